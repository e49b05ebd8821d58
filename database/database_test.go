package database_test

import (
	"context"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

// Ten replicas starting at once on an empty database each run Migrate; every
// migration is applied exactly once and nobody fails.
func TestConcurrentMigratorsApplyEachMigrationOnce(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// A fresh, empty database of its own (a fixed name made -count=2 and
	// parallel runs collide).
	emptyURL := dbtest.NewEmptyURL(t)

	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			db, err := database.Connect(ctx, emptyURL, database.ConnectOptions{})
			if err != nil {
				errs <- err
				return
			}
			defer db.Close()
			errs <- db.Migrate(ctx, nil)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("migrator failed: %v", err)
		}
	}
	db, err := database.Connect(ctx, emptyURL, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Pool().Query(ctx, "SELECT version_id, count(*) FROM goose_db_version WHERE version_id > 0 GROUP BY version_id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var version, count int64
		if err := rows.Scan(&version, &count); err != nil {
			t.Fatal(err)
		}
		n++
		if count != 1 {
			t.Errorf("migration %d applied %d times, want once", version, count)
		}
	}
	if n == 0 {
		t.Fatal("no migration recorded as applied")
	}
}

// Many replicas asking for the mesh key at once all get the same one, in the
// format the DERP server takes.
func TestMeshKeyIsGeneratedOnceUnderConcurrency(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx := context.Background()
	keys := make(chan string, 16)
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k, err := db.DERPMeshKey(ctx)
			if err != nil {
				t.Error(err)
			}
			keys <- k
		}()
	}
	wg.Wait()
	close(keys)
	first := ""
	for k := range keys {
		if len(k) != 64 {
			t.Fatalf("mesh key %q is not 64 hex characters", k)
		}
		if first == "" {
			first = k
		} else if k != first {
			t.Fatalf("two different mesh keys handed out: %q and %q", first, k)
		}
	}
}

func TestAPIKeyValidatesOnlyTheIssuedToken(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx := context.Background()
	tok, err := db.CreateAPIKey(ctx, "ci")
	if err != nil {
		t.Fatal(err)
	}
	if err := db.ValidateAPIKey(ctx, tok); err != nil {
		t.Fatalf("issued token rejected: %v", err)
	}
	var stored int
	if err := db.Pool().QueryRow(ctx, "SELECT count(*) FROM api_keys WHERE hashed_secret::text LIKE '%' || $1 || '%'", tok[11:]).Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored != 0 {
		t.Fatal("the token's secret is stored in clear")
	}
	for _, bad := range []string{"", "garbage", tok + "x", tok[:11] + "wrongsecretwrongsecret", "abcdefghij-" + tok[11:],
		"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6-" + tok[11:], "é" + tok[2:]} {
		if err := db.ValidateAPIKey(ctx, bad); err != database.ErrInvalidToken {
			t.Errorf("token %q: got %v, want ErrInvalidToken", bad, err)
		}
	}
}

// A wrong password fails at once with a line naming the host, and the
// password appears nowhere in it.
func TestConnectErrorNeverShowsThePassword(t *testing.T) {
	t.Parallel()
	u := dbtest.NewURL(t)
	bad := strings.Replace(u, "@", "x@", 1) // a wrong password
	start := time.Now()
	_, err := database.Connect(context.Background(), bad, database.ConnectOptions{Timeout: 10 * time.Second})
	if err == nil {
		t.Fatal("connected with a wrong password")
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("a refused password took %s to report; it should not be retried", time.Since(start))
	}
	parsed, _ := url.Parse(bad)
	pw, _ := parsed.User.Password()
	if strings.Contains(err.Error(), pw) {
		t.Fatalf("error contains the password: %v", err)
	}
	if !strings.Contains(err.Error(), "127.0.0.1") {
		t.Errorf("error does not name the host: %v", err)
	}
}

// A deleted replica row is recreated by the next upsert, and the live list
// uses the database clock.
func TestReplicaRowSurvivesDeletion(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx := context.Background()
	st := database.ReplicaState{Hostname: "h1", RegionID: 999, RelayAddress: "http://127.0.0.1:1"}
	copy(st.ID[:], []byte("0123456789abcdef"))
	if _, err := db.UpsertReplica(ctx, st); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteReplica(ctx, st.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := db.UpsertReplica(ctx, st); err != nil {
		t.Fatal(err)
	}
	live, err := db.LiveReplicas(ctx, 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(live) != 1 || live[0].ID != st.ID {
		t.Fatalf("live replicas = %+v, want the re-registered one", live)
	}
	if err := db.MarkReplicaStopped(ctx, st.ID); err != nil {
		t.Fatal(err)
	}
	live, err = db.LiveReplicas(ctx, 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(live) != 0 {
		t.Fatalf("a stopped replica is still listed live: %+v", live)
	}
	// What a beat after the stop does is in replicas_test.go: a late beat
	// never revives, the next beat of a live replica does.
}

// A replica whose get-or-init of a site config value (the deployment id,
// the mesh key) runs while another replica's insert of it is in flight
// gets the value that replica stored, not an error: two replicas started
// at once on a fresh database both come up.
func TestSiteConfigInitRacingAnotherReplicasInsert(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The other replica's statement: inserted, not committed yet.
	tx, err := db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	const theirs = "11111111-2222-3333-4444-555555555555"
	if _, err := tx.Exec(ctx, `INSERT INTO site_configs (key, value) VALUES ('deployment_id', $1)`, theirs); err != nil {
		t.Fatal(err)
	}
	type result struct {
		id  string
		err error
	}
	got := make(chan result, 1)
	go func() {
		id, err := db.DeploymentID(ctx)
		got <- result{id, err}
	}()
	// Ours waits on their row lock; then they commit.
	wait.For(t, 10*time.Second, "our statement to wait on the other insert", func() bool {
		var waiting int
		_ = db.Pool().QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting)
		return waiting > 0
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil || r.id != theirs {
		t.Fatalf("deployment id = %q, %v; want the other replica's %q", r.id, r.err, theirs)
	}
}
