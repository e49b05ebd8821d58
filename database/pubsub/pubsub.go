// Package pubsub is Postgres LISTEN/NOTIFY for the server: one dedicated
// connection per process listens, publishing goes through the pool.
//
// It owns that connection and its reconnect loop. It never interprets
// payloads (subscribers do) and never logs the connection URL's password.
// Subscribers are told whenever messages may have been lost, so they can
// re-read the state they mirror instead of trusting a gap.
package pubsub

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
)

// ErrDroppedMessages is passed to a Listener when messages may have been
// lost: the listen connection was re-established, or the listener's queue
// overflowed. The listener should re-read whatever state it mirrors.
var ErrDroppedMessages = errors.New("pubsub: messages may have been dropped")

// MaxPayload is the largest payload Publish accepts (Postgres' NOTIFY limit
// is 8000 bytes).
const MaxPayload = 7999

// Listener receives one payload, or err == ErrDroppedMessages. Calls for one
// subscription are made one at a time, in order, from a goroutine the
// Pubsub owns; a slow listener never blocks other subscriptions or the
// connection (its queue overflows instead).
type Listener func(ctx context.Context, payload []byte, err error)

// Options tunes a Pubsub. The zero value is usable.
type Options struct {
	// Logger defaults to a no-op logger.
	Logger *zap.Logger
	// Registerer, if set, receives the coderd_pubsub_* metrics.
	Registerer prometheus.Registerer
	// QueueSize is each subscription's buffer. When it overflows, messages
	// are dropped and the listener gets ErrDroppedMessages. Default 64.
	QueueSize int
	// ReconnectMin and ReconnectMax bound the backoff between attempts to
	// re-establish the listen connection; each wait is drawn at random
	// between half the current backoff and all of it, so a fleet does not
	// reconnect in lockstep. Defaults 100ms and 1s: a replica resyncs
	// within about a second of Postgres returning, at the cost of one
	// connection attempt per second while it is down.
	ReconnectMin, ReconnectMax time.Duration
	// PingInterval is how long the listen connection may stay silent
	// before it is pinged. Default 2s: one tiny round trip every 2s per
	// replica buys detection of a hung connection (a stalled proxy, a
	// middlebox that dropped the connection's state) within
	// PingInterval + PingTimeout, where TCP alone would take minutes.
	PingInterval time.Duration
	// PingTimeout is how long a ping may wait for its answer before the
	// connection counts as hung and is replaced.
	// Default 2s: far above a healthy round trip, well below what an
	// operator would call an outage.
	PingTimeout time.Duration
	// ConnectTimeout bounds each attempt to re-open the listen connection
	// (New's first attempt is bounded by its ctx). Default 10s: generous
	// for a loaded server's authentication; a hung attempt only delays the
	// next one.
	ConnectTimeout time.Duration
	// Clock paces the reconnect backoff, the silence before an idle
	// ping, and the down_for logged on reconnecting. PingTimeout and
	// ConnectTimeout stay on real time: they are deadlines on the
	// driver's round trips. Timer tags start with "pubsub". Default: the
	// real clock; tests step a quartz.Mock.
	Clock quartz.Clock
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.QueueSize <= 0 {
		o.QueueSize = 64
	}
	if o.ReconnectMin <= 0 {
		o.ReconnectMin = 100 * time.Millisecond
	}
	if o.ReconnectMax <= 0 {
		o.ReconnectMax = time.Second
	}
	if o.ReconnectMax < o.ReconnectMin {
		o.ReconnectMax = o.ReconnectMin
	}
	if o.PingInterval <= 0 {
		o.PingInterval = 2 * time.Second
	}
	if o.PingTimeout <= 0 {
		o.PingTimeout = 2 * time.Second
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.Clock == nil {
		o.Clock = quartz.NewReal()
	}
	return o
}

// Pubsub delivers Postgres notifications to subscribers in this process.
type Pubsub struct {
	db      *database.DB
	opts    Options
	log     *zap.Logger
	metrics *metrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu   sync.Mutex
	subs map[string]map[*subscription]struct{} // channel → subscriptions
	// active is the set of channels LISTENed on the current connection
	// (empty while it is down); waiters are Subscribe calls waiting for
	// their channel to become active. Both under mu.
	active  map[string]bool
	waiters map[string][]chan struct{}
	// wake interrupts WaitForNotification so the loop can LISTEN/UNLISTEN.
	wake       chan struct{}
	listening  map[string]bool // owned by the run goroutine
	connected  atomic.Bool
	backendPID atomic.Uint32

	closeOnce sync.Once
}

type subscription struct {
	channel  string
	listener Listener
	queue    chan message
	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
	// overflowed is set when a message was dropped; the next delivery is
	// ErrDroppedMessages.
	overflowed atomic.Bool
}

type message struct {
	payload []byte
	err     error
}

// New opens the listen connection and starts the receive loop. It returns
// an error only if the first connection fails; later failures are retried
// for as long as the Pubsub lives.
func New(ctx context.Context, db *database.DB, opts Options) (*Pubsub, error) {
	opts = opts.withDefaults()
	p := &Pubsub{
		db:        db,
		opts:      opts,
		log:       opts.Logger,
		metrics:   newMetrics(opts.Registerer),
		subs:      map[string]map[*subscription]struct{}{},
		wake:      make(chan struct{}, 1),
		listening: map[string]bool{},
		active:    map[string]bool{},
		waiters:   map[string][]chan struct{}{},
	}
	conn, err := p.connect(ctx)
	if err != nil {
		return nil, err
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.wg.Add(1)
	go p.run(conn)
	return p, nil
}

func (p *Pubsub) connect(ctx context.Context) (*pgx.Conn, error) {
	// OpenConn reads the URL source again: a password rotated through
	// --postgres-url-file applies to the next LISTEN connection.
	conn, err := p.db.OpenConn(ctx)
	if err != nil {
		return nil, fmt.Errorf("pubsub: %w", err)
	}
	p.backendPID.Store(conn.PgConn().PID())
	p.connected.Store(true)
	p.metrics.connected.Set(1)
	return conn, nil
}

// Connected reports whether the listen connection is up. It turns false
// within PingInterval + PingTimeout of the connection hanging, and at once
// when it breaks.
func (p *Pubsub) Connected() bool { return p.connected.Load() }

// BackendPID is the Postgres backend process id of the listen connection
// (tests terminate it to simulate a broken connection).
func (p *Pubsub) BackendPID() uint32 { return p.backendPID.Load() }

// Subscribe delivers every notification on channel to l until cancel is
// called. cancel is idempotent and safe after Close.
//
// It returns once the server is listening on channel for this Pubsub, so
// anything published on channel after it returns, from any connection, is
// delivered. If the listen connection is down (or goes down while
// Subscribe waits), it returns at once without error and l gets
// ErrDroppedMessages when the connection is back, like every subscriber.
func (p *Pubsub) Subscribe(channel string, l Listener) (cancel func(), err error) {
	if channel == "" {
		return nil, errors.New("pubsub: empty channel name")
	}
	s := &subscription{channel: channel, listener: l, queue: make(chan message, p.opts.QueueSize), stop: make(chan struct{}), done: make(chan struct{})}
	p.mu.Lock()
	if p.ctx.Err() != nil {
		p.mu.Unlock()
		return nil, errors.New("pubsub: closed")
	}
	if p.subs[channel] == nil {
		p.subs[channel] = map[*subscription]struct{}{}
	}
	p.subs[channel][s] = struct{}{}
	var listening chan struct{}
	if p.connected.Load() && !p.active[channel] {
		listening = make(chan struct{})
		p.waiters[channel] = append(p.waiters[channel], listening)
	}
	p.wg.Add(1)
	p.mu.Unlock()
	go p.deliver(s)
	p.poke()
	if listening != nil {
		select {
		case <-listening:
		case <-p.ctx.Done():
		}
	}
	return func() {
		p.mu.Lock()
		delete(p.subs[channel], s)
		if len(p.subs[channel]) == 0 {
			delete(p.subs, channel)
		}
		p.mu.Unlock()
		s.stopOnce.Do(func() { close(s.stop) })
		<-s.done
		p.poke()
	}, nil
}

// poke makes the receive loop re-sync its LISTENs.
func (p *Pubsub) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// Publish sends payload on channel through the pool.
func (p *Pubsub) Publish(ctx context.Context, channel string, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("pubsub: payload of %d bytes exceeds the %d-byte NOTIFY limit", len(payload), MaxPayload)
	}
	if _, err := p.db.Pool().Exec(ctx, "SELECT pg_notify($1, $2)", channel, string(payload)); err != nil {
		return fmt.Errorf("pubsub: publish on %q: %w", channel, err)
	}
	p.metrics.published.Inc()
	return nil
}

// Close stops the receive loop and every subscription's delivery goroutine
// and waits for them. It is safe to call more than once.
func (p *Pubsub) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.cancel()
		for _, set := range p.subs {
			for s := range set {
				s.stopOnce.Do(func() { close(s.stop) })
			}
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return nil
}

// deliver runs one subscription's listener.
func (p *Pubsub) deliver(s *subscription) {
	defer p.wg.Done()
	defer close(s.done)
	for {
		select {
		case <-s.stop:
			return
		case m := <-s.queue:
			if s.overflowed.Swap(false) {
				s.listener(p.ctx, nil, ErrDroppedMessages)
			}
			s.listener(p.ctx, m.payload, m.err)
		}
	}
}

// dispatch queues m for every subscriber of channel ("" = all).
func (p *Pubsub) dispatch(channel string, m message) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for ch, set := range p.subs {
		if channel != "" && ch != channel {
			continue
		}
		for s := range set {
			select {
			case s.queue <- m:
			default:
				p.metrics.dropped.Inc()
				if !s.overflowed.Swap(true) {
					p.log.Warn("pubsub subscriber queue full: dropping messages; it will resync", zap.String("channel", ch))
				}
				// Make sure the listener hears about the gap even if
				// nothing else arrives: a queued drop notice is enough.
			}
		}
	}
}

// wantedChannels is the set of channels that have subscribers.
func (p *Pubsub) wantedChannels() map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	want := make(map[string]bool, len(p.subs))
	for ch := range p.subs {
		want[ch] = true
	}
	return want
}
