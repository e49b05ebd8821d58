package relayguard

import (
	"bufio"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// Handler wraps the relay's HTTP handler (derpmesh.Handler). The HTTP
// server's read and write timeouts do not reach relay connections:
// net/http clears a connection's deadlines when the relay hijacks it. For
// every upgrade request Handler watches, through an httptrace hook on the
// request's context, for the DERP library's admission call: that call
// happens only for clients without the mesh key, so it is where such a
// connection is counted against the cap and the accept rate. The verify
// endpoint then answers for exactly that connection (it recognises the
// call by the loopback connection it arrives on). A refused connection is
// closed by the library right after its handshake; the client sees a
// closed connection and redials later.
//
// Handler also keeps the connection the relay hijacks, so that a client
// the webhook refuses at re-verification can be disconnected, and so that
// Listener knows the connection's handshake outcome.
func (g *Guard) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			next.ServeHTTP(w, r)
			return
		}
		c := &conn{g: g, ip: remoteIP(r.RemoteAddr)}
		defer c.release()
		ctx := httptrace.WithClientTrace(r.Context(), &httptrace.ClientTrace{GotConn: c.onVerify})
		next.ServeHTTP(&hijackWriter{ResponseWriter: w, c: c}, r.WithContext(ctx))
	})
}

// hijackWriter passes the server's ResponseWriter through and records the
// connection when the relay (plain upgrade or WebSocket) hijacks it.
type hijackWriter struct {
	http.ResponseWriter
	c *conn
}

// Hijack hijacks the underlying connection and keeps it on the conn.
func (w *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	nc, brw, err := h.Hijack()
	if err != nil {
		return nil, nil, err
	}
	raw := nc
	if tc, ok := nc.(*tls.Conn); ok {
		raw = tc.NetConn() // closing below TLS never waits on a close_notify
	}
	w.c.raw = raw
	if t, ok := raw.(*trackedConn); ok {
		w.c.tracked = t
		t.linked.Store(true)
	}
	return nc, brw, nil
}

// Flush passes through.
func (w *hijackWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the server's ResponseWriter.
func (w *hijackWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// conn is one relay connection as the Guard sees it. Hijack, onVerify and
// release run on the connection's handler goroutine; raw, tracked and
// refused are read by the verify endpoint after g.pendMu hands c over, and
// raw by the re-verification schedule after g.sched hands c over.
type conn struct {
	g       *Guard
	ip      string
	decided bool
	refused string   // the refusal reason, "" when admitted by the limits
	counted bool     // holds a slot under the cap
	ports   []string // loopback client addresses registered in g.pending

	raw     net.Conn     // the hijacked connection (below TLS)
	tracked *trackedConn // raw, when it came through Listener

	// Guarded by g.sched.mu.
	key       admitKey // what the webhook admitted
	scheduled bool     // on the re-verification schedule
	gone      bool     // the handler returned
}

// disconnect closes the client's connection; the relay then unregisters it
// and its handler returns.
func (c *conn) disconnect() {
	if c.raw != nil {
		_ = c.raw.Close()
	}
}

// onVerify runs when the DERP library's admission call for this connection
// (the client did not present the mesh key) has a loopback connection to
// the verify endpoint. The limits are applied once per relay connection;
// the verdict is handed to the endpoint keyed by that loopback connection.
func (c *conn) onVerify(info httptrace.GotConnInfo) {
	if info.Conn == nil || info.Conn.RemoteAddr().String() != c.g.verifyHost {
		return
	}
	if !c.decided {
		c.decided = true
		if reason := c.g.acquire(c.ip); reason != "" {
			c.refused = reason
			c.g.m.refused.WithLabelValues(reason).Inc()
			c.g.noteRefused(reason)
		} else {
			c.counted = true
		}
	}
	port := info.Conn.LocalAddr().String()
	c.ports = append(c.ports, port)
	c.g.pendMu.Lock()
	c.g.pending[port] = c
	c.g.pendMu.Unlock()
}

// claim returns the relay connection whose admission call arrives on the
// loopback connection from addr, or nil.
func (g *Guard) claim(addr string) *conn {
	g.pendMu.Lock()
	defer g.pendMu.Unlock()
	c := g.pending[addr]
	delete(g.pending, addr)
	return c
}

func (c *conn) release() {
	c.g.sched.remove(c)
	if c.counted {
		c.g.conns.Add(-1)
		c.counted = false
	}
	if len(c.ports) > 0 {
		c.g.pendMu.Lock()
		for _, p := range c.ports {
			if c.g.pending[p] == c {
				delete(c.g.pending, p)
			}
		}
		c.g.pendMu.Unlock()
	}
}

// acquire takes a slot under the cap and a token from the rate limits; it
// returns the refusal reason, or "" when the connection may proceed.
func (g *Guard) acquire(ip string) string {
	if max := g.opts.MaxConnections; max > 0 {
		if g.conns.Add(1) > int64(max) {
			g.conns.Add(-1)
			return ReasonLimit
		}
	} else {
		g.conns.Add(1)
	}
	now := g.clock.Now()
	if g.limiter != nil && !g.limiter.AllowN(now, 1) {
		g.conns.Add(-1)
		return ReasonRate
	}
	if g.opts.AcceptRatePerIP > 0 && ip != "" {
		g.ipMu.Lock()
		l, ok := g.ipLimiters.GetOk(ip)
		if !ok {
			l = rate.NewLimiter(g.opts.AcceptRatePerIP, burst(g.opts.AcceptRatePerIP))
			g.ipLimiters.Set(ip, l)
		}
		g.ipMu.Unlock()
		if !l.AllowN(now, 1) {
			g.conns.Add(-1)
			return ReasonRate
		}
	}
	return ""
}

// reasonPending keys the log line of the pending bound (it is not a
// refusal reason of coderd_derp_clients_refused_total: the connection was
// never a client).
const reasonPending = "pending"

// noteRefused logs a refusal for the cap, the rate or the pending bound at
// most once a minute per reason, with how many were refused since the
// last line.
func (g *Guard) noteRefused(reason string) {
	now := g.clock.Now()
	g.logMu.Lock()
	g.suppressed[reason]++
	last, seen := g.lastLogged[reason]
	if seen && now.Sub(last) < time.Minute {
		g.logMu.Unlock()
		return
	}
	n := g.suppressed[reason]
	g.suppressed[reason] = 0
	g.lastLogged[reason] = now
	g.logMu.Unlock()
	switch reason {
	case ReasonLimit:
		g.log.Warn("derp connection cap reached: refusing new clients (existing and mesh connections are unaffected)",
			zap.Int("max_connections", g.opts.MaxConnections), zap.Int("refused", n))
	case ReasonRate:
		g.log.Warn("derp accept rate exceeded: refusing new clients",
			zap.Float64("accepts_per_second", float64(g.opts.AcceptRate)), zap.Int("refused", n))
	case reasonPending:
		g.log.Warn("too many unfinished connections: closing the oldest and refusing new ones (relay and mesh connections are unaffected)",
			zap.Int("max_pending_connections", g.opts.MaxPendingConnections), zap.Duration("grace", g.opts.PendingGrace), zap.Int("closed", n))
	}
}

func remoteIP(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return host
}

// redact drops user info and query from a URL for logs.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User = nil
	u.RawQuery = ""
	return strings.TrimSuffix(u.String(), "?")
}
