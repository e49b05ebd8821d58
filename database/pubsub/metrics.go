package pubsub

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	published, received, reconnects, dropped prometheus.Counter
	connected                                prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	messages := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "coderd_pubsub_messages_total",
		Help: "Pubsub messages by direction (published through the pool, received on the listen connection).",
	}, []string{"direction"})
	m := &metrics{
		published: messages.WithLabelValues("published"),
		received:  messages.WithLabelValues("received"),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_pubsub_reconnects_total",
			Help: "Times the pubsub listen connection was re-established.",
		}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_pubsub_dropped_total",
			Help: "Messages dropped because a subscriber's queue was full.",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_pubsub_connected",
			Help: "1 while the pubsub listen connection is up.",
		}),
	}
	if reg != nil {
		reg.MustRegister(messages, m.reconnects, m.dropped, m.connected)
	}
	return m
}
