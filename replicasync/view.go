// This file holds what the owner reads of the Manager: its own row, the
// live replicas with their latency matrices, the regional peers and the
// measurements.

package replicasync

import (
	"context"
	"sort"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// Self is this replica's row as last written.
func (m *Manager) Self() Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.self
}

// All is every live replica, self included, oldest first. The peers'
// latency matrices (Peers) are not read on every beat, so they are empty
// here except for this replica's own; Replicas fills them in.
func (m *Manager) All() []Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Replica, 0, len(m.peers)+1)
	out = append(out, m.self)
	for _, p := range m.peers {
		out = append(out, p)
	}
	sortReplicas(out)
	return out
}

// matrixTTL is how long Replicas reuses a read of the latency matrix:
// clients polling the replica list share one read a second.
const matrixTTL = time.Second

// matrixTimeout bounds Replicas' read of the matrix; past it (or while the
// heartbeat fails) the last matrix read is shown.
const matrixTimeout = 2 * time.Second

// Replicas is All with every replica's latency matrix (Peers) as stored in
// its row: the membership is this replica's view, the matrices are read
// from the store on request (at most one read per matrixTTL) rather than
// on every beat, where they would cost every replica N² entries. While
// the store is unreachable it answers with the matrices last read. This
// replica's own row shows its current measurements, warnings and error.
func (m *Manager) Replicas(ctx context.Context) []Replica {
	rows := m.All()
	m.matrixMu.Lock()
	defer m.matrixMu.Unlock()
	if (m.matrix == nil || m.clock.Since(m.matrixAt) >= matrixTTL) && !m.HeartbeatFailing() {
		ctx, cancel := context.WithTimeout(ctx, matrixTimeout)
		full, err := m.store.RecentReplicas(ctx, m.opts.StaleAfter)
		cancel()
		if err != nil {
			m.log.Debug("read latency matrix", zap.Error(err))
		} else {
			m.matrix = make(map[uuid.UUID][]PeerReport, len(full))
			for _, r := range full {
				m.matrix[r.ID] = r.Peers
			}
			m.matrixAt = m.clock.Now()
		}
	}
	for i := range rows {
		if rows[i].ID == m.opts.ID {
			// What this replica would write now: a change that waits for
			// the next beat (see loop) shows here at once.
			m.mu.Lock()
			rows[i].Peers = m.peerReportsLocked()
			rows[i].Warnings = renderWarnings(m.warningsLocked())
			rows[i].Error = m.ownError
			rows[i].DatabaseLatency = m.db.latency()
			m.mu.Unlock()
			continue
		}
		rows[i].Peers = []PeerReport{}
		if p, ok := m.matrix[rows[i].ID]; ok && p != nil {
			rows[i].Peers = p
		}
	}
	return rows
}

// Regional is every live peer in this replica's region, self excluded.
func (m *Manager) Regional() []Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Replica
	for _, p := range m.peers {
		if p.RegionID == m.opts.RegionID {
			out = append(out, p)
		}
	}
	sortReplicas(out)
	return out
}

// DatabaseLatency is the median of recent database round trips.
func (m *Manager) DatabaseLatency() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.db.latency()
}

// ClockSkew is the database's clock minus this machine's, measured at the
// last heartbeat (within half a round trip). It is reported, never used to
// judge liveness.
func (m *Manager) ClockSkew() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.skew
}

func sortReplicas(rs []Replica) {
	sort.Slice(rs, func(i, j int) bool {
		if !rs[i].CreatedAt.Equal(rs[j].CreatedAt) {
			return rs[i].CreatedAt.Before(rs[j].CreatedAt)
		}
		return rs[i].ID.String() < rs[j].ID.String()
	})
}
