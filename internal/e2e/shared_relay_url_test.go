package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// sharedURLWarning is p's health warning about a live replica that uses
// p's own relay URL and names id, or "".
func sharedURLWarning(p *clitest.Process, token, id string) (string, coderd.HealthReport) {
	var h coderd.HealthReport
	if p.GetJSON("/api/v2/debug/health", token, &h) != http.StatusOK {
		return "", h
	}
	for _, w := range h.Replicas.Warnings {
		if strings.Contains(w, id) && strings.Contains(w, "uses this replica's relay URL") {
			return w, h
		}
	}
	return "", h
}

func replicaID(t *testing.T, p *clitest.Process) string {
	t.Helper()
	var info coderd.BuildInfo
	if p.GetJSON("/api/v2/buildinfo", "", &info) != http.StatusOK {
		t.Fatalf("%s: buildinfo", p.Name)
	}
	return info.ReplicaID.String()
}

// Two machines (or containers) run `coder server --http-address
// 0.0.0.0:3000` against one Postgres without --access-url: each one's
// relay URL defaults to http://127.0.0.1:3000, the same for both, and a
// replica never meshes with (or probes) a peer behind its own relay URL.
// Clients on one cannot reach clients on the other. Neither replica may
// stay silent about it: each shows a health warning naming the other (not
// healthy) and logs a WARN line naming it.
//
// On one machine the same rows come from a second replica given the
// first one's relay URL. A replica restarted in place after kill -9 (its
// previous run's row still live for the stale window, but never beating
// again) is not warned about.
func TestReplicasSharingARelayURLAreAWarningOnBoth(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	vm1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "vm1", PostgresURL: pg})
	vm1.WaitReady(60 * time.Second)
	vm2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "vm2", PostgresURL: pg, RelayURL: vm1.URL})
	vm2.WaitReady(60 * time.Second)
	ids := map[*clitest.Process]string{vm1: replicaID(t, vm1), vm2: replicaID(t, vm2)}

	for _, pair := range [][2]*clitest.Process{{vm1, vm2}, {vm2, vm1}} {
		p, other := pair[0], pair[1]
		var w string
		var h coderd.HealthReport
		if !wait.Until(30*time.Second, func() bool {
			w, h = sharedURLWarning(p, token, ids[other])
			return w != "" && !h.Healthy
		}) {
			t.Fatalf("%s: no health warning (and not unhealthy) about %s, which uses its relay URL %s: %+v", p.Name, other.Name, vm1.URL, h)
		}
		t.Logf("%s: %s", p.Name, w)
		if !wait.Until(10*time.Second, func() bool {
			for _, l := range strings.Split(p.Output(), "\n") {
				if strings.Contains(l, "WARN") && strings.Contains(l, ids[other]) && strings.Contains(l, "relay URL") {
					return true
				}
			}
			return false
		}) {
			t.Errorf("%s logged no WARN line naming %s (%s), which uses its relay URL", p.Name, other.Name, ids[other])
		}
	}

	// vm2 goes; vm1 restarted in place after kill -9 is not warned about
	// its previous run's row, and vm1's warning about vm2 is gone.
	vm2.Kill()
	port := vm1.Port
	old := ids[vm1]
	vm1.Kill()
	again := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "vm1-again", PostgresURL: pg, Port: port})
	again.WaitReady(60 * time.Second)
	deadline := time.Now().Add(20 * time.Second) // the old rows stay live for 15 s
	for time.Now().Before(deadline) {
		if w, _ := sharedURLWarning(again, token, old); w != "" {
			t.Fatalf("a replica restarted in place warns about its previous run's row: %s", w)
		}
		time.Sleep(500 * time.Millisecond) // sampling a condition that must never hold
	}
}
