package replicasync_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
	"github.com/coder-ha/coder/replicasync/storetest"
)

// countingStore counts full reads, so a test can wait for one.
type countingStore struct {
	*storetest.Memory
	fullReads atomic.Int64
}

func (s *countingStore) RecentMembers(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	s.fullReads.Add(1)
	return s.Memory.RecentMembers(ctx, staleAfter)
}

// memCluster is replicas sharing one in-memory store whose "database
// now()" is a mock clock every replica also uses: time moves only when the
// test steps it.
type memCluster struct {
	t     *testing.T
	clock *quartz.Mock
	mem   *storetest.Memory
	store *countingStore
	logs  *observer.ObservedLogs
	core  zapcore.Core
}

const (
	memBeat  = time.Second
	memStale = 3 * time.Second
)

func newMemCluster(t *testing.T) *memCluster {
	clock := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	mem := storetest.NewMemoryWithClock(func() time.Time { return clock.Now() })
	core, logs := observer.New(zapcore.InfoLevel)
	return &memCluster{t: t, clock: clock, mem: mem, store: &countingStore{Memory: mem}, logs: logs, core: core}
}

func (c *memCluster) start(name string, opts replicasync.Options) *replicasync.Manager {
	c.t.Helper()
	opts.Hostname = name
	opts.Clock = c.clock
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = memBeat
	}
	if opts.StaleAfter == 0 {
		opts.StaleAfter = memStale
	}
	opts.Logger = zap.New(c.core).With(zap.String("self", name))
	m, err := replicasync.New(context.Background(), c.store, c.mem, opts)
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { _ = m.Close() })
	return m
}

// step moves the mock clock d forward, one timer event at a time, letting
// the replicas' goroutines act after each (see settle). It must run inside
// synctest.Test.
func (c *memCluster) step(d time.Duration) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c.settle() // what was started or changed before the step acts first
	for d > 0 {
		next, ok := c.clock.Peek()
		if !ok || next > d {
			c.clock.Advance(d).MustWait(ctx)
			c.settle()
			return
		}
		c.clock.Advance(next).MustWait(ctx)
		d -= next
		c.settle()
	}
}

// settle waits until the goroutines woken by a tick have acted on it:
// until every goroutine of the test's bubble (the replicas', the clock's)
// is blocked again on something only the bubble can end (see
// testing/synctest), so step must run inside synctest.Test. Quartz hands
// a tick to its consumer from a goroutine of its own and drops one not
// taken before the next is due, so Advance(...).MustWait alone does not
// say that the tick was handled, nor even received.
func (c *memCluster) settle() { synctest.Wait() }

func (c *memCluster) left(peer string) int {
	return c.logs.FilterMessage("replica left").FilterField(zap.String("peer_hostname", peer)).Len()
}

func allSee(n int, ms ...*replicasync.Manager) func() bool {
	return func() bool {
		for _, m := range ms {
			if len(m.All()) != n {
				return false
			}
		}
		return true
	}
}

// Item 2: a Postgres outage three times the stale window, and the pubsub
// reconnect's full re-read while the replicas' own beats still fail, drop
// nobody: zero "replica left" events, the mesh set never shrinks.
func TestDatabaseOutageOfThreeStaleWindowsDropsNobody(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a, b, r3 := c.start("a", replicasync.Options{}), c.start("b", replicasync.Options{}), c.start("c", replicasync.Options{})
		wait.For(t, 10*time.Second, "everyone sees three", allSee(3, a, b, r3))

		c.mem.SetDown(true)
		c.step(3 * memStale)
		for _, m := range []*replicasync.Manager{a, b, r3} {
			if !m.HeartbeatFailing() {
				t.Fatalf("%s: heartbeat not failing during the outage", m.Self().Hostname)
			}
		}
		before := c.store.fullReads.Load()
		c.mem.SetDown(false) // pubsub reconnects: everyone re-reads at once, before any beat
		wait.For(t, 10*time.Second, "the reconnect's full re-reads", func() bool { return c.store.fullReads.Load() >= before+3 })
		if !allSee(3, a, b, r3)() {
			t.Fatal("a full re-read while our own beat still fails dropped peers")
		}
		c.step(2 * memStale) // retries succeed, everyone re-beats, the grace window passes
		wait.For(t, 10*time.Second, "heartbeats recovered", func() bool {
			return !a.HeartbeatFailing() && !b.HeartbeatFailing() && !r3.HeartbeatFailing()
		})
		if !allSee(3, a, b, r3)() {
			t.Fatal("peers dropped after the outage")
		}
		if n := c.logs.FilterMessage("replica left").Len(); n != 0 {
			t.Fatalf("%d \"replica left\" events through the outage; want 0", n)
		}
	})
}

// A replica that died during the outage is dropped once the others have
// beaten again and it had a full stale window to re-beat; not before.
func TestReplicaThatDiedDuringOutageIsDroppedAfterTheGraceWindow(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a, b, dead := c.start("a", replicasync.Options{}), c.start("b", replicasync.Options{}), c.start("dead", replicasync.Options{})
		wait.For(t, 10*time.Second, "everyone sees three", allSee(3, a, b, dead))
		c.mem.SetDown(true)
		c.step(memStale)
		dead.StopBeatingForTest()
		c.step(memStale)
		c.mem.SetDown(false)
		c.step(memBeat + memBeat/2) // a and b re-beat; dead does not
		wait.For(t, 10*time.Second, "a and b recovered", func() bool { return !a.HeartbeatFailing() && !b.HeartbeatFailing() })
		if !sees(a, dead.Self().ID) || !sees(b, dead.Self().ID) {
			t.Fatal("the silent replica was dropped inside the grace window")
		}
		c.step(memStale)
		wait.For(t, 10*time.Second, "a and b drop the dead replica", func() bool { return !sees(a, dead.Self().ID) && !sees(b, dead.Self().ID) })
		if n := c.logs.FilterMessage("replica left").Len(); n != 2 {
			t.Fatalf("%d \"replica left\" events, want 2 (a and b about dead)", n)
		}
	})
}

// Item 9: a graceful stop right after an outage is honoured at once, even
// inside the grace window.
func TestGracefulStopRightAfterOutageIsHonouredAtOnce(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a, b := c.start("a", replicasync.Options{}), c.start("b", replicasync.Options{})
		wait.For(t, 10*time.Second, "both see two", allSee(2, a, b))
		c.mem.SetDown(true)
		c.step(2 * memStale)
		c.mem.SetDown(false)
		c.step(memBeat + memBeat/2)
		wait.For(t, 10*time.Second, "recovered", func() bool { return !a.HeartbeatFailing() && !b.HeartbeatFailing() })
		if err := b.Leave(context.Background()); err != nil {
			t.Fatal(err)
		}
		// No clock step: the announcement alone must do it.
		wait.For(t, 10*time.Second, "a drops b at once", func() bool { return !sees(a, b.Self().ID) })
	})
}

// Item 3: a stopped_at set on a live replica's row (not by the replica) is
// cleared by its next beat and announced, so peers take it back.
func TestStopMarkOnALiveReplicaIsClearedByItsNextBeat(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{HeartbeatInterval: time.Hour, StaleAfter: memStale})
		b := c.start("b", replicasync.Options{})
		wait.For(t, 10*time.Second, "both see two", allSee(2, a, b))
		c.mem.MarkStoppedByOther(b.Self().ID)
		// a hears of it (as it would from any announcement) and drops b.
		if err := c.mem.Publish(context.Background(), replicasync.Channel, []byte(b.Self().ID.String())); err != nil {
			t.Fatal(err)
		}
		wait.For(t, 10*time.Second, "a drops the stopped b", func() bool { return !sees(a, b.Self().ID) })
		c.step(memBeat) // only b beats (a's interval is an hour)
		wait.For(t, 10*time.Second, "b's row is live again", func() bool {
			r, ok := c.mem.Row(b.Self().ID)
			return ok && r.StoppedAt == nil
		})
		wait.For(t, 10*time.Second, "a takes b back from b's announcement", func() bool { return sees(a, b.Self().ID) })
	})
}

// Item 3: a replica that left is never revived by its own goroutines,
// which keep running until Close.
func TestReplicaThatLeftStaysStopped(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{})
		if err := a.Leave(context.Background()); err != nil {
			t.Fatal(err)
		}
		c.step(3 * memBeat)
		if r, _ := c.mem.Row(a.Self().ID); r.StoppedAt == nil {
			t.Fatal("a replica that left was revived by a later beat")
		}
		if err := a.Leave(context.Background()); err != nil {
			t.Fatalf("second Leave: %v", err)
		}
		if err := a.Close(); err != nil {
			t.Fatalf("Close after Leave: %v", err)
		}
	})
}

// Item 7: a deleted live row is re-created and announced, so a peer that
// dropped it takes it back without waiting for its own beat.
func TestDeletedRowIsRecreatedAndAnnounced(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{HeartbeatInterval: time.Hour, StaleAfter: memStale})
		b := c.start("b", replicasync.Options{})
		wait.For(t, 10*time.Second, "both see two", allSee(2, a, b))
		c.mem.DeleteReplica(b.Self().ID)
		if err := c.mem.Publish(context.Background(), replicasync.Channel, []byte(b.Self().ID.String())); err != nil {
			t.Fatal(err)
		}
		wait.For(t, 10*time.Second, "a drops the deleted b", func() bool { return !sees(a, b.Self().ID) })
		c.step(memBeat)
		wait.For(t, 10*time.Second, "a sees b again from b's announcement", func() bool { return sees(a, b.Self().ID) })
	})
}

// Item 3, partial partition: a replica whose own beat fails for longer than
// the stale window while others reach the database is dropped by them; it
// says so (one WARN, a health warning, Isolated without incoming links) and
// keeps its own peers.
func TestCutOffReplicaReportsItselfGone(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{RelayAddress: "http://127.0.0.1:1"})
		b := c.start("b", replicasync.Options{RelayAddress: "http://127.0.0.1:2"})
		wait.For(t, 10*time.Second, "both see two", allSee(2, a, b))
		c.mem.CutOff(b.Self().ID, true)
		c.step(memStale + 2*memBeat)
		wait.For(t, 10*time.Second, "a drops the cut-off b", func() bool { return !sees(a, b.Self().ID) })
		if !b.HeartbeatFailing() || !b.CutOff() {
			t.Fatal("b does not know it is cut off")
		}
		if !sees(b, a.Self().ID) {
			t.Fatal("b dropped a while its own beat fails")
		}
		var found bool
		for _, w := range b.Warnings() {
			found = found || (len(w) > 0 && contains(w, "consider this replica gone"))
		}
		if !found {
			t.Fatalf("no health warning about being cut off: %q", b.Warnings())
		}
		if !b.Isolated(0) || b.Isolated(1) {
			t.Fatal("Isolated must be true with no incoming mesh link and false with one")
		}
		if a.Isolated(0) {
			t.Fatal("a replica whose beat works is never isolated")
		}
		c.step(3 * memBeat)
		warns := c.logs.FilterMessage("heartbeat failing for longer than the stale window: replicas that reach the database consider this one gone").Len()
		if warns != 1 {
			t.Fatalf("cut-off WARN logged %d times, want once", warns)
		}
		c.mem.CutOff(b.Self().ID, false)
		c.step(memBeat + memBeat/2)
		wait.For(t, 10*time.Second, "a takes b back", func() bool { return sees(a, b.Self().ID) })
		if b.CutOff() {
			t.Fatal("b still cut off after its beat succeeded")
		}
	})
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// Item 12: the callback runs off the heartbeat goroutine: a callback that
// blocks does not delay beats, changes made meanwhile coalesce (the next
// call has the latest set) and calls never overlap.
func TestSlowCallbackDelaysNoHeartbeatAndCoalesces(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{RelayAddress: "http://127.0.0.1:1"})
		release := make(chan struct{})
		var calls, running, overlapped atomic.Int32
		var last atomic.Value
		a.SetCallback(func(ch replicasync.PeerChange) {
			if running.Add(1) > 1 {
				overlapped.Store(1)
			}
			defer running.Add(-1)
			last.Store(ch.Peers)
			if calls.Add(1) == 2 {
				<-release // the mesh is slow to tear down
			}
		})
		wait.For(t, 10*time.Second, "initial call", func() bool { return calls.Load() == 1 })
		b := c.start("b", replicasync.Options{RelayAddress: "http://127.0.0.1:2"})
		wait.For(t, 10*time.Second, "the blocking call about b", func() bool { return calls.Load() == 2 })
		r3 := c.start("c", replicasync.Options{RelayAddress: "http://127.0.0.1:3"})
		r4 := c.start("d", replicasync.Options{RelayAddress: "http://127.0.0.1:4"})
		wait.For(t, 10*time.Second, "a sees four", allSee(4, a))
		before := a.Self().UpdatedAt
		c.step(2 * memBeat)
		wait.For(t, 10*time.Second, "a beats while its callback blocks", func() bool { return a.Self().UpdatedAt.After(before) })
		close(release)
		wait.For(t, 10*time.Second, "one coalesced call with the latest set", func() bool {
			p, _ := last.Load().([]replicasync.Peer)
			return calls.Load() == 3 && len(p) == 3
		})
		if overlapped.Load() != 0 {
			t.Fatal("callbacks overlapped")
		}
		_, _, _ = b, r3, r4
	})
}

// Item 8: a process restarted behind the same relay URL appears once, the
// newest wins, and the URL is reported as replaced so the owner redials.
func TestPeerRestartedBehindTheSameURLAppearsOnceAndIsReplaced(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{})
		var changes []replicasync.PeerChange
		got := make(chan replicasync.PeerChange, 16)
		a.SetCallback(func(ch replicasync.PeerChange) { got <- ch })
		const url = "http://127.0.0.1:9"
		old := c.start("old", replicasync.Options{RelayAddress: url})
		wait.For(t, 10*time.Second, "a sees old", func() bool { return sees(a, old.Self().ID) })
		old.StopBeatingForTest() // killed: its row is still live for a while
		c.step(memBeat / 2)
		restarted := c.start("new", replicasync.Options{RelayAddress: url})
		wait.For(t, 10*time.Second, "a sees the new process", func() bool { return sees(a, restarted.Self().ID) })
		wait.For(t, 10*time.Second, "callback about the new process", func() bool {
			for {
				select {
				case ch := <-got:
					changes = append(changes, ch)
				default:
					n := len(changes)
					return n > 0 && len(changes[n-1].Peers) == 1 && changes[n-1].Peers[0].ID == restarted.Self().ID
				}
			}
		})
		for _, ch := range changes {
			if len(ch.Peers) > 1 {
				t.Fatalf("the callback got the same URL twice: %+v", ch.Peers)
			}
		}
		lastChange := changes[len(changes)-1]
		if len(lastChange.Replaced) != 1 || lastChange.Replaced[0] != url {
			t.Fatalf("replaced = %v, want [%s]", lastChange.Replaced, url)
		}
	})
}

// Clock skew, deterministically: a replica whose clock is an hour ahead
// stays a member across many stale windows, and measures exactly the hour.
func TestReplicaWithClockAnHourAheadStaysAMemberAndMeasuresIt(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		a := c.start("a", replicasync.Options{})
		ahead, err := replicasync.New(context.Background(), c.store, c.mem, replicasync.Options{Hostname: "ahead", HeartbeatInterval: memBeat, StaleAfter: memStale,
			Clock: replicasync.OffsetClock(c.clock, time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ahead.Close() })
		wait.For(t, 10*time.Second, "both see two", allSee(2, a, ahead))
		c.step(5 * memStale)
		if !allSee(2, a, ahead)() {
			t.Fatal("the skewed replica lost membership")
		}
		if got := ahead.ClockSkew(); got != -time.Hour {
			t.Fatalf("measured skew %s, want -1h (database minus local)", got)
		}
		if c.left("ahead")+c.left("a") != 0 {
			t.Fatal("a replica left")
		}
	})
}

// recordingPinger pings over a real TCP connect to the peer's relay and
// records when (on the test's mock clock) each peer was measured.
type recordingPinger struct {
	tcp   tcpPinger
	clock quartz.Clock
	mu    sync.Mutex
	at    map[string][]time.Time
}

func (p *recordingPinger) PingPeer(ctx context.Context, relayURL string) (time.Duration, bool, error) {
	p.mu.Lock()
	p.at[relayURL] = append(p.at[relayURL], p.clock.Now())
	p.mu.Unlock()
	return p.tcp.PingPeer(ctx, relayURL)
}

// total is how many pings were made so far.
func (p *recordingPinger) total() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, at := range p.at {
		n += len(at)
	}
	return n
}

// probeRound sets up replica a probing four peers over a recordingPinger
// and waits, in real time, until a has measured each of them and no probe
// is under way, so nothing probes until the test moves the mock clock.
// The peers beat hourly: within the test, only a's beats start rounds.
func probeRound(t *testing.T) (c *memCluster, a *replicasync.Manager, urls []string, pinger *recordingPinger) {
	// A threshold no loopback connect reaches: these tests are about when
	// probes happen, not about warnings (whose confirmations add probes).
	return probeSetup(t, 4, replicasync.Options{LatencyThreshold: time.Hour})
}

// probeSetup is probeRound with peers peers and a's options.
func probeSetup(t *testing.T, peers int, opts replicasync.Options) (c *memCluster, a *replicasync.Manager, urls []string, pinger *recordingPinger) {
	t.Helper()
	c = newMemCluster(t)
	links := map[string]bool{}
	for i := 0; i < peers; i++ {
		srv := relay(t)
		urls = append(urls, srv.URL)
		links[srv.URL] = true
	}
	pinger = &recordingPinger{tcp: tcpPinger{links: links}, clock: c.clock, at: map[string][]time.Time{}}
	opts.Pinger = pinger
	a = c.start("a", opts)
	for i, u := range urls {
		c.start(fmt.Sprintf("p%d", i), replicasync.Options{RelayAddress: u, HeartbeatInterval: time.Hour})
	}
	wait.For(t, 20*time.Second, "a sees every peer", func() bool { return len(a.Regional()) == peers })
	// With a pinger, newcomers are measured when their link comes up: the
	// mesh tells the manager so (OnPeerConnected → Reprobe).
	for _, u := range urls {
		a.Reprobe(u)
	}
	wait.For(t, 20*time.Second, "a measured every peer and stopped probing", func() bool {
		n := 0
		for _, p := range a.PeerReports() {
			if p.LatencyMS > 0 {
				n++
			}
		}
		return n == peers && a.ProbesInFlightForTest() == 0
	})
	return c, a, urls, pinger
}

// runRound moves the mock clock to a's next beat and through the probe
// round it starts, waiting at each step until a has made the probe due and
// armed the timer for the next (the trap), so the clock never runs ahead of
// the replica. midRound, if set, runs after the second probe. It returns
// the offset of each probe from the beat; every peer must be probed once.
func runRound(t *testing.T, c *memCluster, a *replicasync.Manager, urls []string, pinger *recordingPinger, midRound func()) []time.Duration {
	t.Helper()
	offsets, probed := runPartialRound(t, c, a, urls, len(urls), pinger, midRound)
	if len(probed) != len(urls) {
		t.Fatalf("%d of %d peers probed in the round, want all", len(probed), len(urls))
	}
	return offsets
}

// runPartialRound is runRound for a round that probes perRound of the
// peers; it returns the offsets and the peers probed (each at most once).
func runPartialRound(t *testing.T, c *memCluster, a *replicasync.Manager, urls []string, perRound int, pinger *recordingPinger, midRound func()) ([]time.Duration, []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	trap := c.clock.Trap().TimerReset("probe")
	defer trap.Close()
	advance := func(d time.Duration) {
		next, ok := c.clock.Peek()
		if !ok || next != d {
			t.Fatalf("next timer event in %v (%v), want %v: something else is scheduled", next, ok, d)
		}
		c.clock.Advance(d).MustWait(ctx)
	}
	// The next event is a's beat (the previous round, if any, checked
	// that nothing else comes first): it starts the round.
	toBeat, ok := c.clock.Peek()
	if !ok || toBeat > memBeat {
		t.Fatalf("next timer event in %v (%v), want a's beat within %v", toBeat, ok, memBeat)
	}
	beatAt := c.clock.Now().Add(toBeat)
	base := pinger.total()
	advance(toBeat)
	for i := 0; i < perRound; i++ {
		wait.For(t, 20*time.Second, fmt.Sprintf("probe %d of the round", i+1), func() bool { return pinger.total() >= base+i+1 })
		if i == perRound-1 {
			break // the last probe arms no timer
		}
		call, err := trap.Wait(ctx)
		if err != nil {
			t.Fatalf("waiting for the probe timer after probe %d: %v", i+1, err)
		}
		call.MustRelease(ctx)
		if i == 1 && midRound != nil {
			midRound()
		}
		advance(call.Duration)
	}
	wait.For(t, 20*time.Second, "the round's probes end", func() bool { return a.ProbesInFlightForTest() == 0 })
	// The rest of the interval, up to the next beat: nothing more is due.
	if next, ok := c.clock.Peek(); !ok || c.clock.Now().Add(next) != beatAt.Add(memBeat) {
		t.Fatalf("after the round, the next event is in %v, want the next beat at +%v", next, beatAt.Add(memBeat).Sub(c.clock.Now()))
	}
	if got := pinger.total() - base; got != perRound {
		t.Fatalf("%d probes in the round, want %d", got, perRound)
	}
	var offsets []time.Duration
	var probed []string
	pinger.mu.Lock()
	defer pinger.mu.Unlock()
	for _, u := range urls {
		var mine []time.Duration
		for _, at := range pinger.at[u] {
			if !at.Before(beatAt) {
				mine = append(mine, at.Sub(beatAt))
			}
		}
		if len(mine) > 1 {
			t.Fatalf("peer %s probed %d times in the round (offsets %v), want at most once", u, len(mine), mine)
		}
		if len(mine) == 1 {
			offsets = append(offsets, mine[0])
			probed = append(probed, u)
		}
	}
	sort.Slice(offsets, func(i, j int) bool { return offsets[i] < offsets[j] })
	return offsets, probed
}

// Probes are spread over the heartbeat interval, each peer at its own
// offset, rather than all at the instant of the beat.
func TestProbesAreSpreadOverTheInterval(t *testing.T) {
	t.Parallel()
	c, a, urls, pinger := probeRound(t)
	offsets := runRound(t, c, a, urls, pinger, nil)
	for i := 1; i < len(offsets); i++ {
		if gap := offsets[i] - offsets[i-1]; gap < memBeat/8 {
			t.Fatalf("probes bunched together: offsets %v", offsets)
		}
	}
	if offsets[len(offsets)-1] >= memBeat {
		t.Fatalf("the round overran the interval: offsets %v", offsets)
	}
}

// A row written mid-round because something changed (here an error the
// mesh reports) neither restarts the round nor probes a peer twice: only
// the periodic beat starts a round.
func TestAChangeWrittenMidRoundDoesNotRestartTheProbeRound(t *testing.T) {
	t.Parallel()
	c, a, urls, pinger := probeRound(t)
	offsets := runRound(t, c, a, urls, pinger, func() {
		a.SetError("cannot mesh with a peer")
		wait.For(t, 20*time.Second, "the error is written", func() bool { return a.Self().Error != "" })
	})
	for i := 1; i < len(offsets); i++ {
		if gap := offsets[i] - offsets[i-1]; gap < memBeat/8 {
			t.Fatalf("probes bunched together: offsets %v", offsets)
		}
	}
}

// With more peers than ProbesPerInterval, each round probes only that many
// (a replica's probing costs the same at any fleet size), the ones measured
// longest ago, so every peer is measured once per probe cycle of
// ceil(peers/ProbesPerInterval) intervals.
func TestLargeFleetIsSampledAFewPeersPerIntervalEveryPeerOncePerCycle(t *testing.T) {
	t.Parallel()
	const peers, perRound = 5, 2
	// The peers beat hourly; a must not find them stale over three rounds.
	c, a, urls, pinger := probeSetup(t, peers, replicasync.Options{ProbesPerInterval: perRound, LatencyThreshold: time.Hour, StaleAfter: time.Hour})
	seen := map[string]int{}
	var rounds [][]string
	for r := 0; r < (peers+perRound-1)/perRound; r++ {
		offsets, probed := runPartialRound(t, c, a, urls, perRound, pinger, nil)
		if len(offsets) == perRound && offsets[len(offsets)-1] >= memBeat {
			t.Fatalf("round %d overran the interval: offsets %v", r+1, offsets)
		}
		for _, u := range probed {
			seen[u]++
		}
		rounds = append(rounds, probed)
	}
	if len(seen) != peers {
		t.Fatalf("after one probe cycle %d of %d peers were measured (rounds %v)", len(seen), peers, rounds)
	}
	for _, u := range rounds[1] {
		for _, v := range rounds[0] {
			if u == v {
				t.Fatalf("peer %s probed again before every peer was probed once (rounds %v)", u, rounds)
			}
		}
	}
}
