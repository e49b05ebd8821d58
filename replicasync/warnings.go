// This file holds what this replica reports about its peers and itself:
// the peer reports and the warnings.

package replicasync

import (
	"sort"
	"time"
)

// Warnings are the warnings in force, as text: latency (naming the peer
// by hostname and relay URL, or the database) and a heartbeat that has
// failed for longer than the stale window. The text is what the row
// stores (see Warning.String).
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return renderWarnings(m.warningsLocked())
}

// WarningValues are the warnings in force as values, in Warnings' order:
// this replica's own (the database, the clock, a cut-off heartbeat, no
// relay URL), then those about peers, sorted by their text.
func (m *Manager) WarningValues() []Warning {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warningsLocked()
}

// renderWarnings is the text of ws, never nil (the row and the JSON hold
// an empty list, not null).
func renderWarnings(ws []Warning) []string {
	out := make([]string, 0, len(ws))
	for _, w := range ws {
		out = append(out, w.String())
	}
	return out
}

// PeerReports is what this replica measured of each regional peer: the
// median latency, or the error of the last probe (never both).
func (m *Manager) PeerReports() []PeerReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerReportsLocked()
}

func (m *Manager) peerReportsLocked() []PeerReport {
	out := []PeerReport{}
	for id, p := range m.peers {
		if p.RegionID != m.opts.RegionID {
			continue
		}
		r := PeerReport{ID: id}
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

func (m *Manager) warningsLocked() []Warning {
	out := []Warning{}
	threshold := m.opts.LatencyThreshold
	if m.db.warned {
		out = append(out, Warning{Kind: WarnDatabaseSlow, Latency: round(m.db.latency()), Threshold: threshold})
	}
	if m.skewWarned {
		out = append(out, Warning{Kind: WarnClockSkew, Skew: m.skew.Abs().Round(time.Millisecond)})
	}
	now := m.clock.Now()
	if m.grace.cutOff(now, m.opts.StaleAfter) {
		out = append(out, Warning{Kind: WarnCutOff, FailingFor: now.Sub(m.grace.failingSince).Round(time.Second), StaleAfter: m.opts.StaleAfter})
	}
	var peerWarnings []Warning
	if peers := m.selfWithoutRelayLocked(); len(peers) > 0 {
		out = append(out, Warning{Kind: WarnSelfNoRelay, Hostname: m.opts.Hostname, ID: m.opts.ID, Peers: len(peers), RegionID: m.opts.RegionID})
	}
	if m.opts.RelayAddress != "" {
		for id, p := range m.peers {
			if p.RegionID == m.opts.RegionID && p.RelayAddress == "" {
				peerWarnings = append(peerWarnings, Warning{Kind: WarnPeerNoRelay, Hostname: p.Hostname, ID: id})
			}
		}
	}
	for _, p := range m.sharedURLLocked() {
		peerWarnings = append(peerWarnings, Warning{Kind: WarnSharedRelayURL, Hostname: p.Hostname, ID: p.ID, RelayURL: m.opts.RelayAddress})
	}
	for id, st := range m.probes {
		if !st.w.warned {
			continue
		}
		p := m.peers[id]
		peerWarnings = append(peerWarnings, Warning{Kind: WarnPeerSlow, Hostname: p.Hostname, RelayURL: p.RelayAddress, Latency: round(st.w.latency()), Threshold: threshold})
	}
	sortByText(peerWarnings)
	return append(out, peerWarnings...)
}

// sortByText sorts warnings by their text.
func sortByText(ws []Warning) {
	text := make([]string, len(ws))
	for i, w := range ws {
		text[i] = w.String()
	}
	sort.Sort(byText{ws, text})
}

type byText struct {
	ws   []Warning
	text []string
}

func (b byText) Len() int           { return len(b.ws) }
func (b byText) Less(i, j int) bool { return b.text[i] < b.text[j] }
func (b byText) Swap(i, j int) {
	b.ws[i], b.ws[j] = b.ws[j], b.ws[i]
	b.text[i], b.text[j] = b.text[j], b.text[i]
}

func round(d time.Duration) time.Duration {
	if d > time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Microsecond)
}
