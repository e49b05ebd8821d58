package database_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
)

// Close may be called more than once, also at the same time; every call
// returns once the pool is closed, and the DB then refuses work with an
// error instead of hanging. (TestMain checks no goroutine is left.)
func TestCloseIsIdempotentAndRefusesWorkAfter(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := database.Connect(ctx, dbtest.NewURL(t), database.ConnectOptions{MaxConns: 4})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Ping(ctx); err != nil {
		t.Fatalf("ping before Close: %v", err)
	}
	wait.Concurrently(3, func() error { db.Close(); return nil })
	db.Close()
	if _, err := db.Ping(ctx); err == nil {
		t.Fatal("ping after Close succeeded")
	}
}
