// This file holds the coderd_replica* metrics.

package replicasync

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	replicas          prometheus.Gauge
	peerLatency       *prometheus.GaugeVec
	databaseLatency   prometheus.Gauge
	heartbeatFailures prometheus.Counter
	malformed         prometheus.Counter
	probeErrors       *prometheus.CounterVec
	clockSkew         prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		replicas: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_replicas",
			Help: "Live replicas this replica sees, itself included.",
		}),
		peerLatency: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "coderd_replica_peer_latency_seconds",
			Help: "Latency to each live regional peer's relay (median of recent probes).",
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
		probeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_replica_peer_probe_errors_total",
			Help: "Latency probes of a live regional peer that failed (while failing, the peer has no latency gauge).",
		}, []string{"peer_id", "peer_hostname"}),
		clockSkew: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "coderd_replica_clock_skew_seconds",
			Help: "The database's clock minus this machine's, measured at the last heartbeat (reported only; liveness uses the database clock).",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.replicas, m.peerLatency, m.databaseLatency, m.heartbeatFailures, m.malformed, m.probeErrors, m.clockSkew)
	}
	return m
}
