package cli_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/pgbouncertest"
)

// --postgres-pubsub: a bad value is one line naming the flag; the flag
// wins over CODER_POSTGRES_PUBSUB; poll mode starts and says so; auto picks
// listen on a plain Postgres.
func TestPostgresPubsubModes(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	bad := clitest.StartServer(t, "bad", []string{"CODER_PG_CONNECTION_URL=" + pg}, "--postgres-pubsub", "notify")
	if code := bad.Wait(30 * time.Second); code <= 0 {
		t.Fatalf("exit code %d, want non-zero", code)
	}
	if out := strings.TrimSpace(bad.Output()); !strings.Contains(out, "--postgres-pubsub") || strings.Contains(out, "\n") {
		t.Fatalf("want one line naming --postgres-pubsub, got:\n%s", out)
	}

	poll := clitest.StartServer(t, "poll", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_POSTGRES_PUBSUB=bogus"}, "--postgres-pubsub", "poll")
	poll.WaitReady(60 * time.Second)
	auto := clitest.StartServer(t, "auto", []string{"CODER_PG_CONNECTION_URL=" + pg})
	auto.WaitReady(60 * time.Second)
	for _, tc := range []struct {
		p    *clitest.Process
		mode string
	}{{poll, "poll"}, {auto, "listen"}} {
		var line string
		for _, l := range strings.Split(tc.p.Output(), "\n") {
			if strings.Contains(l, "replica sync mode chosen") {
				line = l
			}
		}
		if !strings.Contains(line, tc.mode) {
			t.Errorf("want mode %s logged, got %q", tc.mode, line)
		}
		tc.p.Signal(syscall.SIGTERM)
		tc.p.Wait(30 * time.Second)
	}
}

// Behind PgBouncer in transaction pooling, auto mode finds that
// notifications do not arrive, says so, polls, and two replicas still
// become ready and see each other.
func TestAutoModeFallsBackToPollBehindPgBouncer(t *testing.T) {
	t.Parallel()
	bouncer := pgbouncertest.Start(t, dbtest.NewURL(t))
	env := []string{"CODER_PG_CONNECTION_URL=" + bouncer}
	a := clitest.StartServer(t, "a", env)
	a.WaitReady(60 * time.Second)
	// No relay URL flag: each relay URL defaults to the replica's own
	// listen URL, so the two mesh both ways and both become ready.
	b := clitest.StartServer(t, "b", env)
	b.WaitReady(60 * time.Second)
	for _, p := range []*clitest.Process{a, b} {
		var line string
		for _, l := range strings.Split(p.Output(), "\n") {
			if strings.Contains(l, "replica sync mode chosen") {
				line = l
			}
		}
		if !strings.Contains(line, "poll") || !strings.Contains(line, "did not arrive") {
			t.Errorf("want poll chosen because notifications did not arrive, got %q", line)
		}
	}
}
