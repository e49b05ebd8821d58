package database_test

import (
	"context"
	"errors"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// fillPool makes the pool hold n idle connections.
func fillPool(t *testing.T, db *database.DB, n int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var held []interface{ Release() }
	for i := 0; i < n; i++ {
		c, err := db.Pool().Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	for _, c := range held {
		c.Release()
	}
	if idle := db.Pool().Stat().IdleConns(); idle != int32(n) {
		t.Fatalf("pool holds %d idle connections, want %d", idle, n)
	}
}

// After Postgres restarts, the pool's dead connections are discarded
// before use: the very first heartbeats and token checks all succeed,
// serially and all at once, instead of each dead connection costing one
// failed query.
func TestFirstQueriesAfterAPostgresRestartAllSucceed(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db, err := database.Connect(ctx, cluster.URL(), database.ConnectOptions{MaxConns: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	st := database.ReplicaState{ID: uuid.New(), Hostname: "h", RegionID: 999, RelayAddress: "http://127.0.0.1:1"}

	for round, concurrent := range []bool{true, false} {
		fillPool(t, db, 10)
		if err := cluster.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := cluster.Start(ctx); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for i := 0; i < 20; i++ {
			query := func() {
				defer wg.Done()
				if i%2 == 0 {
					_, err := db.UpsertReplica(ctx, st) // a heartbeat
					errs <- err
					return
				}
				_, err := db.Ping(ctx)
				errs <- err
			}
			wg.Add(1)
			if concurrent {
				go query()
			} else {
				query()
			}
		}
		wg.Wait()
		close(errs)
		failed := 0
		var first error
		for err := range errs {
			if err != nil {
				failed++
				if first == nil {
					first = err
				}
			}
		}
		if failed > 0 {
			t.Fatalf("round %d (concurrent=%v): %d of the first 20 queries after the restart failed: %v", round, concurrent, failed, first)
		}
	}
}

func isReadOnly(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "25006"
}

// A pool whose connections are read-only (a standby, or an old primary
// behind an endpoint that has moved) notices the first SQLSTATE 25006 and
// recycles its connections, so writes succeed again as soon as new
// connections are writable instead of failing on the same stale sessions
// forever.
func TestReadOnlyConnectionsAreRecycledNotRetriedForever(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg := dbtest.NewURL(t)
	admin, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	u, _ := url.Parse(pg)
	name := pgx.Identifier{u.Path[1:]}.Sanitize()
	// Sessions opened now are read-only, as on a standby.
	if _, err := admin.Exec(ctx, "ALTER DATABASE "+name+" SET default_transaction_read_only = on"); err != nil {
		t.Fatal(err)
	}
	db, err := database.Connect(ctx, pg, database.ConnectOptions{MaxConns: 5})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fillPool(t, db, 5)
	st := database.ReplicaState{ID: uuid.New(), Hostname: "h", RegionID: 999, RelayAddress: "http://127.0.0.1:1"}
	if _, err := db.UpsertReplica(ctx, st); !isReadOnly(err) {
		t.Fatalf("a write on a read-only session: %v, want SQLSTATE 25006", err)
	}
	// The server accepts writes again for new sessions (promoted, or the
	// endpoint now leads to the primary); the pooled sessions are stale.
	if _, err := admin.Exec(ctx, "ALTER DATABASE "+name+" RESET default_transaction_read_only"); err != nil {
		t.Fatal(err)
	}
	failed := 0
	for i := 0; i < 10; i++ {
		if _, err := db.UpsertReplica(ctx, st); err != nil {
			if !isReadOnly(err) {
				t.Fatal(err)
			}
			failed++
		}
	}
	if failed > 1 {
		t.Fatalf("%d of 10 writes failed on stale read-only connections after the server became writable; want at most 1", failed)
	}
	if db.Recycles() == 0 {
		t.Fatal("the pool never recycled its read-only connections")
	}
}

// A network path that froze (a middlebox that lost the connections' state:
// open, silent) under a pool of idle connections: the first query that
// times out has every idle connection checked at once, so the next query
// runs on a new connection instead of waiting out a ping of each frozen
// one in turn.
func TestQueryAfterATimeoutDoesNotWaitOutFrozenIdleConnections(t *testing.T) {
	t.Parallel()
	proxy, proxied := faultproxy.InFrontOf(t, dbtest.NewURL(t))
	ctx := context.Background()
	db, err := database.Connect(ctx, proxied, database.ConnectOptions{MaxConns: 10})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fillPool(t, db, 4)
	proxy.Freeze()

	timeout, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = db.Ping(timeout)
	cancel()
	if err == nil {
		t.Fatal("a query on a frozen connection succeeded")
	}
	// Well under one ping timeout (2 s): the frozen idle connections were
	// taken out of the pool before this query asked for one.
	next, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	start := time.Now()
	if _, err := db.Ping(next); err != nil {
		t.Fatalf("the query after the timeout waited on a frozen connection: %v after %s", err, time.Since(start).Round(time.Millisecond))
	}
	t.Logf("the query after the timeout took %s", time.Since(start).Round(time.Millisecond))
	// The frozen connections are closed (and their pool slots free) once
	// their pings time out; the pool serves from new ones.
	wait.For(t, 10*time.Second, "the frozen idle connections closed", func() bool {
		return db.Pool().Stat().AcquiredConns() <= 1 // the one that timed out: pgx closes it itself
	})
	for i := 0; i < 5; i++ {
		q, cancel := context.WithTimeout(ctx, time.Second)
		_, err := db.Ping(q)
		cancel()
		if err != nil {
			t.Fatalf("query %d after the check: %v", i, err)
		}
	}
}
