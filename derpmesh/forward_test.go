package derpmesh_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// freezer is a TCP proxy that can stop reading from both sides, leaving
// connections open: to the mesh, the peer behind it behaves like a
// SIGSTOPped process (the kernel buffers fill, then writes block). Unlike
// faultproxy's stall it buffers nothing itself.
type freezer struct {
	l      net.Listener
	target string
	frozen atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func newFreezer(t *testing.T, target string) *freezer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{l: l, target: target}
	f.wg.Add(1)
	go f.accept()
	t.Cleanup(f.close)
	return f
}

func (f *freezer) URL() string { return "http://" + f.l.Addr().String() }
func (f *freezer) freeze()     { f.frozen.Store(true) }

func (f *freezer) accept() {
	defer f.wg.Done()
	for {
		c, err := f.l.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", f.target)
		if err != nil {
			_ = c.Close()
			continue
		}
		f.mu.Lock()
		f.conns = append(f.conns, c, s)
		f.mu.Unlock()
		f.wg.Add(2)
		go f.pipe(c, s)
		go f.pipe(s, c)
	}
}

func (f *freezer) pipe(dst, src net.Conn) {
	defer f.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		if f.frozen.Load() {
			time.Sleep(5 * time.Millisecond)
			f.mu.Lock()
			closed := f.conns == nil
			f.mu.Unlock()
			if closed {
				return
			}
			continue
		}
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			_ = dst.Close()
			return
		}
	}
}

func (f *freezer) close() {
	_ = f.l.Close()
	f.mu.Lock()
	for _, c := range f.conns {
		_ = c.Close()
	}
	f.conns = nil
	f.mu.Unlock()
	f.wg.Wait()
}

// droppedFor reads coderd_derpmesh_forward_dropped_total{peer_id=id}.
func droppedFor(t *testing.T, reg *prometheus.Registry, id string) float64 {
	t.Helper()
	f := gather(t, reg)["coderd_derpmesh_forward_dropped_total"]
	if f == nil {
		return 0
	}
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "peer_id" && l.GetValue() == id {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// A peer that stops reading (a stopped or hung process) while a client
// floods packets at its clients: the same client's traffic to a healthy
// peer keeps flowing at its usual rate with nothing lost (the library's
// own forwarder blocks the sender's read loop for up to its 5 s write
// timeout), and the packets for the stopped peer that overflow its queue
// are counted as dropped under its replica id.
func TestStoppedPeerDoesNotStallForwardingToTheOthers(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	n1, n2, n3 := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	proxy := newFreezer(t, n3.http.Listener.Addr().String())
	reg := prometheus.NewRegistry()
	n1.meshWith(t, meshOptions{meshKey: k, reg: reg})
	n1.mesh.SetPeers([]derpmesh.Peer{{ID: "healthy", URL: n2.url}, {ID: "stopped", URL: proxy.URL()}})
	n2.meshWith(t, meshOptions{meshKey: k}, n1)
	wait.For(t, eventually, "replica 1 meshed with both", n1.mesh.Ready)

	a, b, c := connect(t, n1), connect(t, n2), connect(t, n3)
	if !derptest.Reachable(a, b, 15*time.Second) || !derptest.Reachable(a, c, 15*time.Second) {
		t.Fatal("clients cannot reach each other through the mesh")
	}
	const packets = 2000
	exchange := func() (time.Duration, int) {
		start := time.Now()
		lost := derptest.Exchange(a, b, packets, 1024, 16, 5*time.Second)
		return time.Since(start), lost
	}
	before, lost := exchange()
	if lost != 0 {
		t.Fatalf("lost %d packets before any fault", lost)
	}

	proxy.freeze()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a streams to the stopped peer's client: ~10 MB/s
		defer wg.Done()
		payload := make([]byte, 1024)
		for ctx.Err() == nil {
			for i := 0; i < 10; i++ {
				_ = a.Send(c.Key, payload)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	defer func() { cancel(); wg.Wait() }()
	// ~10 MB fills the kernel's buffers toward the frozen peer; from then
	// on its queue overflows (and the library's forwarder would block).
	for deadline := time.Now().Add(1500 * time.Millisecond); droppedFor(t, reg, "stopped") == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}

	during, lost := exchange()
	if lost != 0 {
		t.Fatalf("a→b lost %d of %d packets while another peer was stopped", lost, packets)
	}
	t.Logf("a→b, %d windowed 1 KiB packets: %v before, %v while flooding a stopped peer (%.0f packets dropped for it so far)",
		packets, before.Round(time.Millisecond), during.Round(time.Millisecond), droppedFor(t, reg, "stopped"))
	// Generous: the machine is shared, and a's own connection also carries
	// the flood. A stalled read loop costs seconds per window.
	if limit := 4*before + time.Second; during > limit {
		t.Fatalf("a→b took %v while another peer was stopped, %v before (limit %v)", during, before, limit)
	}
	wait.For(t, eventually, "packets for the stopped peer counted as dropped", func() bool { return droppedFor(t, reg, "stopped") > 0 })
	if d := droppedFor(t, reg, "healthy"); d != 0 {
		t.Fatalf("%.0f packets dropped for the healthy peer", d)
	}
}

// PingPeer measures the round trip over the established mesh link; with no
// link (unknown URL, peer down) it says so, so the caller can fall back to
// HTTP; a link that stops answering returns an error, not a latency.
func TestPingPeerMeasuresTheMeshLink(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b, c := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	proxy, err := faultproxy.New(c.http.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	t.Cleanup(proxy.Unstall) // first: Close waits for stalled bytes
	a.meshWith(t, meshOptions{meshKey: k, extraURLs: []string{proxy.URL()}}, b)
	wait.For(t, eventually, "meshed", a.mesh.Ready)
	ctx := context.Background()

	rtt, ok, err := a.mesh.PingPeer(ctx, b.url+"/") // trailing slash: same peer
	if !ok || err != nil || rtt <= 0 || rtt > 5*time.Second {
		t.Fatalf("PingPeer(b) = %v, %v, %v; want a round trip", rtt, ok, err)
	}
	t.Logf("mesh round trip to b: %v", rtt)

	proxy.SetDelay(20 * time.Millisecond)
	rtt, ok, err = a.mesh.PingPeer(ctx, proxy.URL())
	if !ok || err != nil || rtt < 40*time.Millisecond {
		t.Fatalf("PingPeer through 20 ms each way = %v, %v, %v; want ≥ 40ms", rtt, ok, err)
	}

	if _, ok, err := a.mesh.PingPeer(ctx, "http://127.0.0.1:1"); ok || err != nil {
		t.Fatalf("PingPeer(unknown URL): ok=%v err=%v; want no link, no error", ok, err)
	}

	proxy.Stall()
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, ok, err := a.mesh.PingPeer(short, proxy.URL()); !ok || err == nil {
		t.Fatalf("PingPeer(stalled peer): ok=%v err=%v; want an error over the established link", ok, err)
	}

	b.stop()
	wait.For(t, eventually, "the link to the stopped peer is gone", func() bool {
		_, ok, _ := a.mesh.PingPeer(ctx, b.url)
		return !ok
	})
}

// A peer replaced by a new process behind the same relay URL (same pod
// IP, new replica id): SetPeers with the new id replaces the connection at
// once, even while the old one is in a long retry pause, and the mesh
// carries packets to the new process's clients. The same id again changes
// nothing.
func TestPeerRestartedBehindTheSameURLIsMeshedAgainAtOnce(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	reg := prometheus.NewRegistry()
	a.meshWith(t, meshOptions{meshKey: k, reg: reg, retry: time.Minute, maxRetry: time.Minute})
	url, addr := b.url, b.http.Listener.Addr().String()
	a.mesh.SetPeers([]derpmesh.Peer{{ID: "old", URL: url}})
	wait.For(t, eventually, "meshed with the old process", a.mesh.Ready)

	for round := 0; round < 3; round++ {
		b.stop()
		wait.For(t, eventually, "the old process's connection is gone", func() bool { return !a.connectedTo(url) })
		nb := startNode(t, nodeOptions{meshKey: k, addr: addr})
		start := time.Now()
		id := []string{"new-1", "new-2", "new-3"}[round]
		a.mesh.SetPeers([]derpmesh.Peer{{ID: id, URL: url}})
		wait.For(t, 10*time.Second, "meshed with the new process (the retry pause is a minute)", func() bool { return a.connectedTo(url) })
		t.Logf("round %d: meshed with the new process %v after SetPeers", round+1, time.Since(start).Round(time.Millisecond))
		ca, cb := connect(t, a), connect(t, nb)
		if !derptest.Reachable(ca, cb, 15*time.Second) {
			t.Fatalf("round %d: the new process's client is unreachable", round+1)
		}
		accepted := expvarValue(t, nb, "accepts")
		a.mesh.SetPeers([]derpmesh.Peer{{ID: id, URL: url}})
		a.mesh.SetAddresses([]string{url}) // no id: keeps the known one
		if !a.connectedTo(url) || expvarValue(t, nb, "accepts") != accepted {
			t.Fatalf("round %d: the same id again replaced the connection", round+1)
		}
		b = nb
	}
	if gather(t, reg)["coderd_derpmesh_forward_dropped_total"] != nil && droppedFor(t, reg, "old") != 0 {
		t.Fatal("the old id's series outlived it")
	}
}

// The forwarder writes a batch of frames per write while the mesh client
// writes its own frames (pings) on the same connection: packets still
// arrive, all of them, and every ping is answered.
func TestForwardedBatchesAndPingsShareALink(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k}, b)
	b.meshWith(t, meshOptions{meshKey: k}, a)
	wait.For(t, eventually, "meshed", func() bool { return a.mesh.Ready() && b.mesh.Ready() })
	ca, cb := connect(t, a), connect(t, b)
	stop := make(chan struct{})
	var pings, failed atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, ok, err := a.mesh.PingPeer(context.Background(), b.url); ok && err == nil {
				pings.Add(1)
			} else {
				failed.Add(1)
			}
		}
	}()
	exchangeBothWays(t, ca, cb, 3000)
	close(stop)
	wg.Wait()
	if pings.Load() == 0 || failed.Load() != 0 {
		t.Fatalf("%d pings answered, %d failed during the exchange", pings.Load(), failed.Load())
	}
	if !a.connectedTo(b.url) {
		t.Fatal("the link broke during the exchange")
	}
}

// A link that black-holes traffic (a middlebox that lost the connection's
// state and swallows every byte, a peer relay that stopped reading) while
// the peer itself is fine: the keepalive would find it only once the link
// has been silent for its interval, which stretches with the number of
// peers (100 s at N=100; an hour here). A latency probe over the link
// (PingPeer) that goes unanswered has it checked at once instead: it is
// redialed within 2×ConfirmTimeout, and the peer's clients are reachable
// again.
func TestUnansweredProbeHasABlackHoledLinkReplacedAtOnce(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	proxy, err := faultproxy.New(b.http.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	via := proxy.URL()
	a.meshWith(t, meshOptions{meshKey: k, ping: time.Hour, confirm: 300 * time.Millisecond, extraURLs: []string{via}})
	wait.For(t, eventually, "meshed through the proxy", func() bool { return a.connectedTo(via) })
	ca, cb := connect(t, a), connect(t, b)
	if !derptest.Reachable(ca, cb, 15*time.Second) {
		t.Fatal("not forwarding")
	}

	proxy.Freeze()
	probe, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, ok, err := a.mesh.PingPeer(probe, via); !ok || err == nil {
		t.Fatalf("PingPeer over the frozen link: ok=%v err=%v; want an error over the established link", ok, err)
	}
	start := time.Now()
	wait.For(t, 10*time.Second, "the frozen link is found dead", func() bool {
		s, _ := a.peerStatus(via)
		return a.brokenCalls(via) > 0 || strings.Contains(s.Error, "peer stopped answering pings")
	})
	t.Logf("black-holed link found dead %v after the unanswered probe (ConfirmTimeout 300ms)", time.Since(start).Round(time.Millisecond))
	wait.For(t, eventually, "meshed again over a new connection", func() bool { return a.connectedTo(via) })
	if !derptest.Reachable(ca, cb, 15*time.Second) {
		t.Fatal("a's client does not reach b's client after the link was replaced")
	}
}
