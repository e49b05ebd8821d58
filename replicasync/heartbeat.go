// This file holds the heartbeat: registration, the beat that writes the
// row and measures the database and the clock skew, and the outage grace
// (a failing heartbeat, cut off, isolated).

package replicasync

import (
	"context"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// HeartbeatFailing reports whether the last heartbeat failed to reach the
// database.
func (m *Manager) HeartbeatFailing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.failing()
}

// maxClockSkew: a machine clock further off the database's than this is
// worth a warning.
const maxClockSkew = time.Second

func skewTooLarge(d time.Duration) bool { return d.Abs() > maxClockSkew }

// CutOff reports whether this replica's own heartbeat has failed for
// longer than the stale window: peers that can still reach the database
// have dropped it. In a full database outage every replica is cut off;
// Isolated tells the two apart.
func (m *Manager) CutOff() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.cutOff(m.clock.Now(), m.opts.StaleAfter)
}

// Isolated is the readiness rule for a partial partition: this replica is
// cut off, it knows regional peers, and none of them still holds a mesh
// link to it (incomingMeshLinks, counted by the owner from its relay). In a
// full outage peers keep everyone (nobody's beat succeeds), so their links
// stay and Isolated is false; when only this replica is cut off, the peers
// drop it and close their links. A lone replica is never isolated.
func (m *Manager) Isolated(incomingMeshLinks int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.cutOff(m.clock.Now(), m.opts.StaleAfter) && len(m.current) > 0 && incomingMeshLinks == 0
}

// registerPatience bounds registration: at a mass start the database is
// at its busiest, and a connection that breaks (a pooler or a server
// restarting) is worth another try rather than a failed start.
const registerPatience = 30 * time.Second

// register writes this replica's first row, trying again (every
// RetryInterval, jittered) after an error that may pass, for
// registerPatience in all; an error the server gives for the statement
// itself (permissions, a missing table) fails at once.
func (m *Manager) register(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, registerPatience)
	defer cancel()
	for {
		err := m.beat(ctx, registerPatience)
		if err == nil || !transient(err) || ctx.Err() != nil {
			return err
		}
		m.log.Info("registration failed; trying again", zap.Error(err))
		t := m.clock.NewTimer(jitter(m.opts.RetryInterval), "register")
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// beat writes the row (re-creating it if deleted, clearing a stop someone
// else set) and takes the round trip as a database latency sample. A
// revived row, or the first beat after an outage, is announced: peers may
// have dropped this replica.
func (m *Manager) beat(ctx context.Context, timeout time.Duration) error {
	m.beatMu.Lock()
	defer m.beatMu.Unlock()
	if m.left {
		return errLeft
	}
	m.mu.Lock()
	state := ReplicaState{
		ID:              m.opts.ID,
		Hostname:        m.opts.Hostname,
		RegionID:        m.opts.RegionID,
		RelayAddress:    m.opts.RelayAddress,
		Version:         m.opts.Version,
		DatabaseLatency: m.db.latency(),
		Error:           m.ownError,
		Peers:           m.peerReportsLocked(),
		Warnings:        renderWarnings(m.warningsLocked()),
	}
	m.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := m.clock.Now()
	b, err := m.store.BeatReplica(ctx, state)
	rtt := m.clock.Since(start)
	if err != nil {
		m.noteBeatFailure(err)
		return err
	}
	m.mu.Lock()
	recovered := m.grace.beatSucceeded(m.clock.Now(), m.opts.StaleAfter)
	m.cutOffWarned = false
	registered := m.self.ID != uuid.Nil // not the first beat
	m.self = b.Replica
	// now() is the beat's transaction start: compare it with the middle of
	// the round trip on this machine's clock.
	m.skew = b.Replica.UpdatedAt.Sub(start.Add(rtt / 2))
	skew := m.skew
	skewChanged := skewTooLarge(skew) != m.skewWarned
	m.skewWarned = skewTooLarge(skew)
	change := m.db.observe(rtt)
	latency := m.db.latency()
	m.mu.Unlock()
	m.metrics.databaseLatency.Set(latency.Seconds())
	m.metrics.clockSkew.Set(skew.Seconds())
	if skewChanged {
		if skewTooLarge(skew) {
			m.log.Warn("local clock differs from the database clock", zap.Duration("database_minus_local", skew.Round(time.Millisecond)))
		} else {
			m.log.Info("local clock agrees with the database clock again", zap.Duration("database_minus_local", skew.Round(time.Millisecond)))
		}
		m.trigger(m.writeNow)
	}
	if recovered {
		m.log.Info("heartbeat recovered: database reachable again")
	}
	if b.Revived && registered {
		m.log.Info("replica row was deleted or marked stopped while this replica runs; re-registered and announced")
	}
	if recovered || (b.Revived && registered) {
		m.publish(ctx) // peers may have dropped us; tell them to re-read
	}
	// A stop that committed while this beat ran (b.Replica.StoppedAt set)
	// is cleared by the next beat, which then announces the revival.
	switch {
	case change.warnedNow && !change.warnedBefore:
		m.log.Warn("database latency above threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
		m.trigger(m.writeNow)
	case !change.warnedNow && change.warnedBefore:
		m.log.Info("database latency back under threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
		m.trigger(m.writeNow)
	}
	return nil
}

func (m *Manager) noteBeatFailure(err error) {
	m.metrics.heartbeatFailures.Inc()
	now := m.clock.Now()
	m.mu.Lock()
	first := m.grace.beatFailed(now)
	cutOff := m.grace.cutOff(now, m.opts.StaleAfter) && !m.cutOffWarned
	if cutOff {
		m.cutOffWarned = true
	}
	since := now.Sub(m.grace.failingSince)
	m.mu.Unlock()
	if m.ctx.Err() != nil {
		return
	}
	if first {
		m.log.Warn("heartbeat failed: keeping the last known peers until the database is back", zap.Error(err))
	}
	if cutOff {
		m.log.Warn("heartbeat failing for longer than the stale window: replicas that reach the database consider this one gone",
			zap.Duration("failing_for", since.Round(time.Millisecond)), zap.Duration("stale_after", m.opts.StaleAfter), zap.Error(err))
	}
}
