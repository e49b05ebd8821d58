package derpmesh

import (
	"bytes"
	"encoding/json"
	"expvar"
	"io"
	"math"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"tailscale.com/derp/derpserver"
	"tailscale.com/metrics"
)

// NewServerCollector exposes the DERP server s's own numbers as coderd_derp_*
// metrics, read from s.ExpVar at each scrape. Nothing is published to the
// global expvar registry (expvar.Publish panics on a second server in one
// process, as in tests).
//
// Names follow the library's expvar conventions:
//   - "gauge_X" → gauge coderd_derp_X (coderd_derp_current_connections);
//   - "counter_X" and plain integers → counter coderd_derp_X_total
//     (coderd_derp_packets_forwarded_out_total);
//   - other plain values (average_queue_duration_ms) → gauges;
//   - a labelled map → one series per key, labelled with the map's own label
//     name ("kind", "le") or "key";
//   - a library histogram → a Prometheus histogram coderd_derp_X;
//   - the library version → coderd_derp_version_info{version} 1.
//
// It also exports coderd_derp_packets_dropped_total and
// coderd_derp_bytes_dropped_total{reason,kind}. Those two are process-wide
// counters in the DERP library, shared by every server in the process; the
// rest is per server.
//
// The metric set is only known at scrape time, so this is an unchecked
// collector (Describe sends nothing). Register one per registry; to put two
// servers in one registry, register each through
// prometheus.WrapRegistererWith with a label telling them apart.
func NewServerCollector(s *derpserver.Server) prometheus.Collector {
	return &serverCollector{vars: s.ExpVar(false), descs: map[string]*prometheus.Desc{}}
}

type serverCollector struct {
	vars expvar.Var // a *metrics.Set whose values read s live

	mu    sync.Mutex // guards descs; Collect may run concurrently
	descs map[string]*prometheus.Desc
}

// Describe sends nothing: this is an unchecked collector.
func (c *serverCollector) Describe(chan<- *prometheus.Desc) {}

// Collect reads every server variable once.
func (c *serverCollector) Collect(ch chan<- prometheus.Metric) {
	if set, ok := c.vars.(*metrics.Set); ok {
		set.Do(func(kv expvar.KeyValue) { c.collectVar(ch, kv.Key, kv.Value) })
	}
	for _, name := range []string{"derp_packets_dropped", "derp_bytes_dropped"} {
		if v, ok := expvar.Get(name).(interface{ WritePrometheus(io.Writer, string) }); ok {
			c.collectPrometheusText(ch, v, name)
		}
	}
}

func (c *serverCollector) collectVar(ch chan<- prometheus.Metric, rawName string, v expvar.Var) {
	name, kind := metricName(rawName)
	switch v := v.(type) {
	case *metrics.Histogram:
		c.collectHistogram(ch, rawName, v)
	case *metrics.LabelMap:
		label := v.Label
		if label == "" {
			label = "key"
		}
		v.Do(func(kv expvar.KeyValue) {
			if f, ok := number(kv.Value); ok {
				c.emit(ch, name, rawName, kind, f, []string{label}, []string{kv.Key})
			}
		})
	case *expvar.Map:
		v.Do(func(kv expvar.KeyValue) {
			if f, ok := number(kv.Value); ok {
				c.emit(ch, name, rawName, kind, f, []string{"key"}, []string{kv.Key})
			}
		})
	case *expvar.String:
		c.emit(ch, "coderd_derp_"+sanitize(rawName)+"_info", rawName, prometheus.GaugeValue, 1, []string{sanitize(rawName)}, []string{v.Value()})
	case expvar.Func:
		if f, ok := number(v); ok {
			if !strings.HasPrefix(rawName, "gauge_") && !strings.HasPrefix(rawName, "counter_") {
				// A computed value without a declared type: a gauge.
				name, kind = "coderd_derp_"+sanitize(rawName), prometheus.GaugeValue
			}
			c.emit(ch, name, rawName, kind, f, nil, nil)
		}
	default:
		if f, ok := number(v); ok {
			c.emit(ch, name, rawName, kind, f, nil, nil)
		}
	}
}

// metricName maps a server expvar name to a Prometheus name and type.
func metricName(raw string) (string, prometheus.ValueType) {
	switch {
	case strings.HasPrefix(raw, "gauge_"):
		return "coderd_derp_" + sanitize(strings.TrimPrefix(raw, "gauge_")), prometheus.GaugeValue
	case strings.HasPrefix(raw, "counter_"):
		return "coderd_derp_" + sanitize(strings.TrimPrefix(raw, "counter_")) + "_total", prometheus.CounterValue
	case strings.HasPrefix(raw, "average_"):
		return "coderd_derp_" + sanitize(raw), prometheus.GaugeValue
	}
	return "coderd_derp_" + sanitize(raw) + "_total", prometheus.CounterValue
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' {
			return r
		}
		return '_'
	}, s)
}

// number reads an integer or float variable (an expvar's String is its
// JSON value).
func number(v expvar.Var) (float64, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(v.String()), 64)
	return f, err == nil && !math.IsNaN(f)
}

func (c *serverCollector) desc(name, rawName string, labels []string) *prometheus.Desc {
	k := name + "\x00" + strings.Join(labels, "\x00")
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.descs[k]
	if !ok {
		d = prometheus.NewDesc(name, "DERP server variable "+rawName+".", labels, nil)
		c.descs[k] = d
	}
	return d
}

func (c *serverCollector) emit(ch chan<- prometheus.Metric, name, rawName string, kind prometheus.ValueType, value float64, labels, values []string) {
	m, err := prometheus.NewConstMetric(c.desc(name, rawName, labels), kind, value, values...)
	if err == nil {
		ch <- m
	}
}

// collectHistogram converts a library histogram. Its sum is unexported; its
// String is JSON: cumulative bucket counts keyed by upper bound, "+Inf",
// "sum" and "count".
func (c *serverCollector) collectHistogram(ch chan<- prometheus.Metric, rawName string, h *metrics.Histogram) {
	var fields map[string]float64
	if err := json.Unmarshal([]byte(h.String()), &fields); err != nil {
		return
	}
	buckets := map[float64]uint64{}
	for k, v := range fields {
		if ub, err := strconv.ParseFloat(k, 64); err == nil && !math.IsInf(ub, 0) {
			buckets[ub] = uint64(v)
		}
	}
	name := "coderd_derp_" + sanitize(strings.TrimPrefix(strings.TrimPrefix(rawName, "counter_"), "histogram_"))
	m, err := prometheus.NewConstHistogram(c.desc(name, rawName, nil), uint64(fields["count"]), fields["sum"], buckets)
	if err == nil {
		ch <- m
	}
}

// collectPrometheusText re-exports a library metric that can only render
// itself as Prometheus text (the process-wide drop counters).
func (c *serverCollector) collectPrometheusText(ch chan<- prometheus.Metric, v interface{ WritePrometheus(io.Writer, string) }, name string) {
	var buf bytes.Buffer
	v.WritePrometheus(&buf, name)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(&buf)
	if err != nil {
		return
	}
	promName := "coderd_" + strings.TrimSuffix(name, "_total") + "_total"
	for _, fam := range families {
		for _, metric := range fam.GetMetric() {
			var labels, values []string
			for _, lp := range metric.GetLabel() {
				labels = append(labels, lp.GetName())
				values = append(values, lp.GetValue())
			}
			value := metric.GetCounter().GetValue()
			if metric.GetCounter() == nil {
				value = metric.GetGauge().GetValue()
			}
			c.emit(ch, promName, name, prometheus.CounterValue, value, labels, values)
		}
	}
}
