package database_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
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
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db.Close()
		}()
	}
	wg.Wait()
	db.Close()
	if _, err := db.Ping(ctx); err == nil {
		t.Fatal("ping after Close succeeded")
	}
}
