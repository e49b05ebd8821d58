package replicasync_test

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
	"github.com/coder-ha/coder/replicasync/storetest"
)

// A replica with more peers than ProbesPerInterval samples the latency
// matrix (a few peers per interval), yet a peer that turns slow (an
// injected delay in front of its relay) is still warned about within the
// documented bound, one probe cycle plus the confirmation probes, and the
// warning clears within the same bound once the delay goes. Meanwhile the
// replica probes its healthy peers about ProbesPerInterval times per
// interval in total, not once each.
func TestSampledMatrixStillWarnsAboutASlowPeerWithinOneCycle(t *testing.T) {
	t.Parallel()
	const (
		beat      = 200 * time.Millisecond
		perRound  = 2
		fast      = 7
		threshold = 100 * time.Millisecond
		delay     = 100 * time.Millisecond // each way: ≥ 200 ms per probe
	)
	mem := storetest.NewMemoryWithClock(time.Now)
	// The peers beat hourly, so only the watcher's rounds probe (the
	// counts below are the watcher's); its stale window outlasts the test.
	opts := func(relayURL string) replicasync.Options {
		return replicasync.Options{RelayAddress: relayURL, HeartbeatInterval: time.Hour}
	}
	var fastProbes []*atomic.Int32
	var others []*replicasync.Manager // every replica but the watcher
	for i := 0; i < fast; i++ {
		srv, n := countingRelay(t)
		fastProbes = append(fastProbes, n)
		others = append(others, realMem(t, "fast", mem, opts(srv.URL)))
	}
	slowRelay, slowProbes := countingRelay(t)
	proxy, err := faultproxy.New(strings.TrimPrefix(slowRelay.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	others = append(others, realMem(t, "slow-peer", mem, opts(proxy.URL())))
	wo := replicasync.Options{RelayAddress: relay(t).URL, HeartbeatInterval: beat, StaleAfter: 5 * time.Minute,
		ProbesPerInterval: perRound, LatencyThreshold: threshold}
	watcher := realMem(t, "watcher", mem, wo)

	peers := fast + 1
	cycle := time.Duration((peers+perRound-1)/perRound) * beat
	// One cycle to reach the peer, then the confirmations: up to Samples
	// back-to-back probes of 2×delay each.
	bound := cycle + 5*2*delay
	t.Logf("probe cycle %v, documented bound %v", cycle, bound)

	measuredAll := func() bool {
		n := 0
		for _, p := range watcher.PeerReports() {
			if p.LatencyMS > 0 {
				n++
			}
		}
		return n == peers
	}
	wait.For(t, 30*time.Second, "the watcher measured every peer", measuredAll)
	// The other replicas probe each newcomer at join (no LinkPinger),
	// back to back, and never again (they beat hourly). Under load those
	// probes can outlast the watcher's first round: the counts below are
	// the watcher's only once they are done.
	wait.For(t, 30*time.Second, "the other replicas' probes at join are done", func() bool {
		for _, m := range others {
			if m.ProbesInFlightForTest() != 0 {
				return false
			}
		}
		return true
	})
	// A full window of fast samples of the slow peer first: the worst case
	// for a median.
	measured := slowProbes.Load()
	wait.For(t, 30*time.Second, "the watcher's window of the slow peer is full of fast samples", func() bool {
		return slowProbes.Load() >= measured+5
	})

	warned := func() bool { return strings.Contains(strings.Join(watcher.Warnings(), "\n"), `"slow-peer"`) }
	if warned() {
		t.Fatal("a warning before the delay")
	}
	var before int32
	for _, n := range fastProbes {
		before += n.Load()
	}
	start := time.Now()
	proxy.SetDelay(delay)
	// Generous: the machine is shared. The figure is logged.
	wait.For(t, 10*bound, "the watcher warns about slow-peer", warned)
	took := time.Since(start)
	t.Logf("warned %v after the delay began (bound %v)", took.Round(time.Millisecond), bound)

	proxy.SetDelay(0)
	start = time.Now()
	wait.For(t, 10*bound, "the warning clears", func() bool { return !warned() })
	t.Logf("cleared %v after the delay ended (bound %v)", time.Since(start).Round(time.Millisecond), bound)

	// The cost side: probes of the healthy peers over the whole episode.
	var after int32
	for _, n := range fastProbes {
		after += n.Load()
	}
	elapsed := time.Since(start) + took
	intervals := int32(elapsed/beat) + 2
	if got, most := after-before, intervals*perRound; got > most {
		t.Fatalf("%d probes of the %d healthy peers in about %d intervals: more than %d per interval (%d)", got, fast, intervals, perRound, most)
	}
}
