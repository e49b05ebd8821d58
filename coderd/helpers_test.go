package coderd

import (
	"context"
	"testing"

	"go.uber.org/zap/zaptest"
)

// startServer starts a replica with cfg for the test (failing it when New
// does) and shuts it down when the test ends.
func startServer(ctx context.Context, t *testing.T, cfg Config) *Server {
	t.Helper()
	s, err := New(ctx, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return s
}
