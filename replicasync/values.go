// This file holds the pure rules, as small value types: the mesh peer set
// and its diff, the latency window, the outage grace and the next peer set.

package replicasync

import (
	"math/rand/v2"
	"sort"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/wire"
)

// Peer is a live regional peer the mesh should connect to.
type Peer struct {
	ID           uuid.UUID
	RelayAddress string
}

// PeerChange is what the peer-change callback is told.
type PeerChange struct {
	// Peers is the live regional peer set, one per relay URL (when two live
	// rows share a URL, the newest process wins), sorted by URL.
	Peers []Peer
	// Replaced lists relay URLs now served by a different replica than in
	// the previous call (a process restarted behind the same address): the
	// owner should redial them rather than wait for the old link to die.
	Replaced []string
}

// meshPeers is the set the mesh should connect to: regional peers with a
// relay URL, deduplicated by URL (the newest start wins), sorted by URL.
func meshPeers(peers map[uuid.UUID]Replica, region int32) []Peer {
	byURL := map[string]Replica{}
	for _, p := range peers {
		if p.RegionID != region || p.RelayAddress == "" {
			continue
		}
		old, ok := byURL[p.RelayAddress]
		if !ok || newer(p, old) {
			byURL[p.RelayAddress] = p
		}
	}
	out := make([]Peer, 0, len(byURL))
	for url, p := range byURL {
		out = append(out, Peer{ID: p.ID, RelayAddress: url})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RelayAddress < out[j].RelayAddress })
	return out
}

// withoutURL drops the peers behind relay URL self (compared without a
// trailing slash): a previous run of this process, killed before it could
// mark itself stopped, leaves a live row naming this replica's own relay,
// and a relay must not mesh with (or probe) itself.
func withoutURL(peers []Peer, self string) []Peer {
	if self == "" {
		return peers
	}
	out := peers[:0:0]
	for _, p := range peers {
		if !sameURL(p.RelayAddress, self) {
			out = append(out, p)
		}
	}
	return out
}

// sameURL reports whether two relay URLs name one replica (wire's
// normalisation: surrounding space and a trailing slash ignored).
func sameURL(a, b string) bool {
	return wire.NormalizeURL(a) == wire.NormalizeURL(b)
}

func newer(a, b Replica) bool {
	if !a.StartedAt.Equal(b.StartedAt) {
		return a.StartedAt.After(b.StartedAt)
	}
	if !a.CreatedAt.Equal(b.CreatedAt) {
		return a.CreatedAt.After(b.CreatedAt)
	}
	return a.ID.String() > b.ID.String()
}

// diffPeers describes the move from the set last told to next.
func diffPeers(last, next []Peer) PeerChange {
	old := make(map[string]uuid.UUID, len(last))
	for _, p := range last {
		old[p.RelayAddress] = p.ID
	}
	change := PeerChange{Peers: next}
	for _, p := range next {
		if id, ok := old[p.RelayAddress]; ok && id != p.ID {
			change.Replaced = append(change.Replaced, p.RelayAddress)
		}
	}
	return change
}

func samePeers(a, b []Peer) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// latencyWindow is what this replica knows of one target's latency: the
// median of recent samples, whether that raised a warning, and the last
// probe error. An error wipes the samples: an unreachable peer has no
// latency, only the error, until it answers again.
type latencyWindow struct {
	keep      int
	threshold time.Duration
	samples   []time.Duration
	err       string
	warned    bool
}

// minSamples is how many samples a target needs before its latency can
// raise a warning.
const minSamples = 3

// latencyChange is the state before and after one observation.
type latencyChange struct {
	warnedBefore, warnedNow bool
	errBefore, errNow       string
	first                   bool // the first sample after none (or an error)
}

// changed reports whether anything worth writing and announcing changed.
func (c latencyChange) changed() bool {
	return c.warnedBefore != c.warnedNow || c.errBefore != c.errNow || c.first
}

func (w *latencyWindow) observe(d time.Duration) latencyChange {
	c := latencyChange{warnedBefore: w.warned, errBefore: w.err, first: len(w.samples) == 0}
	w.err = ""
	w.samples = append(w.samples, d)
	if len(w.samples) > w.keep {
		w.samples = w.samples[len(w.samples)-w.keep:]
	}
	w.warned = len(w.samples) >= min(minSamples, w.keep) && w.latency() > w.threshold
	c.warnedNow, c.errNow = w.warned, w.err
	return c
}

func (w *latencyWindow) fail(msg string) latencyChange {
	c := latencyChange{warnedBefore: w.warned, errBefore: w.err}
	w.err, w.samples, w.warned = msg, nil, false
	c.warnedNow, c.errNow = w.warned, w.err
	return c
}

func (w *latencyWindow) latency() time.Duration { return median(w.samples) }

func (w *latencyWindow) hasLatency() bool { return len(w.samples) > 0 && w.err == "" }

// report is the window as stored in this replica's row.
func (w *latencyWindow) report(id uuid.UUID) PeerReport {
	r := PeerReport{ID: id, Error: w.err}
	if w.hasLatency() {
		r.LatencyMS = float64(w.latency().Microseconds()) / 1000
	}
	return r
}

// outageGrace is the rule that keeps the mesh whole through a database
// outage. While this replica's own beat fails, nobody is dropped for being
// stale: their beats are failing too, most likely. Once the beat succeeds
// again, peers get a full stale window to re-beat before staleness counts.
// A graceful stop (stopped_at) is honoured at once, always: only staleness
// is forgiven.
type outageGrace struct {
	failingSince time.Time // zero while beats succeed
	keepUntil    time.Time // staleness is forgiven until then
}

func (g *outageGrace) beatFailed(now time.Time) (first bool) {
	if !g.failingSince.IsZero() {
		return false
	}
	g.failingSince = now
	return true
}

// beatSucceeded ends an outage; recovered reports whether one ended.
func (g *outageGrace) beatSucceeded(now time.Time, staleAfter time.Duration) (recovered bool) {
	if g.failingSince.IsZero() {
		return false
	}
	g.failingSince = time.Time{}
	g.keepUntil = now.Add(staleAfter)
	return true
}

func (g outageGrace) failing() bool { return !g.failingSince.IsZero() }

// mayDropStale reports whether a peer missing from a read may be dropped.
func (g outageGrace) mayDropStale(now time.Time) bool {
	return !g.failing() && !now.Before(g.keepUntil)
}

// cutOff reports whether this replica's own beat has failed for longer
// than the stale window: to peers that can still reach the database it is
// gone.
func (g outageGrace) cutOff(now time.Time, staleAfter time.Duration) bool {
	return g.failing() && now.Sub(g.failingSince) > staleAfter
}

// nextPeers applies a read to the known peer set. rows are what the read
// returned (full: every recent row; otherwise the rows of the ids read,
// with missing ids in ids). Live rows join or update; stopped rows leave at
// once; anything else missing leaves only when mayDropStale.
func nextPeers(known map[uuid.UUID]Replica, rows []Replica, full bool, ids []uuid.UUID, self uuid.UUID, mayDropStale bool) map[uuid.UUID]Replica {
	next := make(map[uuid.UUID]Replica, len(known))
	for id, p := range known {
		next[id] = p
	}
	seen := map[uuid.UUID]bool{}
	for _, r := range rows {
		if r.ID == self {
			continue
		}
		seen[r.ID] = true
		switch {
		case r.Live:
			next[r.ID] = r
		case r.StoppedAt != nil || mayDropStale:
			delete(next, r.ID)
		}
	}
	if !mayDropStale {
		return next
	}
	if full {
		for id := range known {
			if !seen[id] {
				delete(next, id)
			}
		}
		return next
	}
	for _, id := range ids {
		if !seen[id] {
			delete(next, id)
		}
	}
	return next
}

// jitter spreads d by ±20%, so replicas retrying after a shared outage do
// not arrive at the database together.
func jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return d
	}
	return d + time.Duration((rand.Float64()*0.4-0.2)*float64(d))
}

func median(s []time.Duration) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := append([]time.Duration(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[len(c)/2]
}
