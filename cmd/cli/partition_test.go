package cli_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// proxiedPostgres is a fresh database and a fault proxy in front of it.
func proxiedPostgres(t *testing.T, pg string) (*faultproxy.Proxy, string) {
	t.Helper()
	return faultproxy.InFrontOf(t, pg)
}

var fastBeat = []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=300ms"}

// A replica that alone loses Postgres is dropped by its peers after the
// stale window; it then fails /readyz (the load balancer stops sending it
// clients nobody else can reach) while its peer stays ready, and it is
// ready again once its heartbeat gets through.
func TestReadyzFailsWhenOnlyThisReplicaIsCutOffFromPostgres(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	proxy, viaProxy := proxiedPostgres(t, pg)
	a := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "a", PostgresURL: pg, Env: fastBeat})
	a.WaitReady(60 * time.Second)
	b := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "b", PostgresURL: viaProxy, Env: fastBeat})
	b.WaitReady(60 * time.Second)

	proxy.Cut()
	cut := time.Now()
	wait.For(t, 20*time.Second, "the cut-off replica fails /readyz", func() bool { return b.Status("/readyz") == http.StatusServiceUnavailable })
	t.Logf("/readyz 503 %s after the cut (stale window 900ms)", time.Since(cut).Round(time.Millisecond))
	if code := a.Status("/readyz"); code != http.StatusOK {
		t.Fatalf("the replica that still reaches Postgres answers /readyz %d", code)
	}
	proxy.Heal()
	healed := time.Now()
	wait.For(t, 20*time.Second, "ready again once its beat gets through", func() bool { return b.Status("/readyz") == http.StatusOK })
	t.Logf("/readyz 200 again %s after the heal", time.Since(healed).Round(time.Millisecond))
}

// A full Postgres outage, three stale windows long, never fails /readyz.
func TestReadyzStaysUpThroughAFullPostgresOutage(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	pa, viaA := proxiedPostgres(t, pg)
	pb, viaB := proxiedPostgres(t, pg)
	a := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "a", PostgresURL: viaA, Env: fastBeat})
	a.WaitReady(60 * time.Second)
	b := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "b", PostgresURL: viaB, Env: fastBeat})
	b.WaitReady(60 * time.Second)

	pa.Cut()
	pb.Cut()
	end := time.Now().Add(3 * 900 * time.Millisecond * 2) // well past 3 stale windows
	for time.Now().Before(end) {
		for _, p := range []*clitest.Process{a, b} {
			if code := p.Status("/readyz"); code != http.StatusOK {
				t.Fatalf("/readyz answered %d during a full outage", code)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	pa.Heal()
	pb.Heal()
}
