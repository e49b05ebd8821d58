package relayguard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"
	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/util/lru"
)

// Guard enforces admission and limits for one DERP server. New installs it
// into the server; mount Handler around the relay's HTTP handler; Close
// stops it.
type Guard struct {
	opts  Options
	log   *zap.Logger
	m     *metrics
	clock quartz.Clock

	// The private verify endpoint the DERP library calls.
	ln         net.Listener
	srv        *http.Server
	verifyHost string // host:port of ln
	serveDone  chan struct{}
	closeOnce  sync.Once

	// Admission verdicts.
	cache     *verdictCache
	mu        sync.Mutex
	unhealthy bool // guarded by mu: the last webhook call failed
	flight    singleflight.Group

	// Admitted clients, verified again on a schedule; the ticker that does
	// it runs until stopTicker.
	sched      *schedule
	stopTicker context.CancelFunc
	ticker     quartz.Waiter // nil without re-verification

	// Connections accepted through Listener that are not relay connections
	// yet.
	pend *pendingSet

	// Relay connections whose admission call is in flight, by the loopback
	// client address it uses.
	pendMu  sync.Mutex
	pending map[string]*conn // guarded by pendMu

	// Limits.
	conns      atomic.Int64 // client connections counted against the cap
	limiter    *rate.Limiter
	ipMu       sync.Mutex
	ipLimiters lru.Cache[string, *rate.Limiter] // guarded by ipMu
	logMu      sync.Mutex
	lastLogged map[string]time.Time // guarded by logMu: reason → last log line
	suppressed map[string]int       // guarded by logMu: refusals since that line
}

// New makes a Guard for s and installs it: s will ask the Guard about every
// client that does not present the mesh key. It listens on a random
// loopback port for those questions; it answers only calls the DERP
// library makes about a connection that came in through Handler. With a
// webhook and a VerifyInterval, it starts verifying admitted clients again
// on that schedule. Call Close when s is closed.
func New(s *derpserver.Server, opts Options) (*Guard, error) {
	opts = opts.withDefaults()
	g := &Guard{
		opts:       opts,
		log:        opts.Logger,
		clock:      opts.Clock,
		cache:      newVerdictCache(opts.CacheSize),
		serveDone:  make(chan struct{}),
		pending:    map[string]*conn{},
		lastLogged: map[string]time.Time{},
		suppressed: map[string]int{},
	}
	interval := opts.VerifyInterval
	if opts.VerifyURL == "" || interval < 0 {
		interval = 0
	}
	if interval > 0 && g.opts.AllowTTL > interval {
		// No admission is trusted longer than a connected client goes
		// without being verified again.
		g.opts.AllowTTL = interval
	}
	g.sched = newSchedule(interval)
	g.pend = newPendingSet(g, opts.MaxPendingConnections, opts.PendingGrace)
	g.ipLimiters.MaxEntries = opts.CacheSize
	if opts.AcceptRate > 0 {
		g.limiter = rate.NewLimiter(opts.AcceptRate, burst(opts.AcceptRate))
	}
	g.m = newMetrics(g)
	if opts.MaxConnections > 0 {
		g.m.maxConnections.Set(float64(opts.MaxConnections))
	} else {
		g.m.maxConnections.Set(-1)
	}
	if opts.MaxPendingConnections > 0 {
		g.m.maxPending.Set(float64(opts.MaxPendingConnections))
	} else {
		g.m.maxPending.Set(-1)
	}
	if opts.Registerer != nil {
		if err := g.m.register(opts.Registerer); err != nil {
			return nil, fmt.Errorf("register relay guard metrics: %w", err)
		}
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		var err6 error
		if ln, err6 = net.Listen("tcp", "[::1]:0"); err6 != nil {
			return nil, fmt.Errorf("relay guard: listen on loopback: %w", errors.Join(err, err6))
		}
	}
	const path = "/verify"
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+path, g.serveVerify)
	g.ln = ln
	g.verifyHost = ln.Addr().String()
	g.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		ErrorLog:          zap.NewStdLog(g.log.Named("verify")),
	}
	go func() {
		defer close(g.serveDone)
		_ = g.srv.Serve(ln)
	}()
	s.SetVerifyClientURL("http://" + g.verifyHost + path)
	// Fail-open is decided here, with the cache in mind; the library's own
	// switch would only cover our loopback endpoint being down.
	s.SetVerifyClientURLFailOpen(false)
	ctx, cancel := context.WithCancel(context.Background())
	g.stopTicker = cancel
	if interval > 0 {
		g.ticker = g.clock.TickerFunc(ctx, tickPeriod(interval), func() error { return g.reverifyDue(ctx) }, "relayguard", "reverify")
	}
	return g, nil
}

func burst(r rate.Limit) int {
	b := int(2 * r)
	if b < 1 {
		b = 1
	}
	return b
}

// Close stops re-verification and the verify endpoint and waits for them.
// The DERP server then refuses new clients (its verify URL no longer
// answers), which is right for a server that is shutting down. It is safe
// to call more than once.
func (g *Guard) Close() error {
	g.closeOnce.Do(func() {
		g.stopTicker()
		if g.ticker != nil {
			_ = g.ticker.Wait()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := g.srv.Shutdown(ctx); err != nil {
			_ = g.srv.Close()
		}
		<-g.serveDone
	})
	return nil
}

// Connections is the number of client connections counted against the cap
// right now (mesh connections excluded).
func (g *Guard) Connections() int { return int(g.conns.Load()) }

// serveVerify answers the DERP library's admission question for one client.
// A question that did not come through Handler's hook (another local
// process, or a library version that drops the request context) is
// refused: the guard fails closed, never open.
func (g *Guard) serveVerify(w http.ResponseWriter, r *http.Request) {
	var req tailcfg.DERPAdmitClientRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 4<<10)).Decode(&req); err != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	var allow bool
	c := g.claim(r.RemoteAddr)
	if c != nil && c.tracked != nil {
		c.tracked.markVerified() // a client (not a mesh peer), past its handshake
	}
	switch {
	case c == nil:
		// Not the DERP library asking about one of our connections.
		allow = false
	case c.refused != "":
		allow = false // counted under its reason already
	default:
		k := admitKey{node: req.NodePublic, src: req.Source}
		var cachedUntil time.Time
		allow, cachedUntil = g.decide(req)
		allow = allow && g.schedule(c, k, cachedUntil)
		if !allow {
			g.m.refused.WithLabelValues(ReasonAdmission).Inc()
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
}

// schedule puts an admitted client's connection on the re-verification
// schedule, due by dueBy at the latest when that is set (the admission
// came from a cached verdict, fresh until then). It returns false when the
// client must be refused after all: a re-verification refused k meanwhile
// (its other connections were just cut), or the connection is already
// gone.
func (g *Guard) schedule(c *conn, k admitKey, dueBy time.Time) bool {
	if g.opts.VerifyURL == "" {
		return true
	}
	if !g.sched.add(c, k, g.clock.Now(), dueBy) {
		return false
	}
	if g.cache.denied(k, g.clock.Now()) {
		g.sched.remove(c)
		return false
	}
	return true
}

var errWebhookStatus = errors.New("unexpected status")
