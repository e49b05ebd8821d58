package derpmesh

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

// Peer states reported by Status.
const (
	StateConnected  = "connected"  // watching the peer's clients, mesh privileges confirmed
	StateConnecting = "connecting" // dialing, retrying, or refused
)

// Options configures a Mesh.
type Options struct {
	// Server is the local DERP server whose packets the mesh forwards.
	// Required.
	Server *derpserver.Server
	// MeshKey is the deployment's mesh key (64 hex characters). Required.
	// It is a secret: it is never logged.
	MeshKey string
	// TLSConfig verifies https relay URLs (RootCAs: the system roots plus
	// any CA the operator trusts). Nil means the system roots. Verification
	// is never skipped.
	TLSConfig *tls.Config
	// Logger defaults to a no-op logger.
	Logger *zap.Logger
	// OnPeerBroken is called when a mesh connection to a peer breaks or
	// fails to connect, so the owner can re-probe that peer at once (a
	// crashed replica is then noticed in well under a heartbeat). It is
	// called from the peer's goroutine, never concurrently for one URL and
	// never with a lock held; it must not block for long.
	OnPeerBroken func(relayURL string)
	// RetryInterval is the pause before redialing a peer whose connection
	// failed (with ±20% jitter). Default 1s: the library's own loop waits a
	// fixed 5s. Reconnect and SetAddresses cut the pause short.
	RetryInterval time.Duration
	// ConfirmTimeout bounds the ping that confirms mesh privileges after a
	// connect. Default 5s.
	ConfirmTimeout time.Duration
	// Registerer, if set, receives coderd_derpmesh_peers{state}.
	Registerer prometheus.Registerer
}

// PeerStatus is one peer's mesh connection as seen from here.
type PeerStatus struct {
	URL   string    `json:"url"`
	State string    `json:"state"`
	Error string    `json:"error"`
	Since time.Time `json:"since"`
}

// Mesh is the set of mesh connections from this replica's DERP server to
// its peers. Create it with New; stop it with Close.
type Mesh struct {
	opts    Options
	log     *zap.Logger
	meshKey key.DERPMesh

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	peers  map[string]*peer
	closed bool
}

// New validates opts and returns an idle Mesh: it dials nothing until
// SetAddresses.
func New(opts Options) (*Mesh, error) {
	if opts.Server == nil {
		return nil, errors.New("derpmesh: Server is required")
	}
	meshKey, err := key.ParseDERPMesh(opts.MeshKey)
	if err != nil {
		return nil, fmt.Errorf("derpmesh: the mesh key is not 64 hex characters: %w", err)
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	if opts.ConfirmTimeout <= 0 {
		opts.ConfirmTimeout = 5 * time.Second
	}
	m := &Mesh{opts: opts, log: opts.Logger, meshKey: meshKey, peers: map[string]*peer{}}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	if opts.Registerer != nil {
		for _, state := range []string{StateConnected, StateConnecting} {
			state := state
			opts.Registerer.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name:        "coderd_derpmesh_peers",
				Help:        "Mesh connections to peer relays by state.",
				ConstLabels: prometheus.Labels{"state": state},
			}, func() float64 { return float64(m.count(state)) }))
		}
	}
	return m, nil
}

func (m *Mesh) count(state string) int {
	n := 0
	for _, s := range m.Status() {
		if s.State == state {
			n++
		}
	}
	return n
}

// SetAddresses replaces the set of peer relay URLs to mesh with (the
// caller filters by region and leaves itself out). Connections to URLs no
// longer in the set are closed and their forwarders removed; new URLs are
// dialed at once.
func (m *Mesh) SetAddresses(urls []string) {
	want := map[string]bool{}
	for _, u := range urls {
		want[strings.TrimSuffix(u, "/")] = true
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	var stopping []*peer
	for u, p := range m.peers {
		if !want[u] {
			stopping = append(stopping, p)
			delete(m.peers, u)
		}
	}
	for u := range want {
		if _, ok := m.peers[u]; !ok {
			p := m.newPeer(u)
			m.peers[u] = p
			m.wg.Add(1)
			go p.run()
		}
	}
	m.mu.Unlock()
	for _, p := range stopping {
		m.log.Info("leaving mesh with peer", zap.String("relay_url", p.url))
		p.stop()
	}
}

// Reconnect replaces the connection to url at once (used when a peer came
// back under the same URL): a sleeping retry is cut short and a live
// connection is dropped and redialed.
func (m *Mesh) Reconnect(url string) {
	m.mu.Lock()
	p := m.peers[strings.TrimSuffix(url, "/")]
	m.mu.Unlock()
	if p != nil {
		p.reconnect()
	}
}

// Status lists every peer's connection, sorted by URL.
func (m *Mesh) Status() []PeerStatus {
	m.mu.Lock()
	peers := make([]*peer, 0, len(m.peers))
	for _, p := range m.peers {
		peers = append(peers, p)
	}
	m.mu.Unlock()
	out := make([]PeerStatus, 0, len(peers))
	for _, p := range peers {
		out = append(out, p.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
	return out
}

// Ready reports whether every peer in the current set has a working mesh
// connection with mesh privileges (true with no peers).
func (m *Mesh) Ready() bool {
	for _, s := range m.Status() {
		if s.State != StateConnected {
			return false
		}
	}
	return true
}

// Close closes every mesh connection, removes their forwarders and waits
// for every goroutine. It is safe to call more than once.
func (m *Mesh) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	peers := m.peers
	m.peers = map[string]*peer{}
	m.mu.Unlock()
	m.cancel()
	for _, p := range peers {
		p.stop()
	}
	m.wg.Wait()
	return nil
}

// Handler serves the DERP relay (with websocket support) for mounting at
// /derp. The caller also mounts /derp/latency-check (derpserver.
// ServeNoContent-style 200) and /derp/probe (derpserver.ProbeHandler).
func Handler(s *derpserver.Server) http.Handler {
	return derpserver.AddWebSocketSupport(s, derpserver.Handler(s))
}

// peer owns the mesh connection to one relay URL.
type peer struct {
	m      *Mesh
	url    string
	log    *zap.Logger
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{} // Reconnect

	mu     sync.Mutex
	state  string
	err    string
	since  time.Time
	client *derphttp.Client
}

func (m *Mesh) newPeer(url string) *peer {
	ctx, cancel := context.WithCancel(m.ctx)
	return &peer{
		m: m, url: url, log: m.log.With(zap.String("relay_url", url)),
		ctx: ctx, cancel: cancel, done: make(chan struct{}), wake: make(chan struct{}, 1),
		state: StateConnecting, since: time.Now(),
	}
}

func (p *peer) status() PeerStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PeerStatus{URL: p.url, State: p.state, Error: p.err, Since: p.since}
}

func (p *peer) setState(state, errMsg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state != state {
		p.since = time.Now()
	}
	p.state, p.err = state, errMsg
}

func (p *peer) stop() {
	p.cancel()
	p.mu.Lock()
	c := p.client
	p.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
	<-p.done
}

func (p *peer) reconnect() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
	p.mu.Lock()
	c := p.client
	p.mu.Unlock()
	if c != nil {
		_ = c.Close() // the run loop sees the break and redials at once
	}
}

// run dials, watches and redials until stopped.
func (p *peer) run() {
	defer p.m.wg.Done()
	defer close(p.done)
	fast := false // redial without pausing (after Reconnect)
	for p.ctx.Err() == nil {
		errMsg, wasConnected, selfConnect := p.session()
		if p.ctx.Err() != nil {
			return
		}
		p.setState(StateConnecting, errMsg)
		if selfConnect {
			p.log.Error("relay URL points at this replica; not meshing with it")
			<-p.ctx.Done()
			return
		}
		if wasConnected {
			p.log.Warn("mesh connection to peer broke; redialing", zap.String("error", errMsg))
		} else {
			p.log.Debug("mesh connect failed", zap.String("error", errMsg))
		}
		if f := p.m.opts.OnPeerBroken; f != nil {
			f(p.url)
		}
		select {
		case <-p.wake:
			fast = true
		default:
		}
		if fast {
			fast = false
			continue
		}
		pause := time.Duration(float64(p.m.opts.RetryInterval) * (0.8 + 0.4*rand.Float64()))
		select {
		case <-p.ctx.Done():
			return
		case <-p.wake:
		case <-time.After(pause):
		}
	}
}

// session runs one connection from dial to break. It returns why it ended,
// whether mesh privileges had been confirmed, and whether the URL turned
// out to be this replica itself.
func (p *peer) session() (errMsg string, confirmed, selfConnect bool) {
	srv := p.m.opts.Server
	client, err := derphttp.NewClient(srv.PrivateKey(), p.url+"/derp", func(format string, args ...any) {
		p.log.Debug(fmt.Sprintf(format, args...))
	}, netmon.NewStatic())
	if err != nil {
		return fmt.Sprintf("bad relay URL: %v", err), false, false
	}
	client.MeshKey = p.m.meshKey
	client.WatchConnectionChanges = true
	client.TLSConfig = p.m.opts.TLSConfig
	p.mu.Lock()
	p.client = client
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.client = nil
		p.mu.Unlock()
		_ = client.Close()
	}()

	dialCtx, cancelDial := context.WithTimeout(p.ctx, 10*time.Second)
	err = client.Connect(dialCtx)
	cancelDial()
	if err != nil {
		return fmt.Sprintf("cannot connect: %v", err), false, false
	}
	if client.ServerPublicKey() == srv.PublicKey() {
		return "relay URL points at this replica", false, true
	}

	// Receive until the connection breaks, installing forwarders for the
	// peer's clients. Forwarders this session added are removed when it
	// ends, whatever the reason.
	present := map[key.NodePublic]bool{}
	recvDone := make(chan error, 1)
	go func() {
		for {
			msg, err := client.Recv()
			if err != nil {
				recvDone <- err
				return
			}
			switch msg := msg.(type) {
			case derp.PeerPresentMessage:
				if !present[msg.Key] {
					present[msg.Key] = true
					srv.AddPacketForwarder(msg.Key, client)
				}
			case derp.PeerGoneMessage:
				if present[msg.Peer] {
					delete(present, msg.Peer)
					srv.RemovePacketForwarder(msg.Peer, client)
				}
			}
		}
	}()
	defer func() {
		for k := range present {
			srv.RemovePacketForwarder(k, client)
		}
	}()

	// A peer that refuses our mesh key closes the connection as soon as it
	// reads our WatchConnectionChanges frame, which it reads before our
	// ping: a pong proves the privileges were granted.
	pingCtx, cancelPing := context.WithTimeout(p.ctx, p.m.opts.ConfirmTimeout)
	pingErr := make(chan error, 1)
	go func() { pingErr <- client.Ping(pingCtx) }()
	select {
	case err := <-pingErr:
		cancelPing()
		if err != nil {
			_ = client.Close()
			<-recvDone
			return fmt.Sprintf("peer did not confirm the mesh connection: %v", err), false, false
		}
	case <-recvDone:
		cancelPing()
		<-pingErr
		return "peer refused mesh privileges (is its mesh key different? every replica must share one database)", false, false
	}
	p.setState(StateConnected, "")
	p.log.Info("meshed with peer")

	select {
	case err := <-recvDone:
		return fmt.Sprintf("connection lost: %v", err), true, false
	case <-p.ctx.Done():
		_ = client.Close()
		<-recvDone
		return "", true, false
	}
}
