// This file holds announcements and reads: the notifications heard, the
// announcement of this replica, and the targeted and full reads that
// answer them.

package replicasync

import (
	"context"
	"errors"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
)

// onNotification runs on the pubsub's goroutine: it only parses and flags.
func (m *Manager) onNotification(_ context.Context, payload []byte, err error) {
	if err != nil {
		m.pendingMu.Lock()
		m.pendingAll = true // messages may be lost: re-read everything
		m.pendingMu.Unlock()
		m.trigger(m.syncNow)
		return
	}
	id, ok := ParseNotification(payload)
	if !ok {
		m.metrics.malformed.Inc()
		m.log.Debug("ignoring malformed replica notification", zap.Int("bytes", len(payload)))
		return
	}
	if id == m.opts.ID {
		m.heardOnce.Do(func() { close(m.heard) })
		return
	}
	m.pendingMu.Lock()
	m.pending[id] = struct{}{}
	m.pendingMu.Unlock()
	m.trigger(m.syncNow)
}

// ParseNotification reads a replica notification's payload: a replica id.
func ParseNotification(payload []byte) (uuid.UUID, bool) {
	if len(payload) != 36 {
		return uuid.Nil, false
	}
	id, err := uuid.ParseBytes(payload)
	if err != nil || id == uuid.Nil {
		return uuid.Nil, false
	}
	return id, true
}

// listenTimeout bounds how long New waits to hear its own announcement.
const listenTimeout = 5 * time.Second

// announceUntilHeard announces this replica and, with a Pubsub, repeats the
// announcement (100ms apart, doubling to 1s) until it comes back: the
// Pubsub interface does not promise that a subscription is live when
// Subscribe returns (database/pubsub's was not until it learned to wait
// for its LISTEN), and announcements made before that are lost without
// notice. Once our own comes back, a full read covers
// everything announced before. Without an echo in listenTimeout it warns
// and carries on: the heartbeat's reads catch up.
func (m *Manager) announceUntilHeard(ctx context.Context) {
	m.publish(ctx)
	if m.ps == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, listenTimeout)
	defer cancel()
	again := m.clock.NewTimer(100*time.Millisecond, "announce")
	defer again.Stop()
	for backoff := 100 * time.Millisecond; ; {
		select {
		case <-m.heard:
			return
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) { // not a start that was called off
				m.log.Warn("own replica announcement not heard back: peers that start now may be seen only at the next heartbeat", zap.Duration("timeout", listenTimeout))
			}
			return
		case <-again.C:
			m.publish(ctx)
			backoff = min(2*backoff, time.Second)
			again.Reset(backoff, "announce")
		}
	}
}

func (m *Manager) publish(ctx context.Context) {
	var err error
	if m.ps != nil {
		err = m.ps.Publish(ctx, Channel, []byte(m.opts.ID.String()))
	} else if n, ok := m.store.(Notifier); ok {
		err = n.NotifyReplicaChange(ctx, Channel, m.opts.ID)
	}
	if err != nil {
		m.log.Debug("announce replica", zap.Error(err))
	}
}

// maxTargetedReads: more announcements than this since the last sync are
// cheaper to answer with one full read than with one read each.
const maxTargetedReads = 8

// sync answers the announcements since the last sync: one single-row read
// per announced replica (so N replicas joining cost each peer N small
// reads, not N full-table reads), or one full read after a gap.
func (m *Manager) sync(ctx context.Context) {
	m.pendingMu.Lock()
	pending, all := m.pending, m.pendingAll || len(m.pending) > maxTargetedReads
	m.pending, m.pendingAll = map[uuid.UUID]struct{}{}, false
	m.pendingMu.Unlock()
	if all || len(pending) == 0 {
		_ = m.readAll(ctx)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var rows []Replica
	ids := make([]uuid.UUID, 0, len(pending))
	for id := range pending {
		ids = append(ids, id)
		r, _, err := m.store.GetReplicaIfLive(ctx, id, m.opts.StaleAfter)
		if err != nil {
			_ = m.readAll(ctx) // fall back to the full read
			return
		}
		if r.ID != uuid.Nil { // the row exists; r.Live says whether it counts
			rows = append(rows, r)
		}
	}
	m.apply(rows, false, ids)
}

// readAll reads every recent row, without the latency matrices, and
// applies it.
func (m *Manager) readAll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rows, err := m.store.RecentMembers(ctx, m.opts.StaleAfter)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("read peers", zap.Error(err))
		}
		return err
	}
	m.apply(rows, true, nil)
	return nil
}
