// Noticing a dead mesh link: the one keepalive loop per Mesh that pings
// silent links, the pings' timeouts on the Mesh's clock, and the kernel's
// TCP keepalives on every mesh connection.

package derpmesh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"tailscale.com/derp/derphttp"
)

// keepaliveLoop checks every established connection each half
// PingInterval and pings, each on its own goroutine, those silent for
// their keepalive interval (see Options.PingInterval): one wakeup per
// tick for the whole mesh, instead of a timer per connection firing each
// time the peer's relay sends its own keepalive.
func (m *Mesh) keepaliveLoop() {
	defer m.wg.Done()
	t := m.clock.NewTicker(max(m.opts.PingInterval/2, time.Millisecond), "derpmesh", "keepalive")
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		}
		interval := m.keepaliveInterval()
		m.mu.Lock()
		peers := make([]*peer, 0, len(m.peers))
		for _, p := range m.peers {
			peers = append(peers, p)
		}
		m.mu.Unlock()
		for _, p := range peers {
			if p.silentFor() < interval {
				continue
			}
			m.checkLink(p)
		}
	}
}

// checkLink pings p's established connection now, on its own goroutine,
// up to twice within ConfirmTimeout, and closes and redials it if neither
// ping is answered (see peer.keepalive); nothing happens if p has no
// established connection, a check of it is under way, or the Mesh is
// closing. The keepalive calls it for silent links, and PingPeer for a
// link whose ping went unanswered.
func (m *Mesh) checkLink(p *peer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed { // Close waits for wg: nothing may be added after it
		return
	}
	ctx, c, dead, ok := p.startKeepalive()
	if !ok {
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		p.keepalive(ctx, c, dead)
	}()
}

// pingWithin sends one ping on c and waits for its pong until ctx ends or
// d passes on the Mesh's clock; a pong not back within d is
// context.DeadlineExceeded, as under context.WithTimeout. The DERP
// library gives up on its own after 5 s of real time (its cap on one
// ping, left as it is; it also returns context.DeadlineExceeded). why
// tags the timer ("confirm" or "keepalive") for tests that trap it.
func (m *Mesh) pingWithin(ctx context.Context, c *derphttp.Client, d time.Duration, why string) error {
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var expired atomic.Bool
	t := m.clock.AfterFunc(d, func() {
		expired.Store(true)
		cancel()
	}, "derpmesh", "ping", why)
	defer t.Stop()
	err := c.Ping(pctx)
	if err != nil && expired.Load() && ctx.Err() == nil && errors.Is(err, context.Canceled) {
		return context.DeadlineExceeded
	}
	return err
}

// keepaliveInterval is how long a mesh connection may stay silent before
// its keepalive ping: PingInterval, stretched so that all peers together
// get at most MaxPingsPerInterval pings per PingInterval.
func (m *Mesh) keepaliveInterval() time.Duration {
	m.mu.Lock()
	peers := len(m.peers)
	m.mu.Unlock()
	d := m.opts.PingInterval
	if peers > m.opts.MaxPingsPerInterval {
		d = d * time.Duration(peers) / time.Duration(m.opts.MaxPingsPerInterval)
	}
	return d
}

// dialer dials mesh connections with TCP keepalives (after PingInterval of
// idleness, every ConfirmTimeout/2, two unanswered probes) and a TCP user
// timeout of PingInterval+2×ConfirmTimeout, so a peer whose machine or
// network dies without a reset is noticed by the kernel in about that
// long, whatever the size of the mesh and without waking this process.
func (m *Mesh) dialer() *net.Dialer {
	return &net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{
			Enable:   true,
			Idle:     m.opts.PingInterval,
			Interval: max(m.opts.ConfirmTimeout/2, time.Second),
			Count:    2,
		},
		Control: userTimeout(m.opts.PingInterval + 2*m.opts.ConfirmTimeout),
	}
}

// startKeepalive claims a keepalive ping of the confirmed connection, if
// there is one and no ping of it is under way.
func (p *peer) startKeepalive() (context.Context, *derphttp.Client, chan error, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.client == nil || p.pinging {
		return nil, nil, nil, false
	}
	p.pinging = true
	return p.sessionCtx, p.client, p.dead, true
}

func (p *peer) keepaliveDone(c *derphttp.Client) {
	p.mu.Lock()
	if p.client == c {
		p.pinging = false
	}
	p.mu.Unlock()
}

// keepalive pings the confirmed connection c up to missedPingsBeforeDead
// times in a row, each within ConfirmTimeout, and reports it dead (on
// dead) when none is answered. A ping that cannot be sent means the
// connection broke, which its session sees by itself.
func (p *peer) keepalive(ctx context.Context, c *derphttp.Client, dead chan error) {
	defer p.keepaliveDone(c)
	timeout := p.m.opts.ConfirmTimeout
	for misses := 0; misses < missedPingsBeforeDead; misses++ {
		err := p.m.pingWithin(ctx, c, timeout, "keepalive")
		switch {
		case err == nil:
			p.noteHeard()
			return
		case ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded):
			return
		}
	}
	select {
	case dead <- fmt.Errorf("%w (%d in a row unanswered within %s)", errStoppedAnswering, missedPingsBeforeDead, timeout):
	default:
	}
}

// missedPingsBeforeDead is how many pings in a row an established
// connection may leave unanswered before it is closed and redialed: one
// slow pong from a loaded peer must not cost every forwarder through it.
const missedPingsBeforeDead = 2

// errStoppedAnswering marks an established connection closed for
// unanswered pings.
var errStoppedAnswering = errors.New("peer stopped answering pings")

// noteHeard records that the peer was heard from just now.
func (p *peer) noteHeard() { p.heard.Store(p.m.clock.Now().UnixNano()) }

// silentFor is how long the peer has been silent.
func (p *peer) silentFor() time.Duration { return p.m.clock.Since(time.Unix(0, p.heard.Load())) }
