package relayguard

import (
	"net/http"
	"time"

	"github.com/coder/quartz"
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

// DefaultVerifyInterval is how often a connected client is verified again
// (--derp-server-verify-client-interval's default). It is also the longest
// a client the webhook stops admitting keeps its connection.
const DefaultVerifyInterval = time.Minute

// DefaultCacheSize bounds each half of the verdict cache: at most this many
// admissions and this many refusals are remembered (least recently used
// out). 10 000 refusals measured 3.3 MiB of heap (about 350 bytes each),
// so a full cache holds about 7 MiB; 10 000 admissions cover
// DefaultMaxConnections five times over, so clients that come and go keep
// their verdicts.
const DefaultCacheSize = 10_000

// DefaultMaxPendingConnections bounds the connections a replica holds on its
// HTTP listeners that are not (yet) an established relay connection: TLS
// and HTTP requests in progress, idle keep-alive connections, and upgrades
// whose DERP handshake has not finished. Unbounded, 3000 silent
// connections cost a replica 68 MB; at this bound the same 3000 added
// 18 MB of RSS (1000 held, the rest refused), within the margin the chart's
// 512 MiB leaves above DefaultMaxConnections clients. A replica taking over
// a drained peer's clients at the accept rate has a few dozen handshakes
// pending at once.
const DefaultMaxPendingConnections = 1000

// DefaultPendingGrace is how long a pending connection may take before, at
// the bound, it is closed to make room for a new one. A real client's TLS,
// upgrade and DERP handshake take a few round trips (and the webhook up to
// its 2 s timeout); a slowloris holds its connection for the full
// timeouts (10 s to 30 s) instead.
const DefaultPendingGrace = 3 * time.Second

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
	// stops being able to (re)connect sooner. Default 1m, and never more
	// than VerifyInterval when that is set: a client admitted from the
	// cache is verified again by the time its cached verdict expires, so no
	// client stays on the relay more than one interval after the webhook
	// last admitted it.
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
	// VerifyInterval is how often every admitted client connection is
	// verified again with the webhook (bypassing the cache); a connection
	// the webhook now refuses is closed, and its reconnection is refused
	// like any refused client. A client's first re-verification falls at a
	// point spread over the interval after it connected (a low-discrepancy
	// sequence, so a thousand clients that reconnect at once are not
	// verified at once again), then every interval. While the webhook
	// fails, connected clients keep their connections. Shorter: a revoked
	// node is cut sooner, at one webhook call per client per interval.
	// Zero or negative: never (admission is checked only at connect).
	// Mesh connections are never verified.
	VerifyInterval time.Duration
	// CacheSize bounds each half of the verdict cache: admissions and
	// refusals are kept apart, so a flood of refused keys (node keys cost
	// nothing to make) never evicts the admissions that let known clients
	// reconnect while the webhook fails. Default DefaultCacheSize.
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

	// MaxPendingConnections bounds the connections accepted through
	// Listener that do not carry an established relay connection yet (see
	// DefaultMaxPendingConnections). At the bound, a connection from an
	// address holding fewer pending connections than the address holding
	// the most (or from a mesh peer's address) closes that address's
	// oldest pending one; any other closes the oldest pending one if that
	// one is older than PendingGrace, and is itself closed right after
	// accept otherwise (before anything is allocated for it). So a flood
	// from few addresses never locks out other addresses (probes, health
	// checks, clients, peers), and mesh peers are never refused. 0:
	// DefaultMaxPendingConnections; negative: no bound.
	MaxPendingConnections int
	// PendingGrace: at the bound, a pending connection older than this is
	// closed to make room for a connection from an address that holds as
	// many as any (see DefaultPendingGrace). It caps how fast such sources
	// get in: MaxPendingConnections per PendingGrace. Shorter: a slow
	// flood needs a higher connection rate to lock the flood's own
	// address out; longer: real clients on slow links behind that address
	// are never cut under pressure.
	PendingGrace time.Duration

	// Logger receives one line per change of webhook health and rate
	// limited lines when the cap or the rate is hit. Default: no logs.
	Logger *zap.Logger
	// Registerer receives the metrics. Default: none.
	Registerer prometheus.Registerer
	// Clock drives verdict expiry, rate limits, pending connection ages and
	// the re-verification schedule. Default: the real clock.
	Clock quartz.Clock
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
		o.CacheSize = DefaultCacheSize
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
	if o.MaxPendingConnections == 0 {
		o.MaxPendingConnections = DefaultMaxPendingConnections
	}
	if o.PendingGrace <= 0 {
		o.PendingGrace = DefaultPendingGrace
	}
	if o.Clock == nil {
		o.Clock = quartz.NewReal()
	}
	return o
}
