package relayguard_test

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// Source addresses on loopback: the flood, and real clients (peers dial
// from 127.0.0.1, like derptest clients).
const (
	attackerIP = "127.0.0.2"
	clientIP   = "127.0.0.3"
)

// silentKinds are the half-open connections a slowloris holds: a TCP
// connection that never sends a byte, an HTTP request whose headers never
// end, and an upgrade that never sends the DERP handshake.
var silentKinds = []string{"tcp", "headers", "upgrade"}

// openSilent opens n half-open connections to base from attackerIP,
// cycling through silentKinds, and returns those whose dial succeeded (one
// the server resets at once may fail to dial: it was refused).
func openSilent(t *testing.T, base string, n int) []net.Conn {
	t.Helper()
	return openSilentFrom(t, base, attackerIP, n)
}

// openSilentFrom is openSilent from the local address ip.
func openSilentFrom(t *testing.T, base, ip string, n int) []net.Conn {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	for i := 0; i < n; i++ {
		nc, err := dialFrom(ip, u.Host)
		if err != nil {
			continue
		}
		t.Cleanup(func() { _ = nc.Close() })
		switch silentKinds[i%len(silentKinds)] {
		case "headers":
			_, _ = fmt.Fprintf(nc, "GET /api/v2/buildinfo HTTP/1.1\r\nHost: %s\r\nX-Slow: ", u.Host)
		case "upgrade":
			_, _ = fmt.Fprintf(nc, "GET /derp HTTP/1.1\r\nHost: %s\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n", u.Host)
		}
		conns = append(conns, nc)
	}
	return conns
}

// stillOpen reports whether the server has not closed nc (whatever it
// sent first, like an upgrade's answer, is read and dropped).
func stillOpen(nc net.Conn) bool {
	buf := make([]byte, 4096)
	for {
		_ = nc.SetReadDeadline(time.Now().Add(5 * time.Millisecond))
		_, err := nc.Read(buf)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return true
		}
		if err != nil {
			return false
		}
	}
}

// accepted is how many connections the relay has taken off its listener
// and dealt with: pending, refused or evicted.
func (r *relay) accepted(t *testing.T) float64 {
	return r.metric(t, "coderd_derp_pending_connections", nil) +
		r.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "refused"}) +
		r.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "evicted"})
}

// connectFrom connects a real DERP client from ip, retrying for up to d
// (a refused connection is redialed, as real clients do).
func connectFrom(t *testing.T, r *relay, ip string, d time.Duration) *rawClient {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		rc, err := dialUpgradeFrom(ip, r.url, "/derp", key.NewNode())
		if err == nil {
			t.Cleanup(rc.Close)
			return rc
		}
		if time.Now().After(deadline) {
			t.Fatalf("a client from %s could not connect for %v: %v", ip, d, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// 3000 silent connections (every kind of half-open connection) hold at
// most the bound; past it the oldest are closed to make room, so a real
// client and a mesh peer that never connected before still get in and
// relay, long before the flood's connections would have timed out.
func TestSilentConnectionsLockNobodyOut(t *testing.T) {
	t.Parallel()
	const silent = 3000
	bound := relayguard.DefaultMaxPendingConnections
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{})
	other := connect(t, a)

	start := time.Now()
	conns := openSilent(t, a.url, silent)
	wait.For(t, eventually, "the relay to take every connection off its listener", func() bool {
		return a.accepted(t) >= silent
	})
	if p := a.metric(t, "coderd_derp_pending_connections", nil); p > float64(bound) {
		t.Fatalf("%v pending connections, want ≤ %d", p, bound)
	}
	open := 0
	for _, nc := range conns {
		if stillOpen(nc) {
			open++
		}
	}
	t.Logf("after %d silent connections (%d dialed): %d still open, %v refused, %v evicted", silent, len(conns), open,
		a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "refused"}),
		a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "evicted"}))
	if open > bound {
		t.Fatalf("%d of %d silent connections are still open, want ≤ %d (the bound)", open, silent, bound)
	}

	rc := connectFrom(t, a, clientIP, eventually)
	if !rc.relays(other, 10*time.Second) {
		t.Fatal("a real client that connected after the flood cannot relay")
	}
	t.Logf("a real client got in %v after the flood started", time.Since(start).Round(time.Millisecond))

	// A peer replica that never meshed with a before.
	b := startRelay(t, mk, relayguard.Options{})
	meshPair(t, mk, a, b)
	remote := connect(t, b)
	works(t, remote, other, "a client on a peer that meshed after the flood")
	t.Logf("the mesh peer was in %v after the flood started", time.Since(start).Round(time.Millisecond))
	if got := a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "evicted"}); got < 1 {
		t.Errorf("no pending connection was evicted (the client got in some other way?)")
	}
}

// Once a peer has meshed, its address is never held back by the bound:
// while the bound is full of connections that may not be evicted yet, the
// flood's new connections are refused right after accept, but the peer's
// mesh connection comes back at once when it redials, and existing relay
// connections keep working.
func TestMeshPeersAreNeverLockedOut(t *testing.T) {
	t.Parallel()
	const bound = 100
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{MaxPendingConnections: bound, PendingGrace: time.Hour})
	b := startRelay(t, mk, relayguard.Options{})
	meshPair(t, mk, a, b)
	local, remote := connect(t, a), connect(t, b)
	works(t, local, remote, "before the flood")

	openSilent(t, a.url, 3*bound)
	wait.For(t, eventually, "the relay to take every connection off its listener", func() bool {
		return a.accepted(t) >= 3*bound
	})
	if got := a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "refused"}); got < 2*bound {
		t.Fatalf("%v connections refused at the bound, want ≥ %d", got, 2*bound)
	}
	if _, err := dialUpgradeFrom(attackerIP, a.url, "/derp", key.NewNode()); err == nil {
		t.Fatal("a new connection from the flood's address got past a full bound of connections that may not be evicted yet")
	}
	works(t, local, remote, "relay connections while the bound is full")

	// The peer's mesh link drops and redials.
	_ = b.meshed.Close()
	b.meshWith(t, mk, a)
	wait.For(t, eventually, "the peer to mesh again", func() bool { return b.meshed.Ready() })
	late := connect(t, b)
	works(t, late, local, "a client on the peer after it meshed again during the flood")
	if !derptest.Reachable(remote, local, 10*time.Second) {
		t.Fatal("the peer's existing client cannot reach a's")
	}
}
