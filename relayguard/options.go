package relayguard

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// DefaultMaxConnections is the default cap on concurrent DERP client
// connections per replica, sized for the Helm chart's 512 MiB memory limit:
// an idle client connection measured 39 KiB of the server's RSS (real DERP
// clients, 500 to 2000 of them); a busy one whose two send queues (32
// packets each) hold MTU-sized packets adds ~85 KiB, and the garbage
// collector needs headroom on top. Budgeting 200 KiB per client after 64
// MiB for the process itself gives (512-64) MiB / 200 KiB ≈ 2290; 2000
// leaves a margin. Scale it with the memory limit.
const DefaultMaxConnections = 2000

// DefaultAcceptRate is the default number of new client connections a
// replica accepts per second (the token bucket's refill rate; the burst is
// twice that). It bounds the handshake work a flood can cause, and still
// lets a replica take over a few thousand clients of a drained peer within
// seconds.
const DefaultAcceptRate = 500

// Options configures a Guard. Zero values get the defaults documented on
// each field (see withDefaults).
type Options struct {
	// VerifyURL is the admission webhook: POST a tailcfg
	// DERPAdmitClientRequest, answer a DERPAdmitClientResponse. Empty: every
	// client is admitted (subject to the limits).
	VerifyURL string
	// FailOpen admits new clients the webhook cannot answer for (and that
	// have no cached verdict). Default false: a relay that fails open is an
	// open relay to anyone who can make the webhook unreachable.
	FailOpen bool

	// AllowTTL is how long an admission is trusted without asking the
	// webhook again. Longer: fewer webhook calls; shorter: a revoked node
	// stops being able to (re)connect sooner. Default 1m.
	AllowTTL time.Duration
	// DenyTTL is how long a refusal is remembered. It absorbs reconnect
	// storms of refused clients; shorter lets a newly authorized node in
	// sooner. Default 10s.
	DenyTTL time.Duration
	// StaleTTL is how long after the webhook last admitted a client that
	// client may still reconnect while the webhook is failing. It is what
	// keeps known clients working through a webhook outage. Default 10m.
	StaleTTL time.Duration
	// WebhookTimeout bounds one webhook call. It must stay below the DERP
	// library's own 5 s verify timeout so that a hung webhook yields a
	// decision (fail open or closed) rather than a library error. Default 2s.
	WebhookTimeout time.Duration
	// CacheSize bounds the verdict cache (least recently used out). Default
	// 10000.
	CacheSize int
	// HTTPClient calls the webhook. Default: a client with WebhookTimeout
	// that does not follow redirects (a redirect is an error, so the
	// verdict never comes from a host the operator did not configure).
	HTTPClient *http.Client

	// MaxConnections caps concurrent client connections (mesh connections
	// never count). Past it new clients are closed right after their
	// handshake; existing ones keep working. 0: DefaultMaxConnections;
	// negative: no cap.
	MaxConnections int
	// AcceptRate is new client connections per second per replica (a token
	// bucket with a burst of twice the rate). 0: DefaultAcceptRate;
	// negative: unlimited.
	AcceptRate rate.Limit
	// AcceptRatePerIP is the same per source IP (behind a load balancer
	// that does not preserve client addresses every client shares one IP,
	// so this is off by default). 0: off.
	AcceptRatePerIP rate.Limit

	// Logger receives one line per change of webhook health and rate
	// limited lines when the cap or the rate is hit. Default: no logs.
	Logger *zap.Logger
	// Registerer receives the metrics. Default: none.
	Registerer prometheus.Registerer
	// Now is the clock for verdict expiry and rate limits. Default time.Now.
	Now func() time.Time
}

func (o Options) withDefaults() Options {
	if o.AllowTTL <= 0 {
		o.AllowTTL = time.Minute
	}
	if o.DenyTTL <= 0 {
		o.DenyTTL = 10 * time.Second
	}
	if o.StaleTTL <= 0 {
		o.StaleTTL = 10 * time.Minute
	}
	if o.WebhookTimeout <= 0 {
		o.WebhookTimeout = 2 * time.Second
	}
	if o.CacheSize <= 0 {
		o.CacheSize = 10_000
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{
			Timeout: o.WebhookTimeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		}
	}
	if o.MaxConnections == 0 {
		o.MaxConnections = DefaultMaxConnections
	}
	if o.AcceptRate == 0 {
		o.AcceptRate = DefaultAcceptRate
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}
