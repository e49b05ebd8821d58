package replicasync

import "github.com/prometheus/client_golang/prometheus"

// metrics are the Manager's Prometheus series. They are registered only
// when Options.Registerer is set.
type metrics struct {
	// replicas is moved by readPeers.
	replicas prometheus.Gauge
	// peerLatency is moved by recordProbe; a series is deleted when its
	// peer leaves or becomes unreachable (no measurement, no sample).
	peerLatency *prometheus.GaugeVec
	// databaseLatency is moved by heartbeat.
	databaseLatency prometheus.Gauge
	// heartbeatFailures is moved by noteBeatFailure.
	heartbeatFailures prometheus.Counter
	// malformed is moved by onNotification.
	malformed prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		replicas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_replicas",
			Help: "Live replicas this replica sees, itself included.",
		}),
		peerLatency: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "coderd_replica_peer_latency_seconds",
			Help: "Latency to each reachable live regional peer's relay (median of recent probes). No series while a peer is unreachable.",
		}, []string{"peer_id", "peer_hostname"}),
		databaseLatency: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_replica_database_latency_seconds",
			Help: "Round trip to Postgres (median of recent heartbeats).",
		}),
		heartbeatFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_replica_heartbeat_failures_total",
			Help: "Heartbeats that failed to reach Postgres.",
		}),
		malformed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "coderd_replica_malformed_notifications_total",
			Help: "Replica notifications ignored because their payload was not a replica id.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.replicas, m.peerLatency, m.databaseLatency, m.heartbeatFailures, m.malformed)
	}
	return m
}
