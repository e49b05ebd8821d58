// Package faultproxy is an in-process TCP proxy that injects the network
// faults tests need where tc netem is unavailable: added latency in each
// direction, a stall (bytes held, connections kept), and a cut (every
// connection closed, new ones dropped until healed), a black hole for the
// connections open now (Freeze), and a switch of the target for new
// connections (SetTarget: a load balancer moving clients, or a managed
// database endpoint flipping to a promoted standby).
//
// Put one between a client and anything that speaks TCP (a relay, an HTTP
// server, Postgres) and point the client at Addr() instead of the target:
//
//	p, err := faultproxy.New(target, faultproxy.Options{Delay: 15 * time.Millisecond})
//	defer p.Close()
//	p.SetDelay(0) // heal the latency; p.Cut() / p.Heal() for a partition
//
// It is for tests only: every method is safe for concurrent use, and the
// faults apply to connections already open as well as new ones.
package faultproxy

import (
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Options tunes a Proxy. The zero value forwards without faults.
type Options struct {
	// Delay is added to each direction from the start, as if SetDelay had
	// been called before the first connection. Default 0.
	Delay time.Duration
	// DialTimeout bounds dialing the target for each accepted connection.
	// Default 5s.
	DialTimeout time.Duration
}

// Proxy forwards connections from Addr() to a target address.
type Proxy struct {
	target      atomic.Pointer[string]
	dialTimeout time.Duration
	listener    net.Listener

	delay atomic.Int64 // nanoseconds added to each direction
	cut   atomic.Bool
	stall atomic.Bool

	mu     sync.Mutex
	conns  map[net.Conn]*atomic.Bool // connection → frozen
	closed bool
	wg     sync.WaitGroup
}

// New listens on a free loopback port and forwards each connection to
// target (host:port). At most one Options is used.
func New(target string, opts ...Options) (*Proxy, error) {
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 5 * time.Second
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{dialTimeout: o.DialTimeout, listener: l, conns: map[net.Conn]*atomic.Bool{}}
	p.target.Store(&target)
	p.delay.Store(int64(o.Delay))
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listen address (host:port).
func (p *Proxy) Addr() string { return p.listener.Addr().String() }

// URL is http:// + Addr().
func (p *Proxy) URL() string { return "http://" + p.Addr() }

// SetDelay adds d of latency to each direction of every connection, for
// bytes sent from now on.
func (p *Proxy) SetDelay(d time.Duration) { p.delay.Store(int64(d)) }

// Stall holds every byte (connections stay open, nothing moves) until
// Unstall: like a peer that hangs.
func (p *Proxy) Stall() { p.stall.Store(true) }

// Unstall lets bytes move again.
func (p *Proxy) Unstall() { p.stall.Store(false) }

// Cut closes every connection and drops new ones until Heal: like a
// network partition that resets connections. A new connection is accepted
// and closed at once, so a client sees a reset or EOF rather than
// "connection refused" (close the target itself for that).
func (p *Proxy) Cut() {
	p.cut.Store(true)
	p.mu.Lock()
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
}

// Freeze black-holes every connection open now, for good: each stays open
// but no byte moves in either direction again (a middlebox that lost the
// connections' state, a hung server). Connections accepted later are
// unaffected. Close them with Cut or Close.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, frozen := range p.conns {
		frozen.Store(true)
	}
}

// SetTarget sends connections accepted from now on to target (host:port);
// connections already open stay with the old target until they close.
func (p *Proxy) SetTarget(target string) { p.target.Store(&target) }

// Target is the host:port new connections are forwarded to.
func (p *Proxy) Target() string { return *p.target.Load() }

// Heal ends a Cut.
func (p *Proxy) Heal() { p.cut.Store(false) }

// Close stops the proxy and closes every connection.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.cut.Store(true) // ends a Stall too: stalled pipes wait while !cut
	for c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	err := p.listener.Close()
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c net.Conn, frozen *atomic.Bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.cut.Load() { // a connection accepted just before a Cut
		return false
	}
	p.conns[c] = frozen
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.listener.Accept()
		if err != nil {
			return
		}
		if p.cut.Load() {
			_ = c.Close()
			continue
		}
		p.wg.Add(1)
		go p.handle(c)
	}
}

func (p *Proxy) handle(client net.Conn) {
	defer p.wg.Done()
	server, err := net.DialTimeout("tcp", p.Target(), p.dialTimeout)
	if err != nil {
		_ = client.Close()
		return
	}
	frozen := new(atomic.Bool) // shared by both halves of the pair
	if !p.track(client, frozen) || !p.track(server, frozen) {
		_ = client.Close()
		_ = server.Close()
		return
	}
	defer p.untrack(client)
	defer p.untrack(server)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(server, client, frozen) }()
	go func() { defer wg.Done(); p.pipe(client, server, frozen) }()
	wg.Wait()
}

type chunk struct {
	due  time.Time
	data []byte
}

// pipe copies src to dst, delivering each chunk Delay after it was read.
// Once frozen, it reads and discards (the sender sees a peer that accepts
// bytes and never answers).
func (p *Proxy) pipe(dst, src net.Conn, frozen *atomic.Bool) {
	queue := make(chan chunk, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range queue {
			if frozen.Load() {
				continue
			}
			for p.stall.Load() && !p.cut.Load() {
				time.Sleep(5 * time.Millisecond)
			}
			if d := time.Until(c.due); d > 0 {
				time.Sleep(d)
			}
			if frozen.Load() {
				continue
			}
			if _, err := dst.Write(c.data); err != nil {
				_ = src.Close()
				for range queue {
				}
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			queue <- chunk{due: time.Now().Add(time.Duration(p.delay.Load())), data: append([]byte(nil), buf[:n]...)}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				_ = dst.Close()
			}
			break
		}
	}
	close(queue)
	<-done
	if tcp, ok := dst.(*net.TCPConn); ok {
		_ = tcp.CloseWrite()
	} else {
		_ = dst.Close()
	}
}

// InFrontOf starts a proxy in front of the host of rawURL (a Postgres or
// HTTP URL) and returns it with rawURL rewritten to go through it. The proxy
// is closed when the test ends.
func InFrontOf(t testing.TB, rawURL string) (*Proxy, string) {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatalf("faultproxy: parse %q: %v", rawURL, err)
	}
	p, err := New(u.Host)
	if err != nil {
		t.Fatalf("faultproxy: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	u.Host = p.Addr()
	return p, u.String()
}
