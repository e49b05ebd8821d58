package database_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/pgbouncertest"
	"github.com/coder-ha/coder/migrations"
)

// nextRelease is the shipped migrations plus the test-only next
// release's (migrations/testrelease), as a binary built with the
// upgradetest tag carries them.
func nextRelease(t *testing.T) (expand, contract []migrations.File) {
	t.Helper()
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	more, err := migrations.Load(os.DirFS("../migrations/testrelease"), ".", migrations.KindExpand)
	if err != nil {
		t.Fatal(err)
	}
	contract, err = migrations.Load(os.DirFS("../migrations/testrelease/contract"), ".", migrations.KindContract)
	if err != nil {
		t.Fatal(err)
	}
	return append(shipped, more...), contract
}

func connect(t *testing.T, url string) *database.DB {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := database.Connect(ctx, url, database.ConnectOptions{MaxConns: 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

func assertEachAppliedOnce(t *testing.T, db *database.DB, files []migrations.File) {
	t.Helper()
	counts := dbtest.AppliedCounts(t, db.Pool())
	for _, f := range files {
		if counts[f.Version] != 1 {
			t.Errorf("migration %s recorded %d times, want once", f.Name, counts[f.Version])
		}
	}
	if counts[0] != 1 {
		t.Errorf("goose's version 0 row recorded %d times, want once (releases that run goose need it)", counts[0])
	}
}

// Migrators through PgBouncer in transaction pooling share no session: a
// session advisory lock excludes nobody there. Ten at once on an empty
// database still apply every migration exactly once, the concurrent index
// build of the next release included, and none fails.
func TestMigratorsThroughPgBouncerApplyEachMigrationOnce(t *testing.T) {
	t.Parallel()
	bouncer := pgbouncertest.Start(t, dbtest.NewEmptyURL(t))
	expand, _ := nextRelease(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db, err := database.Connect(ctx, bouncer, database.ConnectOptions{})
			if err != nil {
				errs <- err
				return
			}
			defer db.Close()
			_, err = db.MigrateWith(ctx, database.MigrateOptions{Expand: expand, Release: "v-next"})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("migrator failed: %v", err)
		}
	}
	assertEachAppliedOnce(t, connect(t, bouncer), expand)
}

// previousReleaseMigrate is what 41c5966 (the release before
// expand/contract) runs at every start: goose's provider under a session
// advisory lock, with the migrations it carried (00001 only).
func previousReleaseMigrate(ctx context.Context, db *database.DB) error {
	init, err := os.ReadFile("../migrations/00001_init.sql")
	if err != nil {
		return err
	}
	conn, err := db.Pool().Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(7_386_412_001)); err != nil {
		return err
	}
	defer func() { _, _ = conn.Exec(context.Background(), "SELECT pg_advisory_unlock($1)", int64(7_386_412_001)) }()
	sqlDB := stdlib.OpenDBFromPool(db.Pool())
	defer sqlDB.Close()
	provider, err := goose.NewProvider(goose.DialectPostgres, sqlDB, fstest.MapFS{"00001_init.sql": {Data: init}})
	if err != nil {
		return err
	}
	_, err = provider.Up(ctx)
	return err
}

// An old binary (41c5966) and a new one starting at once on an empty
// database never both migrate: the new runner's transaction lock and the
// old one's session lock are the same advisory lock.
func TestPreviousReleaseAndNewMigratorsNeverBothMigrate(t *testing.T) {
	t.Parallel()
	expand, _ := nextRelease(t)
	for round := 0; round < 4; round++ {
		url := dbtest.NewEmptyURL(t)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		var wg sync.WaitGroup
		errs := make(chan error, 6)
		for i := 0; i < 3; i++ {
			wg.Add(2)
			go func() {
				defer wg.Done()
				db := connect(t, url)
				errs <- previousReleaseMigrate(ctx, db)
			}()
			go func() {
				defer wg.Done()
				db := connect(t, url)
				_, err := db.MigrateWith(ctx, database.MigrateOptions{Expand: expand})
				errs <- err
			}()
		}
		wg.Wait()
		cancel()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("round %d: migrator failed: %v", round, err)
			}
		}
		assertEachAppliedOnce(t, connect(t, url), expand)
	}
}

// The previous release's goose, started on the new schema (a restart of
// an old replica during the rolling upgrade, or a rollback), finds nothing
// to do and no error: versions it does not know are newer, not missing.
func TestPreviousReleaseStartsOnTheNewSchema(t *testing.T) {
	t.Parallel()
	expand, _ := nextRelease(t)
	db := connect(t, dbtest.NewEmptyURL(t))
	ctx := context.Background()
	if _, err := db.MigrateWith(ctx, database.MigrateOptions{Expand: expand}); err != nil {
		t.Fatal(err)
	}
	before := dbtest.AppliedCounts(t, db.Pool())
	if err := previousReleaseMigrate(ctx, db); err != nil {
		t.Fatalf("the previous release's migrate fails on the new schema: %v", err)
	}
	if after := dbtest.AppliedCounts(t, db.Pool()); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Fatalf("the previous release changed the recorded versions: %v → %v", before, after)
	}
}

// A reader holds a lock on replicas (a report, pg_dump) while the next
// release's migration alters the table. The migration waits in short
// attempts, so the heartbeats of the running replicas (UPDATEs queued
// behind its lock request) are delayed by at most about one lock_timeout,
// never for the reader's whole transaction; the migration is applied once
// the reader is done, and the log says it was waiting.
func TestMigrationWaitsForTableLocksWithoutHoldingUpHeartbeats(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	db := connect(t, url)
	expand, _ := nextRelease(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// A running replica's heartbeat, every 100 ms.
	st := database.ReplicaState{ID: uuid.New(), Hostname: "old", RegionID: 999, RelayAddress: "http://127.0.0.1:1", Version: "v-old"}
	if _, err := db.BeatReplica(ctx, st); err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		longest  time.Duration
		failures int
	)
	stopBeats := make(chan struct{})
	beatsDone := make(chan struct{})
	go func() {
		defer close(beatsDone)
		for {
			select {
			case <-stopBeats:
				return
			case <-time.After(100 * time.Millisecond):
			}
			bctx, bcancel := context.WithTimeout(ctx, 5*time.Second)
			start := time.Now()
			_, err := db.BeatReplica(bctx, st)
			took := time.Since(start)
			bcancel()
			mu.Lock()
			longest = max(longest, took)
			if err != nil {
				failures++
			}
			mu.Unlock()
		}
	}()

	reader, err := pgx.Connect(ctx, url)
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
	const hold = 8 * time.Second
	select {
	case err := <-migrated:
		t.Fatalf("the migration finished while a reader held a lock on replicas: %v", err)
	case <-time.After(hold):
	}
	if _, err := reader.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	released := time.Now()
	if err := <-migrated; err != nil {
		t.Fatal(err)
	}
	t.Logf("migration done %s after the reader let go", time.Since(released).Round(time.Millisecond))
	close(stopBeats)
	<-beatsDone
	mu.Lock()
	defer mu.Unlock()
	t.Logf("longest heartbeat during the migration: %s", longest.Round(time.Millisecond))
	if failures != 0 {
		t.Errorf("%d heartbeats failed during the migration", failures)
	}
	if longest > 3*time.Second {
		t.Errorf("a heartbeat waited %s behind the migration (the reader held its lock for %s)", longest.Round(time.Millisecond), hold)
	}
	if logs.FilterMessageSnippet("waiting for a table lock").Len() == 0 {
		t.Error("the log does not say the migration was waiting for a table lock")
	}
	assertEachAppliedOnce(t, db, expand)
}

// Release N runs on N+1's expanded schema and says so; a finalize is
// refused while a live replica runs a release older than the contract
// step, naming it; afterwards a release too old refuses to start, naming
// the oldest release that may.
func TestContractStepsWaitForOldReplicasAndFenceOldReleases(t *testing.T) {
	t.Parallel()
	db := connect(t, dbtest.NewURL(t))
	ctx := context.Background()
	next, contract := nextRelease(t)
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	release := func(version string, expand []migrations.File) database.MigrateOptions {
		return database.MigrateOptions{Release: version, Expand: expand, Contract: []migrations.File{}}
	}
	if _, err := db.MigrateWith(ctx, release("v-n", shipped)); err != nil {
		t.Fatal(err)
	}
	nextOpts := release("v-next", next)
	nextOpts.Contract = contract
	if _, err := db.MigrateWith(ctx, nextOpts); err != nil {
		t.Fatal(err)
	}

	// N on N+1's schema: runs, and knows it.
	st, err := db.MigrateWith(ctx, release("v-n", shipped))
	if err != nil {
		t.Fatalf("release N refuses N+1's expanded schema: %v", err)
	}
	warning := st.SkewWarning("v-n")
	for _, want := range []string{"90002", "v-next", "v-n", fmt.Sprint(migrations.Known(shipped))} {
		if !strings.Contains(warning, want) {
			t.Errorf("skew warning %q does not name %q", warning, want)
		}
	}

	beat := func(host, version string) database.ReplicaState {
		s := database.ReplicaState{ID: uuid.New(), Hostname: host, RegionID: 999, RelayAddress: "http://" + host + ":8080", Version: version}
		if _, err := db.BeatReplica(ctx, s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	oldN := beat("n-host", "v-n")
	older := beat("old-host", "v-old") // 41c5966: never recorded its schema
	beat("next-host", "v-next")

	_, err = db.Finalize(ctx, database.FinalizeOptions{MigrateOptions: nextOpts})
	var refused *database.OldReplicasError
	if !errors.As(err, &refused) {
		t.Fatalf("finalize with old replicas live: %v, want a refusal", err)
	}
	for _, want := range []string{"n-host", "v-n", "old-host", "v-old", "v-next"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not name %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "next-host") {
		t.Errorf("refusal names a replica of the new release: %q", err)
	}
	if st, _ := db.SchemaStatus(ctx, nextOpts); st.MinSchema != 0 || len(st.PendingContract) != 1 {
		t.Fatalf("a refused finalize changed something: floor %d, pending %d", st.MinSchema, len(st.PendingContract))
	}

	for _, s := range []database.ReplicaState{oldN, older} {
		if err := db.MarkReplicaStopped(ctx, s.ID); err != nil {
			t.Fatal(err)
		}
	}
	res, err := db.Finalize(ctx, database.FinalizeOptions{MigrateOptions: nextOpts})
	if err != nil {
		t.Fatalf("finalize once the old replicas left: %v", err)
	}
	if len(res.Applied) != 1 || res.MinSchema != 90002 || res.MinRelease != "v-next" {
		t.Fatalf("finalize result %+v", res)
	}
	var legacy bool
	if err := db.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = 'next_release_widgets' AND column_name = 'legacy')`).Scan(&legacy); err != nil {
		t.Fatal(err)
	}
	if legacy {
		t.Fatal("the contract step did not run")
	}

	_, err = db.MigrateWith(ctx, release("v-n", shipped))
	var tooOld *database.TooOldError
	if !errors.As(err, &tooOld) {
		t.Fatalf("release N after the finalize: %v, want a refusal", err)
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "v-next") || !strings.Contains(msg, "v-n") {
		t.Errorf("refusal %q is not one line naming this release and the oldest that may run", msg)
	}
	if err := db.CheckSchemaFloor(ctx, "v-n", migrations.Known(shipped)); !errors.As(err, &tooOld) {
		t.Errorf("CheckSchemaFloor for release N: %v", err)
	}
	again, err := db.Finalize(ctx, database.FinalizeOptions{MigrateOptions: nextOpts})
	if err != nil || len(again.Applied) != 0 {
		t.Fatalf("a second finalize: %+v, %v", again, err)
	}
}

// A concurrent index build that failed leaves an invalid index behind;
// IF NOT EXISTS alone would keep it forever. The runner drops it and
// builds the index again.
func TestConcurrentIndexBuildReplacesAnInvalidLeftover(t *testing.T) {
	t.Parallel()
	db := connect(t, dbtest.NewURL(t))
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, `INSERT INTO site_configs (key, value) VALUES ('a', 'same'), ('b', 'same')`); err != nil {
		t.Fatal(err)
	}
	// A unique build over duplicates fails and leaves the index invalid.
	if _, err := db.Pool().Exec(ctx, `CREATE UNIQUE INDEX CONCURRENTLY site_configs_value_idx ON site_configs (value)`); err == nil {
		t.Fatal("the unique build succeeded over duplicates")
	}
	f, err := migrations.Parse("00099_value_idx.sql", migrations.KindExpand, []byte(
		"-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY IF NOT EXISTS site_configs_value_idx ON site_configs (value);\n"))
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.MigrateWith(ctx, database.MigrateOptions{Expand: append(shipped, f)}); err != nil {
		t.Fatal(err)
	}
	var valid bool
	if err := db.Pool().QueryRow(ctx, `SELECT indisvalid FROM pg_index WHERE indexrelid = 'site_configs_value_idx'::regclass`).Scan(&valid); err != nil {
		t.Fatal(err)
	}
	if !valid {
		t.Fatal("the invalid index was kept")
	}
}

// An up-to-date database is not locked at all: a start with nothing
// pending only reads, even while another session holds the migration lock.
func TestNothingPendingTakesNoLock(t *testing.T) {
	t.Parallel()
	url := dbtest.NewURL(t)
	db := connect(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	holder, err := sql.Open("pgx", url)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	conn, err := holder.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock(7386412001)"); err != nil {
		t.Fatal(err)
	}
	quick, cancelQuick := context.WithTimeout(ctx, 5*time.Second)
	defer cancelQuick()
	if _, err := db.MigrateWith(quick, database.MigrateOptions{}); err != nil {
		t.Fatalf("an up-to-date start waited for the migration lock: %v", err)
	}
}
