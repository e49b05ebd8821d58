// Package dbtest gives every test a fresh, migrated Postgres database in
// milliseconds: one throwaway cluster per test process (or the server named
// by CODER_TEST_PG_URL), a template database migrated once, and a new
// database cloned from it per test.
//
// Packages that use it call dbtest.Main (or MainLeakChecked) from TestMain
// so the cluster is stopped and removed when the tests end.
package dbtest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/postgres"
	"github.com/coder-ha/coder/migrations"
)

// EnvURL names an existing Postgres server (a URL whose user may create
// databases) to use instead of starting a throwaway cluster.
const EnvURL = "CODER_TEST_PG_URL"

var (
	setupOnce sync.Once
	setupErr  error
	adminURL  string
	template  string
	cluster   *postgres.Cluster
	tmpDir    string
)

// Main runs m and then stops the throwaway cluster, if one was started.
func Main(m *testing.M) {
	code := m.Run()
	Shutdown()
	os.Exit(code)
}

// MainLeakChecked is Main, failing the package when its tests leave a
// goroutine running (goleak): every goroutine must have an owner that
// stops and waits for it. opts ignore goroutines the package does not own
// (a library's background worker).
func MainLeakChecked(m *testing.M, opts ...goleak.Option) {
	code := m.Run()
	Shutdown()
	if code == 0 {
		if err := goleak.Find(opts...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: goroutines left running after the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// Shutdown stops and removes the process's throwaway cluster.
func Shutdown() {
	if cluster != nil {
		_ = cluster.Close()
		cluster = nil
	}
	if tmpDir != "" {
		_ = os.RemoveAll(tmpDir)
		tmpDir = ""
	}
}

// NewCluster starts a dedicated cluster that only this test uses, for tests
// that stop and restart the database. It is removed at cleanup.
func NewCluster(t testing.TB) *postgres.Cluster {
	t.Helper()
	dir, err := os.MkdirTemp("", "coder-test-pg-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Ephemeral: true})
	if err != nil {
		t.Fatalf("start test postgres: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	db, err := database.Connect(ctx, c.URL(), database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Migrate(ctx, nil); err != nil {
		t.Fatal(err)
	}
	return c
}

// NewURL returns the URL of a new migrated database that only t uses. It is
// dropped at cleanup (after every cleanup registered later has run).
func NewURL(t testing.TB) string {
	t.Helper()
	return newDatabase(t, "test_", cloneTemplate)
}

// NewEmptyURL returns the URL of a new database with no schema at all, for
// tests of what happens on a fresh database (migrations, first start).
func NewEmptyURL(t testing.TB) string {
	t.Helper()
	return newDatabase(t, "empty_", func(ctx context.Context, conn *pgx.Conn, name string) error {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+name)
		return err
	})
}

// newDatabase creates a uniquely named database with create, drops it at
// cleanup, and returns its URL.
func newDatabase(t testing.TB, prefix string, create func(context.Context, *pgx.Conn, string) error) string {
	t.Helper()
	setupOnce.Do(func() { setupErr = setup() })
	if setupErr != nil {
		t.Fatalf("test postgres: %v", setupErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	name := prefix + strings.ReplaceAll(uuid.NewString(), "-", "")
	if err := withAdmin(ctx, func(conn *pgx.Conn) error { return create(ctx, conn, name) }); err != nil {
		t.Fatalf("create test database: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = withAdmin(ctx, func(conn *pgx.Conn) error {
			_, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
			return err
		})
	})
	return withDatabase(adminURL, name)
}

// NewDB connects to a new migrated database that only t uses.
func NewDB(t testing.TB) *database.DB {
	t.Helper()
	u := NewURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	db, err := database.Connect(ctx, u, database.ConnectOptions{MaxConns: 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

func setup() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	adminURL = os.Getenv(EnvURL)
	if adminURL == "" {
		dir, err := os.MkdirTemp("", "coder-test-pg-*")
		if err != nil {
			return err
		}
		tmpDir = dir
		c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Ephemeral: true, MaxConnections: 1000})
		if err != nil {
			return err
		}
		cluster = c
		adminURL = c.DatabaseURL("postgres")
	}
	sum, err := migrationsHash()
	if err != nil {
		return err
	}
	template = "coder_template_" + sum[:16]
	return withAdmin(ctx, func(conn *pgx.Conn) error {
		// Several test processes may share one server: one builds the template.
		if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock(7386412099)"); err != nil {
			return err
		}
		defer conn.Exec(context.Background(), "SELECT pg_advisory_unlock(7386412099)") //nolint:errcheck
		var exists bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", template).Scan(&exists); err != nil {
			return err
		}
		if exists {
			return nil
		}
		building := template + "_building"
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+building+" WITH (FORCE)"); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, "CREATE DATABASE "+building); err != nil {
			return err
		}
		db, err := database.Connect(ctx, withDatabase(adminURL, building), database.ConnectOptions{})
		if err != nil {
			return err
		}
		err = db.Migrate(ctx, nil)
		db.Close()
		if err != nil {
			return err
		}
		_, err = conn.Exec(ctx, "ALTER DATABASE "+building+" RENAME TO "+template)
		return err
	})
}

// cloneTemplate creates name from the template. Postgres refuses to copy a
// database that another session is copying at the same moment (55006), so
// clashes are retried.
func cloneTemplate(ctx context.Context, conn *pgx.Conn, name string) error {
	for {
		_, err := conn.Exec(ctx, "CREATE DATABASE "+name+" TEMPLATE "+template)
		var pgErr *pgconn.PgError
		if err == nil || !errors.As(err, &pgErr) || pgErr.Code != "55006" {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func withAdmin(ctx context.Context, f func(*pgx.Conn) error) error {
	conn, err := pgx.Connect(ctx, adminURL)
	if err != nil {
		return fmt.Errorf("connect to %s: %s", database.Describe(adminURL), database.Redact(adminURL, err.Error()))
	}
	defer conn.Close(context.Background())
	return f(conn)
}

func withDatabase(rawURL, db string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		panic(err)
	}
	u.Path = "/" + db
	return u.String()
}

func migrationsHash() (string, error) {
	files, err := migrations.Expand()
	if err != nil {
		return "", err
	}
	h := sha256.New()
	for _, f := range files {
		h.Write([]byte(f.Name))
		for _, s := range f.Statements {
			h.Write([]byte(s))
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Querier is what AppliedCounts reads through: a pool, a connection or a
// transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// AppliedCounts is how many times goose_db_version records each applied
// version: a migration applied twice shows as 2.
func AppliedCounts(t testing.TB, q Querier) map[int64]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rows, err := q.Query(ctx, `SELECT version_id, count(*) FROM goose_db_version WHERE is_applied GROUP BY version_id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[int64]int{}
	for rows.Next() {
		var v int64
		var n int
		if err := rows.Scan(&v, &n); err != nil {
			t.Fatal(err)
		}
		out[v] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}
