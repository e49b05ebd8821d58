package relayguard_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// halfOpen upgrades a connection to DERP and never sends the client's
// handshake, as a slowloris attacker would.
func halfOpen(t *testing.T, base string) net.Conn {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	fmt.Fprintf(nc, "GET /derp HTTP/1.1\r\nHost: %s\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n", u.Host)
	return nc
}

// Neither connections that never finish the handshake nor clients that
// vanish without a goodbye (a reset) keep a slot under the cap: after
// both, new clients get in and the count is back to what is connected.
func TestCapSlotsAreNotHeldByHalfOpenOrResetConnections(t *testing.T) {
	t.Parallel()
	const max = 3
	a := startRelay(t, newMeshKey(), relayguard.Options{MaxConnections: max})

	var stalled []net.Conn
	for i := 0; i < 3*max; i++ {
		stalled = append(stalled, halfOpen(t, a.url))
	}
	keep := connect(t, a)
	wait.For(t, eventually, "one counted connection", func() bool { return a.guard.Connections() == 1 })

	// Clients that complete the handshake and then reset their connection.
	for round := 0; round < 3; round++ {
		var rcs []*rawClient
		for i := 0; i < max-1; i++ {
			rc, err := dialUpgrade(a.url, "/derp", key.NewNode())
			if err != nil {
				t.Fatalf("round %d: client %d under the cap refused: %v", round, i, err)
			}
			if !rc.relays(keep, 10*time.Second) {
				t.Fatalf("round %d: client %d under the cap cannot relay", round, i)
			}
			rcs = append(rcs, rc)
		}
		wait.For(t, eventually, "the cap to be reached", func() bool { return a.guard.Connections() == max })
		for _, rc := range rcs {
			_ = rc.nc.(*net.TCPConn).SetLinger(0) // close sends a reset
			rc.Close()
		}
		wait.For(t, eventually, "reset clients to free their slots", func() bool { return a.guard.Connections() == 1 })
	}

	// The server gives up on the stalled handshakes on its own.
	start := time.Now()
	for _, nc := range stalled {
		_ = nc.SetReadDeadline(time.Now().Add(eventually))
		br := bufio.NewReader(nc)
		res, err := http.ReadResponse(br, nil)
		if err == nil && res.StatusCode == http.StatusSwitchingProtocols {
			_, err = io.Copy(io.Discard, br)
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("a connection that never sent its handshake was still open after %v", time.Since(start))
		}
	}
	t.Logf("stalled handshakes closed by the server within %v", time.Since(start).Round(time.Second))
}
