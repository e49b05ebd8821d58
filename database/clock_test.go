package database_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder/quartz"
	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
)

// quietFor is how long a test watches, on real time, that nothing happens
// before the injected clock is stepped: many times the pause the code
// would take on a real clock.
const quietFor = 2 * time.Second

// A Connect that found the server down pauses on its clock between
// attempts: the server coming back is not enough, the attempt after the
// pause is what connects.
func TestConnectRetriesWhenItsClockSaysSo(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cluster := dbtest.NewCluster(t)
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	clock := quartz.NewMock(t)
	pause := clock.Trap().NewTimer("database", "connect")
	defer pause.Close()

	type result struct {
		db  *database.DB
		err error
	}
	done := make(chan result, 1)
	go func() {
		db, err := database.Connect(ctx, cluster.URL(), database.ConnectOptions{Clock: clock, Timeout: time.Minute})
		done <- result{db, err}
	}()
	call := pause.MustWait(trapCtx(t, ctx)) // refused: Connect pauses before trying again
	call.MustRelease(ctx)
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if wait.Until(quietFor, func() bool { return len(done) > 0 }) {
		r := <-done
		if r.db != nil {
			r.db.Close()
		}
		t.Fatalf("Connect returned (err %v) before its clock moved past the %s pause", r.err, call.Duration)
	}
	clock.Advance(call.Duration).MustWait(ctx)
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("connect after the pause: %v", r.err)
		}
		defer r.db.Close()
		if _, err := r.db.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	case <-ctx.Done():
		t.Fatal("Connect did not return after its clock moved past the pause")
	}
}

// A migrator that finds the migration lock taken waits out its retry
// pause on its clock: the lock being released is not enough, the attempt
// after the pause is what migrates.
func TestMigrationLockRetryWaitsForItsClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	url := dbtest.NewEmptyURL(t)
	db := connect(t, url)

	holder, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background()) //nolint:errcheck
	// Another migrator holds the migration lock (migrationLockID).
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(7386412001)`); err != nil {
		t.Fatal(err)
	}

	clock := quartz.NewMock(t)
	pause := clock.Trap().NewTimer("database", "migrate", "retry")
	defer pause.Close()
	done := make(chan error, 1)
	go func() {
		_, err := db.MigrateWith(ctx, database.MigrateOptions{Clock: clock})
		done <- err
	}()
	call := pause.MustWait(trapCtx(t, ctx)) // the lock is taken: the migrator pauses
	call.MustRelease(ctx)
	if err := tx.Commit(ctx); err != nil { // releases the lock
		t.Fatal(err)
	}
	if wait.Until(quietFor, func() bool { return len(done) > 0 }) {
		t.Fatalf("the migration ended (err %v) before its clock moved past the %s pause", <-done, call.Duration)
	}
	var started bool
	if err := db.Pool().QueryRow(ctx, `SELECT to_regclass('goose_db_version') IS NOT NULL`).Scan(&started); err != nil {
		t.Fatal(err)
	}
	if started {
		t.Fatal("the migrator took the lock before its clock moved past its pause")
	}
	clock.Advance(call.Duration).MustWait(ctx)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("migrate after the pause: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the migration did not finish after its clock moved past the pause")
	}
	st, err := db.MigrateWith(ctx, database.MigrateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Pending) > 0 {
		t.Fatalf("still pending after the migration: %v", st.Pending)
	}
}

// trapCtx bounds the wait for the code to reach a trapped timer: it does
// at once if it takes its pauses on the injected clock.
func trapCtx(t *testing.T, ctx context.Context) context.Context {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
