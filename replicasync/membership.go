// This file holds membership: applying a read to the live peer set (with
// its log lines), the relay URL rules between this replica and its peers,
// and telling the owner through the callback.

package replicasync

import (
	"fmt"
	"sort"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// SetCallback sets the function told about the live regional peers
// whenever the set changes: a join, a leave, or a new process behind a
// known relay URL (listed in Replaced). It is called soon after SetCallback
// with the current set, then on change only (never once per beat), from
// the Manager's own callback goroutine: never concurrently, never with a
// lock held, and never on the heartbeat path, so a slow callback delays
// only later callbacks (which coalesce: the latest set wins).
func (m *Manager) SetCallback(f func(PeerChange)) {
	m.mu.Lock()
	m.callback = f
	m.told = nil
	m.tellDue = true
	m.mu.Unlock()
	m.trigger(m.tellNow)
}

// apply makes a read the live peer set (by the outage grace rule): logs
// joins and leaves, starts probing newcomers and has the owner told if the
// mesh set changed.
func (m *Manager) apply(rows []Replica, full bool, ids []uuid.UUID) {
	m.mu.Lock()
	mayDrop := m.grace.mayDropStale(m.clock.Now())
	next := nextPeers(m.peers, rows, full, ids, m.opts.ID, mayDrop)
	var joined, left []Replica
	for id, p := range next {
		if _, known := m.peers[id]; !known {
			joined = append(joined, p)
		}
	}
	for id, old := range m.peers {
		if _, still := next[id]; !still {
			left = append(left, old)
			delete(m.probes, id)
		}
	}
	m.peers = next
	m.metrics.replicas.Set(float64(len(next) + 1))
	current := withoutURL(meshPeers(next, m.opts.RegionID), m.opts.RelayAddress)
	selfStarted := m.self.StartedAt
	changed := !samePeers(current, m.current)
	m.current = current
	// With a LinkPinger, a newcomer is measured over its mesh link: the
	// owner asks (Reprobe) once the link is up, and the next round takes
	// peers never measured first. Probing it now would go over HTTP
	// before the link exists: at a mass start, N-1 connections and
	// requests per replica for a sample the link gives a moment later.
	linked := m.pinger != nil
	// Peer-labelled series follow membership, under mu so that a probe
	// ending as its peer leaves cannot bring a series back: the probe
	// error counter of a regional peer exists (at 0) from when the peer is
	// first seen, and both go when it leaves.
	for _, p := range left {
		m.metrics.peerLatency.DeleteLabelValues(p.ID.String(), p.Hostname)
		m.metrics.probeErrors.DeleteLabelValues(p.ID.String(), p.Hostname)
	}
	for _, p := range joined {
		if p.RegionID == m.opts.RegionID {
			m.metrics.probeErrors.WithLabelValues(p.ID.String(), p.Hostname)
		}
	}
	selfNoRelay := m.selfWithoutRelayLocked()
	selfNoRelayChanged := (len(selfNoRelay) > 0) != m.selfNoRelayWarned
	m.selfNoRelayWarned = len(selfNoRelay) > 0
	var sharing []Replica // newly seen to share this replica's relay URL
	shared := m.sharedURLLocked()
	warned := make(map[uuid.UUID]bool, len(shared))
	for _, p := range shared {
		if !m.sharedURLWarned[p.ID] {
			sharing = append(sharing, p)
		}
		warned[p.ID] = true
	}
	m.sharedURLWarned = warned
	m.mu.Unlock()

	for _, p := range left {
		m.log.Info("replica left", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress), zap.Bool("stopped", p.StoppedAt != nil))
	}
	for _, p := range joined {
		m.log.Info("replica joined", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
		if p.RegionID == m.opts.RegionID && p.RelayAddress == "" && m.opts.RelayAddress != "" {
			m.log.Warn("a live replica of this region has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
				zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.Int32("region_id", p.RegionID))
		}
		if p.RegionID == m.opts.RegionID && sameURL(p.RelayAddress, m.opts.RelayAddress) && !p.StartedAt.After(selfStarted) {
			// Not meshed with (see withoutURL). A row started before this
			// process is most likely its own previous run; if it beats
			// again, it is another replica (sharedURLLocked) and warned
			// about below.
			m.log.Info("ignoring an older live row with this replica's relay URL (a previous run killed before it could stop?)",
				zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
		}
		if !linked {
			m.startProbe(p)
		}
	}
	for _, p := range sharing {
		m.log.Warn("another live replica uses this replica's relay URL: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url",
			zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
	}
	if selfNoRelayChanged {
		if len(selfNoRelay) > 0 {
			m.log.Warn("this replica has no relay URL while live replicas of its region have one: they cannot mesh with it, so clients on them cannot reach clients here; set --derp-server-relay-url",
				zap.String("hostname", m.opts.Hostname), zap.Stringer("replica_id", m.opts.ID), zap.Strings("peers", selfNoRelay))
		} else {
			m.log.Info("no live replica of this region has a relay URL any more: nothing to mesh with", zap.String("hostname", m.opts.Hostname))
		}
	}
	if changed {
		m.trigger(m.tellNow)
	}
}

// tellLoop runs the callback, off the heartbeat path. Changes that arrive
// while it runs coalesce: the next call gets the latest set.
func (m *Manager) tellLoop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.tellNow:
		}
		m.mu.Lock()
		f, current, told, due := m.callback, m.current, m.told, m.tellDue
		if f == nil || (!due && samePeers(current, told)) {
			m.mu.Unlock()
			continue
		}
		m.told, m.tellDue = current, false
		m.mu.Unlock()
		f(diffPeers(told, current))
	}
}

// sharedURLLocked is the live regional peers that use this replica's relay
// URL and have heartbeated since it started, oldest first: other running
// replicas given the same URL (two machines listening on all interfaces
// without an access URL both default to http://127.0.0.1:<port>). A relay
// never meshes with a peer behind its own URL, so neither side can reach
// the other's clients. The row a previous run of this process left when
// it was killed shares the URL too, but never beats again after this
// replica started: it is not counted.
func (m *Manager) sharedURLLocked() []Replica {
	var out []Replica
	for _, p := range m.peers {
		if m.sharesURLLocked(p) {
			out = append(out, p)
		}
	}
	sortReplicas(out)
	return out
}

// sharesURLLocked reports whether p is a live regional peer behind this
// replica's relay URL that beat after this replica started.
func (m *Manager) sharesURLLocked(p Replica) bool {
	return m.opts.RelayAddress != "" && p.RegionID == m.opts.RegionID && sameURL(p.RelayAddress, m.opts.RelayAddress) &&
		!m.self.StartedAt.IsZero() && p.UpdatedAt.After(m.self.StartedAt)
}

// selfWithoutRelayLocked names the live regional peers that have a relay
// URL when this replica has none (they mesh one way only: toward them).
// Empty when this replica has a relay URL, or no peer has one (a region
// whose replicas all run without the DERP server).
func (m *Manager) selfWithoutRelayLocked() []string {
	if m.opts.RelayAddress != "" {
		return nil
	}
	var out []string
	for id, p := range m.peers {
		if p.RegionID == m.opts.RegionID && p.RelayAddress != "" {
			out = append(out, fmt.Sprintf("%s (%s)", p.Hostname, id))
		}
	}
	sort.Strings(out)
	return out
}
