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
// At MaxPendingConnections, a new connection makes room as follows:
//
//   - from an address that holds fewer pending connections than the
//     address holding the most (by two or more), or from an address a mesh
//     peer has completed a mesh handshake from: the oldest pending
//     connection of the address holding the most is closed, however young.
//     So a flood from one address (or a few), however fast, never locks
//     out anyone else: a kubelet's probes, a load balancer's health checks,
//     clients from other addresses, a peer replica meshing;
//   - otherwise the oldest pending connection is closed if it has been
//     pending longer than PendingGrace, else the new connection is closed
//     at once (with a reset) and Accept takes the next, so a refused
//     connection costs nothing beyond the kernel's socket, and the flood's
//     own sources get in at most MaxPendingConnections per PendingGrace.
//
// Connections from a mesh peer's address count like any other (an
// attacker sharing a replica's address, behind a proxy or on the same
// host, is bounded too); the peer's own mesh connection finishes its
// handshake within milliseconds and leaves the set. The timeouts that end
// stalled connections on their own stay as they are (the HTTP server's,
// and the DERP library's 10 s per handshake step); the bound only adds a
// ceiling.
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
// the same per source address, and the addresses mesh peers connect from.
type pendingSet struct {
	g     *Guard
	max   int // <= 0: no bound
	grace time.Duration

	mu        sync.Mutex
	list      list.List                       // guarded by mu: *trackedConn, oldest first
	byIP      map[netip.Addr]*list.List       // guarded by mu: the same, per address; no empty lists
	meshAddrs lru.Cache[netip.Addr, struct{}] // guarded by mu
}

func newPendingSet(g *Guard, max int, grace time.Duration) *pendingSet {
	p := &pendingSet{g: g, max: max, grace: grace, byIP: map[netip.Addr]*list.List{}}
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
	if p.max > 0 && p.list.Len() >= p.max {
		evict = p.victim(ip, now)
		if evict == nil {
			p.mu.Unlock()
			abort(nc)
			p.g.m.pendingClosed.WithLabelValues(pendingRefused).Inc()
			p.g.noteRefused(reasonPending)
			return nil
		}
		p.removeLocked(evict)
	}
	tc := &trackedConn{Conn: nc, p: p, ip: ip, at: now}
	tc.elem = p.list.PushBack(tc)
	q := p.byIP[ip]
	if q == nil {
		q = list.New()
		p.byIP[ip] = q
	}
	tc.ipElem = q.PushBack(tc)
	p.mu.Unlock()
	if evict != nil {
		abort(evict.Conn)
		p.g.m.pendingClosed.WithLabelValues(pendingEvicted).Inc()
		p.g.noteRefused(reasonPending)
	}
	return tc
}

// victim picks the pending connection to close so that one from ip can be
// accepted at the bound, or nil when ip's connection is to be refused (see
// Listener). p.mu is held.
func (p *pendingSet) victim(ip netip.Addr, now time.Time) *trackedConn {
	// The address holding the most pending connections. A scan, at the
	// bound only: there are at most max addresses, and a flood from few
	// addresses (the case this is for) makes it short.
	var heavy *list.List
	for _, q := range p.byIP {
		if heavy == nil || q.Len() > heavy.Len() {
			heavy = q
		}
	}
	mine := 0
	if q := p.byIP[ip]; q != nil {
		mine = q.Len()
	}
	_, mesh := p.meshAddrs.PeekOk(ip)
	if (mesh && ip.IsValid()) || mine+1 < heavy.Len() {
		return heavy.Front().Value.(*trackedConn)
	}
	if oldest := p.list.Front().Value.(*trackedConn); now.Sub(oldest.at) >= p.grace {
		return oldest
	}
	return nil
}

// removeLocked takes c out of the pending set. p.mu is held.
func (p *pendingSet) removeLocked(c *trackedConn) {
	if c.elem == nil {
		return
	}
	p.list.Remove(c.elem)
	c.elem = nil
	if q := p.byIP[c.ip]; q != nil {
		q.Remove(c.ipElem)
		if q.Len() == 0 {
			delete(p.byIP, c.ip)
		}
	}
	c.ipElem = nil
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
	p  *pendingSet
	ip netip.Addr
	at time.Time

	// Guarded by p.mu: nil once no longer pending.
	elem   *list.Element // in p.list
	ipElem *list.Element // in p.byIP[ip]

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
	p.removeLocked(c)
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
	} else if c.deadline.Load() && !c.verified.Load() {
		c.established(c.linked.Load())
	}
	return c.Conn.SetDeadline(t)
}

// Close stops counting c and closes it.
func (c *trackedConn) Close() error {
	c.established(false)
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
