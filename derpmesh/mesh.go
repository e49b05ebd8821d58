package derpmesh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

// Peer states reported by Status.
const (
	// StateConnected: the watch connection is up and the peer answered a
	// ping sent after the watch request, which proves it granted mesh
	// privileges. Packets for the peer's clients are being forwarded.
	StateConnected = "connected"
	// StateConnecting: everything else — dialing, waiting to redial,
	// refused, or parked (a relay URL that is invalid or points at this
	// replica). PeerStatus.Error says which.
	StateConnecting = "connecting"
)

// PeerStatus is one peer's mesh connection as seen from this replica.
type PeerStatus struct {
	// URL is the relay URL as given to SetAddresses, without a trailing
	// slash.
	URL string `json:"url"`
	// State is StateConnected or StateConnecting.
	State string `json:"state"`
	// Error is why the peer is not connected: the last connect error
	// (connection refused, TLS verification), a refusal of mesh privileges,
	// "relay URL points at this replica", or how the last connection broke.
	// It stays set while redialing and is empty once connected, and while
	// the first attempt (or one asked for by Reconnect) is under way.
	Error string `json:"error"`
	// Since is when State last changed (for a new peer: when it was added).
	Since time.Time `json:"since"`
	// ServerKey is the peer relay's public key while connected (zero
	// otherwise). The peer's own mesh client connects to this replica with
	// that key, so the owner can tell whether the peer holds a link to it
	// too (derpserver.Server.IsClientConnectedForTest).
	ServerKey key.NodePublic `json:"-"`
}

// Mesh keeps a DERP server meshed with a set of peer relays. Create it with
// New, feed it the peer set with SetAddresses, stop it with Close.
//
// All methods are safe for concurrent use.
type Mesh struct {
	opts    Options
	log     *zap.Logger
	clock   quartz.Clock // opts.Clock: every local time decision
	meshKey key.DERPMesh
	notify  *notifier
	// netMon is the one network-state snapshot every mesh client shares
	// (the library requires one per client; the mesh dials through its own
	// dialer, so a snapshot per connection, N-1 netlink dumps a replica,
	// bought nothing).
	netMon  *netmon.Monitor
	gauges  []prometheus.Collector
	dropped *prometheus.CounterVec // coderd_derpmesh_forward_dropped_total{peer_id}

	ctx    context.Context // canceled by Close; parent of every peer's
	cancel context.CancelFunc

	// setMu serializes SetAddresses and Close, which wait for removed
	// peers' goroutines: so at most one goroutine ever owns a URL.
	setMu sync.Mutex

	mu     sync.Mutex // guards peers and closed
	peers  map[string]*peer
	closed bool

	changed chan struct{}  // cap 1; see Changed
	wg      sync.WaitGroup // keepaliveLoop and its pings

	closeOnce sync.Once
	closeDone chan struct{}
}

// New validates opts and returns an idle Mesh: it dials nothing until
// SetAddresses. It fails on a missing Server, a malformed MeshKey, a
// MeshKey different from Server's own, a TLSConfig that skips
// verification, or a Registerer that already has coderd_derpmesh_peers.
func New(opts Options) (*Mesh, error) {
	if opts.Server == nil {
		return nil, errors.New("derpmesh: Options.Server is required")
	}
	meshKey, err := key.ParseDERPMesh(opts.MeshKey)
	if err != nil {
		// err names the rule, never the value.
		return nil, fmt.Errorf("derpmesh: the mesh key must be 64 hex characters: %w", err)
	}
	if opts.Server.HasMeshKey() && !opts.Server.MeshKey().Equal(meshKey) {
		return nil, errors.New("derpmesh: Options.MeshKey differs from the local DERP server's mesh key; peers would refuse one of them")
	}
	if c := opts.TLSConfig; c != nil && (c.InsecureSkipVerify || c.VerifyConnection != nil) {
		return nil, errors.New("derpmesh: TLSConfig must not set InsecureSkipVerify or VerifyConnection; add the peers' CA to RootCAs instead")
	}
	opts = opts.withDefaults()
	m := &Mesh{
		opts:      opts,
		log:       opts.Logger,
		clock:     opts.Clock,
		meshKey:   meshKey,
		netMon:    netmon.NewStatic(),
		changed:   make(chan struct{}, 1),
		peers:     map[string]*peer{},
		closeDone: make(chan struct{}),
	}
	if !opts.Server.HasMeshKey() {
		m.log.Warn("the local DERP server has no mesh key; peers cannot mesh with this replica")
	}
	m.dropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "coderd_derpmesh_forward_dropped_total",
		Help: "Packets for a peer replica's clients that this replica dropped instead of forwarding: the peer's queue was full (slow or stopped peer) or its mesh connection ended with packets queued.",
	}, []string{"peer_id"})
	if opts.Registerer != nil {
		if err := opts.Registerer.Register(m.dropped); err != nil {
			return nil, fmt.Errorf("derpmesh: register coderd_derpmesh_forward_dropped_total: %w", err)
		}
		m.gauges = append(m.gauges, m.dropped)
		for _, state := range []string{StateConnected, StateConnecting} {
			g := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name:        "coderd_derpmesh_peers",
				Help:        "Peer relays this replica's DERP server meshes with, by state (connected: mesh privileges confirmed).",
				ConstLabels: prometheus.Labels{"state": state},
			}, func() float64 { return float64(m.count(state)) })
			if err := opts.Registerer.Register(g); err != nil {
				m.unregister()
				return nil, fmt.Errorf("derpmesh: register coderd_derpmesh_peers: %w", err)
			}
			m.gauges = append(m.gauges, g)
		}
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.notify = newNotifier(opts.OnPeerBroken, opts.OnPeerConnected)
	m.wg.Add(1)
	go m.keepaliveLoop()
	return m, nil
}

// Changed receives a value (coalesced: one for any number of changes
// since the last receive) whenever what Status reports may have changed: a
// peer's state or error, or the peer set. An owner that mirrors Status
// waits on it instead of polling.
func (m *Mesh) Changed() <-chan struct{} { return m.changed }

func (m *Mesh) noteChange() {
	select {
	case m.changed <- struct{}{}:
	default:
	}
}

// droppedCounter is the drop counter of the peer labelled label.
func (m *Mesh) droppedCounter(label string) prometheus.Counter {
	return m.dropped.WithLabelValues(label)
}

func (m *Mesh) unregister() {
	for _, g := range m.gauges {
		m.opts.Registerer.Unregister(g)
	}
	m.gauges = nil
}

// normalizeURL is the key a relay URL is known by: "http://a:1" and
// "http://a:1/" are the same peer.
func normalizeURL(u string) string {
	return strings.TrimSuffix(strings.TrimSpace(u), "/")
}

// Peer is one peer replica to mesh with.
type Peer struct {
	// ID is the replica's id (a uuid). It labels the peer's metrics, and a
	// new ID behind a URL already meshed with means a new process there:
	// the connection is replaced as by Reconnect. Empty: not known (the
	// URL labels the metrics; an ID given earlier is kept).
	ID string
	// URL is the replica's relay URL, as for SetAddresses.
	URL string
}

// SetAddresses replaces the set of peer relay URLs to mesh with. A relay
// URL is a replica's base URL ("http://10.0.0.1:8080"); the DERP endpoint
// is that plus "/derp" (a URL already ending in "/derp" is used as is).
// The caller filters by region and leaves this replica out; a URL that
// still leads here is detected and parked with an error, which keeps Ready
// false (two replicas claiming one relay URL is a misconfiguration).
//
// New URLs are dialed at once. URLs no longer in the set are disconnected
// and their forwarders removed before SetAddresses returns, so packets for
// those peers' clients stop being forwarded. URLs still in the set keep
// their connection untouched (use Reconnect to replace one). Duplicates and
// empty strings are ignored; an unparsable URL is kept and reported in
// Status. After Close, SetAddresses does nothing.
//
// It is SetPeers without replica ids; prefer SetPeers.
func (m *Mesh) SetAddresses(urls []string) {
	peers := make([]Peer, len(urls))
	for i, u := range urls {
		peers[i] = Peer{URL: u}
	}
	m.SetPeers(peers)
}

// SetPeers replaces the set of peers to mesh with, as SetAddresses does
// for their URLs. In addition, each peer's ID labels its
// coderd_derpmesh_forward_dropped_total series, and a URL already in the
// set that comes with a different ID than before is a restarted peer
// (same address, new process): its connection is replaced at once, as by
// Reconnect, so the mesh is confirmed with the new process without
// waiting for the old connection to time out. When the same URL appears
// twice, the last entry wins.
func (m *Mesh) SetPeers(peers []Peer) {
	m.setMu.Lock()
	defer m.setMu.Unlock()

	want := make(map[string]string, len(peers)) // url → id
	for _, p := range peers {
		if u := normalizeURL(p.URL); u != "" {
			want[u] = strings.TrimSpace(p.ID)
		}
	}

	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return
	}
	var removed, restarted []*peer
	for u, p := range m.peers {
		if _, ok := want[u]; !ok {
			removed = append(removed, p)
			delete(m.peers, u)
		}
	}
	for u, id := range want {
		p, ok := m.peers[u]
		if !ok {
			p = m.newPeer(u, id)
			m.peers[u] = p
			go p.run()
			continue
		}
		if changed, old := p.setID(id); changed {
			m.dropped.DeleteLabelValues(old)
			restarted = append(restarted, p)
		} else if old == "" && id != "" {
			m.dropped.DeleteLabelValues(u) // labelled by URL until now
		}
	}
	m.mu.Unlock()

	m.noteChange()
	for _, p := range restarted {
		m.log.Info("peer restarted behind its relay URL; reconnecting", zap.String("relay_url", p.url), zap.String("peer_id", p.label()))
		p.reconnect()
	}
	for _, p := range removed {
		m.log.Info("leaving mesh with peer", zap.String("relay_url", p.url))
		p.cancel()
	}
	for _, p := range removed {
		<-p.done
		m.dropped.DeleteLabelValues(p.label())
	}
}

// PingPeer returns the round trip to the peer whose relay URL is relayURL
// over its established mesh link. ok is false when there is no
// established link (the caller falls back to an HTTP probe).
//
// The round trip is a DERP ping answered by the peer's relay on the very
// connection that carries forwarded packets, so it measures the path
// relayed traffic takes (queueing behind forwarded packets included), and
// is read on Options.Clock. It returns when the pong arrives, ctx ends, or
// 5 s pass (the library's own cap on one ping, which stays on real time);
// a ping that fails on an established link returns ok true and the error:
// the peer did not answer over the mesh. It is safe to call concurrently
// with everything else, for any URL.
//
// A ping that is not answered before ctx's deadline has the link checked
// at once, as the keepalive would check a silent one: two more pings
// unanswered within ConfirmTimeout close and redial it. So a link that
// black-holes traffic (a peer relay that stopped reading, a middlebox
// that lost the connection) is replaced within about 2×ConfirmTimeout of
// a failed probe, instead of after its keepalive silence, which stretches
// with the number of peers (see Options.PingInterval).
func (m *Mesh) PingPeer(ctx context.Context, relayURL string) (rtt time.Duration, ok bool, err error) {
	m.mu.Lock()
	p := m.peers[normalizeURL(relayURL)]
	m.mu.Unlock()
	if p == nil {
		return 0, false, nil
	}
	c := p.confirmedClient()
	if c == nil {
		return 0, false, nil
	}
	start := m.clock.Now("derpmesh", "pingPeer")
	if err := c.Ping(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			// Unanswered: the link may be dead without being silent for
			// its keepalive interval yet (which stretches with the number
			// of peers). Check it now, as the keepalive would.
			m.checkLink(p)
		}
		return 0, true, fmt.Errorf("ping peer %s over the mesh: %w", p.url, err)
	}
	p.noteHeard() // the link is alive: no keepalive needed for a while
	return m.clock.Since(start, "derpmesh", "pingPeer"), true, nil
}

// keepaliveLoop checks every established connection each half
// PingInterval and pings, each on its own goroutine, those silent for
// their keepalive interval (see Options.PingInterval): one wakeup per
// tick for the whole mesh, instead of a timer per connection firing each
// time the peer's relay sends its own keepalive.
func (m *Mesh) keepaliveLoop() {
	defer m.wg.Done()
	t := m.clock.NewTicker(max(m.opts.PingInterval/2, time.Millisecond), "derpmesh", "keepalive")
	defer t.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-t.C:
		}
		interval := m.keepaliveInterval()
		m.mu.Lock()
		peers := make([]*peer, 0, len(m.peers))
		for _, p := range m.peers {
			peers = append(peers, p)
		}
		m.mu.Unlock()
		for _, p := range peers {
			if p.silentFor() < interval {
				continue
			}
			m.checkLink(p)
		}
	}
}

// checkLink pings p's established connection now, on its own goroutine,
// up to twice within ConfirmTimeout, and closes and redials it if neither
// ping is answered (see peer.keepalive); nothing happens if p has no
// established connection, a check of it is under way, or the Mesh is
// closing. The keepalive calls it for silent links, and PingPeer for a
// link whose ping went unanswered.
func (m *Mesh) checkLink(p *peer) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed { // Close waits for wg: nothing may be added after it
		return
	}
	ctx, c, dead, ok := p.startKeepalive()
	if !ok {
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		p.keepalive(ctx, c, dead)
	}()
}

// pingWithin sends one ping on c and waits for its pong until ctx ends or
// d passes on the Mesh's clock; a pong not back within d is
// context.DeadlineExceeded, as under context.WithTimeout. The DERP
// library gives up on its own after 5 s of real time (its cap on one
// ping, left as it is; it also returns context.DeadlineExceeded). why
// tags the timer ("confirm" or "keepalive") for tests that trap it.
func (m *Mesh) pingWithin(ctx context.Context, c *derphttp.Client, d time.Duration, why string) error {
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var expired atomic.Bool
	t := m.clock.AfterFunc(d, func() {
		expired.Store(true)
		cancel()
	}, "derpmesh", "ping", why)
	defer t.Stop()
	err := c.Ping(pctx)
	if err != nil && expired.Load() && ctx.Err() == nil && errors.Is(err, context.Canceled) {
		return context.DeadlineExceeded
	}
	return err
}

// keepaliveInterval is how long a mesh connection may stay silent before
// its keepalive ping: PingInterval, stretched so that all peers together
// get at most MaxPingsPerInterval pings per PingInterval.
func (m *Mesh) keepaliveInterval() time.Duration {
	m.mu.Lock()
	peers := len(m.peers)
	m.mu.Unlock()
	d := m.opts.PingInterval
	if peers > m.opts.MaxPingsPerInterval {
		d = d * time.Duration(peers) / time.Duration(m.opts.MaxPingsPerInterval)
	}
	return d
}

// dialer dials mesh connections with TCP keepalives (after PingInterval of
// idleness, every ConfirmTimeout/2, two unanswered probes) and a TCP user
// timeout of PingInterval+2×ConfirmTimeout, so a peer whose machine or
// network dies without a reset is noticed by the kernel in about that
// long, whatever the size of the mesh and without waking this process.
func (m *Mesh) dialer() *net.Dialer {
	return &net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{
			Enable:   true,
			Idle:     m.opts.PingInterval,
			Interval: max(m.opts.ConfirmTimeout/2, time.Second),
			Count:    2,
		},
		Control: userTimeout(m.opts.PingInterval + 2*m.opts.ConfirmTimeout),
	}
}

// Reconnect replaces the connection to url at once: a live connection is
// closed (its forwarders removed) and redialed, a pending retry pause is
// cut short, a dial in progress is restarted, and a URL parked as "points
// at this replica" is tried again. Use it when the peer behind url was
// replaced by a new process. OnPeerBroken is not called for it. A url not
// in the current set is ignored.
func (m *Mesh) Reconnect(url string) {
	m.mu.Lock()
	p := m.peers[normalizeURL(url)]
	m.mu.Unlock()
	if p != nil {
		p.reconnect()
	}
}

// Status lists every peer in the current set, sorted by URL.
func (m *Mesh) Status() []PeerStatus {
	m.mu.Lock()
	out := make([]PeerStatus, 0, len(m.peers))
	for _, p := range m.peers {
		out = append(out, p.status())
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
	return out
}

// Ready reports whether every peer in the current set is StateConnected:
// its watch connection is up and it confirmed mesh privileges. It is true
// with no peers. It turns false the moment a peer's connection breaks, and
// briefly during Reconnect; owners that must not flap (a load balancer's
// readiness) should latch it.
func (m *Mesh) Ready() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.peers {
		if p.status().State != StateConnected {
			return false
		}
	}
	return true
}

func (m *Mesh) count(state string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, p := range m.peers {
		if p.status().State == state {
			n++
		}
	}
	return n
}

// Close disconnects every peer, removes every forwarder the mesh
// installed, drops pending OnPeerBroken calls, unregisters the gauge, and
// waits for every goroutine the Mesh started. It is idempotent: every call
// returns nil once the first has finished. It must not be called from
// OnPeerBroken.
func (m *Mesh) Close() error {
	m.closeOnce.Do(func() {
		m.setMu.Lock()
		m.mu.Lock()
		m.closed = true
		peers := m.peers
		m.peers = map[string]*peer{}
		m.mu.Unlock()
		m.cancel()
		for _, p := range peers {
			<-p.done
		}
		m.wg.Wait()
		m.setMu.Unlock()
		m.notify.close()
		m.unregister()
		close(m.closeDone)
	})
	<-m.closeDone
	return nil
}
