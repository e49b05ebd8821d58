package replicasync

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
)

// probeLoop probes every regional peer when asked (each beat, and when a
// peer joins).
func (m *Manager) probeLoop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.probeNow:
			for _, p := range m.Regional() {
				m.startProbe(p)
			}
		}
	}
}

// startProbe probes one peer in its own goroutine, unless a probe of it is
// already under way (a hung peer must not pile up probes).
func (m *Manager) startProbe(p database.Replica) {
	if p.RelayAddress == "" || p.RegionID != m.opts.RegionID {
		return
	}
	m.mu.Lock()
	st := m.probes[p.ID]
	if st == nil {
		st = &probeState{}
		m.probes[p.ID] = st
	}
	if m.ctx.Err() != nil {
		m.mu.Unlock()
		return
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
	m.wg.Add(1)
	m.mu.Unlock()
	go func() {
		defer m.wg.Done()
		// A peer without enough samples (new, or just recovered) is probed
		// back to back: the first probe also opens the kept-alive
		// connection, and a warning needs a median, not one cold sample.
		for {
			latency, err := m.probe(p.RelayAddress)
			samples := m.recordProbe(p, latency, err)
			if !m.probeAgain(p.ID, samples, err) {
				return
			}
		}
	}()
}

// probe measures one GET of the peer's latency-check endpoint.
func (m *Manager) probe(relayURL string) (lat time.Duration, err error) {
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.ProbeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(relayURL, "/")+"/derp/latency-check", nil)
	if err != nil {
		return 0, err
	}
	start := m.opts.Clock.Now()
	resp, err := m.opts.HTTPClient.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	lat = m.opts.Clock.Now().Sub(start)
	if resp.StatusCode/100 != 2 {
		return lat, fmt.Errorf("latency check answered %s", resp.Status)
	}
	return lat, nil
}

// probeAgain decides, when a probe of id ends, whether to probe it again
// at once: when someone asked while it was under way, or while the peer
// has too few samples for a median. Otherwise the probe is no longer in
// flight.
func (m *Manager) probeAgain(id uuid.UUID, samples int, err error) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.probes[id]
	if st == nil || m.ctx.Err() != nil {
		return false
	}
	if st.again || (err == nil && samples < minSamples) {
		st.again = false
		return true
	}
	st.inFlight = false
	return false
}

// minSamples is how many probes a peer needs before its latency can raise
// a warning.
const minSamples = 3

// recordProbe stores a probe's result and, when the peer's warning or error
// state changed, logs it once and has the row written and announced. It
// returns how many samples the peer now has.
func (m *Manager) recordProbe(p database.Replica, latency time.Duration, err error) int {
	m.mu.Lock()
	st := m.probes[p.ID]
	if st == nil || m.ctx.Err() != nil { // the peer left meanwhile
		m.mu.Unlock()
		return minSamples
	}
	oldErr, oldWarned := st.err, st.warned
	firstSample := len(st.samples) == 0 && err == nil
	if err != nil {
		st.err = describeProbeError(err)
	} else {
		st.err = ""
		st.samples = appendSample(st.samples, latency, m.opts.Samples)
		st.warned = len(st.samples) >= min(minSamples, m.opts.Samples) && st.latency() > m.opts.LatencyThreshold
	}
	samples := len(st.samples)
	current := st.latency()
	newErr, newWarned := st.err, st.warned
	m.mu.Unlock()

	if err == nil {
		m.metrics.peerLatency.WithLabelValues(p.ID.String(), p.Hostname).Set(current.Seconds())
	}
	fields := []zap.Field{zap.String("peer_hostname", p.Hostname), zap.String("relay_url", p.RelayAddress), zap.Stringer("peer_id", p.ID)}
	switch {
	case newWarned && !oldWarned:
		m.log.Warn("peer replica latency above threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	case !newWarned && oldWarned:
		m.log.Info("peer replica latency back under threshold", append(fields, zap.Duration("latency", current), zap.Duration("threshold", m.opts.LatencyThreshold))...)
	}
	switch {
	case newErr != "" && oldErr == "":
		m.log.Warn("peer replica unreachable", append(fields, zap.String("error", newErr))...)
	case newErr == "" && oldErr != "":
		m.log.Info("peer replica reachable again", fields...)
	}
	// The first measurement of a new peer is worth telling too: the matrix
	// every replica shows should not wait a beat to fill in.
	if newErr != oldErr || newWarned != oldWarned || firstSample {
		m.trigger(m.writeNow)
	}
	return samples
}
