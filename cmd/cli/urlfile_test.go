package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// --postgres-url-file: set together with --postgres-url it is a one-line
// error naming both, before anything starts; a file that cannot be used
// is a one-line error naming the path and never the contents; a good file
// works for the server and for create-token.
func TestPostgresURLFileRules(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	dir := t.TempDir()
	good := filepath.Join(dir, "url")
	if err := os.WriteFile(good, []byte(pg+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("hunter2-is-not-a-url\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	oneLine := func(t *testing.T, p *clitest.Process, want ...string) string {
		t.Helper()
		if code := p.Wait(30 * time.Second); code <= 0 {
			t.Fatalf("exit code %d, want non-zero:\n%s", code, p.Output())
		}
		out := strings.TrimSpace(p.Output())
		if strings.Contains(out, "\n") {
			t.Fatalf("want one line, got:\n%s", out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Fatalf("the error lacks %q: %s", w, out)
			}
		}
		return out
	}

	both := clitest.StartServer(t, "both", []string{"CODER_PG_CONNECTION_URL=" + pg}, "--postgres-url-file", good)
	oneLine(t, both, "--postgres-url-file", "--postgres-url")
	missing := clitest.StartServer(t, "missing", []string{"CODER_PG_CONNECTION_URL_FILE=" + filepath.Join(dir, "nope")})
	oneLine(t, missing, "--postgres-url-file", filepath.Join(dir, "nope"), "no such file")
	bad := clitest.StartServer(t, "garbage", []string{"CODER_PG_CONNECTION_URL_FILE=" + garbage})
	if out := oneLine(t, bad, garbage); strings.Contains(out, "hunter2") {
		t.Fatalf("the error shows the file's contents: %s", out)
	}
	tokenBoth := clitest.Start(t, "create-token both", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_PG_CONNECTION_URL_FILE=" + good}, "server", "create-token")
	oneLine(t, tokenBoth, "--postgres-url-file", "--postgres-url")

	tok := clitest.Start(t, "create-token", []string{"CODER_PG_CONNECTION_URL_FILE=" + good}, "server", "create-token")
	if code := tok.Wait(60 * time.Second); code != 0 {
		t.Fatalf("create-token with a URL file: exit %d: %s", code, tok.Output())
	}
	srv := clitest.StartServer(t, "file", []string{"CODER_PG_CONNECTION_URL_FILE=" + good})
	srv.WaitReady(60 * time.Second)
	if out := srv.Output(); strings.Contains(out, pg) {
		t.Fatalf("the server printed the URL from the file:\n%s", out)
	}
}
