// The heartbeat probe: how long a write to the replicas table waits while
// the cluster rolls (a migration's lock shows here first).

package upgradetest

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// heartbeatProbe writes to replicas as a heartbeat does (an UPDATE takes
// the same lock), every 50 ms, on a stopped row no replica counts, and
// keeps how long each write took.
type heartbeatProbe struct {
	mu      sync.Mutex
	samples []sample
	done    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

type sample struct {
	at   time.Time
	took time.Duration
}

func startHeartbeatProbe(t testing.TB, pg string) *heartbeatProbe {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	if _, err := c.Exec(ctx, `INSERT INTO replicas (id, hostname, region_id, stopped_at, updated_at)
VALUES ($1, 'heartbeat-probe', 0, now() - interval '1 hour', now() - interval '1 hour')`, id); err != nil {
		t.Fatal(err)
	}
	p := &heartbeatProbe{done: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		defer close(p.stopped)
		defer c.Close(context.Background())
		for {
			select {
			case <-p.done:
				return
			case <-time.After(50 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			began := time.Now()
			_, err := c.Exec(ctx, `UPDATE replicas SET error = '' WHERE id = $1`, id)
			took := time.Since(began)
			cancel()
			if err != nil {
				took = 30 * time.Second
			}
			p.mu.Lock()
			p.samples = append(p.samples, sample{at: began, took: took})
			p.mu.Unlock()
		}
	}()
	return p
}

// longest is the longest write that started between from and to.
func (p *heartbeatProbe) longest(from, to time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var d time.Duration
	for _, s := range p.samples {
		if !s.at.Before(from) && !s.at.After(to) {
			d = max(d, s.took)
		}
	}
	return d
}

func (p *heartbeatProbe) stop() {
	p.once.Do(func() { close(p.done) })
	<-p.stopped
}
