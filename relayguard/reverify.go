package relayguard

import (
	"context"
	"math"
	"sync"
	"time"

	"go.uber.org/zap"
)

// reverifyConcurrency bounds the webhook calls one re-verification tick
// makes at once.
const reverifyConcurrency = 8

// invPhi is 1/φ: successive multiples of it, modulo 1, are as evenly spread
// over [0, 1) as any sequence can be (each new point falls into one of the
// largest gaps), whatever the number of points.
const invPhi = 0.6180339887498949

// schedule is the admitted client connections, grouped by what the webhook
// decides on (node key and source address), and when each group is
// verified next.
type schedule struct {
	interval time.Duration // 0: no re-verification; nothing is scheduled

	mu      sync.Mutex
	seq     uint64                    // guarded by mu: groups scheduled so far
	clients map[admitKey]*clientGroup // guarded by mu
	nconns  int                       // guarded by mu
}

// clientGroup is the connections of one admitKey.
type clientGroup struct {
	due   time.Time
	conns map[*conn]struct{}
}

func newSchedule(interval time.Duration) *schedule {
	return &schedule{interval: interval, clients: map[admitKey]*clientGroup{}}
}

// firstDue spreads the first re-verification of the seq-th group over the
// interval after now: clients admitted together (a replica taking over a
// drained peer's clients) are not verified together again, and no verdict
// is older than one interval.
func (s *schedule) firstDue(now time.Time, seq uint64) time.Time {
	frac := math.Mod(float64(seq)*invPhi, 1)
	return now.Add(time.Duration((1 - frac) * float64(s.interval)))
}

// add puts the admitted connection c, admitted as k, on the schedule; a
// new group is due by dueBy (when set) at the latest. It returns false
// when c is already gone (the library gave up on the admission call before
// it was answered).
func (s *schedule) add(c *conn, k admitKey, now, dueBy time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.gone {
		return false
	}
	if s.interval <= 0 || c.scheduled {
		return true
	}
	g := s.clients[k]
	if g == nil {
		g = &clientGroup{due: s.firstDue(now, s.seq), conns: map[*conn]struct{}{}}
		if !dueBy.IsZero() && dueBy.Before(g.due) {
			g.due = dueBy // verified again when the cached verdict expires
		}
		s.seq++
		s.clients[k] = g
	}
	g.conns[c] = struct{}{}
	c.key, c.scheduled = k, true
	s.nconns++
	return true
}

// remove takes c off the schedule for good (its handler returned).
func (s *schedule) remove(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.gone = true
	if !c.scheduled {
		return
	}
	c.scheduled = false
	s.nconns--
	if g := s.clients[c.key]; g != nil {
		delete(g.conns, c)
		if len(g.conns) == 0 {
			delete(s.clients, c.key)
		}
	}
}

// takeDue returns the groups due at now and moves each one's next
// verification a whole number of intervals on, keeping its place in the
// spread even after a stall.
func (s *schedule) takeDue(now time.Time) []admitKey {
	s.mu.Lock()
	defer s.mu.Unlock()
	var due []admitKey
	for k, g := range s.clients {
		if now.Before(g.due) {
			continue
		}
		due = append(due, k)
		behind := now.Sub(g.due)
		g.due = g.due.Add((behind/s.interval + 1) * s.interval)
	}
	return due
}

// conns returns the connections admitted as k right now.
func (s *schedule) conns(k admitKey) []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.clients[k]
	if g == nil {
		return nil
	}
	out := make([]*conn, 0, len(g.conns))
	for c := range g.conns {
		out = append(out, c)
	}
	return out
}

// connections is how many connections are on the schedule.
func (s *schedule) connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nconns
}

// tickPeriod is how often the schedule is checked for due clients: a
// sixtieth of the interval, between 10 ms and 1 s. A client is verified
// within one tick of its due time.
func tickPeriod(interval time.Duration) time.Duration {
	return min(max(interval/60, 10*time.Millisecond), time.Second)
}

// reverifyDue verifies every client group due now, at most
// reverifyConcurrency at once, and returns when all are done (or ctx ends).
// It runs on the schedule's ticker; it never returns an error, so the
// ticker runs until the Guard closes.
func (g *Guard) reverifyDue(ctx context.Context) error {
	keys := g.sched.takeDue(g.clock.Now())
	sem := make(chan struct{}, reverifyConcurrency)
	var wg sync.WaitGroup
	for _, k := range keys {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return nil
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			g.reverify(ctx, k)
		}()
	}
	wg.Wait()
	return nil
}

// reverify asks the webhook about connected clients admitted as k and
// closes their connections when it refuses them now. When the webhook
// fails, they stay connected (fail-closed is about new clients); the
// webhook-health log line says so once per outage.
func (g *Guard) reverify(ctx context.Context, k admitKey) {
	allow, err := g.askCtx(ctx, k)
	switch {
	case ctx.Err() != nil:
		return // closing: no verdict
	case err != nil:
		g.m.reverified.WithLabelValues(reverifyError).Inc()
	case allow:
		g.m.reverified.WithLabelValues(reverifyAllow).Inc()
	default:
		g.m.reverified.WithLabelValues(reverifyDeny).Inc()
		conns := g.sched.conns(k)
		for _, c := range conns {
			c.disconnect()
		}
		g.m.disconnected.Add(float64(len(conns)))
		if len(conns) > 0 {
			g.log.Info("derp client disconnected: the admission webhook no longer admits it",
				zap.String("node_key", k.node.ShortString()), zap.Stringer("source", k.src), zap.Int("connections", len(conns)))
		}
	}
}
