// This file holds what this replica reports about its peers and itself:
// the peer reports and the warnings.

package replicasync

import (
	"fmt"
	"sort"
	"time"

	"github.com/coder-ha/coder/database"
)

// Warnings are the warnings in force: latency (naming the peer by
// hostname and relay URL, or the database) and a heartbeat that has failed
// for longer than the stale window.
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warningsLocked()
}

// PeerReports is what this replica measured of each regional peer: the
// median latency, or the error of the last probe (never both).
func (m *Manager) PeerReports() []database.PeerReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerReportsLocked()
}

func (m *Manager) peerReportsLocked() []database.PeerReport {
	out := []database.PeerReport{}
	for id, p := range m.peers {
		if p.RegionID != m.opts.RegionID {
			continue
		}
		r := database.PeerReport{ID: id}
		if st := m.probes[id]; st != nil {
			r = st.w.report(id)
		}
		if p.RelayAddress == "" {
			r.Error = "peer has no relay URL"
		} else if m.sharesURLLocked(p) {
			r.Error = "peer uses this replica's relay URL"
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out
}

func (m *Manager) warningsLocked() []string {
	out := []string{}
	threshold := m.opts.LatencyThreshold
	if m.db.warned {
		out = append(out, fmt.Sprintf("the database is %s away; every replica must be within %s of Postgres", round(m.db.latency()), threshold))
	}
	if m.skewWarned {
		out = append(out, fmt.Sprintf("this machine's clock is %s off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much", m.skew.Abs().Round(time.Millisecond)))
	}
	now := m.clock.Now()
	if m.grace.cutOff(now, m.opts.StaleAfter) {
		out = append(out, fmt.Sprintf("the database has not accepted this replica's heartbeat for %s (stale window %s): if other replicas reach it, they consider this replica gone",
			now.Sub(m.grace.failingSince).Round(time.Second), m.opts.StaleAfter))
	}
	var peerWarnings []string
	if peers := m.selfWithoutRelayLocked(); len(peers) > 0 {
		out = append(out, fmt.Sprintf("this replica (%q, id %s) has no relay URL: the %d other replica(s) of region %d cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url",
			m.opts.Hostname, m.opts.ID, len(peers), m.opts.RegionID))
	}
	if m.opts.RelayAddress != "" {
		for id, p := range m.peers {
			if p.RegionID == m.opts.RegionID && p.RelayAddress == "" {
				peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (id %s) has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
					p.Hostname, id))
			}
		}
	}
	for _, p := range m.sharedURLLocked() {
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (id %s) uses this replica's relay URL %s: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)",
			p.Hostname, p.ID, m.opts.RelayAddress))
	}
	for id, st := range m.probes {
		if !st.w.warned {
			continue
		}
		p := m.peers[id]
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (%s) is %s away; every replica must be within %s of each other",
			p.Hostname, p.RelayAddress, round(st.w.latency()), threshold))
	}
	sort.Strings(peerWarnings)
	return append(out, peerWarnings...)
}

func round(d time.Duration) time.Duration {
	if d > time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Microsecond)
}
