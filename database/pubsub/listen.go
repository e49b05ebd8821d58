package pubsub

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// syncListens LISTENs and UNLISTENs so the connection matches the
// subscriptions.
// Each statement may take up to ConnectTimeout (a hung connection fails
// it; a merely slow server does not).
func (p *Pubsub) syncListens(ctx context.Context, conn *pgx.Conn) error {
	exec := func(sql string) error {
		ctx, cancel := context.WithTimeout(ctx, p.opts.ConnectTimeout)
		defer cancel()
		_, err := conn.Exec(ctx, sql)
		return err
	}
	want := p.wantedChannels()
	for ch := range want {
		if !p.listening[ch] {
			if err := exec("LISTEN " + pgx.Identifier{ch}.Sanitize()); err != nil {
				return fmt.Errorf("listen %q: %w", ch, err)
			}
			p.listening[ch] = true
		}
	}
	for ch := range p.listening {
		if !want[ch] {
			if err := exec("UNLISTEN " + pgx.Identifier{ch}.Sanitize()); err != nil {
				return fmt.Errorf("unlisten %q: %w", ch, err)
			}
			delete(p.listening, ch)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.active = make(map[string]bool, len(p.listening))
	for ch := range p.listening {
		p.active[ch] = true
		for _, w := range p.waiters[ch] {
			close(w)
		}
		delete(p.waiters, ch)
	}
	return nil
}

// setDown records that the listen connection is gone: Connected turns
// false and Subscribe calls waiting for a LISTEN return (their listeners
// hear ErrDroppedMessages once the connection is back).
func (p *Pubsub) setDown() {
	p.connected.Store(false)
	p.metrics.connected.Set(0)
	p.listening = map[string]bool{}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.active = map[string]bool{}
	for ch, ws := range p.waiters {
		for _, w := range ws {
			close(w)
		}
		delete(p.waiters, ch)
	}
}

// closeConn closes a connection that may be hung without waiting long.
func closeConn(conn *pgx.Conn) {
	// Real time: a deadline on the driver's goodbye.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// run owns the listen connection: it waits for notifications, re-syncs
// LISTENs when poked, and reconnects when the connection breaks.
func (p *Pubsub) run(conn *pgx.Conn) {
	defer p.wg.Done()
	defer func() {
		if conn != nil {
			closeConn(conn)
		}
		p.setDown()
	}()
	for p.ctx.Err() == nil {
		err := p.syncListens(p.ctx, conn)
		if err == nil {
			err = p.receive(conn)
		}
		if p.ctx.Err() != nil {
			return
		}
		if err != nil {
			p.setDown()
			closeConn(conn)
			conn = p.reconnect(err)
			if conn == nil {
				return
			}
		}
	}
}

// receive waits for notifications until poked (nil) or the connection
// fails (the error). A connection silent for PingInterval is pinged; no
// answer within PingTimeout counts as a failure.
func (p *Pubsub) receive(conn *pgx.Conn) error {
	for {
		waitCtx, cancel := context.WithCancel(p.ctx)
		var poked, silent atomic.Bool
		quiet := p.opts.Clock.AfterFunc(p.opts.PingInterval, func() {
			silent.Store(true)
			cancel()
		}, "pubsub", "idle")
		stopWake, wakeDone := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(wakeDone)
			select {
			case <-p.wake:
				poked.Store(true)
				cancel()
			case <-stopWake:
			}
		}()
		n, err := conn.WaitForNotification(waitCtx)
		quiet.Stop()
		close(stopWake)
		<-wakeDone
		idle := silent.Load() && !poked.Load()
		cancel()
		if p.ctx.Err() != nil {
			return p.ctx.Err()
		}
		if err == nil {
			p.metrics.received.Inc()
			p.dispatch(n.Channel, message{payload: []byte(n.Payload)})
		}
		if conn.IsClosed() {
			if err == nil {
				err = errors.New("connection closed")
			}
			return err
		}
		switch {
		case poked.Load():
			return nil // re-sync LISTENs (a poke that raced a notification is kept)
		case err == nil:
		case idle:
			if err := p.ping(conn); err != nil {
				return err
			}
		default:
			return err
		}
	}
}

// ping checks that an idle listen connection still answers.
func (p *Pubsub) ping(conn *pgx.Conn) error {
	// Real time: a deadline on the driver's round trip.
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.PingTimeout)
	defer cancel()
	if err := conn.Ping(ctx); err != nil {
		if p.ctx.Err() != nil {
			return p.ctx.Err()
		}
		// Whatever froze this connection (a middlebox that lost its
		// state, a stalled proxy) likely froze the pool's idle ones too:
		// have them checked now, so the re-read that follows the
		// reconnect (and any query after it) does not wait one out.
		p.db.CheckIdle()
		return fmt.Errorf("idle connection did not answer a ping within %s: %w", p.opts.PingTimeout, err)
	}
	return nil
}

// reconnect retries with exponential backoff and jitter until a new
// connection is up (and tells every subscriber messages may have been
// lost), or the Pubsub closes (nil).
func (p *Pubsub) reconnect(cause error) *pgx.Conn {
	clock := p.opts.Clock
	lost := clock.Now("pubsub", "reconnect")
	p.log.Warn("pubsub connection lost; reconnecting", zap.String("database", p.db.Describe()),
		zap.String("error", p.db.Redact(cause.Error())))
	backoff := p.opts.ReconnectMin
	for {
		jitter := time.Duration(rand.Int64N(int64(backoff)/2 + 1))
		t := clock.NewTimer(backoff/2+jitter, "pubsub", "reconnect")
		select {
		case <-p.ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		// Real time: a deadline on the driver's dial and handshake.
		ctx, cancel := context.WithTimeout(p.ctx, p.opts.ConnectTimeout)
		conn, err := p.connect(ctx)
		cancel()
		if err == nil {
			err = p.syncListens(p.ctx, conn)
			if err != nil {
				p.setDown()
				closeConn(conn)
			}
		}
		if err == nil {
			p.metrics.reconnects.Inc()
			p.log.Info("pubsub connection restored", zap.Duration("down_for", clock.Since(lost, "pubsub", "reconnect").Round(time.Millisecond)))
			p.dispatch("", message{err: ErrDroppedMessages})
			return conn
		}
		if p.ctx.Err() != nil {
			return nil
		}
		backoff *= 2
		if backoff > p.opts.ReconnectMax {
			backoff = p.opts.ReconnectMax
		}
	}
}
