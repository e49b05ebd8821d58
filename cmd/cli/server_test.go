package cli_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

func getJSON(t *testing.T, u string, v any) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

// A server on an external Postgres answers the health and build endpoints;
// on SIGTERM /readyz turns 503 for the grace period while the process keeps
// serving, then it exits 0.
func TestServerDrainsOnSIGTERMThenExitsZero(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	srv := clitest.StartServer(t, "replica", []string{"CODER_PG_CONNECTION_URL=" + pg}, "--shutdown-grace-period", "3s")
	srv.WaitReady(60 * time.Second)

	if got := srv.Status("/healthz"); got != http.StatusOK {
		t.Fatalf("/healthz = %d, want 200", got)
	}
	var info struct {
		Version      string `json:"version"`
		DeploymentID string `json:"deployment_id"`
		ReplicaID    string `json:"replica_id"`
	}
	getJSON(t, srv.URL+"/api/v2/buildinfo", &info)
	if info.Version == "" || info.DeploymentID == "" || info.ReplicaID == "" {
		t.Fatalf("buildinfo has empty fields: %+v", info)
	}

	srv.Signal(syscall.SIGTERM)
	if !clitest.Eventually(2*time.Second, func() bool { return srv.Status("/readyz") == http.StatusServiceUnavailable }) {
		t.Fatal("/readyz did not turn 503 after SIGTERM")
	}
	// Still draining: alive, answering liveness, not ready.
	time.Sleep(time.Second) // a point inside the 3s grace period, not a synchronization
	if srv.Exited() {
		t.Fatal("the server exited before its grace period ended")
	}
	if got := srv.Status("/healthz"); got != http.StatusOK {
		t.Fatalf("/healthz during drain = %d, want 200", got)
	}
	if code := srv.Wait(30 * time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
}

// A Postgres that is not there fails the start within 30 s with a line that
// names Postgres, and the password appears nowhere.
func TestUnreachablePostgresFailsWithinThirtySecondsWithoutPassword(t *testing.T) {
	t.Parallel()
	const secret = "hunter2-very-secret"
	port := clitest.FreePort(t)
	u := "postgres://coder:" + secret + "@127.0.0.1:" + itoa(port) + "/coder?sslmode=disable"
	clitest.Binary(t) // build first: the clock below times the server, not the compiler
	start := time.Now()
	p := clitest.StartServer(t, "replica", nil, "--postgres-url", u)
	code := p.Wait(40 * time.Second)
	if code <= 0 {
		t.Fatalf("exit code %d, want non-zero", code)
	}
	if took := time.Since(start); took > 35*time.Second {
		t.Errorf("took %s to fail, want within 30s", took)
	}
	out := p.Output()
	if !strings.Contains(strings.ToLower(out), "postgres") {
		t.Errorf("output does not name postgres:\n%s", out)
	}
	if strings.Contains(out, secret) {
		t.Fatalf("output shows the password:\n%s", out)
	}
	if !strings.Contains(out, "connection refused") {
		t.Errorf("output does not give the reason:\n%s", out)
	}
	if strings.Contains(out, "goroutine ") {
		t.Errorf("output has a stack trace:\n%s", out)
	}
}

// A wrong password is refused at once, with the reason.
func TestWrongPasswordFailsAtOnce(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	parsed, _ := url.Parse(pg)
	parsed.User = url.UserPassword(parsed.User.Username(), "not-the-password")
	clitest.Binary(t)
	start := time.Now()
	p := clitest.StartServer(t, "replica", []string{"CODER_PG_CONNECTION_URL=" + parsed.String()})
	if code := p.Wait(30 * time.Second); code <= 0 {
		t.Fatalf("exit code %d, want non-zero", code)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("a refused password took %s to report", took)
	}
	out := p.Output()
	if strings.Contains(out, "not-the-password") {
		t.Fatalf("output shows the password:\n%s", out)
	}
	if !strings.Contains(out, "password authentication failed") {
		t.Errorf("output does not give the reason:\n%s", out)
	}
}

// The built-in Postgres: a first start, a clean restart, and a start after
// the server was killed with kill -9 all come up on the same data.
func TestBuiltinPostgresSurvivesRestartAndKill9(t *testing.T) {
	t.Parallel()
	// Traversable by everyone, so as root the data stays in the cache dir
	// (below t.TempDir's 0700 parent it would go to /var/lib/coder).
	cache, err := os.MkdirTemp("", "coder-cache-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(cache) })
	if err := os.Chmod(cache, 0o755); err != nil {
		t.Fatal(err)
	}
	deployment := func(p *clitest.Process) string {
		var info struct {
			DeploymentID string `json:"deployment_id"`
		}
		getJSON(t, p.URL+"/api/v2/buildinfo", &info)
		return info.DeploymentID
	}

	first := clitest.StartServer(t, "first", nil, "--cache-dir", cache)
	first.WaitReady(90 * time.Second)
	id := deployment(first)
	first.Signal(syscall.SIGTERM)
	if code := first.Wait(30 * time.Second); code != 0 {
		t.Fatalf("first: exit code %d, want 0", code)
	}

	second := clitest.StartServer(t, "second", nil, "--cache-dir", cache)
	second.WaitReady(60 * time.Second)
	if got := deployment(second); got != id {
		t.Fatalf("deployment id changed across a restart: %s → %s (data lost?)", id, got)
	}
	second.Kill()

	third := clitest.StartServer(t, "third", nil, "--cache-dir", cache)
	third.WaitReady(60 * time.Second)
	if got := deployment(third); got != id {
		t.Fatalf("deployment id changed after kill -9: %s → %s", id, got)
	}

	// postgres-builtin-url points a second replica at the running database.
	url := clitest.Start(t, "url", nil, "server", "postgres-builtin-url", "--cache-dir", cache)
	if code := url.Wait(10 * time.Second); code != 0 {
		t.Fatalf("postgres-builtin-url exit %d: %s", code, url.Output())
	}
	pgURL := strings.TrimSpace(url.Output())
	db, err := database.Connect(context.Background(), pgURL, database.ConnectOptions{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("postgres-builtin-url printed an unusable URL: %v", err)
	}
	db.Close()
	third.Signal(syscall.SIGTERM)
	if code := third.Wait(30 * time.Second); code != 0 {
		t.Fatalf("third: exit code %d, want 0", code)
	}
}

// Start-up rules refuse a bad configuration with one line naming the flag,
// a non-zero exit, and nothing written to the database.
func TestStartupRulesRefuseBadRelayURLs(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"relative relay URL", []string{"--derp-server-relay-url", "10.0.0.1:80"}, "--derp-server-relay-url"},
		{"ftp relay URL", []string{"--derp-server-relay-url", "ftp://10.0.0.1"}, "--derp-server-relay-url"},
		{"relay URL equals access URL", []string{"--access-url", "https://coder.big.corp", "--derp-server-relay-url", "https://coder.big.corp/"}, "access URL"},
	} {
		p := clitest.StartServer(t, tc.name, []string{"CODER_PG_CONNECTION_URL=" + pg}, tc.args...)
		if code := p.Wait(30 * time.Second); code <= 0 {
			t.Fatalf("%s: exit code %d, want non-zero", tc.name, code)
		}
		out := strings.TrimSpace(p.Output())
		if !strings.Contains(out, tc.want) || strings.Count(out, "\n") > 0 {
			t.Errorf("%s: want one line containing %q, got:\n%s", tc.name, tc.want, out)
		}
	}
	db, err := database.Connect(context.Background(), pg, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.Pool().QueryRow(context.Background(), "SELECT count(*) FROM replicas").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d replica rows written by refused starts", n)
	}
}

// CODER_ADDRESS is an alias of CODER_HTTP_ADDRESS, and a flag wins over the
// environment.
func TestAddressFromEnvironmentAndFlagPrecedence(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	envPort := clitest.FreePort(t)
	p := clitest.Start(t, "env", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_ADDRESS=127.0.0.1:" + itoa(envPort)}, "server")
	p.Port, p.URL = envPort, "http://127.0.0.1:"+itoa(envPort)
	p.WaitReady(60 * time.Second)
	p.Signal(syscall.SIGTERM)
	p.Wait(30 * time.Second)

	// The flag (StartServer passes --http-address) wins over the variable.
	q := clitest.StartServer(t, "flag", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_HTTP_ADDRESS=127.0.0.1:1"})
	q.WaitReady(60 * time.Second)
}

func itoa(i int) string { return strconv.Itoa(i) }
