package e2e_test

import (
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

func replica(t *testing.T, name, pg string) *clitest.Process {
	t.Helper()
	return clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg})
}

func createToken(t *testing.T, pg string) string { return clitest.CreateToken(t, pg) }

func apiGet(t *testing.T, url, token string, v any) int {
	t.Helper()
	p := &clitest.Process{URL: url}
	return p.GetJSON("", token, v)
}

// fullMatrix reports whether every replica, as seen through r, lists every
// other with a measured latency and no error.
func fullMatrix(t *testing.T, r *clitest.Process, token string, n int) bool {
	var replicas []coderd.Replica
	if apiGet(t, r.URL+"/api/v2/replicas", token, &replicas) != http.StatusOK || len(replicas) != n {
		return false
	}
	for _, rep := range replicas {
		if rep.Error != "" || len(rep.Peers) != n-1 || rep.DatabaseLatencyMS <= 0 {
			return false
		}
		for _, p := range rep.Peers {
			if p.Error != "" || p.LatencyMS <= 0 {
				return false
			}
		}
	}
	return true
}

func connectClient(t *testing.T, p *clitest.Process) *derptest.Client {
	t.Helper()
	return derptest.MustConnect(t, p.URL)
}

// The HA guide's 3-node table, verbatim but on loopback: three replicas
// find each other with no other configuration, every replica shows the
// full latency matrix, clients on replica 1 and 3 reach each other through
// the mesh, and `coder replicas` / `coder debug mesh` show it.
func TestThreeReplicasConfiguredLikeTheHAGuideFormOneMesh(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	token := createToken(t, pg)
	r1, r2, r3 := replica(t, "coder-1", pg), replica(t, "coder-2", pg), replica(t, "coder-3", pg)
	for _, r := range []*clitest.Process{r1, r2, r3} {
		r.WaitReady(90 * time.Second)
	}
	lastReady := time.Now()

	a, c := connectClient(t, r1), connectClient(t, r3)
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("a client on replica 1 cannot reach a client on replica 3")
	}
	t.Logf("first packet crossed the mesh %s after the last replica was ready", time.Since(lastReady))
	if lost := derptest.Exchange(a, c, 1000, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("1→3 lost %d of 1000", lost)
	}
	if lost := derptest.Exchange(c, a, 1000, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("3→1 lost %d of 1000", lost)
	}

	for _, r := range []*clitest.Process{r1, r2, r3} {
		if !clitest.Eventually(20*time.Second, func() bool { return fullMatrix(t, r, token, 3) }) {
			var replicas []coderd.Replica
			apiGet(t, r.URL+"/api/v2/replicas", token, &replicas)
			t.Fatalf("%s does not show a full, healthy matrix: %+v", r.Name, replicas)
		}
	}
	var health coderd.HealthReport
	apiGet(t, r2.URL+"/api/v2/debug/health", token, &health)
	if !health.Healthy {
		t.Fatalf("health: %+v", health)
	}
	if code := apiGet(t, r2.URL+"/api/v2/replicas", "", nil); code != http.StatusUnauthorized {
		t.Fatalf("replicas without a token: %d, want 401", code)
	}
	if code := apiGet(t, r2.URL+"/api/v2/debug/health", "wrong-token", nil); code != http.StatusUnauthorized {
		t.Fatalf("health with a wrong token: %d, want 401", code)
	}

	table := clitest.Start(t, "coder replicas", []string{"CODER_URL=" + r1.URL, "CODER_SESSION_TOKEN=" + token}, "replicas")
	if code := table.Wait(30 * time.Second); code != 0 {
		t.Fatalf("coder replicas exit %d: %s", code, table.Output())
	}
	out := table.Output()
	for _, r := range []*clitest.Process{r1, r2, r3} {
		if !strings.Contains(out, r.URL) {
			t.Errorf("coder replicas does not list %s:\n%s", r.URL, out)
		}
	}
	if !strings.Contains(out, "LATENCY") || strings.Contains(out, "WARNINGS") || strings.Contains(out, "ERRORS") {
		t.Errorf("coder replicas: want a matrix without warnings:\n%s", out)
	}

	mesh := clitest.Start(t, "coder debug mesh", []string{"CODER_URL=" + r2.URL, "CODER_SESSION_TOKEN=" + token}, "debug", "mesh")
	if code := mesh.Wait(60 * time.Second); code != 0 {
		t.Fatalf("coder debug mesh exit %d:\n%s", code, mesh.Output())
	}
	if !strings.Contains(mesh.Output(), "all 6 pairs") {
		t.Fatalf("coder debug mesh:\n%s", mesh.Output())
	}
}

// A replica that stops leaves the mesh at once; its clients, reconnecting
// to another replica, are reachable again.
func TestStoppedReplicaLeavesAndItsClientsReconnectElsewhere(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	token := createToken(t, pg)
	r1, r2, r3 := replica(t, "coder-1", pg), replica(t, "coder-2", pg), replica(t, "coder-3", pg)
	for _, r := range []*clitest.Process{r1, r2, r3} {
		r.WaitReady(90 * time.Second)
	}
	a := connectClient(t, r1)
	b := connectClient(t, r2)
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("not meshed")
	}
	r2.Signal(syscall.SIGTERM)
	stopped := time.Now()
	if !clitest.Eventually(2*time.Second, func() bool {
		var replicas []coderd.Replica
		return apiGet(t, r1.URL+"/api/v2/replicas", token, &replicas) == 200 && len(replicas) == 2
	}) {
		t.Fatal("replica 1 still lists the stopped replica after 2s")
	}
	t.Logf("stopped replica dropped after %s", time.Since(stopped))
	if code := r2.Wait(30 * time.Second); code != 0 {
		t.Fatalf("stopped replica exit %d", code)
	}
	// The client of the stopped replica reconnects through "the load
	// balancer" to replica 3.
	moved := connectClient(t, r3)
	if !derptest.Reachable(a, moved, 5*time.Second) || !derptest.Reachable(moved, a, 5*time.Second) {
		t.Fatal("a client that moved to replica 3 is unreachable from replica 1")
	}
}

// A second replica in the region without a relay URL (behind a load
// balancer: an access URL given, so the relay URL has no default) is
// refused before it writes anything; one with the DERP server disabled
// joins through Postgres alone, its relay URL ignored with a warning.
func TestRelayURLRulesWithPeersPresent(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	token := createToken(t, pg)
	first := replica(t, "first", pg)
	first.WaitReady(90 * time.Second)

	noRelay := clitest.StartServer(t, "no-relay", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_ACCESS_URL=https://coder.big.corp"})
	if code := noRelay.Wait(60 * time.Second); code <= 0 {
		t.Fatalf("a replica without a relay URL joined a live region (exit %d)", code)
	}
	if out := noRelay.Output(); !strings.Contains(out, "--derp-server-relay-url") || !strings.Contains(out, "is required") {
		t.Fatalf("refusal does not name the flag:\n%s", out)
	}

	noDERP := clitest.StartServer(t, "no-derp", []string{"CODER_PG_CONNECTION_URL=" + pg},
		"--derp-server-enable=false", "--derp-server-relay-url", "http://10.0.0.9:80", "--derp-server-region-id", "998")
	noDERP.WaitReady(60 * time.Second)
	if !strings.Contains(noDERP.Output(), "ignoring the relay URL") {
		t.Fatalf("no warning about the ignored relay URL:\n%s", noDERP.Output())
	}
	if !clitest.Eventually(5*time.Second, func() bool {
		var replicas []coderd.Replica
		return apiGet(t, first.URL+"/api/v2/replicas", token, &replicas) == 200 && len(replicas) == 2
	}) {
		t.Fatal("the DERP-less replica is not listed")
	}
	if code := noDERP.Status("/derp/latency-check"); code != http.StatusNotFound {
		t.Fatalf("/derp/latency-check on a DERP-less replica: %d, want 404", code)
	}
	_ = fmt.Sprint()
}
