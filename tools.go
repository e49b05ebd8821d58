//go:build tools

// Package tools pins modules the project needs before any package imports
// them; it is never built.
package tools

import (
	_ "github.com/google/uuid"
	_ "github.com/jackc/pgx/v5/pgxpool"
	_ "github.com/pressly/goose/v3"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/spf13/cobra"
	_ "go.uber.org/zap"
	_ "tailscale.com/derp/derphttp"
	_ "tailscale.com/derp/derpserver"
)
