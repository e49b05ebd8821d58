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
	"time"

	"go.uber.org/zap"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
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

	mu            sync.Mutex
	id            string           // the peer replica's id, "" until told (SetPeers)
	client        *derphttp.Client // the confirmed connection, nil when none
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
		since:  time.Now(),
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
	return u.String(), nil
}

func (p *peer) status() PeerStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PeerStatus{URL: p.url, State: p.state, Error: p.err, Since: p.since, ServerKey: p.serverKey}
}

func (p *peer) setState(state, errMsg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != state {
		p.since = time.Now()
	}
	p.state, p.err = state, errMsg
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

func (p *peer) setClient(c *derphttp.Client) {
	var k key.NodePublic
	if c != nil {
		k = c.ServerPublicKey()
	}
	p.mu.Lock()
	p.client, p.serverKey = c, k
	p.mu.Unlock()
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

		start := time.Now()
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
		p.m.notify.post(p.url)
		if res.confirmed {
			lastErr = "" // a break after a connection is news: log it at WARN
		}
		if res.confirmed && time.Since(start) >= p.m.opts.MaxRetryInterval {
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
	t := time.NewTimer(d)
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
	c, err := derphttp.NewClient(srv.PrivateKey(), p.derpURL, p.libLogf, netmon.NewStatic())
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
		var d net.Dialer
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
	connectedAt := time.Now()
	// unconfirmedBreak explains a connection that ended before its first
	// pong. A refusal is immediate; a later break is something else.
	unconfirmedBreak := func(err error) error {
		if time.Since(connectedAt) <= p.m.opts.ConfirmTimeout {
			return fmt.Errorf("peer %s refused mesh privileges (mesh key mismatch?): it closed the connection right after the watch request: %v", p.url, err)
		}
		return fmt.Errorf("connection lost before the peer confirmed mesh privileges: %v", err)
	}
	recvErr := make(chan error, 1)
	go func() { recvErr <- p.watch(c, fw) }()
	pingCtx, cancelPing := context.WithCancel(ctx)
	confirmed := make(chan struct{})
	pingErr := make(chan error, 1)
	go func() { pingErr <- p.pingLoop(pingCtx, c, confirmed) }()

	recvDone, pingDone := false, false
	defer func() {
		p.setClient(nil)
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
			p.setClient(c)
			p.setState(StateConnected, "")
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
			if ctx.Err() != nil {
				return sessionResult{confirmed: res.confirmed}
			}
			res.confirmed = res.confirmed || isConfirmed()
			switch {
			case errors.Is(err, errStoppedAnswering):
				res.err = err
			case !res.confirmed:
				res.err = unconfirmedBreak(err) // the ping could not be sent
			default:
				res.err = fmt.Errorf("connection lost: %v", err)
			}
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
// every forwarder it added. It never forwards our own server key (the
// peer reports our mesh connection like any other client).
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
		switch msg := msg.(type) {
		case derp.PeerPresentMessage:
			if msg.Key == self || present[msg.Key] {
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

// pingLoop pings c until ctx ends or the connection is found dead, and
// closes confirmed on the first pong.
//
// Before that first pong, silence is not a failure: a peer that refuses
// mesh privileges closes the connection (watch sees it), so a missing pong
// only means a slow or hung peer, and redialing would only add a handshake
// to its load. It keeps pinging and reports the wait in the status.
// After it, every PingInterval, missedPingsBeforeDead unanswered pings in a
// row end the connection with errStoppedAnswering. A ping that cannot be
// sent (the connection broke) ends it at once.
func (p *peer) pingLoop(ctx context.Context, c *derphttp.Client, confirmed chan<- struct{}) error {
	timeout := p.m.opts.ConfirmTimeout
	ping := func() error {
		pctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return c.Ping(pctx)
	}
	isConfirmed := false
	waitingSince := time.Now()
	misses := 0
	for {
		err := ping()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case err == nil:
			misses = 0
			if !isConfirmed {
				isConfirmed = true
				close(confirmed)
			}
		case !errors.Is(err, context.DeadlineExceeded):
			return err
		case !isConfirmed:
			p.setState(StateConnecting, fmt.Sprintf("peer %s has not answered a ping for %s after the mesh handshake (overloaded or hung?)",
				p.url, time.Since(waitingSince).Round(time.Second)))
			continue
		default:
			misses++
			if misses >= missedPingsBeforeDead {
				return fmt.Errorf("%w (%d in a row unanswered within %s)", errStoppedAnswering, misses, timeout)
			}
			continue
		}
		t := time.NewTimer(p.m.opts.PingInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}
