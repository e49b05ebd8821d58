package database_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/migrations"
)

// slowAlter is an expand migration (as a test gives it, past the check)
// that alters replicas, then keeps its transaction open a moment: long
// enough for a test to cut the migrator off while it holds ACCESS
// EXCLUSIVE on replicas.
func slowAlter(t *testing.T) []migrations.File {
	t.Helper()
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	f, err := migrations.Parse("90100_slow_alter.sql", migrations.KindExpand, []byte(`-- +goose Up
ALTER TABLE replicas ADD COLUMN frozen_note text;
SELECT pg_sleep(1);
`))
	if err != nil {
		t.Fatal(err)
	}
	return append(shipped, f)
}

// A migrator whose connection goes silent mid-migration (a middlebox that
// lost the connection's state, a paused VM) after its ALTER TABLE took
// ACCESS EXCLUSIVE on replicas: Postgres waits for the next statement of a
// client that will never send one, holding the lock. Every running
// replica's heartbeat must not queue behind it for more than a few
// seconds, let alone forever.
func TestAMigratorCutOffMidTransactionDoesNotHoldUpHeartbeats(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	direct := connect(t, url)
	proxy, proxied := faultproxy.InFrontOf(t, url)
	migrator := connect(t, proxied)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	st := database.ReplicaState{ID: uuid.New(), Hostname: "old", RegionID: 999, RelayAddress: "http://127.0.0.1:1", Version: "v-old"}
	if _, err := direct.BeatReplica(ctx, st); err != nil {
		t.Fatal(err)
	}

	mctx, mcancel := context.WithCancel(ctx)
	migrated := make(chan error, 1)
	go func() {
		_, err := migrator.MigrateWith(mctx, database.MigrateOptions{Expand: slowAlter(t)})
		migrated <- err
	}()
	defer func() {
		proxy.Cut()
		mcancel()
		<-migrated
	}()
	// The ALTER is done and its lock held once the sleep runs.
	if !wait.Until(30*time.Second, func() bool {
		var n int
		err := direct.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND query LIKE 'SELECT pg_sleep(1)%'`).Scan(&n)
		return err == nil && n == 1
	}) {
		t.Fatal("the migration never reached its second statement")
	}
	proxy.Freeze()

	bctx, bcancel := context.WithTimeout(ctx, 20*time.Second)
	defer bcancel()
	start := time.Now()
	_, err := direct.BeatReplica(bctx, st)
	took := time.Since(start)
	t.Logf("heartbeat after the migrator went silent: %s (err %v)", took.Round(time.Millisecond), err)
	if err != nil {
		t.Fatalf("a heartbeat failed behind a migrator that went silent holding its lock (waited %s): %v", took.Round(time.Millisecond), err)
	}
	if took > 6*time.Second {
		t.Errorf("a heartbeat waited %s behind a migrator that went silent holding its lock", took.Round(time.Millisecond))
	}
}

// A migrator that is merely slow (a stall longer than IdleTimeout between
// two statements) has its session ended by Postgres: it tries again and
// completes, instead of failing the replica's start.
func TestASlowMigratorWhoseSessionWasEndedTriesAgain(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	direct := connect(t, url)
	proxy, proxied := faultproxy.InFrontOf(t, url)
	migrator := connect(t, proxied)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	files := slowAlter(t)
	migrated := make(chan error, 1)
	go func() {
		_, err := migrator.MigrateWith(ctx, database.MigrateOptions{Expand: files, IdleTimeout: 300 * time.Millisecond})
		migrated <- err
	}()
	if !wait.Until(30*time.Second, func() bool {
		var n int
		err := direct.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active' AND query LIKE 'SELECT pg_sleep(1)%'`).Scan(&n)
		return err == nil && n == 1
	}) {
		t.Fatal("the migration never reached its second statement")
	}
	proxy.Stall()
	if !wait.Until(30*time.Second, func() bool {
		var n int
		err := direct.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep(1)%'`).Scan(&n)
		return err == nil && n == 0
	}) {
		t.Fatal("Postgres never ended the session of the stalled migrator")
	}
	proxy.Unstall()
	if err := <-migrated; err != nil {
		t.Fatalf("a migrator whose session was ended while it stalled gave up: %v", err)
	}
	assertEachAppliedOnce(t, direct, files)
}
