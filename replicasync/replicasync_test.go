package replicasync_test

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/quartz"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

// relay serves /derp/latency-check like a replica's relay.
func relay(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/derp/latency-check" {
			w.WriteHeader(http.StatusOK)
			return
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func newPubsub(t *testing.T, db *database.DB) *pubsub.Pubsub {
	t.Helper()
	ps, err := pubsub.New(context.Background(), db, pubsub.Options{ReconnectMin: 50 * time.Millisecond, ReconnectMax: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	return ps
}

// start runs a Manager with its own pubsub connection, as a separate
// process would.
func start(t *testing.T, db *database.DB, opts replicasync.Options) *replicasync.Manager {
	t.Helper()
	if opts.HeartbeatInterval == 0 {
		opts.HeartbeatInterval = time.Minute // only NOTIFY can explain fast convergence
	}
	m, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), newPubsub(t, db), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return m
}

func sees(m *replicasync.Manager, id uuid.UUID) bool {
	for _, r := range m.All() {
		if r.ID == id {
			return true
		}
	}
	return false
}

func TestReplicasSeeEachOtherWithinASecondWithoutWaitingForABeat(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a := start(t, db, replicasync.Options{Hostname: "a", RelayAddress: relay(t).URL})
	began := time.Now()
	b := start(t, db, replicasync.Options{Hostname: "b", RelayAddress: relay(t).URL})
	wait.For(t, 10*time.Second, "a sees b", func() bool { return sees(a, b.Self().ID) })
	if !sees(b, a.Self().ID) {
		t.Fatal("b does not see a right after registering")
	}
	t.Logf("a saw b %s after b started", time.Since(began))

	_ = b.Close()
	wait.For(t, 10*time.Second, "a drops the closed b", func() bool { return !sees(a, b.Self().ID) })
}

func TestSilentReplicaIsDroppedAfterThreeBeatsNotBefore(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	const beat = 300 * time.Millisecond
	a := start(t, db, replicasync.Options{Hostname: "a", HeartbeatInterval: beat})
	b := start(t, db, replicasync.Options{Hostname: "b", HeartbeatInterval: beat})
	wait.For(t, 10*time.Second, "a sees b", func() bool { return sees(a, b.Self().ID) })
	b.StopBeatingForTest()
	// Measured from b's last beat (the database's now(), the same machine's
	// clock here), not from the stop: on a loaded machine b's last beat may
	// already be late when the test stops it.
	lastBeat := b.Self().UpdatedAt
	wait.For(t, 10*time.Second, "a drops the silent b", func() bool { return !sees(a, b.Self().ID) })
	gone := time.Since(lastBeat)
	if gone < 2*beat {
		t.Fatalf("b dropped %s after its last beat; it should survive at least 2 beats (%s)", gone, 2*beat)
	}
}

// Liveness is decided by the database clock: a replica whose machine's
// clock is an hour off stays a member and sees its peers.
func skewedClock(offset time.Duration) quartz.Clock {
	return replicasync.OffsetClock(quartz.NewReal(), offset)
}

func TestReplicaWithSkewedClockStaysAMember(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	// A stale window far longer than the beat: a replica starved of CPU
	// on a loaded machine stays a member, so only a liveness rule that
	// used the skewed machine clock (an hour off) could drop anyone.
	const beat = 300 * time.Millisecond
	const stale = 10 * time.Second
	a := start(t, db, replicasync.Options{Hostname: "a", HeartbeatInterval: beat, StaleAfter: stale})
	skewed := start(t, db, replicasync.Options{Hostname: "skewed", HeartbeatInterval: beat, StaleAfter: stale, Clock: skewedClock(-time.Hour)})
	ahead := start(t, db, replicasync.Options{Hostname: "ahead", HeartbeatInterval: beat, StaleAfter: stale, Clock: skewedClock(time.Hour)})
	wait.For(t, 10*time.Second, "everyone sees three", func() bool {
		return len(a.All()) == 3 && len(skewed.All()) == 3 && len(ahead.All()) == 3
	})
	time.Sleep(5 * beat) // several beats and reads pass; membership must hold
	for _, m := range []*replicasync.Manager{a, skewed, ahead} {
		if all := m.All(); len(all) != 3 {
			var names []string
			for _, r := range all {
				names = append(names, r.Hostname)
			}
			t.Fatalf("%s sees %v after 5 beats, want all three", m.Self().Hostname, names)
		}
	}
	// The offset is real: each replica measures it against the database.
	for _, tc := range []struct {
		m    *replicasync.Manager
		want time.Duration
	}{{skewed, time.Hour}, {ahead, -time.Hour}} {
		if got := tc.m.ClockSkew(); (got - tc.want).Abs() > time.Second {
			t.Errorf("%s: clock skew %s, want about %s", tc.m.Self().Hostname, got, tc.want)
		}
		if w := strings.Join(tc.m.Warnings(), "\n"); !strings.Contains(w, "off the database clock") {
			t.Errorf("%s: no clock warning: %q", tc.m.Self().Hostname, w)
		}
	}
	if a.ClockSkew().Abs() > time.Second || len(a.Warnings()) != 0 {
		t.Errorf("a replica on the database's clock reports skew %s, warnings %q", a.ClockSkew(), a.Warnings())
	}
}

func TestDeletedRowComesBackWithinABeat(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	const beat = 200 * time.Millisecond
	a := start(t, db, replicasync.Options{Hostname: "a", HeartbeatInterval: beat})
	b := start(t, db, replicasync.Options{Hostname: "b", HeartbeatInterval: beat})
	if err := db.DeleteReplica(context.Background(), b.Self().ID); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "b's row is back", func() bool {
		_, err := db.GetReplica(context.Background(), b.Self().ID)
		return err == nil
	})
	wait.For(t, 10*time.Second, "a still sees b", func() bool { return sees(a, b.Self().ID) })
}

// Not parallel: twenty managers starting at once would starve the timing
// of the tests that run beside it.
func TestTwentyReplicasStartingTogetherAllSeeTwenty(t *testing.T) {
	db := dbtest.NewDB(t)
	const n = 20
	managers := make([]*replicasync.Manager, n)
	var wg sync.WaitGroup
	for i := range managers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ps, err := pubsub.New(context.Background(), db, pubsub.Options{})
			if err != nil {
				t.Error(err)
				return
			}
			m, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), ps, replicasync.Options{Hostname: fmt.Sprintf("r%d", i), HeartbeatInterval: time.Minute})
			if err != nil {
				t.Error(err)
				_ = ps.Close()
				return
			}
			managers[i] = m
			t.Cleanup(func() { _ = m.Close(); _ = ps.Close() })
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	wait.For(t, 20*time.Second, "all twenty see twenty", func() bool {
		for _, m := range managers {
			if len(m.All()) != n {
				return false
			}
		}
		return true
	})
}

// The LISTEN connection killed by the database: the replica reconnects and
// resyncs, and still hears of a newcomer without waiting for a beat.
func TestKilledListenConnectionReconnectsAndResyncs(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ps := newPubsub(t, db)
	a, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), ps, replicasync.Options{Hostname: "a", HeartbeatInterval: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := db.Pool().Exec(context.Background(), "SELECT pg_terminate_backend($1)", int32(ps.BackendPID())); err != nil {
		t.Fatal(err)
	}
	b := start(t, db, replicasync.Options{Hostname: "b"}) // announced while a may be reconnecting
	wait.For(t, 10*time.Second, "a sees b after its listen connection was killed", func() bool { return sees(a, b.Self().ID) })
	wait.For(t, 10*time.Second, "pubsub reconnected", ps.Connected)
	c := start(t, db, replicasync.Options{Hostname: "c"})
	wait.For(t, 10*time.Second, "a sees c without waiting for a beat", func() bool { return sees(a, c.Self().ID) })
}

// A peer 100ms away each way raises the warning (log, health, row); a fast
// peer does not; removing the delay clears it.
func TestSlowPeerRaisesLatencyWarningThatClearsOnRecovery(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	proxy, err := faultproxy.New(strings.TrimPrefix(relay(t).URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	proxy.SetDelay(100 * time.Millisecond)

	core, logs := observer.New(zapcore.InfoLevel)
	// A stale window far longer than the beat: a peer starved of CPU for
	// a few beats on a loaded machine must not drop out and lose its
	// samples.
	const beat = 500 * time.Millisecond
	const stale = 10 * time.Second
	// 100ms sits well between a loopback peer on a busy 2-core machine
	// (a median of a few ms, tens under heavy load) and the 200ms round
	// trip through the proxy (100ms each way).
	watcher := start(t, db, replicasync.Options{Hostname: "watcher", HeartbeatInterval: beat, StaleAfter: stale, Logger: zap.New(core), RelayAddress: relay(t).URL, LatencyThreshold: 100 * time.Millisecond})
	slow := start(t, db, replicasync.Options{Hostname: "slow-peer", HeartbeatInterval: beat, StaleAfter: stale, RelayAddress: proxy.URL()})
	fast := start(t, db, replicasync.Options{Hostname: "fast-peer", HeartbeatInterval: beat, StaleAfter: stale, RelayAddress: relay(t).URL})

	warnsAbout := func(warnings []string, host string) bool {
		for _, w := range warnings {
			if strings.Contains(w, `"`+host+`"`) {
				return true
			}
		}
		return false
	}
	wait.For(t, 10*time.Second, "warning about slow-peer", func() bool { return warnsAbout(watcher.Warnings(), "slow-peer") })
	w := strings.Join(watcher.Warnings(), "\n")
	if !strings.Contains(w, proxy.URL()) {
		t.Errorf("warning does not name the relay URL %s: %s", proxy.URL(), w)
	}
	wait.For(t, 10*time.Second, "warning stored in watcher's row", func() bool {
		r, err := db.GetReplica(context.Background(), watcher.Self().ID)
		return err == nil && warnsAbout(r.Warnings, "slow-peer")
	})
	warnLines := logs.FilterMessage("peer replica latency above threshold").FilterField(zap.String("peer_hostname", "slow-peer")).All()
	if len(warnLines) != 1 || warnLines[0].Level != zapcore.WarnLevel {
		t.Fatalf("want exactly one WARN line about slow-peer, got %d", len(warnLines))
	}
	time.Sleep(5 * beat) // more beats pass while still slow: no repeated lines
	if n := logs.FilterMessage("peer replica latency above threshold").FilterField(zap.String("peer_hostname", "slow-peer")).Len(); n != 1 {
		t.Fatalf("the warning was logged %d times; once per change", n)
	}
	if warnsAbout(watcher.Warnings(), "fast-peer") {
		t.Fatal("a fast peer raised a warning")
	}
	var slowLatency float64
	for _, p := range watcher.PeerReports() {
		if p.ID == slow.Self().ID {
			slowLatency = p.LatencyMS
		}
	}
	if slowLatency < 200 {
		t.Errorf("slow peer's reported latency %.1fms, want ≥ 200ms (100ms each way)", slowLatency)
	}

	proxy.SetDelay(0)
	wait.For(t, 10*time.Second, "warning clears", func() bool { return !warnsAbout(watcher.Warnings(), "slow-peer") })
	if logs.FilterMessage("peer replica latency back under threshold").Len() == 0 {
		t.Fatal("no INFO line on recovery")
	}
	_ = fast
}

// When the mesh reports a broken connection, a peer that refuses
// connections is marked unreachable within a second.
func TestReprobeMarksCrashedPeerUnreachableWithinASecond(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	peerRelay := relay(t)
	a := start(t, db, replicasync.Options{Hostname: "a", RelayAddress: relay(t).URL})
	b := start(t, db, replicasync.Options{Hostname: "b", RelayAddress: peerRelay.URL})
	wait.For(t, 10*time.Second, "a has probed b", func() bool {
		for _, p := range a.PeerReports() {
			if p.ID == b.Self().ID && p.LatencyMS > 0 {
				return true
			}
		}
		return false
	})
	peerRelay.Close()
	crashed := time.Now()
	a.Reprobe(peerRelay.URL)
	// The product does this in milliseconds (make bench); the bound is
	// generous for a loaded 2-core machine.
	wait.For(t, 10*time.Second, "b reported unreachable", func() bool {
		for _, p := range a.PeerReports() {
			if p.ID == b.Self().ID && p.Error != "" {
				return true
			}
		}
		return false
	})
	t.Logf("unreachable after %s", time.Since(crashed))
}

func TestCallbackFiresOnMembershipChangeOnly(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	const beat = 300 * time.Millisecond
	// A stale window far longer than the beat: a replica starved of CPU
	// for a few beats on a loaded machine is not dropped (and re-added),
	// which would be a real change, not a spurious call.
	const stale = 10 * time.Second
	a := start(t, db, replicasync.Options{Hostname: "a", HeartbeatInterval: beat, StaleAfter: stale, RelayAddress: relay(t).URL})
	var calls atomic.Int32
	var last atomic.Value
	a.SetCallback(func(change replicasync.PeerChange) {
		calls.Add(1)
		last.Store(change.Peers)
	})
	wait.For(t, 10*time.Second, "initial call", func() bool { return calls.Load() == 1 })
	b := start(t, db, replicasync.Options{Hostname: "b", HeartbeatInterval: beat, StaleAfter: stale, RelayAddress: relay(t).URL})
	wait.For(t, 10*time.Second, "call on join", func() bool { return calls.Load() == 2 })
	if peers := last.Load().([]replicasync.Peer); len(peers) != 1 || peers[0].ID != b.Self().ID {
		t.Fatalf("callback got %v, want just b", peers)
	}
	time.Sleep(10 * beat) // ten beats with no change
	if n := calls.Load(); n != 2 {
		t.Fatalf("callback fired %d times across quiet beats; want no extra calls", n-2)
	}
	_ = b.Close()
	wait.For(t, 10*time.Second, "call on leave", func() bool { return calls.Load() == 3 })
	if peers := last.Load().([]replicasync.Peer); len(peers) != 0 {
		t.Fatalf("after b left the callback got %v", peers)
	}
}

func TestMalformedNotificationsAreIgnored(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a := start(t, db, replicasync.Options{Hostname: "a"})
	ps := newPubsub(t, db)
	for _, payload := range []string{"", "garbage", strings.Repeat("x", 7000), "00000000-0000-0000-0000-000000000000", `{"id": "json, not an id"}`, "ünïcödé-0000-0000-0000-000000000000"} {
		if err := ps.Publish(context.Background(), replicasync.Channel, []byte(payload)); err != nil {
			t.Fatal(err)
		}
	}
	b := start(t, db, replicasync.Options{Hostname: "b"})
	wait.For(t, 10*time.Second, "a still works and sees b", func() bool { return sees(a, b.Self().ID) })
}

func FuzzParseNotification(f *testing.F) {
	f.Add([]byte(uuid.NewString()))
	f.Add([]byte(""))
	f.Add([]byte("not-a-uuid"))
	f.Add([]byte("{00000000-0000-0000-0000-000000000000}"))
	f.Fuzz(func(t *testing.T, payload []byte) {
		id, ok := replicasync.ParseNotification(payload)
		if ok && (id == uuid.Nil || id.String() != strings.ToLower(string(payload))) {
			t.Fatalf("accepted %q as %s", payload, id)
		}
	})
}

func TestCloseIsIdempotentAndLeavesATombstone(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a := start(t, db, replicasync.Options{Hostname: "a"})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	_ = a.Close()
	r, err := db.GetReplica(context.Background(), a.Self().ID)
	if err != nil {
		t.Fatal(err)
	}
	if r.StoppedAt == nil {
		t.Fatal("closed replica's row has no stopped_at")
	}
}

// A connection that breaks while the replica registers (a pooler or the
// server restarting at a mass start) is tried again, not a failed start.
func TestRegistrationOutlastsABrokenConnection(t *testing.T) {
	t.Parallel()
	proxy, url := faultproxy.InFrontOf(t, dbtest.NewURL(t))
	db, err := database.Connect(context.Background(), url, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	proxy.Cut() // every pooled connection breaks; new ones are reset
	healed := make(chan struct{})
	go func() {
		defer close(healed)
		time.Sleep(1500 * time.Millisecond) // the outage's length, not a wait for a condition
		proxy.Heal()
	}()
	m, err := replicasync.New(context.Background(), replicasync.NewPostgresStore(db), nil, replicasync.Options{Hostname: "r", HeartbeatInterval: time.Minute})
	<-healed
	if err != nil {
		t.Fatalf("registration during a 1.5 s connection outage failed: %v", err)
	}
	t.Cleanup(func() { _ = m.Close() })
	if m.Self().ID == uuid.Nil {
		t.Fatal("registered, but the replica has no row")
	}
}
