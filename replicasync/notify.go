package replicasync

import (
	"context"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database/pubsub"
)

// Channel is the pubsub channel replicas announce themselves on: at start,
// when their row changed in a way peers should see at once (a warning or an
// error raised or cleared), and at stop. A payload is the announcing
// replica's id as text and nothing else (NOTIFY carries at most 8000
// bytes); receivers re-read the table rather than trust a payload.
const Channel = "replica"

// Pubsub is what the Manager needs of LISTEN/NOTIFY
// (database/pubsub.Pubsub implements it). Listeners must be called one at a
// time; err == pubsub.ErrDroppedMessages means notifications may have been
// lost and the Manager re-reads its peers.
type Pubsub interface {
	Subscribe(channel string, l pubsub.Listener) (cancel func(), err error)
	Publish(ctx context.Context, channel string, payload []byte) error
}

// ParseNotification reads a replica notification's payload: a replica id
// in canonical text form (36 characters, any case). Anything else, the nil
// id included, is malformed.
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

// onNotification runs on the pubsub's delivery goroutine. It only parses
// and raises the dirty flag: the loop goroutine re-reads the table once for
// any burst of notifications that arrived while it was busy.
func (m *Manager) onNotification(_ context.Context, payload []byte, err error) {
	if err != nil {
		m.trigger(m.syncNow) // notifications may be lost: re-read everything
		return
	}
	id, ok := ParseNotification(payload)
	if !ok {
		m.metrics.malformed.Inc()
		m.log.Debug("ignoring malformed replica notification", zap.Int("bytes", len(payload)))
		return
	}
	if id == m.opts.ID {
		return // our own announcement
	}
	m.trigger(m.syncNow)
}

// publish announces this replica's id. A failure is not fatal: peers fall
// back to the heartbeat.
func (m *Manager) publish(ctx context.Context) {
	if err := m.ps.Publish(ctx, Channel, []byte(m.opts.ID.String())); err != nil && ctx.Err() == nil {
		m.log.Debug("could not announce replica; peers will see the change at their next beat", zap.Error(err))
	}
}

func (m *Manager) trigger(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
