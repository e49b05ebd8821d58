package database_test

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
)

// A URL file that cannot be used is an error naming the path and the
// reason, never what the file holds (it may be a password put in the
// wrong place).
func TestURLFileErrorsNameThePathNeverTheContents(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := map[string]string{
		filepath.Join(dir, "missing"):                    "no such file",
		write("empty", "\n"):                             "is empty",
		write("garbage", "s3cret-not-a-url\n"):           "does not hold a valid postgres URL",
		write("two", "postgres://a:s3cret@h/db\nmore\n"): "more than one line",
		dir: "",
		write("big", strings.Repeat("s3cret", 20000)):         "larger than",
		write("badparam", "postgres://a:s3cret@h/db?port=xx"): "does not hold a valid postgres URL",
	}
	for path, want := range cases {
		_, err := database.URLFile(path)
		if err == nil {
			t.Fatalf("%s: no error", path)
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %q does not name the path and %q", path, err, want)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: error shows the contents: %q", path, err)
		}
	}
	src, err := database.URLFile(write("good", "  postgres://u:p4ss@127.0.0.1:5432/db \n"))
	if err != nil {
		t.Fatal(err)
	}
	if u, _ := src.Read(); u != "postgres://u:p4ss@127.0.0.1:5432/db" {
		t.Fatalf("read %q", u)
	}
	if got := src.Describe(); got != "127.0.0.1:5432/db" {
		t.Fatalf("describe %q", got)
	}
}

// The pool and OpenConn read the file for every connection they open: once
// the password is rotated (ALTER ROLE, the file replaced, every backend
// terminated) both work on new connections, and Redact removes the old
// password as well as the new one.
func TestConnectionsOpenedAfterARotationUseTheNewURL(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	admin := dbtest.NewURL(t)
	adminConn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	defer adminConn.Close(ctx)
	role := fmt.Sprintf("rot_unit_%d", time.Now().UnixNano())
	exec := func(sql string) {
		t.Helper()
		if _, err := adminConn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec("CREATE ROLE " + role + " LOGIN PASSWORD 'first-pw-1234'")
	t.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), admin)
		if err == nil {
			_, _ = c.Exec(context.Background(), "DROP ROLE IF EXISTS "+role)
			_ = c.Close(context.Background())
		}
	})
	au, _ := url.Parse(admin)
	withPassword := func(pw string) string {
		u := *au
		u.User = url.UserPassword(role, pw)
		return u.String()
	}
	file := filepath.Join(t.TempDir(), "url")
	if err := os.WriteFile(file, []byte(withPassword("first-pw-1234")), 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := database.URLFile(file)
	if err != nil {
		t.Fatal(err)
	}
	db, err := database.ConnectSource(ctx, src, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	exec("ALTER ROLE " + role + " PASSWORD 'second-pw-5678'")
	tmp := file + ".new"
	if err := os.WriteFile(tmp, []byte(withPassword("second-pw-5678")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, file); err != nil {
		t.Fatal(err)
	}
	exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '" + role + "'")
	// pg_terminate_backend only signals: a query sent before the backend
	// has exited gets its FATAL 57P01 (under load, often). The rotation is
	// done once they are gone.
	wait.For(t, 10*time.Second, "the role's backends exit", func() bool {
		var n int
		return adminConn.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role).Scan(&n) == nil && n == 0
	})
	if _, err := db.Ping(ctx); err != nil {
		t.Fatalf("a pooled query after the rotation: %v", err)
	}
	conn, err := db.OpenConn(ctx)
	if err != nil {
		t.Fatalf("a dedicated connection after the rotation: %v", err)
	}
	_ = conn.Close(ctx)
	if got := db.Redact("first-pw-1234 second-pw-5678"); strings.Contains(got, "pw") {
		t.Fatalf("Redact left a password: %q", got)
	}
}

// A URL whose password holds an unencoded '/', '?' or '#' puts parts of
// the password in the host, path or query: it is refused, and Describe
// never shows those parts. An '@' inside a query value (a password given
// as ?password=…) is a plain URL and is accepted.
func TestURLWithAnUnencodedPasswordIsRefusedWithoutShowingIt(t *testing.T) {
	t.Parallel()
	refused := []string{
		"postgres://coder:4417/s3cret@127.0.0.1:5432/coder",
		"postgresql://coder:12?s3cret@127.0.0.1:5432/coder",
		"postgres://coder:12#s3cret@127.0.0.1:5432/coder",
	}
	for _, raw := range refused {
		if got := database.Describe(raw); strings.Contains(got, "s3cret") || strings.Contains(got, "12") {
			t.Errorf("Describe(%q) = %q shows part of the password", raw, got)
		}
		p := filepath.Join(t.TempDir(), "url")
		if err := os.WriteFile(p, []byte(raw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := database.URLFile(p)
		if err == nil || !strings.Contains(err.Error(), "percent-encoded") || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("URLFile(%q): %v, want a refusal saying what to encode, without the password", raw, err)
		}
	}
	accepted := map[string]string{
		"postgres://127.0.0.1:5432/coder?user=coder&password=p@ss":     "127.0.0.1:5432/coder",
		"postgres://coder:p%2Fss@127.0.0.1:5432/coder?sslmode=disable": "127.0.0.1:5432/coder",
		"postgres://coder:p@ss@127.0.0.1:5432/coder":                   "127.0.0.1:5432/coder",
	}
	for raw, want := range accepted {
		if got := database.Describe(raw); got != want {
			t.Errorf("Describe(%q) = %q, want %q", raw, got, want)
		}
		p := filepath.Join(t.TempDir(), "url")
		if err := os.WriteFile(p, []byte(raw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := database.URLFile(p); err != nil {
			t.Errorf("URLFile(%q): %v", raw, err)
		}
	}
}
