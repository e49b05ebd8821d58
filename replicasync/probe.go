// This file holds the latency probes: the probe rounds spread over the
// heartbeat interval, one probe of a peer (over its mesh link or HTTP),
// and recording its result.

package replicasync

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"time"

	"go.uber.org/zap"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/wire"
)

// probeState is what this replica knows of one peer's latency.
type probeState struct {
	w          latencyWindow
	inFlight   bool
	again      bool      // asked for while in flight: probe once more after
	lastProbe  time.Time // when the last probe started (zero: never)
	confirming int       // back-to-back probes made to confirm a crossing
}

// probeLoop runs a probe round after each successful periodic beat: the
// ProbesPerInterval regional peers measured longest ago (never measured
// first), spread over the heartbeat interval (probe i of n at i/n of it),
// so a replica with many peers does not probe them all at once and every
// peer is not probed by everyone at the same instant. Each peer is probed
// at most once per round; a new round replaces what is left of the last.
// It also closes the HTTP client's idle connections after an interval
// without an HTTP probe (see Options.HTTPClient).
func (m *Manager) probeLoop() {
	defer m.wg.Done()
	next := m.clock.NewTimer(time.Hour, "probe")
	next.Stop()
	defer next.Stop()
	var queue []Peer
	var spacing time.Duration
	probeNext := func() {
		if len(queue) == 0 {
			return
		}
		p := queue[0]
		queue = queue[1:]
		m.mu.Lock()
		r, ok := m.peers[p.ID]
		m.mu.Unlock()
		if ok {
			m.startProbe(r)
		}
		if len(queue) > 0 {
			next.Reset(spacing, "probe")
		}
	}
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.probeNow:
			if m.httpProbes.Swap(0) == 0 {
				m.opts.HTTPClient.CloseIdleConnections()
			}
			queue = m.roundQueue()
			if len(queue) > 0 {
				spacing = m.opts.HeartbeatInterval / time.Duration(len(queue))
			}
			next.Stop()
			probeNext()
		case <-next.C:
			probeNext()
		}
	}
}

// roundQueue is the next round: up to ProbesPerInterval regional peers,
// those measured longest ago first (never measured before anything else;
// ties in relay URL order, as m.current is sorted).
func (m *Manager) roundQueue() []Peer {
	m.mu.Lock()
	defer m.mu.Unlock()
	queue := append([]Peer(nil), m.current...)
	last := func(p Peer) time.Time {
		if st := m.probes[p.ID]; st != nil {
			return st.lastProbe
		}
		return time.Time{}
	}
	sort.SliceStable(queue, func(i, j int) bool { return last(queue[i]).Before(last(queue[j])) })
	if len(queue) > m.opts.ProbesPerInterval {
		queue = queue[:m.opts.ProbesPerInterval]
	}
	return queue
}

// startProbe probes one peer in its own goroutine, unless a probe of it is
// already under way (a hung peer must not pile up probes).
func (m *Manager) startProbe(p Replica) {
	if p.RelayAddress == "" || p.RegionID != m.opts.RegionID || sameURL(p.RelayAddress, m.opts.RelayAddress) {
		return
	}
	m.mu.Lock()
	if m.ctx.Err() != nil {
		m.mu.Unlock()
		return
	}
	if _, live := m.peers[p.ID]; !live {
		m.mu.Unlock()
		return
	}
	st := m.probes[p.ID]
	if st == nil {
		st = &probeState{w: latencyWindow{keep: m.opts.Samples, threshold: m.opts.LatencyThreshold}}
		m.probes[p.ID] = st
	}
	if st.inFlight {
		// Probe again as soon as the one under way ends: it may have
		// started before whatever made the caller ask (a broken mesh
		// connection), and must not answer for it.
		st.again = true
		m.mu.Unlock()
		return
	}
	st.inFlight = true
	st.lastProbe = m.clock.Now()
	m.wg.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.wg.Done()
		// A peer without enough samples (new, or just recovered) is probed
		// back to back: the first probe also opens the kept-alive
		// connection, and a warning needs a median, not one cold sample.
		// So is a peer whose sample crossed the threshold (see
		// Options.ProbesPerInterval).
		for {
			latency, err := m.probe(p.RelayAddress)
			samples, crossed := m.recordProbe(p, latency, err)
			if !m.probeAgain(p.ID, samples, crossed, err) {
				return
			}
		}
	}()
}

// probe measures one round trip to the peer: over its mesh link when the
// LinkPinger has one, otherwise one GET of its latency-check endpoint.
func (m *Manager) probe(relayURL string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.ProbeTimeout)
	defer cancel()
	m.mu.Lock()
	pinger := m.pinger
	m.mu.Unlock()
	if pinger != nil {
		rtt, ok, err := pinger.PingPeer(ctx, relayURL)
		if ok {
			return rtt, err
		}
	}
	m.httpProbes.Add(1)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, wire.JoinPath(relayURL, wire.LatencyCheckPath), nil)
	if err != nil {
		return 0, err
	}
	start := m.clock.Now()
	resp, err := m.opts.HTTPClient.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	lat := m.clock.Since(start)
	if resp.StatusCode/100 != 2 {
		return lat, fmt.Errorf("latency check answered %s", resp.Status)
	}
	return lat, nil
}

// probeAgain decides, when a probe of id ends, whether to probe it again
// at once: when someone asked while it was under way, while the peer
// has too few samples for a median, or while its samples cross the
// threshold (up to Samples in a row). Otherwise the probe is no longer in
// flight.
func (m *Manager) probeAgain(id uuid.UUID, samples int, crossed bool, err error) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.probes[id]
	if st == nil || m.ctx.Err() != nil {
		return false
	}
	if !crossed {
		st.confirming = 0
	}
	confirm := crossed && st.confirming < m.opts.Samples
	if confirm {
		st.confirming++
	}
	if st.again || confirm || (err == nil && samples < min(minSamples, m.opts.Samples)) {
		st.again = false
		st.lastProbe = m.clock.Now()
		return true
	}
	st.inFlight = false
	return false
}

// recordProbe stores a probe's result and, when the peer's warning or error
// state changed, logs it once and has the row written (see loop: at most
// one such write per interval). An
// error replaces the latency (report, warning and gauge) until the peer
// answers again. It returns how many samples the peer now has, and
// whether this sample is on the other side of the threshold from the
// peer's warning state (after it was taken into account): a crossing the
// median does not show yet.
func (m *Manager) recordProbe(p Replica, latency time.Duration, err error) (int, bool) {
	m.mu.Lock()
	st := m.probes[p.ID]
	if st == nil || m.ctx.Err() != nil { // the peer left meanwhile
		m.mu.Unlock()
		return minSamples, false
	}
	var c latencyChange
	if err != nil {
		c = st.w.fail(describeProbeError(err))
	} else {
		c = st.w.observe(latency)
	}
	samples := len(st.w.samples)
	crossed := err == nil && samples >= min(minSamples, m.opts.Samples) && (latency > m.opts.LatencyThreshold) != st.w.warned
	current := st.w.latency()
	// Under mu: apply deletes a leaving peer's series under it, and a
	// probe that ends just after must not bring them back.
	id, host := p.ID.String(), p.Hostname
	if err != nil {
		m.metrics.peerLatency.DeleteLabelValues(id, host)
		m.metrics.probeErrors.WithLabelValues(id, host).Inc()
	} else {
		m.metrics.peerLatency.WithLabelValues(id, host).Set(current.Seconds())
	}
	m.mu.Unlock()

	fields := []zap.Field{zap.String("peer_hostname", p.Hostname), zap.String("relay_url", p.RelayAddress), zap.Stringer("peer_id", p.ID)}
	switch {
	case c.warnedNow && !c.warnedBefore:
		m.log.Warn("peer replica latency above threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	case !c.warnedNow && c.warnedBefore && c.errNow == "":
		m.log.Info("peer replica latency back under threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	}
	switch {
	case c.errNow != "" && c.errBefore == "":
		m.log.Warn("peer replica unreachable", append(fields, zap.String("error", c.errNow))...)
	case c.errNow == "" && c.errBefore != "":
		m.log.Info("peer replica reachable again", fields...)
	}
	// The first measurement of a new peer is worth telling too: the matrix
	// every replica shows should not wait a beat to fill in.
	if c.changed() {
		m.trigger(m.writeNow)
	}
	return samples, crossed
}
