package database_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

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

// A migrator killed (kill -9, a node lost) in the middle of a concurrent
// index build: its lock holder's session ends, releasing the migration
// lock, but the backend building the index knows nothing of that and goes
// on building (here: waiting for an old snapshot, as a build on a busy
// table does). The next migrator, started at once as Kubernetes restarts a
// pod, must not collide with that build (dropping the index under it fails
// with "tuple concurrently updated", or throws the work away): it waits
// for the build to end and keeps the index it built.
func TestAMigratorWaitsForTheIndexBuildAKilledOneLeftRunning(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	direct := connect(t, url)
	proxy, proxied := faultproxy.InFrontOf(t, url)
	killed := connect(t, proxied)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	files := withHostnameIndex(t, "90200_hostname_index.sql")

	// An old snapshot the build must wait for.
	snap, err := direct.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rollbackTx(snap)
	if _, err := snap.Exec(ctx, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"); err != nil {
		t.Fatal(err)
	}
	if _, err := snap.Exec(ctx, "SELECT count(*) FROM site_configs"); err != nil {
		t.Fatal(err)
	}

	first := make(chan error, 1)
	go func() {
		_, err := killed.MigrateWith(ctx, database.MigrateOptions{Expand: files})
		first <- err
	}()
	var building uint32
	var builder int // the killed migrator's building backend
	if !wait.Until(30*time.Second, func() bool {
		err := direct.Pool().QueryRow(ctx, `SELECT COALESCE((SELECT index_relid FROM pg_stat_progress_create_index WHERE relid = 'replicas'::regclass), 0), COALESCE((SELECT pid FROM pg_stat_progress_create_index WHERE relid = 'replicas'::regclass), 0)`).Scan(&building, &builder)
		return err == nil && building != 0
	}) {
		t.Fatal("the first migrator never started building the index")
	}
	proxy.Cut() // kill -9: every connection of the first migrator closes
	<-first
	lockFree := func() bool {
		var n int
		err := direct.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`).Scan(&n)
		return err == nil && n == 0
	}
	if !wait.Until(30*time.Second, lockFree) {
		t.Fatal("the killed migrator's lock was never released")
	}

	// The premise: the killed migrator's build goes on in its backend.
	// Postgres sometimes notices the closed connection and ends the build
	// (then the leftover is merely invalid: dropping it and building again
	// is right, and only the outcome is checked).
	var leftRunning bool
	if err := direct.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index WHERE pid = $1)`, builder).Scan(&leftRunning); err != nil {
		t.Fatal(err)
	}
	if !leftRunning {
		t.Log("Postgres ended the killed migrator's build itself: checking only that the next migrator builds the index")
		if err := snap.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := direct.MigrateWith(ctx, database.MigrateOptions{Expand: files}); err != nil {
			t.Fatalf("the migrator started after one was killed mid-build failed: %v", err)
		}
		var valid bool
		if err := direct.Pool().QueryRow(ctx, `SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('replicas_hostname_idx')`).Scan(&valid); err != nil || !valid {
			t.Fatalf("the index is not valid (%v)", err)
		}
		assertEachAppliedOnce(t, direct, files)
		return
	}

	core, logs := observer.New(zap.InfoLevel)
	second := make(chan error, 1)
	go func() {
		_, err := direct.MigrateWith(ctx, database.MigrateOptions{Expand: files, Logger: zap.New(core)})
		second <- err
	}()
	// The second migrator found the leftover and decided what to do with
	// it: drop it (it is invalid while it builds), or wait for the build.
	if !wait.Until(60*time.Second, func() bool {
		var drops int
		err := direct.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'DROP INDEX%'`).Scan(&drops)
		return (err == nil && drops > 0) || logs.FilterMessageSnippet("index build").Len() > 0
	}) {
		for _, e := range logs.All() {
			t.Logf("second migrator: %s %v", e.Message, e.ContextMap())
		}
		rows, err := direct.Pool().Query(ctx, `SELECT pid, state, COALESCE(wait_event_type, ''), COALESCE(wait_event, ''), left(query, 120) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()`)
		if err == nil {
			for rows.Next() {
				var pid int
				var st, wt, we, q string
				if rows.Scan(&pid, &st, &wt, &we, &q) == nil {
					t.Logf("backend %d %s %s/%s: %s", pid, st, wt, we, q)
				}
			}
			rows.Close()
		}
		t.Fatal("the second migrator never got to the leftover index")
	}
	if err := snap.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatalf("the migrator started after one was killed mid-build failed: %v", err)
	}
	var valid bool
	var oid uint32
	if err := direct.Pool().QueryRow(ctx, `SELECT indexrelid, indisvalid FROM pg_index WHERE indexrelid = to_regclass('replicas_hostname_idx')`).Scan(&oid, &valid); err != nil {
		t.Fatal(err)
	}
	if !valid {
		t.Error("the index is not valid")
	}
	if oid != building {
		t.Errorf("the index the killed migrator's build finished was dropped and built again (oid %d, then %d)", building, oid)
	}
	assertEachAppliedOnce(t, direct, files)
}

// withHostnameIndex is the shipped expand migrations and, named name, a
// NO TRANSACTION one building replicas_hostname_idx concurrently.
func withHostnameIndex(t *testing.T, name string) []migrations.File {
	t.Helper()
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	idx, err := migrations.Parse(name, migrations.KindExpand, []byte(`-- +goose NO TRANSACTION
-- +goose Up
CREATE INDEX CONCURRENTLY IF NOT EXISTS replicas_hostname_idx ON replicas (hostname);
`))
	if err != nil {
		t.Fatal(err)
	}
	return append(shipped, idx)
}

func rollbackTx(tx interface{ Rollback(context.Context) error }) {
	_ = tx.Rollback(context.Background())
}

// Two finalizes at once, A and B. Both raise the schema floor (A raises
// it, B finds it raised); A then sees an old replica that registered in
// between and is refused, so it puts the floor back; B, which checked
// before the replica registered, applies the contract step. Whatever the
// order of A's restore and B's step, the contract step must never end up
// applied below the floor: releases too old for it would start on the
// contracted schema, and a replica of such a release that registered in
// between would keep running.
func TestARefusedFinalizeNeverLowersTheFloorUnderAContractStep(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	next, contract := nextRelease(t)
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	nextOpts := database.MigrateOptions{Release: "v-next", Expand: next, Contract: contract}
	setup := func(t *testing.T) *database.DB {
		db := connect(t, dbtest.NewURL(t))
		if _, err := db.MigrateWith(ctx, nextOpts); err != nil {
			t.Fatal(err)
		}
		return db
	}
	tooOld := func(t *testing.T, db *database.DB, when string) {
		t.Helper()
		var e *database.TooOldError
		if err := db.CheckSchemaFloor(ctx, "v-n", migrations.Known(shipped)); !errors.As(err, &e) {
			t.Errorf("%s: release N may start on the contracted schema (floor check: %v)", when, err)
		}
	}

	t.Run("B's step, then A's restore", func(t *testing.T) {
		t.Parallel()
		db := setup(t)
		restoreA, raisedA, err := database.RaiseSchemaFloor(ctx, db, 90002, "v-next")
		if err != nil || !raisedA {
			t.Fatalf("A raises the floor: %v, raised %v", err, raisedA)
		}
		if _, raisedB, err := database.RaiseSchemaFloor(ctx, db, 90002, "v-next"); err != nil || raisedB {
			t.Fatalf("B finds it raised: %v, raised %v", err, raisedB)
		}
		if err := database.ApplyContractStep(ctx, db, nextOpts, contract[0]); err != nil {
			t.Fatalf("B applies the contract step: %v", err)
		}
		if err := restoreA(); err != nil {
			t.Fatalf("A puts the floor back: %v", err)
		}
		tooOld(t, db, "after A's restore")
	})

	t.Run("A's restore, then B's step", func(t *testing.T) {
		t.Parallel()
		db := setup(t)
		restoreA, _, err := database.RaiseSchemaFloor(ctx, db, 90002, "v-next")
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := database.RaiseSchemaFloor(ctx, db, 90002, "v-next"); err != nil {
			t.Fatal(err)
		}
		if err := restoreA(); err != nil {
			t.Fatalf("A puts the floor back: %v", err)
		}
		err = database.ApplyContractStep(ctx, db, nextOpts, contract[0])
		var legacy bool
		if err := db.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'next_release_widgets' AND column_name = 'legacy')`).Scan(&legacy); err != nil {
			t.Fatal(err)
		}
		if !legacy {
			tooOld(t, db, "after B's step")
		}
		if err == nil && legacy {
			t.Error("B reported the step applied, but it did not run")
		}
		if err != nil && !strings.Contains(err.Error(), "floor") {
			t.Errorf("B's step refused without saying why: %v", err)
		}
	})
}

// Postgres restarts (a failover, a minor upgrade) while a replica of the
// next release migrates, here while it waits for a table lock: the
// migrator rides through it as a running replica does, and finishes once
// Postgres is back, instead of failing the replica's start.
func TestAMigrationRidesThroughAPostgresRestart(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db := connect(t, cluster.URL())
	expand, _ := nextRelease(t)

	reader, err := pgx.Connect(ctx, cluster.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close(context.Background())
	if _, err := reader.Exec(ctx, "BEGIN; LOCK TABLE replicas IN ACCESS SHARE MODE"); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	migrated := make(chan error, 1)
	go func() {
		_, err := db.MigrateWith(ctx, database.MigrateOptions{Expand: expand, Logger: zap.New(core)})
		migrated <- err
	}()
	wait.For(t, 30*time.Second, "the migration waits for the table lock", func() bool {
		return logs.FilterMessageSnippet("waiting for a table lock").Len() > 0
	})
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	// Down long enough for the migrator to try again meanwhile.
	var result error
	ended := false
	wait.For(t, 30*time.Second, "the migrator tries again while Postgres is down (or gives up)", func() bool {
		select {
		case result = <-migrated:
			ended = true
			return true
		default:
		}
		return logs.FilterMessageSnippet("lost the database").Len() > 1
	})
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !ended {
		result = <-migrated
	}
	if result != nil {
		t.Fatalf("the migration failed across a Postgres restart: %v", result)
	}
	assertEachAppliedOnce(t, db, expand)
}

// A concurrent index build waits for every transaction whose snapshot is
// older than its own, including a statement blocked on the migration
// lock. A release before expand/contract restarting during the build (it
// blocks on the lock at every start) and a finalize raising the schema
// floor (it blocks on the lock too) must neither wait for the build's
// lock holder nor be waited for by the build: all of them finish.
func TestAnIndexBuildAndTheOldReleaseOrAFinalizeStartingDuringItAllFinish(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	db := connect(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	files := withHostnameIndex(t, "90201_hostname_index.sql")

	// A writer's open transaction holds the build in its first phase
	// (waiting for writers), before it lists the snapshots it will wait
	// for at the end, until the others are waiting on the lock.
	snap, err := db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer rollbackTx(snap)
	if _, err := snap.Exec(ctx, "LOCK TABLE replicas IN ROW EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	build := make(chan error, 1)
	go func() {
		_, err := db.MigrateWith(ctx, database.MigrateOptions{Expand: files})
		build <- err
	}()
	if !wait.Until(30*time.Second, func() bool {
		var n int
		err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_progress_create_index WHERE relid = 'replicas'::regclass`).Scan(&n)
		return err == nil && n > 0
	}) {
		t.Fatal("the index build never started")
	}
	old := make(chan error, 1)
	go func() { old <- previousReleaseMigrate(ctx, connect(t, url)) }()
	floor := make(chan error, 1)
	go func() {
		_, _, err := database.RaiseSchemaFloor(ctx, connect(t, url), 1, "v-test")
		floor <- err
	}()
	// Give both a moment to block (or not) on the migration lock before
	// the build may proceed; the outcome must not depend on it.
	if !wait.Until(5*time.Second, func() bool {
		var n int
		err := db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND wait_event = 'advisory'`).Scan(&n)
		return err == nil && n >= 2
	}) {
		t.Log("the old release and the finalize did not wait on the migration lock")
	}
	if err := snap.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for name, ch := range map[string]chan error{"the index build": build, "the previous release's start": old, "the schema floor's raise": floor} {
		select {
		case err := <-ch:
			if err != nil {
				t.Errorf("%s failed: %v", name, err)
			}
		case <-time.After(45 * time.Second):
			t.Fatalf("%s never finished (deadlocked with the build?)", name)
		}
	}
	assertEachAppliedOnce(t, db, files)
}
