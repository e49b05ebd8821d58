package derpmesh

import (
	"crypto/tls"
	"time"

	"github.com/coder/quartz"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"tailscale.com/derp/derpserver"
)

// Options configures a Mesh. Server and MeshKey are required; every other
// field has a default, applied in one place (withDefaults) and listed in
// DefaultOptions.
type Options struct {
	// Server is the local DERP server whose clients' packets the mesh
	// forwards to peers. Required. Its private key is the mesh connections'
	// identity, so a relay URL that leads back to Server is recognised as
	// "this replica" and not dialed again.
	Server *derpserver.Server

	// MeshKey is the deployment's mesh key: 64 hex characters
	// (key.ParseDERPMesh). Required. If Server has a mesh key, it must be
	// the same one. It is a secret: never logged, never in an error.
	MeshKey string

	// TLSConfig verifies peers' https relay URLs. The DERP library treats
	// RootCAs as roots trusted IN ADDITION to the system roots (and its
	// baked-in Let's Encrypt roots); it cannot narrow trust. Nil means the
	// system roots. InsecureSkipVerify and VerifyConnection are refused by
	// New (the library would panic on them).
	TLSConfig *tls.Config

	// Logger receives one line per event (connected, broke, refused); the
	// DERP library's own chatter goes to its debug level. Default: no-op.
	Logger *zap.Logger

	// OnPeerBroken is called with a peer's relay URL when an established
	// mesh connection to it breaks, and after every failed attempt to
	// connect to it (so at most about once per retry pause), so the owner
	// can ask replicasync to re-probe that peer now. It is not called for
	// Reconnect, SetAddresses removals or Close.
	//
	// Calls come from one goroutine owned by the Mesh: never concurrently
	// (for any URL), never with a lock held, and a slow callback never
	// delays a redial. Calls for the same URL are coalesced while one is
	// pending, and one may arrive shortly after the URL left the set. The
	// callback may call SetAddresses, Reconnect, Status and Ready; it must
	// not call Close (Close waits for it).
	OnPeerBroken func(relayURL string)

	// OnPeerConnected is called with a peer's relay URL each time a mesh
	// connection to it is confirmed (StateConnected), from the same
	// goroutine and with the same guarantees as OnPeerBroken, so the owner
	// can measure the new link at once (PingPeer) instead of probing the
	// peer some other way before the link exists.
	OnPeerConnected func(relayURL string)

	// RetryInterval is the pause before the first redial of a peer whose
	// connect attempt failed; each further failure doubles it up to
	// MaxRetryInterval, with ±20% jitter. Shorter finds a returning peer
	// sooner; longer dials a dead address less often. Default 1s (the
	// library's own loop waits a fixed 5s). A connection that broke after
	// being up for at least MaxRetryInterval is redialed at once.
	// Reconnect and SetAddresses cut any pause short.
	RetryInterval time.Duration

	// MaxRetryInterval caps the backoff, and so bounds how long a peer that
	// came back without Reconnect being called waits to be meshed again.
	// Default 5s. Never less than RetryInterval.
	MaxRetryInterval time.Duration

	// ConfirmTimeout bounds each ping on a mesh connection. The first ping
	// is sent right after the watch request, and its pong confirms the peer
	// granted mesh privileges (a peer that refuses closes the connection
	// instead). Until that pong the connection is kept and pinged again
	// every ConfirmTimeout, with the wait shown in PeerStatus.Error: a slow
	// peer is not redialed, since a new handshake would only add to its
	// load. Default 5s, which is also the DERP library's cap on one ping.
	ConfirmTimeout time.Duration

	// PingInterval is how long an established mesh connection may stay
	// silent before it is pinged (the keepalive). Anything heard from the
	// peer counts: a pong to PingPeer (replicasync's latency probes), its
	// relay's own keepalive frame (every 60 s), a client coming or going.
	// Connections are checked every PingInterval/2, all at once (one
	// wakeup for the whole mesh). Two pings in a row unanswered within
	// ConfirmTimeout close the connection and redial. With more peers than
	// MaxPingsPerInterval the silence allowed per connection stretches to
	// PingInterval × peers/MaxPingsPerInterval, so a replica's keepalives
	// cost the same at any fleet size; a peer process that hangs while its
	// machine stays up is noticed within that plus PingInterval/2 +
	// 2×ConfirmTimeout (≈ 25 s up to 10 peers, ≈ 115 s at 99; its
	// heartbeat stopping drops it sooner when the whole process hangs),
	// or 2×ConfirmTimeout after a latency probe over the link (PingPeer)
	// goes unanswered, whichever comes first: replicasync probes every
	// peer at least once per probe cycle (one heartbeat up to 11
	// replicas), so a link that black-holes traffic while its peer still
	// heartbeats is replaced within about a cycle + 12 s. A
	// peer whose machine or network dies without
	// a TCP reset is noticed by the kernel instead, at any fleet size:
	// mesh connections use TCP keepalives after PingInterval of idleness
	// and a TCP user timeout of PingInterval+2×ConfirmTimeout (≈ 20 s),
	// which wake no process. Default 10s: one 8-byte frame each way per
	// silent peer.
	PingInterval time.Duration

	// MaxPingsPerInterval caps the keepalive pings sent per PingInterval
	// across all peers (see PingInterval). Larger notices hung peer
	// processes sooner in a large mesh at the cost of waking both ends of
	// every silent link more often. Default 10.
	MaxPingsPerInterval int

	// ForwardQueueSize is how many packets may wait for one peer's mesh
	// connection. Packets for a peer's clients are queued and written by
	// one goroutine per peer, so a slow or stopped peer never stalls the
	// local clients' traffic to anyone else; when its queue is full the
	// oldest packet is dropped (coderd_derpmesh_forward_dropped_total).
	// Larger absorbs longer bursts and pauses of a peer, at up to 64 KiB
	// of memory per slot under overload, and adds that much delay before a
	// dead peer's packets start being dropped. The queue is allocated as
	// packets wait and released once drained, so an idle link holds none.
	// Default 1024 (the DERP server's own queue per client is 32).
	ForwardQueueSize int

	// WriteTimeout bounds one write to a peer's mesh connection; a peer
	// that does not take the bytes in time (stopped, hung, partitioned) has
	// its connection closed and redialed, and its queued packets dropped.
	// Default 5s, the DERP library's own write timeout.
	WriteTimeout time.Duration

	// Clock decides every local time in the mesh: the retry pauses and how
	// long a broken connection had been up, PeerStatus.Since, the confirm
	// window and the timeout of each confirm and keepalive ping, the
	// keepalive schedule and how long a link has been silent, and
	// PingPeer's round trip. Tests step a quartz.Mock. Not on it: the
	// write deadlines of the mesh connections (WriteTimeout) and their TCP
	// keepalives, which the kernel keeps on real time, and the DERP
	// library's own timers (its dial timeouts and its 5 s cap on one
	// ping). Default: the real clock.
	Clock quartz.Clock

	// Registerer, if set, receives coderd_derpmesh_peers{state} (the number
	// of peers per State, read at scrape time) and
	// coderd_derpmesh_forward_dropped_total{peer_id} (packets for a peer's
	// clients dropped by this replica: queue full, or the connection
	// ended with packets queued; peer_id is the replica id given to
	// SetPeers, or the relay URL where none was). Close unregisters them.
	Registerer prometheus.Registerer
}

// DefaultOptions lists the defaults New applies to zero fields.
var DefaultOptions = Options{
	RetryInterval:       time.Second,      // a returning peer is meshed ~1s after it listens
	MaxRetryInterval:    5 * time.Second,  // never slower than the library's fixed 5s
	ConfirmTimeout:      5 * time.Second,  // the library caps Ping at 5s anyway
	PingInterval:        10 * time.Second, // silent peer death noticed within ~20s
	MaxPingsPerInterval: 10,               // up to 10 peers, every silent link every PingInterval
	ForwardQueueSize:    1024,             // ~1.3 MB of 1 KiB packets per stalled peer
	WriteTimeout:        5 * time.Second,  // as the DERP library
	Clock:               quartz.NewReal(), // tests step a quartz.Mock
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.RetryInterval <= 0 {
		o.RetryInterval = DefaultOptions.RetryInterval
	}
	if o.MaxRetryInterval <= 0 {
		o.MaxRetryInterval = DefaultOptions.MaxRetryInterval
	}
	if o.MaxRetryInterval < o.RetryInterval {
		o.MaxRetryInterval = o.RetryInterval
	}
	if o.ConfirmTimeout <= 0 {
		o.ConfirmTimeout = DefaultOptions.ConfirmTimeout
	}
	if o.PingInterval <= 0 {
		o.PingInterval = DefaultOptions.PingInterval
	}
	if o.MaxPingsPerInterval <= 0 {
		o.MaxPingsPerInterval = DefaultOptions.MaxPingsPerInterval
	}
	if o.ForwardQueueSize <= 0 {
		o.ForwardQueueSize = DefaultOptions.ForwardQueueSize
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultOptions.WriteTimeout
	}
	if o.Clock == nil {
		o.Clock = DefaultOptions.Clock
	}
	return o
}
