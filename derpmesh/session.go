// One mesh connection to a peer, from dial to break: the watch of the
// peer's clients, the forwarders installed for them, and the first pong
// that confirms mesh privileges.

package derpmesh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
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

// libLogf sends the DERP library's own log lines to debug. They never
// contain the mesh key (the library only ever sends it on the wire).
func (p *peer) libLogf(format string, args ...any) {
	if ce := p.log.Check(zap.DebugLevel, "derphttp"); ce != nil {
		ce.Write(zap.String("detail", fmt.Sprintf(format, args...)))
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
