// This file holds the Options and their defaults, in one place.

package replicasync

import (
	"crypto/tls"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/coder/quartz"
	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Options configures a Manager. Zero fields take the defaults listed on
// each; DefaultOptions shows them in one place.
type Options struct {
	// ID is this replica's id. Default: a random uuid (one per process).
	ID uuid.UUID
	// Hostname is shown to operators. Default: os.Hostname().
	Hostname string
	// RegionID: replicas probe and mesh only with peers of their region.
	// Default 999.
	RegionID int32
	// RelayAddress is how peers reach this replica's relay directly. Empty
	// means peers cannot probe or mesh with it.
	RelayAddress string
	// Version is stored in the row and shown by the API.
	Version string

	// HeartbeatInterval is how often the row is rewritten and peers are
	// re-read and re-probed. Shorter detects silent deaths sooner at the
	// cost of 2 queries per replica per interval. Default 5s.
	HeartbeatInterval time.Duration
	// StaleAfter: a replica whose row was not updated for this long (by the
	// database clock) is dead. Default StaleAfterBeats (3) ×
	// HeartbeatInterval.
	StaleAfter time.Duration
	// ProbeTimeout bounds one latency probe of a peer. Default 2s.
	ProbeTimeout time.Duration
	// LatencyThreshold: a peer or database slower than this raises a
	// warning. Default 10ms (every replica must be within 10ms of each
	// other and of Postgres).
	LatencyThreshold time.Duration
	// Samples is how many recent probes the reported latency is the median
	// of, so that one slow sample cannot flip a warning. Default 5.
	Samples int
	// ProbesPerInterval caps the peers probed per HeartbeatInterval, so a
	// replica's probing costs the same at any fleet size (the fleet's, N
	// times that, instead of N²). Up to this many regional peers, every
	// peer is probed every interval. With more, the latency matrix is
	// sampled: each interval probes the peers measured longest ago, so
	// every peer is measured at least every ceil(peers/ProbesPerInterval)
	// intervals (the probe cycle). A sample on the other side of the
	// threshold from the peer's current state is confirmed at once by
	// back-to-back probes (up to Samples), so a peer that turns slow is
	// warned about (and one that recovers is cleared) within one probe
	// cycle plus a few round trips, not after Samples cycles: at N=100
	// with the defaults, 50 s (10 intervals of 5 s); at N≤11, one
	// interval. Peers measured because something happened (a new mesh
	// link, a broken one, a newcomer) are probed at once and do not count.
	// Larger catches slow peers sooner at the cost of probes (each a
	// round trip over the mesh link, woken on both replicas). Default 10.
	ProbesPerInterval int
	// Retention: rows of replicas dead for longer are deleted (by one
	// replica at a time). Default 24h.
	Retention time.Duration
	// CleanupInterval is how often dead rows are looked for. Default 1h.
	CleanupInterval time.Duration
	// RetryInterval is how soon a failed heartbeat is retried (±20%
	// jitter, so replicas do not return to a recovering database all at
	// once). Shorter resyncs sooner after an outage at the cost of more
	// failed connection attempts during one. Default min(1s,
	// HeartbeatInterval).
	RetryInterval time.Duration
	// PollInterval is how often the table is re-read in poll mode (a nil
	// Pubsub: LISTEN/NOTIFY unavailable, e.g. behind PgBouncer in
	// transaction pooling). Shorter converges sooner at the cost of one
	// full read per replica per interval. Default 1s.
	PollInterval time.Duration
	// Pinger, if set, measures peer latency over established mesh links;
	// peers without a link are probed over HTTP. With a Pinger, a peer that
	// joins is not probed at once: the owner calls Reprobe when its link
	// is up, and the next round measures it in any case. Default nil: HTTP
	// only, newcomers probed at once. SetPinger sets it after construction.
	Pinger LinkPinger

	// HTTPClient probes peers. Default: a keep-alive client; TLSConfig
	// (if set) verifies https relay URLs. Its idle connections are closed
	// after an interval without an HTTP probe (every peer measured over
	// its mesh link), so a replica does not keep N-1 of them open.
	HTTPClient *http.Client
	// TLSConfig is used by the default HTTPClient for https relay URLs.
	TLSConfig *tls.Config
	// Logger defaults to a no-op logger.
	Logger *zap.Logger
	// Registerer, if set, receives the coderd_replica* metrics.
	Registerer prometheus.Registerer
	// Clock is used for every local time decision (tickers, timers,
	// round trips, the outage grace window); never for liveness, which is
	// the store's now(). Default: the real clock.
	Clock quartz.Clock
}

// StaleAfterBeats is how many heartbeat intervals a replica may go
// unheard before its peers consider it dead: the default StaleAfter is
// StaleAfterBeats × HeartbeatInterval.
const StaleAfterBeats = 3

// DefaultOptions returns the defaults every zero field of Options takes.
func DefaultOptions() Options {
	hostname, _ := os.Hostname()
	const heartbeat = 5 * time.Second
	return Options{
		Hostname:          hostname,
		RegionID:          999,
		HeartbeatInterval: heartbeat,
		StaleAfter:        StaleAfterBeats * heartbeat,
		ProbeTimeout:      2 * time.Second,
		LatencyThreshold:  10 * time.Millisecond,
		Samples:           5,
		ProbesPerInterval: 10,
		Retention:         24 * time.Hour,
		CleanupInterval:   time.Hour,
		RetryInterval:     time.Second,
		PollInterval:      time.Second,
	}
}

func (o Options) withDefaults() Options {
	d := DefaultOptions()
	if o.ID == uuid.Nil {
		o.ID = uuid.New()
	}
	if o.Hostname == "" {
		o.Hostname = d.Hostname
	}
	if o.RegionID == 0 {
		o.RegionID = d.RegionID
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = d.HeartbeatInterval
	}
	if o.StaleAfter <= 0 {
		o.StaleAfter = StaleAfterBeats * o.HeartbeatInterval
	}
	if o.ProbeTimeout <= 0 {
		o.ProbeTimeout = d.ProbeTimeout
	}
	if o.LatencyThreshold <= 0 {
		o.LatencyThreshold = d.LatencyThreshold
	}
	if o.Samples <= 0 {
		o.Samples = d.Samples
	}
	if o.ProbesPerInterval <= 0 {
		o.ProbesPerInterval = d.ProbesPerInterval
	}
	if o.Retention <= 0 {
		o.Retention = d.Retention
	}
	if o.CleanupInterval <= 0 {
		o.CleanupInterval = d.CleanupInterval
	}
	if o.RetryInterval <= 0 {
		o.RetryInterval = min(d.RetryInterval, o.HeartbeatInterval)
	}
	if o.PollInterval <= 0 {
		o.PollInterval = d.PollInterval
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Clock == nil {
		o.Clock = quartz.NewReal()
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{
			Transport: &http.Transport{
				Proxy:               nil, // peers are reached directly, never through a proxy
				DialContext:         (&net.Dialer{Timeout: o.ProbeTimeout, KeepAlive: 30 * time.Second}).DialContext,
				TLSClientConfig:     o.TLSConfig,
				MaxIdleConnsPerHost: 2,
				IdleConnTimeout:     5 * time.Minute,
				TLSHandshakeTimeout: o.ProbeTimeout,
			},
		}
	}
	return o
}
