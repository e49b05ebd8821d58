// Package migrations holds the SQL schema as numbered goose migrations,
// embedded in the binary so every replica carries the schema it expects.
// It must never be edited in place once released: add a new file instead.
package migrations

import "embed"

// FS holds the migration files (goose format, "-- +goose Up" sections).
//
//go:embed *.sql
var FS embed.FS
