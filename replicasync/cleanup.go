// This file holds the cleanup of long-dead replicas' rows.

package replicasync

import (
	"context"
	"time"

	"go.uber.org/zap"
)

func (m *Manager) cleanup() {
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	n, err := m.store.DeleteDeadReplicas(ctx, m.opts.Retention)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("delete dead replicas", zap.Error(err))
		}
		return
	}
	if n > 0 {
		m.log.Info("deleted rows of long-dead replicas", zap.Int64("rows", n), zap.Duration("retention", m.opts.Retention))
	}
}
