package derpmesh_test

import (
	"crypto/tls"
	"crypto/x509"
	"strings"
	"testing"
	"time"

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
