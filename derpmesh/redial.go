// A peer's dial loop: one connection at a time, redialed after a break
// with backoff, at once on Reconnect, or parked when the URL leads here.

package derpmesh

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"
)

// run dials, watches and redials until the peer is removed or the Mesh
// closes.
func (p *peer) run() {
	defer close(p.done)
	if p.bad != nil {
		p.setState(StateConnecting, p.bad.Error())
		p.log.Warn("not meshing with peer: invalid relay URL", zap.Error(p.bad))
		<-p.ctx.Done()
		return
	}
	var (
		failures int    // consecutive failed sessions
		lastErr  string // last error logged at WARN, to log each new one once
	)
	for {
		select { // a Reconnect before this point is served by this very dial
		case <-p.wake:
		default:
		}
		sctx, scancel := context.WithCancel(p.ctx)
		p.mu.Lock()
		p.redialNow = false
		p.cancelSession = scancel
		p.mu.Unlock()

		start := p.m.clock.Now()
		res := p.session(sctx)
		scancel()

		p.mu.Lock()
		p.cancelSession = nil
		redial := p.redialNow
		p.mu.Unlock()

		switch {
		case p.ctx.Err() != nil:
			return
		case redial || res.err == nil: // canceled by Reconnect
			p.log.Info("reconnecting to peer on request")
			if res.confirmed {
				p.setState(StateConnecting, "")
			}
			failures, lastErr = 0, ""
			continue
		case errors.Is(res.err, errSelf):
			p.setState(StateConnecting, errSelf.Error())
			p.log.Warn("not meshing with peer: its relay URL points at this replica")
			if !p.park() {
				return
			}
			failures, lastErr = 0, ""
			continue
		}

		msg := res.err.Error()
		p.setState(StateConnecting, msg)
		p.m.notify.post(p.url, eventBroken)
		if res.confirmed {
			lastErr = "" // a break after a connection is news: log it at WARN
		}
		if res.confirmed && p.m.clock.Since(start) >= p.m.opts.MaxRetryInterval {
			// A connection that was up a while: redial at once (the peer
			// may have restarted in place).
			p.log.Warn("mesh connection to peer broke; redialing", zap.String("error", msg))
			failures, lastErr = 0, ""
			continue
		}
		failures++
		if msg != lastErr {
			lastErr = msg
			p.log.Warn("cannot mesh with peer; retrying", zap.String("error", msg), zap.Int("failures", failures))
		} else {
			p.log.Debug("cannot mesh with peer; retrying", zap.String("error", msg), zap.Int("failures", failures))
		}
		if !p.pause(p.backoff(failures)) {
			return
		}
	}
}

// backoff is the pause after the n-th consecutive failure (n >= 1).
func (p *peer) backoff(n int) time.Duration {
	d := p.m.opts.RetryInterval
	for i := 1; i < n && d < p.m.opts.MaxRetryInterval; i++ {
		d *= 2
	}
	d = min(d, p.m.opts.MaxRetryInterval)
	return time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
}

// pause waits d, or less if Reconnect is called. It reports false when
// the peer is stopping.
func (p *peer) pause(d time.Duration) bool {
	p.mu.Lock()
	now := p.redialNow
	p.mu.Unlock()
	if now {
		return p.ctx.Err() == nil
	}
	t := p.m.clock.NewTimer(d, "derpmesh", "redial")
	defer t.Stop()
	select {
	case <-p.ctx.Done():
		return false
	case <-p.wake:
		return true
	case <-t.C:
		return true
	}
}

// park waits for Reconnect. It reports false when the peer is stopping.
func (p *peer) park() bool {
	select {
	case <-p.ctx.Done():
		return false
	case <-p.wake:
		return true
	}
}
