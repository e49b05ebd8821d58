package derpmesh_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/coder/quartz"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// The mesh decides on the clock it is given (Options.Clock), so these
// tests step a quartz.Mock through pauses and silences of an hour or more
// that the real clock would never reach while the test runs, between real
// DERP servers.

// A peer that cannot be reached is redialed when its retry pause ends on
// the mesh's clock: an hour-long pause ends as soon as the mock is
// stepped by it, and the peer's state change is stamped with the mock's
// time.
func TestRedialPauseRunsOnTheInjectedClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	mock := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	redial := mock.Trap().NewTimer("derpmesh", "redial")
	defer redial.Close()

	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	url, addr := b.url, b.http.Listener.Addr().String()
	b.stop() // nothing listens there: every dial is refused
	a.meshWith(t, meshOptions{
		meshKey: k, clock: mock,
		retry: time.Hour, maxRetry: time.Hour, // on the real clock: never within the test
		ping: 24 * time.Hour, // no keepalive tick before the pause ends
	}, b)

	call := redial.MustWait(ctx)
	if call.Duration < 48*time.Minute || call.Duration > 72*time.Minute {
		t.Fatalf("first retry pause %v, want RetryInterval 1h ±20%%", call.Duration)
	}
	call.MustRelease(ctx)
	if s, _ := a.peerStatus(url); !strings.Contains(s.Error, "cannot connect") {
		t.Fatalf("status during the pause: %+v, want the connect error", s)
	}

	back := startNode(t, nodeOptions{meshKey: k, addr: addr})
	if back.url != url {
		t.Fatalf("restarted on %s, want %s", back.url, url)
	}
	mock.Advance(call.Duration).MustWait(ctx)
	wait.For(t, eventually, "meshed once the pause ended on the mock clock", func() bool { return a.connectedTo(url) })
	if s, _ := a.peerStatus(url); !s.Since.Equal(mock.Now()) {
		t.Fatalf("PeerStatus.Since %v, want the mock clock's %v", s.Since, mock.Now())
	}
	ca, cb := connect(t, a), connect(t, back)
	if !derptest.Reachable(ca, cb, 15*time.Second) {
		t.Fatal("not forwarding after the redial")
	}
}

// A link that black-holes traffic is noticed by the keepalive on the
// mesh's clock: it is pinged once it has been silent for PingInterval
// (an hour here), each ping is given ConfirmTimeout (a minute), and after
// two unanswered pings the link is reported broken and redialed.
func TestSilentLinkIsPingedAndReplacedOnTheInjectedClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	mock := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	pings := mock.Trap().AfterFunc("derpmesh", "ping", "keepalive")
	defer pings.Close()
	redial := mock.Trap().NewTimer("derpmesh", "redial")
	defer redial.Close()

	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	proxy, via := faultproxy.InFrontOf(t, b.url)
	a.meshWith(t, meshOptions{
		meshKey: k, clock: mock,
		ping: time.Hour, confirm: time.Minute,
		retry: 24 * time.Hour, maxRetry: 24 * time.Hour,
		extraURLs: []string{via},
	})
	wait.For(t, eventually, "meshed through the proxy", func() bool { return a.connectedTo(via) })

	proxy.Freeze() // the link stays open, nothing moves on it
	// The keepalive checks every PingInterval/2; the link has been silent
	// for PingInterval at the second check.
	mock.Advance(30 * time.Minute).MustWait(ctx)
	mock.Advance(30 * time.Minute).MustWait(ctx)
	for i := 1; i <= 2; i++ {
		call := pings.MustWait(ctx)
		if call.Duration != time.Minute {
			t.Fatalf("keepalive ping %d given %v, want ConfirmTimeout 1m", i, call.Duration)
		}
		call.MustRelease(ctx)
		if !a.connectedTo(via) {
			t.Fatalf("link reported broken before ping %d timed out", i)
		}
		mock.Advance(time.Minute).MustWait(ctx)
	}

	// A link that had been up 1h2m is redialed after a pause (it was up
	// less than MaxRetryInterval), during which the status says why.
	call := redial.MustWait(ctx)
	call.MustRelease(ctx)
	s, _ := a.peerStatus(via)
	if s.State != derpmesh.StateConnecting || !strings.Contains(s.Error, "peer stopped answering pings (2 in a row unanswered within 1m0s)") {
		t.Fatalf("status after two unanswered pings: %+v", s)
	}
	if !s.Since.Equal(mock.Now()) {
		t.Fatalf("PeerStatus.Since %v, want the mock clock's %v", s.Since, mock.Now())
	}
	wait.For(t, eventually, "OnPeerBroken", func() bool { return a.brokenCalls(via) > 0 })

	a.mesh.Reconnect(via) // new connections through the proxy are not frozen
	wait.For(t, eventually, "meshed again", func() bool { return a.connectedTo(via) })
	ca, cb := connect(t, a), connect(t, b)
	if !derptest.Reachable(ca, cb, 15*time.Second) {
		t.Fatal("not forwarding over the new link")
	}
}

// PingPeer's round trip is read on the mesh's clock, the clock replicasync
// schedules its probes on: the 7 ms the mock moves while the pong is
// awaited is the reported latency, to the nanosecond.
func TestPingPeerRoundTripIsReadOnTheInjectedClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	mock := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	end := mock.Trap().Since("derpmesh", "pingPeer")
	defer end.Close()

	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k, clock: mock, ping: 24 * time.Hour}, b)
	wait.For(t, eventually, "meshed", func() bool { return a.connectedTo(b.url) })

	type result struct {
		rtt time.Duration
		ok  bool
		err error
	}
	done := make(chan result, 1)
	go func() {
		rtt, ok, err := a.mesh.PingPeer(ctx, b.url)
		done <- result{rtt, ok, err}
	}()
	call := end.MustWait(ctx) // the pong is back; the round trip is being read
	mock.Advance(7 * time.Millisecond).MustWait(ctx)
	call.MustRelease(ctx)
	r := <-done
	if !r.ok || r.err != nil {
		t.Fatalf("PingPeer over an established link: ok %v, err %v", r.ok, r.err)
	}
	if r.rtt != 7*time.Millisecond {
		t.Fatalf("round trip %v, want the mock clock's 7ms", r.rtt)
	}
}

// Close does not wait for the mesh's clock: with a retry pause and a
// keepalive ping pending on a mock that is never stepped again, it
// returns at once (the pending ping ends with the connection), and the goroutines it waited for are gone (TestMain's
// goleak fails the package otherwise).
func TestCloseDoesNotWaitForTheInjectedClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	mock := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	pings := mock.Trap().AfterFunc("derpmesh", "ping", "keepalive")
	defer pings.Close()
	redial := mock.Trap().NewTimer("derpmesh", "redial")
	defer redial.Close()

	k := newMeshKey()
	a, b, gone := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	gone.stop()
	proxy, via := faultproxy.InFrontOf(t, b.url)
	a.meshWith(t, meshOptions{
		meshKey: k, clock: mock, ping: time.Hour, confirm: time.Minute,
		retry: 24 * time.Hour, maxRetry: 24 * time.Hour,
		extraURLs: []string{via, gone.url},
	})
	redial.MustWait(ctx).MustRelease(ctx) // gone.url is pausing
	wait.For(t, eventually, "meshed through the proxy", func() bool { return a.connectedTo(via) })
	proxy.Freeze()
	mock.Advance(30 * time.Minute).MustWait(ctx)
	mock.Advance(30 * time.Minute).MustWait(ctx)
	pings.MustWait(ctx).MustRelease(ctx) // a keepalive ping is waiting for its timeout

	// Within the DERP library's own 5 s cap on a ping (real time), which
	// would otherwise end the pending ping for Close; Close itself takes
	// milliseconds.
	const within = 4 * time.Second
	closed := make(chan struct{})
	start := time.Now()
	go func() {
		_ = a.mesh.Close()
		close(closed)
	}()
	select {
	case <-closed:
		t.Logf("Close returned in %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(within):
		t.Fatalf("Close did not return within %v: it waits for the mock clock", within)
	}
}
