package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/coder-ha/coder/database/postgres"
	"github.com/coder-ha/coder/internal/wait"
)

// TestMain fails the package when a test leaves a goroutine running (the
// postmaster's waiter has an owner: Stop and Close wait for it).
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The cluster's lifecycle: Stop and Close may each be called more than
// once, also at the same time, and return once the server is gone; Start
// brings a stopped server back with what it stored (the tests restart
// Postgres this way to play an outage), but not a closed one.
func TestStopStartAndCloseAreRepeatable(t *testing.T) {
	if _, err := postgres.FindBinDir(); err != nil {
		t.Skip(err)
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := run(t, postgres.Options{Dir: tempDir(t)})
	exec := func(sql string) error {
		cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
		defer ccancel()
		conn, err := pgx.Connect(cctx, c.URL())
		if err != nil {
			return err
		}
		defer func() { _ = conn.Close(cctx) }()
		_, err = conn.Exec(cctx, sql)
		return err
	}
	if err := exec("CREATE TABLE kept (v int); INSERT INTO kept VALUES (7)"); err != nil {
		t.Fatal(err)
	}

	together := func(f func() error) {
		t.Helper()
		for i, err := range wait.Concurrently(3, f) {
			if err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
		}
	}
	together(c.Stop)
	if err := c.Stop(); err != nil {
		t.Fatalf("Stop after Stop: %v", err)
	}
	if err := exec("SELECT 1"); err == nil {
		t.Fatal("a stopped server answered")
	}
	if err := c.Start(ctx); err != nil {
		t.Fatalf("Start after Stop: %v", err)
	}
	if err := exec("DO $$ BEGIN IF (SELECT v FROM kept) <> 7 THEN RAISE 'lost'; END IF; END $$"); err != nil {
		t.Fatalf("after a restart: %v", err)
	}
	together(c.Close)
	if err := c.Close(); err != nil {
		t.Fatalf("Close after Close: %v", err)
	}
	if err := exec("SELECT 1"); err == nil {
		t.Fatal("a closed server answered")
	}
	if err := c.Start(ctx); err == nil {
		t.Fatal("Start after Close started a server on a released data directory")
	}
}
