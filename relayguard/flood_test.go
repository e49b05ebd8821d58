package relayguard_test

import (
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// flood opens connections to base from ip as fast as it can and holds
// them silent (each worker keeps its newest few hundred; the server resets
// or evicts the others), until the returned stop is called: a connection
// flood far faster than the bound divided by the grace period.
func flood(t *testing.T, base, ip string) (stop func()) {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var held []net.Conn
			defer func() {
				for _, nc := range held {
					_ = nc.Close()
				}
			}()
			for {
				select {
				case <-done:
					return
				default:
				}
				nc, err := dialFrom(ip, u.Host)
				if err != nil {
					continue
				}
				held = append(held, nc)
				if len(held) > 300 {
					_ = held[0].Close()
					held = held[1:]
				}
			}
		}()
	}
	var once sync.Once
	stop = func() { once.Do(func() { close(done); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}

// probe GETs path on r from ip over a new connection, as a kubelet's
// probe or a load balancer's health check does, and reports whether it got
// a 200.
func probe(r *relay, ip, path string) bool {
	tr := &http.Transport{
		DisableKeepAlives: true,
		DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}).DialContext,
	}
	defer tr.CloseIdleConnections()
	res, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get(r.url + path)
	if err != nil {
		return false
	}
	_ = res.Body.Close()
	return res.StatusCode == http.StatusOK
}

// A flood from one address, opening connections faster than the bound
// can age them past the grace period, keeps the bound full of its young
// connections. It must not lock anyone else out: a kubelet's liveness and
// readiness probes (a pod failing them is restarted or taken out of the
// load balancer, which turns a flood into an outage), a real client and a
// peer replica that never meshed before all come from other addresses and
// get in, while the bound still holds.
func TestConnectionFloodFromOneAddressLocksNobodyElseOut(t *testing.T) {
	t.Parallel()
	const bound = 100
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{MaxPendingConnections: bound})
	other := connect(t, a)

	stop := flood(t, a.url, attackerIP)
	wait.For(t, eventually, "the flood to fill the bound and be refused", func() bool {
		return a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "refused"})+
			a.metric(t, "coderd_derp_pending_connections_closed_total", map[string]string{"reason": "evicted"}) > 5*bound
	})
	const probes = 20
	failed := 0
	for i := 0; i < probes; i++ {
		if !probe(a, clientIP, "/healthz") {
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d health probes from another address failed during the flood", failed, probes)
	}
	rc := connectFrom(t, a, clientIP, 10*time.Second)
	if !rc.relays(other, 10*time.Second) {
		t.Error("a real client from another address cannot relay during the flood")
	}
	b := startRelay(t, mk, relayguard.Options{})
	meshPair(t, mk, a, b)
	works(t, connect(t, b), other, "a client on a peer that meshed during the flood")
	if p := a.metric(t, "coderd_derp_pending_connections", nil); p > bound {
		t.Errorf("%v pending connections during the flood, want ≤ %d", p, bound)
	}
	stop()
}

// A flood that comes from a peer replica's address (a load balancer or an
// attacker on the same host as a replica, or a proxy in front of both) is
// bounded like any other: the address is not a pass around the bound. The
// peer still meshes again when its link drops during that flood.
func TestFloodFromAMeshPeersAddressIsStillBounded(t *testing.T) {
	t.Parallel()
	const bound = 100
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{MaxPendingConnections: bound, PendingGrace: time.Hour})
	b := startRelay(t, mk, relayguard.Options{})
	meshPair(t, mk, a, b) // b's mesh client dials a from 127.0.0.1
	local, remote := connect(t, a), connect(t, b)

	const peerIP = "127.0.0.1"
	conns := openSilentFrom(t, a.url, peerIP, 3*bound)
	open := len(conns)
	wait.Until(10*time.Second, func() bool {
		open = 0
		for _, nc := range conns {
			if stillOpen(nc) {
				open++
			}
		}
		return open <= bound
	})
	if open > bound {
		t.Errorf("%d of %d silent connections from a peer's address are open, want ≤ %d (the bound)", open, len(conns), bound)
	}
	if p := a.metric(t, "coderd_derp_pending_connections", nil); p > bound {
		t.Errorf("%v pending connections, want ≤ %d", p, bound)
	}

	_ = b.meshed.Close()
	b.meshWith(t, mk, a)
	wait.For(t, eventually, "the peer to mesh again", func() bool { return b.meshed.Ready() })
	works(t, connect(t, b), local, "a client on the peer after it meshed again during the flood")
	works(t, local, remote, "relay connections through the flood")
}
