package replicasync

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
)

// LatencyCheckPath is probed on each peer's relay URL; a 2xx answer is a
// success.
const LatencyCheckPath = "/derp/latency-check"

// minSamples is how many measurements a latency needs before it can raise
// a warning (capped by Options.Samples). A new peer is probed back to back
// until it has them, so a warning about a slow peer does not wait beats.
const minSamples = 3

// probeState is what this replica knows of one regional peer's latency.
type probeState struct {
	samples  []time.Duration // most recent last; reset when the peer fails
	err      string          // last probe's failure; "" when it answered
	warned   bool            // the latency warning is in force
	inFlight bool            // a probe goroutine owns this peer
	again    bool            // Reprobe was asked while one was in flight
}

func (p *probeState) latency() time.Duration { return median(p.samples) }

func (m *Manager) minSamples() int { return min(minSamples, m.opts.Samples) }

// probeLoop probes every regional peer when asked: after each heartbeat.
func (m *Manager) probeLoop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.probeNow:
			for _, p := range m.Regional() {
				m.startProbe(p, false)
			}
		}
	}
}

// startProbe probes p in a goroutine of its own, so peers are probed
// concurrently and a hung peer delays nobody. At most one probe of a peer
// runs at a time; urgent (Reprobe) queues one more behind a running one.
func (m *Manager) startProbe(p database.Replica, urgent bool) {
	if p.RegionID != m.opts.RegionID || p.RelayAddress == "" {
		return
	}
	m.mu.Lock()
	if _, live := m.peers[p.ID]; !live || m.ctx.Err() != nil {
		m.mu.Unlock()
		return
	}
	st := m.probes[p.ID]
	if st == nil {
		st = &probeState{}
		m.probes[p.ID] = st
	}
	if st.inFlight {
		st.again = st.again || urgent
		m.mu.Unlock()
		return
	}
	st.inFlight = true
	m.wg.Add(1)
	m.mu.Unlock()
	go m.runProbes(p, st)
}

// runProbes owns st while st.inFlight.
func (m *Manager) runProbes(p database.Replica, st *probeState) {
	defer m.wg.Done()
	for {
		latency, err := m.probe(p.RelayAddress)
		m.recordProbe(p, st, latency, err)
		if !m.probeAgain(p, st, err) {
			return
		}
	}
}

// probeAgain decides whether the probe goroutine goes on (a Reprobe came
// in, or a reachable peer has too few samples for a median) or releases
// the peer.
func (m *Manager) probeAgain(p database.Replica, st *probeState, err error) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.probes[p.ID] != st {
		return false // the peer left meanwhile; st is orphaned
	}
	if m.ctx.Err() == nil && (st.again || (err == nil && len(st.samples) < m.minSamples())) {
		st.again = false
		return true
	}
	st.inFlight = false
	return false
}

// probe measures one GET of relayURL's latency check over the client's
// kept-alive connection.
func (m *Manager) probe(relayURL string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.ProbeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(relayURL, "/")+LatencyCheckPath, nil)
	if err != nil {
		return 0, err
	}
	start := m.opts.Clock.Now()
	resp, err := m.opts.HTTPClient.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16)) // drain, so the connection is reused
	_ = resp.Body.Close()
	latency := since(m.opts.Clock, start)
	if resp.StatusCode/100 != 2 {
		return 0, fmt.Errorf("%s answered %s", LatencyCheckPath, resp.Status)
	}
	return latency, nil
}

// recordProbe stores a probe's result. When the peer's warning or
// reachability changed it logs that once, and it has the row written and
// announced at once (also for a peer's first measurement, so the matrix
// every replica shows fills in without waiting a beat).
func (m *Manager) recordProbe(p database.Replica, st *probeState, latency time.Duration, err error) {
	m.mu.Lock()
	if m.probes[p.ID] != st || m.ctx.Err() != nil {
		m.mu.Unlock()
		return
	}
	oldErr, oldWarned := st.err, st.warned
	first := false
	if err != nil {
		// The samples describe a connection that is gone; after recovery
		// the peer is measured afresh. The unreachable line supersedes the
		// latency warning.
		st.err = describeProbeError(err)
		st.samples = nil
		st.warned = false
	} else {
		first = len(st.samples) == 0
		st.err = ""
		st.samples = appendSample(st.samples, latency, m.opts.Samples)
		st.warned = len(st.samples) >= m.minSamples() && st.latency() > m.opts.LatencyThreshold
	}
	current := st.latency()
	newErr, newWarned := st.err, st.warned
	m.mu.Unlock()

	if newErr == "" {
		m.metrics.peerLatency.WithLabelValues(p.ID.String(), p.Hostname).Set(current.Seconds())
	} else {
		m.metrics.peerLatency.DeleteLabelValues(p.ID.String(), p.Hostname)
	}
	fields := []zap.Field{zap.String("peer_hostname", p.Hostname), zap.String("relay_url", p.RelayAddress), zap.Stringer("peer_id", p.ID)}
	switch {
	case newWarned && !oldWarned:
		m.log.Warn("peer replica latency above threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	case !newWarned && oldWarned && newErr == "":
		m.log.Info("peer replica latency back under threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	}
	switch {
	case newErr != "" && oldErr == "":
		m.log.Warn("peer replica unreachable", append(fields, zap.String("error", newErr))...)
	case newErr == "" && oldErr != "":
		m.log.Info("peer replica reachable again", append(fields, zap.Duration("latency", current))...)
	}
	if newErr != oldErr || newWarned != oldWarned || first {
		m.trigger(m.writeNow)
	}
}

// checkDatabaseLatency raises or clears the database warning on change.
func (m *Manager) checkDatabaseLatency(latency time.Duration) {
	m.mu.Lock()
	above := latency > m.opts.LatencyThreshold
	changed := above != m.dbWarned
	m.dbWarned = above
	m.mu.Unlock()
	if !changed {
		return
	}
	if above {
		m.log.Warn("database latency above threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
	} else {
		m.log.Info("database latency back under threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
	}
	m.trigger(m.writeNow)
}

// peerReportsLocked is what this replica stores about each live regional
// peer: latency in ms when reachable, the error when not, zeros while not
// measured yet.
func (m *Manager) peerReportsLocked() []database.PeerReport {
	out := []database.PeerReport{}
	for id, p := range m.peers {
		if p.RegionID != m.opts.RegionID {
			continue
		}
		r := database.PeerReport{ID: id}
		st := m.probes[id]
		switch {
		case p.RelayAddress == "":
			r.Error = "peer has no relay URL"
		case st == nil:
		case st.err != "":
			r.Error = st.err
		case len(st.samples) > 0:
			r.LatencyMS = float64(st.latency().Microseconds()) / 1000
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out
}

func (m *Manager) warningsLocked() []string {
	out := []string{}
	threshold := m.opts.LatencyThreshold
	if m.dbWarned {
		out = append(out, fmt.Sprintf("the database is %s away; every replica must be within %s of Postgres", round(median(m.dbSamples)), threshold))
	}
	var peerWarnings []string
	for id, st := range m.probes {
		p, live := m.peers[id]
		if !st.warned || !live {
			continue
		}
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (%s) is %s away; every replica must be within %s of each other",
			p.Hostname, p.RelayAddress, round(st.latency()), threshold))
	}
	sort.Strings(peerWarnings)
	return append(out, peerWarnings...)
}

// describeProbeError turns a probe failure into a short, stable message
// for the row and the logs: "connection refused", "timed out", or the
// underlying cause without the request's URL.
func describeProbeError(err error) string {
	var netErr net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &netErr) && netErr.Timeout():
		return "timed out"
	}
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		err = urlErr.Err
	}
	msg := err.Error()
	if strings.Contains(msg, "connection refused") { // wrapped where errors.Is cannot see
		return "connection refused"
	}
	return msg
}

func appendSample(s []time.Duration, d time.Duration, keep int) []time.Duration {
	s = append(s, d)
	if len(s) > keep {
		s = s[len(s)-keep:]
	}
	return s
}

// median of s (the upper one of an even count); 0 for none.
func median(s []time.Duration) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := append([]time.Duration(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[len(c)/2]
}

// round keeps warnings readable: 15.2ms, not 15.234567ms.
func round(d time.Duration) time.Duration {
	if d > time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Microsecond)
}
