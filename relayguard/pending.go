package relayguard

import (
	"container/list"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/util/lru"
)

// meshAddrsSize bounds how many mesh peer addresses are remembered.
const meshAddrsSize = 256

// Listener wraps the HTTP (or, below TLS, the TCP) listener that serves the
// relay, so the Guard can bound pending connections: every accepted
// connection is pending until it is an established relay connection (a
// client the verify endpoint answered for, or a mesh peer whose DERP
// handshake the library completed) or closed. That covers TLS and HTTP
// requests in progress, idle keep-alive connections, and upgrades that
// never send their DERP handshake.
//
// At MaxPendingConnections, Accept closes the oldest pending connection to
// make room if it has been pending longer than PendingGrace; otherwise it
// closes the new connection at once (with a reset) and accepts the next,
// so a refused connection costs nothing beyond the kernel's socket.
// Connections from an address a mesh peer has completed a mesh handshake
// from are never counted, refused or closed by the bound, so replicas stay
// meshed through a flood. The timeouts that end stalled connections on
// their own stay as they are (the HTTP server's, and the DERP library's
// 10 s per handshake step); the bound only adds a ceiling.
//
// Wrap the listener below TLS (tls.NewListener(g.Listener(tcp), …)), so a
// stalled TLS handshake counts too.
func (g *Guard) Listener(l net.Listener) net.Listener {
	return &pendingListener{Listener: l, p: g.pend}
}

type pendingListener struct {
	net.Listener
	p *pendingSet
}

// Accept returns the next connection the bound lets in.
func (l *pendingListener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if tc := l.p.track(nc); tc != nil {
			return tc, nil
		}
	}
}

// pendingSet is the pending connections in the order they were accepted,
// and the addresses mesh peers connect from.
type pendingSet struct {
	g     *Guard
	max   int // <= 0: no bound
	grace time.Duration

	mu        sync.Mutex
	list      list.List                       // guarded by mu: *trackedConn, oldest first
	meshAddrs lru.Cache[netip.Addr, struct{}] // guarded by mu
}

func newPendingSet(g *Guard, max int, grace time.Duration) *pendingSet {
	p := &pendingSet{g: g, max: max, grace: grace}
	p.meshAddrs.MaxEntries = meshAddrsSize
	return p
}

func (p *pendingSet) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.list.Len()
}

// track returns nc wrapped and counted as pending, or nil after closing it
// when the bound leaves no room.
func (p *pendingSet) track(nc net.Conn) *trackedConn {
	ip := addrOf(nc.RemoteAddr())
	now := p.g.clock.Now()
	var evict *trackedConn
	p.mu.Lock()
	if _, ok := p.meshAddrs.PeekOk(ip); ok && ip.IsValid() {
		p.mu.Unlock()
		return &trackedConn{Conn: nc, p: p, ip: ip, exempt: true}
	}
	if p.max > 0 && p.list.Len() >= p.max {
		oldest := p.list.Front().Value.(*trackedConn)
		if now.Sub(oldest.at) < p.grace {
			p.mu.Unlock()
			abort(nc)
			p.g.m.pendingClosed.WithLabelValues(pendingRefused).Inc()
			p.g.noteRefused(reasonPending)
			return nil
		}
		p.list.Remove(oldest.elem)
		oldest.elem = nil
		evict = oldest
	}
	tc := &trackedConn{Conn: nc, p: p, ip: ip, at: now}
	tc.elem = p.list.PushBack(tc)
	p.mu.Unlock()
	if evict != nil {
		abort(evict.Conn)
		p.g.m.pendingClosed.WithLabelValues(pendingEvicted).Inc()
		p.g.noteRefused(reasonPending)
	}
	return tc
}

// abort closes nc with a reset: nothing is left in TIME_WAIT for a
// connection the server gave up on.
func abort(nc net.Conn) {
	if l, ok := nc.(interface{ SetLinger(int) error }); ok {
		_ = l.SetLinger(0)
	}
	_ = nc.Close()
}

func addrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(ta.IP)
		return ip.Unmap()
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// trackedConn is one connection accepted through Listener.
type trackedConn struct {
	net.Conn
	p      *pendingSet
	ip     netip.Addr
	at     time.Time
	exempt bool // from a mesh peer's address: never counted

	elem *list.Element // guarded by p.mu: nil once no longer pending

	// linked: the relay handler hijacked this connection, so the verify
	// endpoint will hear about it if it is a client. verified: it did.
	linked, verified atomic.Bool
	// deadline: the DERP library set a handshake deadline (net/http never
	// calls SetDeadline with a time; the library does before each
	// handshake step, and clears it once the handshake is done).
	deadline atomic.Bool
}

// established takes c out of the pending set: it is a relay connection
// now. A mesh peer's address is remembered.
func (c *trackedConn) established(mesh bool) {
	p := c.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.elem != nil {
		p.list.Remove(c.elem)
		c.elem = nil
	}
	if mesh && c.ip.IsValid() {
		p.meshAddrs.Set(c.ip, struct{}{})
	}
}

// markVerified records that the verify endpoint answered for c: it is a
// client (whatever the answer), not a mesh peer, and no longer pending.
func (c *trackedConn) markVerified() {
	c.verified.Store(true)
	c.established(false)
}

// SetDeadline passes through, and notices the DERP library clearing its
// handshake deadline: the handshake is done. A connection the verify
// endpoint never heard about is then a mesh peer (the library asks about
// every other one).
func (c *trackedConn) SetDeadline(t time.Time) error {
	if !t.IsZero() {
		c.deadline.Store(true)
	} else if c.deadline.Load() && !c.verified.Load() && !c.exempt {
		c.established(c.linked.Load())
	}
	return c.Conn.SetDeadline(t)
}

// Close stops counting c and closes it.
func (c *trackedConn) Close() error {
	if !c.exempt {
		c.established(false)
	}
	return c.Conn.Close()
}

// CloseWrite lets the HTTP server half-close as it would the TCP
// connection.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
