// What an idle mesh costs: keepalives budgeted across peers, links not
// forwarded to or sampled, two goroutines per idle link and no timers.

package derpmesh_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/metrics"

	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// expvarValue reads one of n's DERP server variables.
func expvarValue(t *testing.T, n *node, name string) string {
	t.Helper()
	v := n.server.ExpVar(false).(*metrics.Set).Get(name)
	if v == nil {
		t.Fatalf("DERP server has no variable %q", name)
	}
	return v.String()
}

// Replicas' mesh connections are not clients: a replica installs no
// forwarder for another replica's mesh client that a peer reports, so a
// server holds one forwarder per real client of its peers, not one per
// replica per peer (at N=100, 9,702 of them per replica). Real clients
// still reach each other.
func TestMeshConnectionsAreNotForwardedTo(t *testing.T) {
	nodes := fullMesh(t, 4)
	a, b := connect(t, nodes[0]), connect(t, nodes[3])
	exchangeBothWays(t, a, b, 50)
	for i, n := range nodes {
		set, ok := n.server.ExpVar(false).(*metrics.Set)
		if !ok {
			t.Fatal("the DERP server's variables are not a metrics.Set")
		}
		created := set.Get("multiforwarder_created").String()
		remote := set.Get("gauge_clients_remote").String()
		// Each real client is on one replica: one forwarder per peer
		// that reports it, never a second (a multiforwarder).
		if created != "0" {
			t.Errorf("replica %d made %s multi-forwarders: it forwards to other replicas' mesh connections", i, created)
		}
		if want := map[int]string{0: "1", 1: "2", 2: "2", 3: "1"}[i]; remote != want {
			t.Errorf("replica %d counts %s remote clients, want %s", i, remote, want)
		}
	}
}

// gotPings is how many pings n's relay has answered.
func gotPings(t *testing.T, n *node) int64 {
	t.Helper()
	set, ok := n.server.ExpVar(false).(*metrics.Set)
	if !ok {
		t.Fatal("the DERP server's variables are not a metrics.Set")
	}
	v, err := strconv.ParseInt(set.Get("got_ping").String(), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Keepalive pings cost a replica the same at any mesh size: with more peers
// than MaxPingsPerInterval, each silent link is pinged less often, so all
// of them together get about MaxPingsPerInterval per PingInterval; and a
// link the owner pings (PingPeer, the latency probes) needs no keepalive.
func TestKeepalivesAreBudgetedAcrossPeersAndSkippedOnLinksHeardFrom(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	const (
		peers    = 6
		interval = 100 * time.Millisecond
		maxPings = 2
		window   = 3 * time.Second
	)
	a := startNode(t, nodeOptions{meshKey: k})
	var others []*node
	for i := 0; i < peers; i++ {
		others = append(others, startNode(t, nodeOptions{meshKey: k}))
	}
	a.meshWith(t, meshOptions{meshKey: k, ping: interval, confirm: time.Second, maxPings: maxPings}, others...)
	wait.For(t, eventually, "meshed with every peer", a.mesh.Ready)

	// The first peer is pinged by the owner every 50 ms, the others not.
	probed := others[0]
	before := make([]int64, peers)
	for i, o := range others {
		before[i] = gotPings(t, o)
	}
	var owner int64
	for start := time.Now(); time.Since(start) < window; time.Sleep(50 * time.Millisecond) {
		if _, ok, err := a.mesh.PingPeer(context.Background(), probed.url); ok && err == nil {
			owner++
		}
	}
	var keepalives int64
	for i, o := range others[1:] {
		keepalives += gotPings(t, o) - before[i+1]
	}
	stretched := interval * peers / maxPings
	most := int64(peers-1) * (int64(window/stretched) + 2)
	t.Logf("%d keepalive pings to %d silent peers in %v (each link allowed %v of silence; at most %d), %d owner pings", keepalives, peers-1, window, stretched, most, owner)
	if keepalives > most {
		t.Fatalf("%d keepalive pings in %v: more than %d (MaxPingsPerInterval %d per %v over %d peers)", keepalives, window, most, maxPings, interval, peers)
	}
	if keepalives == 0 {
		t.Fatal("no keepalive pings at all: silent links are not checked")
	}
	if extra := gotPings(t, probed) - before[0] - owner; extra > 2 {
		t.Fatalf("%d keepalive pings on a link the owner pinged every 50 ms", extra)
	}
}

// rttSampling reads the relay's TCP round-trip histogram counter for a
// label ("non-tcp": connections it does not sample).
func rttSampling(t *testing.T, n *node, label string) int64 {
	t.Helper()
	set, ok := n.server.ExpVar(false).(*metrics.Set)
	if !ok {
		t.Fatal("the DERP server's variables are not a metrics.Set")
	}
	m, ok := set.Get("counter_tcp_rtt").(*metrics.LabelMap)
	if !ok {
		t.Fatal("no counter_tcp_rtt")
	}
	if v := m.Get(label); v != nil {
		return v.Value()
	}
	return 0
}

// Mesh connections are spared the relay library's per-connection TCP RTT
// sampling (a 10 s timer per connection: N-1 wakeups per 10 s on every
// replica of a large fleet), while clients are still sampled and the
// mesh still carries their packets.
func TestMeshConnectionsAreNotSampledForTCPRoundTrips(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 3)
	a, b := connect(t, nodes[0]), connect(t, nodes[2])
	exchangeBothWays(t, a, b, 20)
	for i, n := range nodes {
		// Two peers' mesh connections, not sampled; the test client (if
		// any) is.
		if got := rttSampling(t, n, "non-tcp"); got != 2 {
			t.Errorf("replica %d left %d connections unsampled, want its 2 peers' mesh connections", i, got)
		}
	}
}

// An idle established mesh connection costs two goroutines (its dialer
// and session, its receiver) and no timer of its own: the keepalive
// checks every connection from one goroutine per Mesh, and a forwarder's
// writer starts with the first packet to forward. At N=100, a keepalive
// goroutine per peer (with a timer re-armed whenever the peer's relay sent
// its own keepalive) and an idle writer per peer were 198 goroutines per
// replica. Not parallel: it counts the package's goroutines.
func TestIdleMeshLinksCostTwoGoroutinesAndNoTimers(t *testing.T) {
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	var peers []*node
	for i := 0; i < 5; i++ {
		peers = append(peers, startNode(t, nodeOptions{meshKey: k}))
	}
	a.meshWith(t, meshOptions{meshKey: k}, peers...)
	wait.For(t, eventually, "meshed with every peer", a.mesh.Ready)
	n := 0
	for _, g := range meshGoroutines() {
		if strings.Contains(g, "derpmesh.(*peer)") || strings.Contains(g, "derpmesh.(*forwarder)") {
			n++
		}
	}
	if n > 2*len(peers) {
		t.Fatalf("%d goroutines for %d idle established mesh connections, want 2 each", n, len(peers))
	}
	// Traffic starts a writer for the link that carries it, and only that
	// (only a meshes here: packets flow from a's clients to the peers').
	c0, c1 := connect(t, a), connect(t, peers[0])
	if !derptest.Reachable(c0, c1, 15*time.Second) {
		t.Fatal("a's client cannot reach the peer's")
	}
	n = 0
	for _, g := range meshGoroutines() {
		if strings.Contains(g, "derpmesh.(*forwarder)") {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("%d forwarder writers after traffic over one link, want 1", n)
	}
}
