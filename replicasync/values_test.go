package replicasync

import (
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestMeshPeersDedupesByURLNewestWinsAndDiffReportsReplaced(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	old := Replica{ID: uuid.New(), RegionID: 1, RelayAddress: "http://x", StartedAt: t0}
	restarted := Replica{ID: uuid.New(), RegionID: 1, RelayAddress: "http://x", StartedAt: t0.Add(time.Second)}
	other := Replica{ID: uuid.New(), RegionID: 1, RelayAddress: "http://y", StartedAt: t0}
	elsewhere := Replica{ID: uuid.New(), RegionID: 2, RelayAddress: "http://z", StartedAt: t0}
	noURL := Replica{ID: uuid.New(), RegionID: 1, StartedAt: t0}
	before := meshPeers(map[uuid.UUID]Replica{old.ID: old, other.ID: other}, 1)
	after := meshPeers(map[uuid.UUID]Replica{old.ID: old, restarted.ID: restarted, other.ID: other, elsewhere.ID: elsewhere, noURL.ID: noURL}, 1)
	want := []Peer{{ID: restarted.ID, RelayAddress: "http://x"}, {ID: other.ID, RelayAddress: "http://y"}}
	if !samePeers(after, want) {
		t.Fatalf("mesh peers = %v, want %v", after, want)
	}
	ch := diffPeers(before, after)
	if len(ch.Replaced) != 1 || ch.Replaced[0] != "http://x" {
		t.Fatalf("replaced = %v, want [http://x]", ch.Replaced)
	}
	if ch := diffPeers(after, after); len(ch.Replaced) != 0 {
		t.Fatalf("an unchanged set reports replaced %v", ch.Replaced)
	}
}

func TestLatencyWindowErrorReplacesLatencyAndWarning(t *testing.T) {
	w := latencyWindow{keep: 5, threshold: 10 * time.Millisecond}
	id := uuid.New()
	for i := 0; i < 2; i++ {
		if c := w.observe(50 * time.Millisecond); c.warnedNow {
			t.Fatal("warned before the minimum number of samples")
		}
	}
	if c := w.observe(50 * time.Millisecond); !c.warnedNow || !c.changed() {
		t.Fatal("three slow samples must raise the warning")
	}
	if r := w.report(id); r.LatencyMS != 50 || r.Error != "" {
		t.Fatalf("report = %+v", r)
	}
	c := w.fail("connection refused")
	if c.warnedNow || !c.warnedBefore || c.errNow != "connection refused" || !c.changed() {
		t.Fatalf("failure change = %+v", c)
	}
	if r := w.report(id); r.LatencyMS != 0 || r.Error != "connection refused" {
		t.Fatalf("an unreachable peer reports %+v; want the error and no latency", r)
	}
	if c := w.fail("connection refused"); c.changed() {
		t.Fatal("a repeated error is not a change")
	}
	if c := w.observe(time.Millisecond); !c.first || c.errNow != "" || !c.changed() {
		t.Fatalf("recovery change = %+v", c)
	}
}

func TestOutageGraceForgivesStalenessOnlyUntilPeersHadAFullWindow(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	const stale = 15 * time.Second
	var g outageGrace
	if !g.mayDropStale(t0) {
		t.Fatal("with no outage, staleness counts")
	}
	if !g.beatFailed(t0) || g.beatFailed(t0.Add(time.Second)) {
		t.Fatal("beatFailed must report only the first failure")
	}
	if g.mayDropStale(t0.Add(time.Hour)) {
		t.Fatal("staleness counted while our own beat fails")
	}
	if g.cutOff(t0.Add(stale), stale) || !g.cutOff(t0.Add(stale+time.Millisecond), stale) {
		t.Fatal("cut off exactly after the stale window")
	}
	back := t0.Add(time.Hour)
	if !g.beatSucceeded(back, stale) || g.beatSucceeded(back, stale) {
		t.Fatal("beatSucceeded must report only the recovery")
	}
	if g.mayDropStale(back.Add(stale-time.Millisecond)) || !g.mayDropStale(back.Add(stale)) {
		t.Fatal("peers get exactly one stale window after our recovery")
	}
}

func TestNextPeersHonoursStopsAlwaysAndStalenessOnlyWhenAllowed(t *testing.T) {
	self := uuid.New()
	now := time.Now()
	live := Replica{ID: uuid.New(), Live: true}
	stale := Replica{ID: uuid.New()}
	stopped := Replica{ID: uuid.New(), StoppedAt: &now}
	missing := Replica{ID: uuid.New()}
	known := map[uuid.UUID]Replica{live.ID: live, stale.ID: stale, stopped.ID: stopped, missing.ID: missing}
	rows := []Replica{live, stale, stopped, {ID: self, Live: true}}

	kept := nextPeers(known, rows, true, nil, self, false)
	if _, ok := kept[stopped.ID]; ok {
		t.Fatal("a stopped peer was kept during grace")
	}
	if _, ok := kept[self]; ok {
		t.Fatal("self is not a peer")
	}
	if len(kept) != 3 {
		t.Fatalf("during grace want live, stale and missing kept, got %d", len(kept))
	}
	dropped := nextPeers(known, rows, true, nil, self, true)
	if len(dropped) != 1 {
		t.Fatalf("after grace want only the live peer, got %d", len(dropped))
	}
	// A targeted read only judges the ids it read.
	one := nextPeers(known, nil, false, []uuid.UUID{missing.ID}, self, true)
	if _, ok := one[missing.ID]; ok || len(one) != 3 {
		t.Fatalf("targeted read of a missing row: %d peers left", len(one))
	}
}

func TestJitterStaysWithinTwentyPercent(t *testing.T) {
	seen := map[time.Duration]bool{}
	for i := 0; i < 1000; i++ {
		d := jitter(time.Second)
		if d < 800*time.Millisecond || d > 1200*time.Millisecond {
			t.Fatalf("jitter(1s) = %s", d)
		}
		seen[d] = true
	}
	if len(seen) < 100 {
		t.Fatal("jitter does not spread")
	}
}

// Relay URLs are compared as wire normalises them, exactly as replicasync
// always did: surrounding space and one trailing slash are ignored; case,
// a second slash and a path are not.
func TestRelayURLsCompareAsWireNormalisesThem(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		same bool
	}{
		{"http://a:1", "http://a:1", true},
		{"http://a:1", "http://a:1/", true},
		{" http://a:1/ ", "http://a:1", true},
		{"http://a:1\n", "http://a:1", true},
		{"", " ", true},
		{"http://A:1", "http://a:1", false},
		{"HTTP://a:1", "http://a:1", false},
		{"http://a:1//", "http://a:1", false},
		{"http://a:1/derp", "http://a:1", false},
		{"http://a:1", "http://a:10", false},
	} {
		if got := sameURL(tc.a, tc.b); got != tc.same {
			t.Errorf("sameURL(%q, %q) = %v, want %v", tc.a, tc.b, got, tc.same)
		}
	}
}
