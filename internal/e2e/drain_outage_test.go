package e2e_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/faultproxy"
)

// pgBehindProxy returns a fresh database's URL rewritten to go through a
// fault proxy, and the proxy.
func pgBehindProxy(t *testing.T) (string, *faultproxy.Proxy) {
	t.Helper()
	p, u := faultproxy.InFrontOf(t, dbtest.NewURL(t))
	return u, p
}

// SIGTERM while Postgres hangs (every connection, new ones included, black
// holed): the drain cannot mark the replica stopped, but it must still end
// within the grace period plus a bound and exit 0, not hang on the
// database.
func TestSigtermWhilePostgresHangsStillExitsZero(t *testing.T) {
	t.Parallel()
	pg, proxy := pgBehindProxy(t)
	const grace = 2 * time.Second
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "a", PostgresURL: pg,
		Env: []string{"CODER_SHUTDOWN_GRACE_PERIOD=" + grace.String()}})
	r.WaitReady(60 * time.Second)
	proxy.Stall()
	time.Sleep(time.Second) // let a beat get stuck in the hung connection
	start := time.Now()
	r.Signal(syscall.SIGTERM)
	const bound = 15 * time.Second
	code := r.Wait(grace + bound + 30*time.Second)
	took := time.Since(start)
	t.Logf("drain with a hung database took %v (grace %v)", took, grace)
	if code != 0 {
		t.Fatalf("exit %d after SIGTERM with a hung database: %s", code, r.Output())
	}
	if took > grace+bound {
		t.Fatalf("drain took %v with a hung database, want under grace %v + %v", took, grace, bound)
	}
}
