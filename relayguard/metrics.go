package relayguard

import "github.com/prometheus/client_golang/prometheus"

// Refusal reasons, the values of coderd_derp_clients_refused_total's label.
const (
	ReasonAdmission = "admission" // the webhook (or fail-closed) said no
	ReasonLimit     = "limit"     // --derp-server-max-connections reached
	ReasonRate      = "rate"      // the accept rate limit
)

type metrics struct {
	refused        *prometheus.CounterVec
	decisions      *prometheus.CounterVec
	webhookErrors  prometheus.Counter
	webhookUp      prometheus.Gauge
	webhookSeconds prometheus.Histogram
	connections    prometheus.GaugeFunc
	maxConnections prometheus.Gauge
}

func newMetrics(g *Guard) *metrics {
	m := &metrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_clients_refused_total",
			Help: "DERP client connections refused, by reason: admission (webhook), limit (connection cap), rate (accept rate limit).",
		}, []string{"reason"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_derp_admission_decisions_total",
			Help: "Admission verdicts for DERP clients, by decision (allow, deny) and source: webhook, cache, stale_cache (webhook failing, earlier admission reused), fail_open, fail_closed.",
		}, []string{"decision", "source"}),
		webhookErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_derp_admission_webhook_errors_total",
			Help: "Admission webhook calls that failed (unreachable, timeout, non-200, bad answer).",
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
	}
	for _, r := range []string{ReasonAdmission, ReasonLimit, ReasonRate} {
		m.refused.WithLabelValues(r)
	}
	m.webhookUp.Set(1)
	return m
}

func (m *metrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.refused, m.decisions, m.webhookErrors, m.webhookUp, m.webhookSeconds, m.connections, m.maxConnections} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}
