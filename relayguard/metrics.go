package relayguard

import "github.com/prometheus/client_golang/prometheus"

// Refusal reasons, the values of coderd_derp_clients_refused_total's label.
const (
	ReasonAdmission = "admission" // the webhook (or fail-closed) said no
	ReasonLimit     = "limit"     // --derp-server-max-connections reached
	ReasonRate      = "rate"      // the accept rate limit
)

// The label values of coderd_derp_admission_decisions_total, every
// combination exported at 0 from the start.
var (
	decisionValues = []string{"allow", "deny"}
	sourceValues   = []string{"webhook", "cache", "stale_cache", "fail_open", "fail_closed"}
)

// Results of a re-verification (coderd_derp_admission_reverifications_total).
const (
	reverifyAllow = "allow" // still admitted: the connection stays
	reverifyDeny  = "deny"  // refused now: the connection is closed
	reverifyError = "error" // the webhook failed: the connection stays
)

// Why a pending connection was closed by the bound
// (coderd_derp_pending_connections_closed_total).
const (
	pendingRefused = "refused" // at the bound, closed right after accept
	pendingEvicted = "evicted" // closed to make room (see Listener)
)

type metrics struct {
	refused        *prometheus.CounterVec
	decisions      *prometheus.CounterVec
	webhookErrors  prometheus.Counter
	webhookUp      prometheus.Gauge
	webhookSeconds prometheus.Histogram
	connections    prometheus.GaugeFunc
	maxConnections prometheus.Gauge

	cacheLookups  *prometheus.CounterVec
	cacheHit      prometheus.Counter
	cacheMiss     prometheus.Counter
	cacheEntries  []prometheus.Collector
	reverified    *prometheus.CounterVec
	disconnected  prometheus.Counter
	verifiedConns prometheus.GaugeFunc

	pending       prometheus.GaugeFunc
	maxPending    prometheus.Gauge
	pendingClosed *prometheus.CounterVec
}

func newMetrics(g *Guard) *metrics {
	m := &metrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_clients_refused_total",
			Help: "DERP client connections refused, by reason: admission (webhook), limit (connection cap), rate (accept rate limit).",
		}, []string{"reason"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_admission_decisions_total",
			Help: "Admission verdicts for new DERP clients, by decision (allow, deny) and source: webhook, cache, stale_cache (webhook failing, earlier admission reused), fail_open, fail_closed.",
		}, []string{"decision", "source"}),
		webhookErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_derp_admission_webhook_errors_total",
			Help: "Admission webhook calls that failed (unreachable, timeout, non-200, bad answer), at connect or at re-verification.",
		}),
		webhookUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_derp_admission_webhook_up",
			Help: "1 when the last admission webhook call succeeded, 0 when it failed (1 until the first call).",
		}),
		webhookSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "coderd_derp_admission_webhook_duration_seconds",
			Help:    "Duration of admission webhook calls.",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		connections: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coderd_derp_capped_connections",
			Help: "DERP client connections counted against --derp-server-max-connections (mesh connections excluded).",
		}, func() float64 { return float64(g.conns.Load()) }),
		maxConnections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_derp_max_connections",
			Help: "The configured cap on DERP client connections (--derp-server-max-connections); -1 when uncapped.",
		}),
		cacheLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_admission_cache_lookups_total",
			Help: "Admission verdict cache lookups for new DERP clients: hit (a fresh verdict, no webhook call) or miss. Hit rate: hit / (hit + miss).",
		}, []string{"result"}),
		reverified: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_admission_reverifications_total",
			Help: "Connected DERP clients verified again with the webhook (--derp-server-verify-client-interval), by result: allow (stays), deny (disconnected), error (webhook failing: stays).",
		}, []string{"result"}),
		disconnected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_derp_admission_disconnects_total",
			Help: "Connected DERP client connections closed because the webhook refused them at re-verification.",
		}),
		verifiedConns: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coderd_derp_admission_reverify_connections",
			Help: "DERP client connections on the re-verification schedule (admitted by the webhook, still connected).",
		}, func() float64 { return float64(g.sched.connections()) }),
		pending: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "coderd_derp_pending_connections",
			Help: "Connections on the HTTP listeners that are not an established relay connection yet (requests in progress, idle keep-alives, upgrades before the DERP handshake ends); mesh peers' addresses excluded.",
		}, func() float64 { return float64(g.pend.len()) }),
		maxPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_derp_max_pending_connections",
			Help: "The bound on pending connections; -1 when unbounded.",
		}),
		pendingClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_pending_connections_closed_total",
			Help: "Connections closed by the pending bound: refused (closed right after accept) or evicted (closed to make room: the oldest unfinished one past the grace period, or the oldest of the address holding the most, for a lighter address or a peer replica's).",
		}, []string{"reason"}),
	}
	for _, r := range []string{ReasonAdmission, ReasonLimit, ReasonRate} {
		m.refused.WithLabelValues(r)
	}
	for _, d := range decisionValues {
		for _, s := range sourceValues {
			m.decisions.WithLabelValues(d, s)
		}
	}
	m.cacheHit = m.cacheLookups.WithLabelValues("hit")
	m.cacheMiss = m.cacheLookups.WithLabelValues("miss")
	for _, v := range []string{"allow", "deny"} {
		v := v
		m.cacheEntries = append(m.cacheEntries, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "coderd_derp_admission_cache_entries",
			Help:        "Verdicts held in the admission cache, by verdict; each is bounded by the cache size (10000 by default).",
			ConstLabels: prometheus.Labels{"verdict": v},
		}, func() float64 {
			allow, deny := g.cache.len()
			if v == "allow" {
				return float64(allow)
			}
			return float64(deny)
		}))
	}
	for _, r := range []string{reverifyAllow, reverifyDeny, reverifyError} {
		m.reverified.WithLabelValues(r)
	}
	for _, r := range []string{pendingRefused, pendingEvicted} {
		m.pendingClosed.WithLabelValues(r)
	}
	m.webhookUp.Set(1)
	return m
}

func (m *metrics) register(r prometheus.Registerer) error {
	cs := []prometheus.Collector{
		m.refused, m.decisions, m.webhookErrors, m.webhookUp, m.webhookSeconds, m.connections, m.maxConnections,
		m.cacheLookups, m.reverified, m.disconnected, m.verifiedConns, m.pending, m.maxPending, m.pendingClosed,
	}
	for _, c := range append(cs, m.cacheEntries...) {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}
