package replicasync_test

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
	"github.com/coder-ha/coder/replicasync/storetest"
)

// realMem is an in-memory store on the real clock, for tests about real
// HTTP probes.
func realMem(t *testing.T, name string, mem *storetest.Memory, opts replicasync.Options) *replicasync.Manager {
	t.Helper()
	opts.Hostname = name
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = 200 * time.Millisecond
	}
	m, err := replicasync.New(context.Background(), mem, mem, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func report(m *replicasync.Manager, id [16]byte) (latencyMS float64, errMsg string, ok bool) {
	for _, p := range m.PeerReports() {
		if p.ID == id {
			return p.LatencyMS, p.Error, true
		}
	}
	return 0, "", false
}

// Item 5: an unreachable peer shows the error, not its last latency; its
// latency warning and gauge go away and the probe-error counter moves.
func TestUnreachablePeerShowsErrorNotItsLastLatency(t *testing.T) {
	t.Parallel()
	mem := storetest.NewMemoryWithClock(time.Now)
	reg := prometheus.NewRegistry()
	peerRelay := relay(t)
	// A threshold no real probe meets: the peer is "slow" while reachable.
	a := realMem(t, "a", mem, replicasync.Options{RelayAddress: relay(t).URL, LatencyThreshold: time.Nanosecond, Registerer: reg})
	b := realMem(t, "b", mem, replicasync.Options{RelayAddress: peerRelay.URL})
	id := b.Self().ID
	wait.For(t, 10*time.Second, "a warns about b's latency", func() bool {
		return strings.Contains(strings.Join(a.Warnings(), "\n"), `"b"`)
	})
	if n := series(t, reg, "coderd_replica_peer_latency_seconds"); n != 1 {
		t.Fatalf("%d latency gauges, want 1", n)
	}
	peerRelay.Close()
	a.Reprobe(peerRelay.URL)
	wait.For(t, 10*time.Second, "b reported unreachable", func() bool {
		_, e, _ := report(a, id)
		return e != ""
	})
	lat, _, _ := report(a, id)
	if lat != 0 {
		t.Fatalf("unreachable peer still reports %.3fms", lat)
	}
	if w := strings.Join(a.Warnings(), "\n"); strings.Contains(w, `"b"`) {
		t.Fatalf("the latency warning outlived reachability: %s", w)
	}
	if n := series(t, reg, "coderd_replica_peer_latency_seconds"); n != 0 {
		t.Fatalf("the latency gauge outlived reachability (%d series)", n)
	}
	if v := counterSum(t, reg, "coderd_replica_peer_probe_errors_total"); v < 1 {
		t.Fatalf("probe errors = %v, want ≥ 1", v)
	}
}

// series counts the series of a metric family.
func series(t *testing.T, reg *prometheus.Registry, name string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.Metric)
		}
	}
	return 0
}

// counterSum adds up every series of a counter family.
func counterSum(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.Metric {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// Item 11: Close closes the probe client's kept-alive connections.
func TestCloseClosesProbeConnections(t *testing.T) {
	t.Parallel()
	mem := storetest.NewMemoryWithClock(time.Now)
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		switch s {
		case http.StateNew:
			open[c] = true
		case http.StateClosed, http.StateHijacked:
			delete(open, c)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	a := realMem(t, "a", mem, replicasync.Options{})
	_ = realMem(t, "b", mem, replicasync.Options{RelayAddress: srv.URL})
	wait.For(t, 10*time.Second, "a has probed b", func() bool {
		for _, p := range a.PeerReports() {
			if p.LatencyMS > 0 {
				return true
			}
		}
		return false
	})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "the probe connections are closed", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(open) == 0
	})
}

// tcpPinger is a real LinkPinger: it times a TCP connect to the peer's
// relay and claims a link only for the URLs it was told about.
type tcpPinger struct {
	links map[string]bool
	pings atomic.Int32
}

func (p *tcpPinger) PingPeer(ctx context.Context, relayURL string) (time.Duration, bool, error) {
	if !p.links[relayURL] {
		return 0, false, nil
	}
	p.pings.Add(1)
	start := time.Now()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", strings.TrimPrefix(relayURL, "http://"))
	if err != nil {
		return 0, true, err
	}
	_ = c.Close()
	return max(time.Since(start), time.Microsecond), true, nil
}

// countingRelay serves the latency check and counts the HTTP probes.
func countingRelay(t *testing.T) (*httptest.Server, *atomic.Int32) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/derp/latency-check" {
			n.Add(1)
		}
		w.WriteHeader(http.StatusOK)
	}))
	t.Cleanup(srv.Close)
	return srv, &n
}

// Latency goes over the mesh link when there is one; HTTP only for peers
// without a link.
func TestLinkPingerReplacesHTTPProbesForLinkedPeers(t *testing.T) {
	t.Parallel()
	mem := storetest.NewMemoryWithClock(time.Now)
	linked, linkedHTTP := countingRelay(t)
	unlinked, unlinkedHTTP := countingRelay(t)
	pinger := &tcpPinger{links: map[string]bool{linked.URL: true}}
	a := realMem(t, "a", mem, replicasync.Options{})
	a.SetPinger(pinger)
	// Every replica measures with the same links (the others through the
	// option), so any HTTP probe of the linked peer is a bug.
	l := realMem(t, "linked", mem, replicasync.Options{RelayAddress: linked.URL, Pinger: pinger})
	u := realMem(t, "unlinked", mem, replicasync.Options{RelayAddress: unlinked.URL, Pinger: pinger})
	wait.For(t, 10*time.Second, "a measured both peers", func() bool {
		lat1, _, _ := report(a, l.Self().ID)
		lat2, _, _ := report(a, u.Self().ID)
		return lat1 > 0 && lat2 > 0
	})
	if pinger.pings.Load() == 0 {
		t.Fatal("the linked peer was never pinged over its link")
	}
	if unlinkedHTTP.Load() == 0 {
		t.Fatal("the peer without a link was not probed over HTTP")
	}
	if n := linkedHTTP.Load(); n != 0 {
		t.Fatalf("the linked peer got %d HTTP probes; its link should carry them", n)
	}
}

// Item 4: with no pubsub (PgBouncer in transaction pooling) replicas still
// see each other, by polling, within a poll interval and without a beat.
func TestPollModeSeesJoinsAndLeavesWithoutNotify(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	opts := replicasync.Options{HeartbeatInterval: time.Minute, PollInterval: 100 * time.Millisecond}
	newPolling := func(name string) *replicasync.Manager {
		o := opts
		o.Hostname = name
		m, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), nil, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close() })
		return m
	}
	a := newPolling("a")
	b := newPolling("b")
	wait.For(t, 10*time.Second, "a sees b by polling", func() bool { return sees(a, b.Self().ID) })
	if err := b.Leave(context.Background()); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "a sees b leave by polling", func() bool { return !sees(a, b.Self().ID) })
}

// slowListen is the real pubsub whose subscriptions go live only when the
// test says so: LISTEN is sent by the pubsub's own goroutine some time
// after Subscribe returns, and a notification sent meanwhile is lost.
type slowListen struct {
	*pubsub.Pubsub
	live chan struct{}
	wg   sync.WaitGroup
}

func (s *slowListen) Subscribe(channel string, l pubsub.Listener) (func(), error) {
	stop := make(chan struct{})
	var mu sync.Mutex
	var cancel func()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-s.live:
		case <-stop:
			return
		}
		c, err := s.Pubsub.Subscribe(channel, l)
		if err != nil {
			return
		}
		mu.Lock()
		cancel = c
		mu.Unlock()
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(stop) })
		s.wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if cancel != nil {
			cancel()
		}
	}, nil
}

// A poll-mode replica still announces itself through the pool, so a
// replica that LISTENs sees it at once, without waiting for a beat.
func TestPollModeReplicaIsHeardByListeningPeersAtOnce(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	listening := start(t, db, replicasync.Options{Hostname: "listening"})
	polling, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), nil, replicasync.Options{Hostname: "polling", HeartbeatInterval: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = polling.Close() })
	wait.For(t, 10*time.Second, "the listening replica sees the polling one", func() bool { return sees(listening, polling.Self().ID) })
	if err := polling.Leave(context.Background()); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "and sees it leave", func() bool { return !sees(listening, polling.Self().ID) })
}

// A peer that announces itself while a starting replica's LISTEN is not yet
// in place is still seen at once: New returns only after its subscription
// is live (it hears its own announcement), and reads its peers after that.
func TestPeerAnnouncedBeforeTheListenIsLiveIsNotMissed(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	slow := &slowListen{Pubsub: newPubsub(t, db), live: make(chan struct{})}
	type result struct {
		m   *replicasync.Manager
		err error
	}
	started := make(chan result, 1)
	go func() {
		m, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), slow, replicasync.Options{Hostname: "listening", HeartbeatInterval: time.Minute})
		started <- result{m, err}
	}()
	// Registered, announced, but not yet listening: wait for its row.
	wait.For(t, 10*time.Second, "the listening replica registered", func() bool {
		rows, err := db.RecentReplicas(context.Background(), time.Minute)
		return err == nil && len(rows) == 1
	})
	peer := start(t, db, replicasync.Options{Hostname: "peer"}) // announces into the gap
	close(slow.live)
	var r result
	select {
	case r = <-started:
	case <-time.After(20 * time.Second):
		t.Fatal("New did not return after its subscription went live")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	t.Cleanup(func() { _ = r.m.Close() })
	wait.For(t, 10*time.Second, "the starting replica sees the peer that announced into the gap", func() bool { return sees(r.m, peer.Self().ID) })
}

// A subscription that never goes live (a proxy that drops notifications)
// delays the start by the listen timeout at most, with one WARN line, and
// the replica works: it still registers and sees its peers by reading.
func TestStartGoesOnWhenItsAnnouncementNeverComesBack(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	deaf := &slowListen{Pubsub: newPubsub(t, db), live: make(chan struct{})} // never live
	core, logs := observer.New(zapcore.InfoLevel)
	began := time.Now()
	a, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), deaf, replicasync.Options{Hostname: "deaf", Logger: zap.New(core), HeartbeatInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	t.Logf("New returned after %s", time.Since(began))
	if n := logs.FilterMessage("own replica announcement not heard back: peers that start now may be seen only at the next heartbeat").Len(); n != 1 {
		t.Fatalf("%d warnings about the missing echo, want 1", n)
	}
	b := start(t, db, replicasync.Options{Hostname: "b"})
	wait.For(t, 10*time.Second, "the deaf replica sees b at its next beat", func() bool { return sees(a, b.Self().ID) })
}

// switchPinger is a tcpPinger whose links the test adds while it runs (a
// mesh link coming up).
type switchPinger struct {
	mu    sync.Mutex
	links map[string]bool
	pings atomic.Int32
}

func (p *switchPinger) link(url string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.links == nil {
		p.links = map[string]bool{}
	}
	p.links[url] = true
}

func (p *switchPinger) PingPeer(ctx context.Context, relayURL string) (time.Duration, bool, error) {
	p.mu.Lock()
	linked := p.links[relayURL]
	p.mu.Unlock()
	if !linked {
		return 0, false, nil
	}
	p.pings.Add(1)
	return (&tcpPinger{links: map[string]bool{relayURL: true}}).PingPeer(ctx, relayURL)
}

// With a LinkPinger (the relay on), a peer that joins is measured over its
// mesh link once the link is up (the mesh calls Reprobe), not over HTTP
// before: at a mass start that was N-1 HTTP connections and requests per
// replica for a sample the link gives a moment later.
func TestNewcomerIsMeasuredOverItsLinkNotOverHTTPFirst(t *testing.T) {
	t.Parallel()
	mem := storetest.NewMemoryWithClock(time.Now)
	pinger := &switchPinger{}
	// Hourly beats: no round runs during the test, only joins and Reprobe.
	a := realMem(t, "a", mem, replicasync.Options{Pinger: pinger, HeartbeatInterval: time.Hour})
	srv, httpProbes := countingRelay(t)
	b := realMem(t, "b", mem, replicasync.Options{RelayAddress: srv.URL, HeartbeatInterval: time.Hour})
	wait.For(t, 10*time.Second, "a sees b", func() bool { return sees(a, b.Self().ID) })
	time.Sleep(300 * time.Millisecond) // what a would do on its own now: nothing
	if n := httpProbes.Load(); n != 0 {
		t.Fatalf("a probed the newcomer over HTTP %d times before its link was up", n)
	}
	pinger.link(srv.URL)
	a.Reprobe(srv.URL) // the mesh: the link is up
	wait.For(t, 10*time.Second, "a measured b over the link", func() bool {
		lat, _, _ := report(a, b.Self().ID)
		return lat > 0
	})
	if n := httpProbes.Load(); n != 0 || pinger.pings.Load() == 0 {
		t.Fatalf("%d HTTP probes and %d link pings, want only link pings", n, pinger.pings.Load())
	}
}

// HTTP probe connections are not kept once every peer is measured over a
// mesh link: a replica would otherwise hold N-1 idle connections (and
// their goroutines and buffers on both sides) for minutes after a start.
func TestIdleHTTPProbeConnectionsCloseOnceLinksCarryTheProbes(t *testing.T) {
	t.Parallel()
	mem := storetest.NewMemoryWithClock(time.Now)
	var mu sync.Mutex
	open := map[net.Conn]bool{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		switch s {
		case http.StateNew:
			open[c] = true
		case http.StateClosed, http.StateHijacked:
			delete(open, c)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	openConns := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(open)
	}
	pinger := &switchPinger{}
	a := realMem(t, "a", mem, replicasync.Options{Pinger: pinger, StaleAfter: time.Hour})
	b := realMem(t, "b", mem, replicasync.Options{RelayAddress: srv.URL, HeartbeatInterval: time.Hour, StaleAfter: time.Hour})
	// No link yet: a round measures b over HTTP, on a kept-alive connection.
	wait.For(t, 10*time.Second, "a measured b over HTTP", func() bool {
		lat, _, _ := report(a, b.Self().ID)
		return lat > 0 && openConns() > 0
	})
	pinger.link(srv.URL)
	wait.For(t, 10*time.Second, "the idle HTTP probe connection is closed", func() bool { return openConns() == 0 })
	if pinger.pings.Load() == 0 {
		t.Fatal("b was not measured over its link afterwards")
	}
}
