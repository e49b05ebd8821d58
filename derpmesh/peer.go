package derpmesh

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// errSelf is the parked state of a relay URL that leads to this replica.
var errSelf = errors.New("relay URL points at this replica")

// deadContext is every mesh client's BaseContext. derphttp.Client redials
// on its own whenever Send, ForwardPacket or Recv finds its connection
// broken, synchronously, with that context; the local server calls
// ForwardPacket from a client's read loop. With a dead context such a
// redial fails at once, so one Client is exactly one TCP connection and
// every dial goes through peer.run, with its backoff and accounting.
var deadContext = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// peer owns the mesh connection to one relay URL. Its run goroutine is the
// only one that dials, and it is stopped by cancel and awaited on done.
type peer struct {
	m       *Mesh
	url     string // normalized relay URL, the Mesh's key
	derpURL string // url + "/derp"; "" when url is invalid
	bad     error  // why url is invalid
	log     *zap.Logger

	ctx    context.Context // canceled when removed from the set or on Close
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{} // cap 1; Reconnect wakes a pause or a park

	// heard is when anything last arrived from the peer on the current
	// connection (unix nanoseconds): a frame, or a pong to PingPeer. The
	// keepalive pings only a connection silent for its interval.
	heard atomic.Int64

	mu            sync.Mutex
	id            string           // the peer replica's id, "" until told (SetPeers)
	client        *derphttp.Client // the confirmed connection, nil when none
	sessionCtx    context.Context  // the confirmed connection's session
	dead          chan error       // cap 1; the keepalive found client dead
	pinging       bool             // a keepalive ping of client is under way
	serverKey     key.NodePublic   // the peer relay's key while client is set
	state         string
	err           string
	since         time.Time
	redialNow     bool               // Reconnect was called; skip the pause
	cancelSession context.CancelFunc // cancels the dial or connection in progress
}

func (m *Mesh) newPeer(u, id string) *peer {
	ctx, cancel := context.WithCancel(m.ctx)
	p := &peer{
		m:      m,
		url:    u,
		log:    m.log.With(zap.String("relay_url", u)),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		id:     id,
		state:  StateConnecting,
		since:  m.clock.Now(),
	}
	p.derpURL, p.bad = derpURL(u)
	return p
}

// derpURL turns a relay URL into the DERP endpoint to dial.
func derpURL(relay string) (string, error) {
	u, err := url.Parse(relay)
	if err != nil {
		return "", fmt.Errorf("invalid relay URL: %v", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("invalid relay URL %q: the scheme must be http or https", relay)
	}
	if u.Host == "" {
		return "", fmt.Errorf("invalid relay URL %q: no host", relay)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("invalid relay URL %q: only scheme, host, port and path are allowed", relay)
	}
	if !strings.HasSuffix(u.Path, "/derp") {
		u = u.JoinPath("derp")
	}
	u.RawQuery = meshQuery // see Handler
	return u.String(), nil
}

func (p *peer) status() PeerStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PeerStatus{URL: p.url, State: p.state, Error: p.err, Since: p.since, ServerKey: p.serverKey}
}

func (p *peer) setState(state, errMsg string) {
	p.mu.Lock()
	changed := p.state != state || p.err != errMsg
	if p.state != state {
		p.since = p.m.clock.Now()
	}
	p.state, p.err = state, errMsg
	p.mu.Unlock()
	if changed {
		p.m.noteChange()
	}
}

// label is the peer's coderd_derpmesh_forward_dropped_total label: its
// replica id, or its relay URL until the id is known.
func (p *peer) label() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.id != "" {
		return p.id
	}
	return p.url
}

// setID records the peer's replica id and reports whether it changed from
// a known one (a new process behind the same URL).
func (p *peer) setID(id string) (changed bool, old string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if id == "" || id == p.id {
		return false, p.id
	}
	old, p.id = p.id, id
	return old != "", old
}

// confirmedClient is the connection PingPeer uses, nil when there is none.
func (p *peer) confirmedClient() *derphttp.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.client
}

// setClient records the session's confirmed connection (nil: none), for
// PingPeer, the keepalive (which reports a dead one on dead) and
// two-sided readiness (the peer relay's server key).
func (p *peer) setClient(ctx context.Context, c *derphttp.Client, dead chan error) {
	var k key.NodePublic
	if c != nil {
		k = c.ServerPublicKey()
	}
	p.mu.Lock()
	p.client, p.sessionCtx, p.dead, p.pinging, p.serverKey = c, ctx, dead, false, k
	p.mu.Unlock()
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

func (p *peer) reconnect() {
	p.mu.Lock()
	p.redialNow = true
	cancel := p.cancelSession
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// libLogf sends the DERP library's own log lines to debug. They never
// contain the mesh key (the library only ever sends it on the wire).
func (p *peer) libLogf(format string, args ...any) {
	if ce := p.log.Check(zap.DebugLevel, "derphttp"); ce != nil {
		ce.Write(zap.String("detail", fmt.Sprintf(format, args...)))
	}
}

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

// sessionResult is how one connection ended.
type sessionResult struct {
	err       error // why it ended; nil when canceled
	confirmed bool  // the peer confirmed mesh privileges during it
}

// session runs one mesh connection, from dial to break or cancellation,
// with a fresh derphttp.Client. Every forwarder it installs is removed
// before it returns.
func (p *peer) session(ctx context.Context) (res sessionResult) {
	srv := p.m.opts.Server
	// The client's own timers (its dial timeouts, its 5 s cap on one
	// ping) are the library's and stay on real time; every decision of
	// the mesh around it is on Options.Clock.
	c, err := derphttp.NewClient(srv.PrivateKey(), p.derpURL, p.libLogf, p.m.netMon)
	if err != nil {
		return sessionResult{err: fmt.Errorf("invalid relay URL: %v", err)}
	}
	c.MeshKey = p.m.meshKey
	c.WatchConnectionChanges = true
	c.TLSConfig = p.m.opts.TLSConfig
	c.BaseContext = func() context.Context { return deadContext }
	var (
		bcMu sync.Mutex
		bc   *batchConn
	)
	c.SetURLDialer(func(ctx context.Context, network, addr string) (net.Conn, error) {
		d := p.m.dialer()
		conn, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		bcMu.Lock()
		bc = newBatchConn(conn, p.m.opts.WriteTimeout)
		bcMu.Unlock()
		return bc, nil
	})
	defer c.Close()

	if err := c.Connect(ctx); err != nil {
		if ctx.Err() != nil {
			return sessionResult{}
		}
		return sessionResult{err: fmt.Errorf("cannot connect: %v", err)}
	}
	if c.ServerPublicKey() == srv.PublicKey() {
		return sessionResult{err: errSelf}
	}

	// Packets for the peer's clients go through our own forwarder (see
	// forwarder), writing on the connection dialed above.
	bcMu.Lock()
	fw := newForwarder(c, bc, p.m.opts.ForwardQueueSize, p.m.droppedCounter(p.label()), p.url)
	bcMu.Unlock()
	defer fw.close()

	// Connect sent the watch request. A peer that refuses our mesh key
	// closes the connection as soon as it reads that frame, and it reads
	// frames in order: a pong to the ping sent after it proves the
	// privileges were granted.
	connectedAt := p.m.clock.Now()
	// unconfirmedBreak explains a connection that ended before its first
	// pong. A refusal is immediate; a later break is something else.
	unconfirmedBreak := func(err error) error {
		if p.m.clock.Since(connectedAt) <= p.m.opts.ConfirmTimeout {
			return fmt.Errorf("peer %s refused mesh privileges (mesh key mismatch?): it closed the connection right after the watch request: %v", p.url, err)
		}
		return fmt.Errorf("connection lost before the peer confirmed mesh privileges: %v", err)
	}
	p.noteHeard()
	recvErr := make(chan error, 1)
	go func() { recvErr <- p.watch(c, fw) }()
	pingCtx, cancelPing := context.WithCancel(ctx)
	confirmed := make(chan struct{})
	pingErr := make(chan error, 1)
	go func() { pingErr <- p.confirm(pingCtx, c, confirmed) }()
	dead := make(chan error, 1) // the Mesh's keepalive found it dead

	recvDone, pingDone := false, false
	defer func() {
		p.setClient(nil, nil, nil)
		cancelPing()
		_ = c.Close()
		if !recvDone {
			<-recvErr
		}
		if !pingDone {
			<-pingErr
		}
	}()
	isConfirmed := func() bool {
		select {
		case <-confirmed:
			return true
		default:
			return false
		}
	}
	confirmedCh := confirmed
	for {
		select {
		case <-confirmedCh:
			confirmedCh = nil
			res.confirmed = true
			p.setClient(pingCtx, c, dead)
			p.setState(StateConnected, "")
			p.m.notify.post(p.url, eventConnected)
			p.log.Info("meshed with peer", zap.String("peer_key", c.ServerPublicKey().ShortString()))
		case err := <-recvErr:
			recvDone = true
			if ctx.Err() != nil {
				return sessionResult{confirmed: res.confirmed}
			}
			res.confirmed = res.confirmed || isConfirmed()
			if !res.confirmed {
				res.err = unconfirmedBreak(err)
			} else {
				res.err = fmt.Errorf("connection lost: %v", err)
			}
			return res
		case err := <-pingErr:
			pingDone = true
			if err == nil { // confirmed: the Mesh's keepalive takes over
				continue
			}
			if ctx.Err() != nil {
				return sessionResult{confirmed: res.confirmed}
			}
			res.confirmed = res.confirmed || isConfirmed()
			if !res.confirmed {
				res.err = unconfirmedBreak(err) // the ping could not be sent
			} else {
				res.err = fmt.Errorf("connection lost: %v", err)
			}
			return res
		case err := <-dead:
			if ctx.Err() != nil {
				return sessionResult{confirmed: res.confirmed}
			}
			res.confirmed, res.err = true, err
			return res
		case <-fw.failed:
			if ctx.Err() != nil {
				return sessionResult{confirmed: res.confirmed}
			}
			res.confirmed = res.confirmed || isConfirmed()
			res.err = fmt.Errorf("connection lost: forwarding to the peer failed: %v", fw.failure())
			return res
		case <-ctx.Done():
			return sessionResult{confirmed: res.confirmed || isConfirmed()}
		}
	}
}

// watch receives from c until the connection breaks, keeping one
// forwarder on the local server per client the peer reports. The peer
// reports a client again for each of its duplicate connections but says it
// is gone only once, so watch adds each key once; on return it removes
// every forwarder it added. It never forwards to a mesh connection (the
// peer reports every other replica's mesh client, ours included, like any
// other client, flagged as a mesh peer): nothing sends packets to a
// replica's server key, and forwarders for them cost every replica N-2
// forwarders per peer, N² server-lock round trips at a mass start.
func (p *peer) watch(c *derphttp.Client, fw *forwarder) error {
	srv := p.m.opts.Server
	self := srv.PublicKey()
	present := map[key.NodePublic]bool{}
	defer func() {
		for k := range present {
			srv.RemovePacketForwarder(k, fw)
		}
	}()
	for {
		msg, err := c.Recv()
		if err != nil {
			return err
		}
		p.noteHeard()
		switch msg := msg.(type) {
		case derp.PeerPresentMessage:
			if msg.Key == self || present[msg.Key] || msg.Flags&derp.PeerPresentIsMeshPeer != 0 {
				continue
			}
			present[msg.Key] = true
			srv.AddPacketForwarder(msg.Key, fw)
		case derp.PeerGoneMessage:
			// Disconnected, or "not here" in reply to a packet we forwarded
			// for a client that already left the peer: either way, stop
			// forwarding there.
			if present[msg.Peer] {
				delete(present, msg.Peer)
				srv.RemovePacketForwarder(msg.Peer, fw)
			}
		case derp.HealthMessage:
			if msg.Problem != "" {
				p.log.Warn("peer relay reports a problem", zap.String("problem", msg.Problem))
			}
		case derp.ServerRestartingMessage:
			p.log.Info("peer relay is restarting", zap.Duration("reconnect_in", msg.ReconnectIn))
		}
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

// confirm pings c until the first pong, closes confirmed, and returns nil;
// from then on the Mesh's keepalive (keepaliveLoop) watches the
// connection. It returns an error only if a ping cannot be sent (the
// connection broke) or ctx ends first.
//
// Silence before that first pong is not a failure: a peer that refuses
// mesh privileges closes the connection (watch sees it), so a missing pong
// only means a slow or hung peer, and redialing would only add a handshake
// to its load. It keeps pinging every ConfirmTimeout and reports the wait
// in the status.
func (p *peer) confirm(ctx context.Context, c *derphttp.Client, confirmed chan<- struct{}) error {
	timeout := p.m.opts.ConfirmTimeout
	waitingSince := p.m.clock.Now()
	for {
		err := p.m.pingWithin(ctx, c, timeout, "confirm")
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil:
			p.noteHeard()
			close(confirmed)
			return nil
		case !errors.Is(err, context.DeadlineExceeded):
			return err
		}
		p.setState(StateConnecting, fmt.Sprintf("peer %s has not answered a ping for %s after the mesh handshake (overloaded or hung?)",
			p.url, p.m.clock.Since(waitingSince).Round(time.Second)))
	}
}
