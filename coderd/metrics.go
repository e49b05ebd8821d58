package coderd

import (
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/coder-ha/coder/replicasync"
)

// newRegistry is the process's own registry (never the global one: tests
// run many servers in one process). It starts with the Go runtime and
// process collectors.
func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// poolCollector exposes pgxpool statistics, read at scrape time.
type poolCollector struct {
	pool                                *pgxpool.Pool
	total, idle, acquired, max, acquire *prometheus.Desc
	acquireWait                         *prometheus.Desc
}

func newPoolCollector(pool *pgxpool.Pool) *poolCollector {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc("coderd_db_pool_"+name, help, nil, nil)
	}
	return &poolCollector{
		pool:        pool,
		total:       d("connections", "Connections open in the Postgres pool."),
		idle:        d("idle_connections", "Idle connections in the Postgres pool."),
		acquired:    d("acquired_connections", "Connections in use from the Postgres pool."),
		max:         d("max_connections", "The Postgres pool's connection limit."),
		acquire:     d("acquires_total", "Connections acquired from the Postgres pool."),
		acquireWait: d("acquire_wait_seconds_total", "Time spent waiting for a pool connection."),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.total, c.idle, c.acquired, c.max, c.acquire, c.acquireWait} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.pool.Stat()
	ch <- prometheus.MustNewConstMetric(c.total, prometheus.GaugeValue, float64(s.TotalConns()))
	ch <- prometheus.MustNewConstMetric(c.idle, prometheus.GaugeValue, float64(s.IdleConns()))
	ch <- prometheus.MustNewConstMetric(c.acquired, prometheus.GaugeValue, float64(s.AcquiredConns()))
	ch <- prometheus.MustNewConstMetric(c.max, prometheus.GaugeValue, float64(s.MaxConns()))
	ch <- prometheus.MustNewConstMetric(c.acquire, prometheus.CounterValue, float64(s.AcquireCount()))
	ch <- prometheus.MustNewConstMetric(c.acquireWait, prometheus.CounterValue, s.AcquireDuration().Seconds())
}

// newBuildInfoCollector is coderd_build_info{version}: always 1, labelled
// with this replica's version (join it with other series by instance).
func newBuildInfoCollector(version string) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "coderd_build_info",
		Help:        "Always 1; the version label is this replica's version.",
		ConstLabels: prometheus.Labels{"version": version},
	})
	g.Set(1)
	return g
}

// versionsCollector is coderd_replica_versions{version}: the live
// replicas (self included) per version, as this replica sees them, read
// at scrape time so that a version disappears with its last replica.
type versionsCollector struct {
	live func() []replicasync.Replica
	desc *prometheus.Desc
}

func newVersionsCollector(live func() []replicasync.Replica) *versionsCollector {
	return &versionsCollector{live: live, desc: prometheus.NewDesc("coderd_replica_versions",
		"Live replicas per version, self included, as this replica sees them; more than one series means a rolling upgrade is under way.",
		[]string{"version"}, nil)}
}

func (c *versionsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *versionsCollector) Collect(ch chan<- prometheus.Metric) {
	for _, g := range versionsOf(c.live()) {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(len(g.Replicas)), g.Version)
	}
}
