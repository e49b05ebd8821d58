package replicasync

import (
	"crypto/tls"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Options configures a Manager. Every zero field takes the default named in
// its comment; DefaultOptions lists them in one place.
type Options struct {
	// ID is this replica's id, stored as the row's primary key and
	// announced on the pubsub channel. Default: a random uuid. Use a new id
	// per process: peers recognise a restarted replica by its new id and
	// reconnect to it at once.
	ID uuid.UUID
	// Hostname is shown to operators in logs, warnings and the API.
	// Default: os.Hostname().
	Hostname string
	// RegionID: a replica probes, warns about and meshes with peers of its
	// own region only. Default 999 (Coder's embedded relay region); 0
	// cannot be chosen.
	RegionID int32
	// RelayAddress is how peers reach this replica's relay directly (e.g.
	// http://10.0.0.1:80). Default empty: peers cannot probe or mesh with
	// this replica, and they report it with "peer has no relay URL".
	RelayAddress string
	// Version is stored in the row and shown by the API. Default empty.
	Version string

	// HeartbeatInterval is how often the row is rewritten, the peers are
	// re-read and every regional peer is probed: 2 queries per replica per
	// interval plus one probe per regional peer. Shorter detects a replica
	// that died without stopping (kill -9, partition) sooner at the cost of
	// database load and probe traffic; joins and graceful leaves do not wait
	// for it (they are announced). Default 5s.
	HeartbeatInterval time.Duration
	// StaleAfter: a replica whose row was not updated for this long, by the
	// database's clock, is dead. Silent deaths are noticed after between
	// StaleAfter and StaleAfter + HeartbeatInterval. Shorter than 2
	// intervals risks dropping a live replica over one slow beat.
	// Default 3 × HeartbeatInterval.
	StaleAfter time.Duration
	// ProbeTimeout bounds one latency probe of a peer (connect, TLS and
	// answer). A peer that does not answer within it is reported "timed
	// out". Default 2s.
	ProbeTimeout time.Duration
	// LatencyThreshold: a peer's or the database's latency above this
	// raises a warning (WARN log line, Warnings(), the stored row). Default
	// 10ms: every replica must be within 10ms of each other and of Postgres.
	LatencyThreshold time.Duration
	// Samples is how many recent measurements a latency is the median of.
	// More samples make a warning harder to flip with one outlier and
	// slower to raise or clear (about Samples/2 beats). Default 5.
	Samples int
	// Retention: rows of replicas not heard from for longer are deleted,
	// by one replica at a time (an advisory lock). Shorter keeps the table
	// small; longer keeps tombstones for post-mortems. Default 24h.
	Retention time.Duration
	// CleanupInterval is how often dead rows are looked for (also once at
	// start). Default 1h.
	CleanupInterval time.Duration

	// HTTPClient probes peers. Default: a client of its own that keeps
	// connections alive (so a probe measures one round trip, not a
	// handshake), never uses an HTTP proxy, and verifies https relay URLs
	// against TLSConfig or the system roots. A default client's idle
	// connections are closed by Close; a provided one is left alone.
	HTTPClient *http.Client
	// TLSConfig is used by the default HTTPClient for https relay URLs.
	// Default nil: the system roots.
	TLSConfig *tls.Config
	// Logger defaults to a no-op logger.
	Logger *zap.Logger
	// Registerer, if set, receives the coderd_replica* metrics. Default
	// nil: none are registered. Give each Manager in a process its own
	// registry; never the global one in tests.
	Registerer prometheus.Registerer
	// Clock times measurements and, if it is a TickerClock, paces the
	// loops. It never decides liveness. Default RealClock.
	Clock Clock
}

// DefaultOptions returns the value each zero field of Options takes (ID
// excepted: a fresh random one per Manager).
func DefaultOptions() Options {
	hostname, _ := os.Hostname()
	return Options{
		Hostname:          hostname,
		RegionID:          999,
		HeartbeatInterval: 5 * time.Second,
		StaleAfter:        15 * time.Second, // 3 × HeartbeatInterval
		ProbeTimeout:      2 * time.Second,
		LatencyThreshold:  10 * time.Millisecond,
		Samples:           5,
		Retention:         24 * time.Hour,
		CleanupInterval:   time.Hour,
		Clock:             RealClock{},
	}
}

func (o Options) withDefaults() (_ Options, ownClient bool) {
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
		o.StaleAfter = 3 * o.HeartbeatInterval
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
	if o.Retention <= 0 {
		o.Retention = d.Retention
	}
	if o.CleanupInterval <= 0 {
		o.CleanupInterval = d.CleanupInterval
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Clock == nil {
		o.Clock = d.Clock
	}
	if o.HTTPClient == nil {
		ownClient = true
		o.HTTPClient = &http.Client{
			Timeout: o.ProbeTimeout,
			Transport: &http.Transport{
				Proxy:                 nil, // peers are reached directly, never through a proxy
				DialContext:           (&net.Dialer{Timeout: o.ProbeTimeout, KeepAlive: 30 * time.Second}).DialContext,
				TLSClientConfig:       o.TLSConfig,
				TLSHandshakeTimeout:   o.ProbeTimeout,
				ResponseHeaderTimeout: o.ProbeTimeout,
				MaxIdleConnsPerHost:   2,
				IdleConnTimeout:       max(5*time.Minute, 3*o.HeartbeatInterval),
			},
		}
	}
	return o, ownClient
}
