package derpmesh_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/metrics"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

func TestClientsOnTwoMeshedReplicasExchangePacketsBothWaysWithoutLoss(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	for i, n := range nodes {
		st := n.mesh.Status()
		if len(st) != 1 || st[0].State != derpmesh.StateConnected || st[0].Error != "" {
			t.Fatalf("mesh %d status: %+v", i, st)
		}
	}
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	exchangeBothWays(t, a, b, 1000)
}

// A replica that dies is reported (state, error, OnPeerBroken) while the
// survivors keep forwarding; a new process on the same address is meshed
// again by the retry loop within about MaxRetryInterval, and at once by
// Reconnect even when the retry pause is long.
func TestDeadReplicaIsReportedAndANewOneOnTheSameAddressIsMeshedAgain(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	n0, n1, n2 := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	n0.meshWith(t, meshOptions{meshKey: k}, n1, n2)                                            // fast retries
	n1.meshWith(t, meshOptions{meshKey: k}, n0, n2)                                            //
	n2.meshWith(t, meshOptions{meshKey: k, retry: time.Minute, maxRetry: time.Minute}, n0, n1) // only Reconnect is fast
	for _, n := range []*node{n0, n1, n2} {
		wait.For(t, eventually, "full mesh ready", n.mesh.Ready)
	}
	a, c := connect(t, n0), connect(t, n2)

	deadURL, addr := n1.url, n1.http.Listener.Addr().String()
	n1.stop()

	wait.For(t, eventually, "replica 0 reports the dead peer with a connect error", func() bool {
		s, ok := n0.peerStatus(deadURL)
		return ok && s.State == derpmesh.StateConnecting && strings.Contains(s.Error, "cannot connect")
	})
	wait.For(t, eventually, "OnPeerBroken for the dead peer on both survivors", func() bool {
		return n0.brokenCalls(deadURL) > 0 && n2.brokenCalls(deadURL) > 0
	})
	if n0.mesh.Ready() || n2.mesh.Ready() {
		t.Fatal("Ready() with a peer down")
	}
	if n0.brokenCalls(n2.url) != 0 {
		t.Fatal("OnPeerBroken was called for a healthy peer")
	}
	exchangeBothWays(t, a, c, 300)

	// A new process (new DERP key, same mesh key) on the same address.
	back := startNode(t, nodeOptions{meshKey: k, addr: addr})
	if back.url != deadURL {
		t.Fatalf("restarted on %s, want %s", back.url, deadURL)
	}
	back.meshWith(t, meshOptions{meshKey: k}, n0, n2)
	start := time.Now()
	wait.For(t, 10*time.Second, "replica 0 remeshes on its own", func() bool { return n0.connectedTo(deadURL) })
	// The owner is told of each confirmed link (it measures it at once):
	// the first one, and the new one to the restarted peer.
	wait.For(t, eventually, "OnPeerConnected for the first link and the new one", func() bool { return n0.connectedCalls(deadURL) == 2 })
	if n := n0.connectedCalls(n2.url); n != 1 {
		t.Fatalf("OnPeerConnected called %d times for a link that never broke, want 1", n)
	}
	t.Logf("remeshed by the retry loop %v after the address listened again (RetryInterval %v, MaxRetryInterval %v)",
		time.Since(start).Round(time.Millisecond), testRetry, testMaxRetry)

	// Replica 2 is in a one-minute pause; Reconnect ends it.
	if n2.connectedTo(deadURL) {
		t.Fatal("replica 2 remeshed before its retry pause ended")
	}
	start = time.Now()
	n2.mesh.Reconnect(deadURL)
	wait.For(t, 10*time.Second, "Reconnect remeshes at once", func() bool { return n2.connectedTo(deadURL) })
	t.Logf("Reconnect remeshed in %v", time.Since(start).Round(time.Millisecond))
	wait.For(t, eventually, "every mesh ready again", func() bool {
		return n0.mesh.Ready() && n2.mesh.Ready() && back.mesh.Ready()
	})

	b := connect(t, back)
	exchangeBothWays(t, a, b, 100)
	exchangeBothWays(t, c, b, 100)
}

// Removing a peer from the set disconnects it before SetAddresses returns:
// this replica's clients no longer reach that peer's clients (the peer's own
// mesh still carries the other direction).
func TestRemovingAPeerStopsForwardingToItsClients(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	if !derptest.Reachable(a, b, 15*time.Second) {
		t.Fatal("not meshed")
	}

	if got := expvarValue(t, nodes[0], "gauge_clients_remote"); got != "1" {
		t.Fatalf("replica 0 forwards to %s remote clients, want 1", got)
	}

	nodes[0].mesh.SetAddresses(nil)

	// Synchronously: no forwarder left when SetAddresses returns.
	if got := expvarValue(t, nodes[0], "gauge_clients_remote"); got != "0" {
		t.Fatalf("replica 0 still forwards to %s remote clients after SetAddresses returned", got)
	}
	if st := nodes[0].mesh.Status(); len(st) != 0 {
		t.Fatalf("Status still lists removed peers: %+v", st)
	}
	if !nodes[0].mesh.Ready() {
		t.Fatal("a mesh with no peers is not Ready")
	}
	notDelivered(t, a, b, 500*time.Millisecond, "after the peer was removed")
	if !derptest.Reachable(b, a, 15*time.Second) {
		t.Fatal("the peer's own mesh toward us stopped working")
	}
	if n := nodes[0].brokenCalls(nodes[1].url); n != 0 {
		t.Fatalf("OnPeerBroken called %d times for a deliberately removed peer", n)
	}
}

// Reconnect swaps a live connection for a new one; the peer's clients that
// stayed put are reachable through the new one (no stale forwarder left
// behind to shadow it).
func TestReconnectKeepsForwardingToThePeersClients(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	if !derptest.Reachable(a, b, 15*time.Second) {
		t.Fatal("not meshed")
	}
	for i := 0; i < 3; i++ {
		accepted := expvarValue(t, nodes[1], "accepts")
		nodes[0].mesh.Reconnect(nodes[1].url)
		wait.For(t, eventually, "a new mesh connection, confirmed", func() bool {
			return expvarValue(t, nodes[1], "accepts") != accepted && nodes[0].connectedTo(nodes[1].url)
		})
		if !derptest.Reachable(a, b, 15*time.Second) {
			t.Fatalf("after Reconnect %d the peer's client is unreachable", i+1)
		}
		if lost := derptest.Exchange(a, b, 64, 1024, 16, 5*time.Second); lost != 0 {
			t.Fatalf("after Reconnect %d: lost %d of 64 packets", i+1, lost)
		}
		if got := expvarValue(t, nodes[0], "gauge_clients_remote"); got != "1" {
			t.Fatalf("after Reconnect %d replica 0 has %s forwarding entries, want 1", i+1, got)
		}
	}
	if n := nodes[0].brokenCalls(nodes[1].url); n != 0 {
		t.Fatalf("OnPeerBroken called %d times for requested reconnects", n)
	}
}

// A peer that hangs without closing the connection (a partition that
// drops instead of resetting) is noticed by the periodic ping, reported,
// and meshed again once it answers.
func TestHungPeerIsNoticedByPingsAndMeshedAgainWhenItAnswers(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	proxy, err := faultproxy.New(b.http.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	via := proxy.URL()
	a.meshWith(t, meshOptions{meshKey: k, ping: 100 * time.Millisecond, confirm: 300 * time.Millisecond, extraURLs: []string{via}})
	wait.For(t, eventually, "meshed through the proxy", func() bool { return a.connectedTo(via) })

	proxy.Stall()
	start := time.Now()
	wait.For(t, 10*time.Second, "the hang is noticed and reported", func() bool {
		s, _ := a.peerStatus(via)
		return s.State == derpmesh.StateConnecting && a.brokenCalls(via) > 0 &&
			strings.Contains(s.Error, "peer stopped answering pings (2 in a row unanswered within 300ms)")
	})
	t.Logf("hang noticed after %v (PingInterval 100ms, ConfirmTimeout 300ms)", time.Since(start).Round(time.Millisecond))

	proxy.Unstall()
	wait.For(t, eventually, "meshed again", func() bool { return a.connectedTo(via) })
	ca, cb := connect(t, a), connect(t, b)
	if !derptest.Reachable(ca, cb, 15*time.Second) {
		t.Fatal("not forwarding after the peer answered again")
	}
}

func TestMeshWithAWrongKeyIsRefusedAndNeverReady(t *testing.T) {
	t.Parallel()
	wrong := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: wrong})
	b := startNode(t, nodeOptions{meshKey: newMeshKey()})
	a.meshWith(t, meshOptions{meshKey: wrong}, b)

	wait.For(t, eventually, "the refusal is reported", func() bool {
		s, ok := a.peerStatus(b.url)
		return ok && strings.Contains(s.Error, "refused mesh privileges (mesh key mismatch?)") && strings.Contains(s.Error, b.url)
	})
	// Every further attempt is refused the same way: the state never
	// leaves "connecting" and the error never turns into a plain break.
	first := a.brokenCalls(b.url)
	wait.For(t, eventually, "three more refused attempts", func() bool {
		if a.mesh.Ready() {
			t.Fatal("Ready() with a refused peer")
		}
		s, _ := a.peerStatus(b.url)
		if s.State != derpmesh.StateConnecting || !strings.Contains(s.Error, "refused mesh privileges") {
			t.Fatalf("refused peer shown as %q: %s", s.State, s.Error)
		}
		return a.brokenCalls(b.url) >= first+3
	})
	ca, cb := connect(t, a), connect(t, b)
	notDelivered(t, ca, cb, 500*time.Millisecond, "without mesh privileges")
}

func TestTLSMeshVerifiesPeersWithTheGivenCA(t *testing.T) {
	t.Parallel()
	pool, serverTLS := testCA(t)
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k, tls: serverTLS})
	b := startNode(t, nodeOptions{meshKey: k, tls: serverTLS})
	if !strings.HasPrefix(a.url, "https://127.0.0.1:") {
		t.Fatalf("relay URL %s is not https", a.url)
	}
	trusting := &tls.Config{RootCAs: pool}
	a.meshWith(t, meshOptions{meshKey: k, tls: trusting}, b)
	b.meshWith(t, meshOptions{meshKey: k, tls: trusting}, a)
	wait.For(t, eventually, "TLS mesh ready", func() bool { return a.mesh.Ready() && b.mesh.Ready() })
	exchangeBothWays(t, connect(t, a), connect(t, b), 200)

	// A replica that trusts no extra CA cannot mesh with them, and says why.
	c := startNode(t, nodeOptions{meshKey: k})
	c.meshWith(t, meshOptions{meshKey: k, tls: &tls.Config{RootCAs: x509.NewCertPool()}}, a)
	wait.For(t, eventually, "certificate error reported", func() bool {
		s, ok := c.peerStatus(a.url)
		return ok && strings.Contains(s.Error, "certificate") && s.State == derpmesh.StateConnecting
	})
	if c.mesh.Ready() {
		t.Fatal("Ready() with an unverifiable peer")
	}
}

// Not parallel: 380 mesh handshakes at once would starve the timing of the
// tests beside it on a small machine.
func TestTwentyReplicasInOneProcessReachEachOther(t *testing.T) {
	nodes := fullMesh(t, 20)
	a, b := connect(t, nodes[9]), connect(t, nodes[16])
	exchangeBothWays(t, a, b, 100)
}

// A relay URL that leads back to this replica (two replicas claiming one
// URL) is detected, reported and not redialed, until Reconnect.
func TestOwnRelayURLIsReportedAndNotRedialed(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k}, a)

	wait.For(t, eventually, "self-connect reported", func() bool {
		s, ok := a.peerStatus(a.url)
		return ok && s.Error == "relay URL points at this replica"
	})
	accepts := func() string { return expvarValue(t, a, "accepts") }
	before := accepts()
	// Far more than the retry pause: no new dial may happen.
	time.Sleep(5 * testMaxRetry)
	if got := accepts(); got != before {
		t.Fatalf("the replica's own URL was redialed: accepts %s → %s", before, got)
	}
	if a.mesh.Ready() {
		t.Fatal("Ready() while meshing with itself")
	}
	if n := a.brokenCalls(a.url); n != 0 {
		t.Fatalf("OnPeerBroken called %d times for the replica's own URL", n)
	}
	a.mesh.Reconnect(a.url)
	wait.For(t, eventually, "Reconnect tries once more", func() bool { return accepts() != before })
}

func TestNewRejectsUnsafeOrInconsistentOptions(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	for name, opts := range map[string]derpmesh.Options{
		"no server":           {MeshKey: k},
		"short mesh key":      {Server: a.server, MeshKey: "abc123"},
		"another mesh key":    {Server: a.server, MeshKey: newMeshKey()},
		"skips verification":  {Server: a.server, MeshKey: k, TLSConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec // refused, which is the point
		"custom verification": {Server: a.server, MeshKey: k, TLSConfig: &tls.Config{VerifyConnection: func(tls.ConnectionState) error { return nil }}},
	} {
		m, err := derpmesh.New(opts)
		if err == nil {
			_ = m.Close()
			t.Errorf("%s: New succeeded", name)
			continue
		}
		if strings.Contains(err.Error(), k) || strings.Contains(err.Error(), "abc123") {
			t.Errorf("%s: the error reveals the mesh key: %v", name, err)
		}
	}
}

func TestInvalidRelayURLIsReportedNotDialed(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k, extraURLs: []string{"ftp://10.0.0.1", "http://"}})
	wait.For(t, eventually, "both reported", func() bool {
		st := a.mesh.Status()
		return len(st) == 2 && strings.Contains(st[0].Error, "invalid relay URL") && strings.Contains(st[1].Error, "invalid relay URL")
	})
	if a.mesh.Ready() {
		t.Fatal("Ready() with invalid peers")
	}
}

// Close is idempotent (also when called concurrently), disconnects peers,
// and stops every goroutine: dialing, pausing, parked and connected peers,
// and the callback goroutine.
func TestCloseIsIdempotentAndLeavesNoGoroutines(t *testing.T) {
	// Not parallel: it counts goroutines.
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	c, d := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	before := len(meshGoroutines())
	if before != 0 {
		t.Fatalf("derpmesh goroutines running before the test:\n%s", strings.Join(meshGoroutines(), "\n\n"))
	}
	extra := []string{
		c.url, d.url, // connected, then removed
		a.url,        // this replica: parked
		"gopher://x", // invalid: parked
	}
	for port := 1; port <= 10; port++ {
		extra = append(extra, fmt.Sprintf("http://127.0.0.1:%d", port)) // refused: pausing between attempts
	}
	a.meshWith(t, meshOptions{meshKey: k, extraURLs: extra}, b)
	wait.For(t, eventually, "connected to the live peers", func() bool {
		return a.connectedTo(b.url) && a.connectedTo(c.url) && a.connectedTo(d.url)
	})
	wait.For(t, eventually, "the unreachable peers reported", func() bool {
		for port := 1; port <= 10; port++ {
			if a.brokenCalls(fmt.Sprintf("http://127.0.0.1:%d", port)) == 0 {
				return false
			}
		}
		return true
	})
	if runs := peerLoops(); runs != 15 {
		t.Fatalf("%d peer loops for 15 peers", runs)
	}
	if wantCurrent := "1"; expvarValue(t, b, "gauge_current_connections") != wantCurrent {
		t.Fatalf("peer sees %s connections, want the mesh's 1", expvarValue(t, b, "gauge_current_connections"))
	}

	// Removing peers stops their goroutines before SetAddresses returns.
	a.mesh.SetAddresses(append([]string{b.url}, extra[7:]...))
	wait.For(t, time.Second, "7 removed peer loops gone", func() bool { return peerLoops() == 8 })

	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _ = a.mesh.Close() }()
	}
	wg.Wait()
	if err := a.mesh.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// Close waited for them; a goroutine that has just signalled it is done
	// may still show its last frame for a moment.
	if leaked := waitNoMeshGoroutines(); len(leaked) != 0 {
		t.Fatalf("Close returned with derpmesh goroutines running:\n%s", strings.Join(leaked, "\n\n"))
	}
	if st := a.mesh.Status(); len(st) != 0 {
		t.Fatalf("Status after Close: %+v", st)
	}
	a.mesh.SetAddresses([]string{b.url}) // no-op after Close
	a.mesh.Reconnect(b.url)
	if leaked := waitNoMeshGoroutines(); len(leaked) != 0 {
		t.Fatal("SetAddresses after Close started goroutines")
	}
	wait.For(t, eventually, "the peer sees the mesh connection gone", func() bool {
		return expvarValue(t, b, "gauge_current_connections") == "0"
	})
}

// waitNoMeshGoroutines waits up to a second for the package's goroutines to
// be gone and returns any left.
func waitNoMeshGoroutines() []string {
	deadline := time.Now().Add(time.Second)
	for {
		leaked := meshGoroutines()
		if len(leaked) == 0 || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// peerLoops counts the package's per-peer goroutines.
func peerLoops() int {
	n := 0
	for _, g := range meshGoroutines() {
		if strings.Contains(g, "derpmesh.(*peer).run(") {
			n++
		}
	}
	return n
}

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
