// The Mesh: its construction, the peer set it is told (SetPeers,
// SetAddresses, Reconnect), round trips over its links (PingPeer), and
// Close.

package derpmesh

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/coder/quartz"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/wire"
)

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
		if u := wire.NormalizeURL(p.URL); u != "" {
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
	p := m.peers[wire.NormalizeURL(relayURL)]
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

// Reconnect replaces the connection to url at once: a live connection is
// closed (its forwarders removed) and redialed, a pending retry pause is
// cut short, a dial in progress is restarted, and a URL parked as "points
// at this replica" is tried again. Use it when the peer behind url was
// replaced by a new process. OnPeerBroken is not called for it. A url not
// in the current set is ignored.
func (m *Mesh) Reconnect(url string) {
	m.mu.Lock()
	p := m.peers[wire.NormalizeURL(url)]
	m.mu.Unlock()
	if p != nil {
		p.reconnect()
	}
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
