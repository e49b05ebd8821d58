package derpmesh

import (
	"bytes"
	"expvar"
	"io"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"tailscale.com/derp/derpserver"
	"tailscale.com/metrics"
)

// NewServerCollector exposes a DERP server's own counters and gauges as
// coderd_derp_* metrics, read from the server at scrape time. Nothing is
// published to the global expvar registry (which panics when two servers
// live in one process, as in tests).
func NewServerCollector(s *derpserver.Server) prometheus.Collector {
	return &serverCollector{vars: s.ExpVar(false)}
}

type serverCollector struct {
	vars expvar.Var
}

// Describe sends nothing: the metric set depends on the server (an
// unchecked collector).
func (c *serverCollector) Describe(chan<- *prometheus.Desc) {}

func (c *serverCollector) Collect(ch chan<- prometheus.Metric) {
	set, ok := c.vars.(*metrics.Set)
	if !ok {
		return
	}
	set.Do(func(kv expvar.KeyValue) {
		name, kind := metricName(kv.Key)
		switch v := kv.Value.(type) {
		case *metrics.LabelMap:
			v.Do(func(inner expvar.KeyValue) {
				if f, ok := number(inner.Value); ok {
					emit(ch, name, kind, f, []string{labelName(v.Label)}, []string{inner.Key})
				}
			})
		case *expvar.Map:
			v.Do(func(inner expvar.KeyValue) {
				if f, ok := number(inner.Value); ok {
					emit(ch, name, kind, f, []string{"key"}, []string{inner.Key})
				}
			})
		default:
			if f, ok := number(kv.Value); ok {
				emit(ch, name, kind, f, nil, nil)
			}
		}
	})
	// Drops by reason are package-wide counters in the DERP library, shared
	// by every server in the process.
	for _, name := range []string{"derp_packets_dropped", "derp_bytes_dropped"} {
		if v, ok := expvar.Get(name).(interface{ WritePrometheus(io.Writer, string) }); ok {
			emitPrometheusText(ch, v, name)
		}
	}
}

// metricName maps the DERP server's expvar names ("gauge_current_connections",
// "counter_packets_received_kind", "bytes_sent") to Prometheus names.
func metricName(key string) (string, prometheus.ValueType) {
	switch {
	case strings.HasPrefix(key, "gauge_"):
		return "coderd_derp_" + strings.TrimPrefix(key, "gauge_"), prometheus.GaugeValue
	case strings.HasPrefix(key, "counter_"):
		return "coderd_derp_" + strings.TrimPrefix(key, "counter_") + "_total", prometheus.CounterValue
	case strings.HasPrefix(key, "average_"):
		return "coderd_derp_" + key, prometheus.GaugeValue
	}
	return "coderd_derp_" + key + "_total", prometheus.CounterValue
}

func labelName(l string) string {
	if l == "" {
		return "key"
	}
	return l
}

func number(v expvar.Var) (float64, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(v.String()), 64)
	return f, err == nil
}

func emit(ch chan<- prometheus.Metric, name string, kind prometheus.ValueType, value float64, labels, values []string) {
	desc := prometheus.NewDesc(name, "DERP server "+strings.TrimPrefix(name, "coderd_derp_")+".", labels, nil)
	m, err := prometheus.NewConstMetric(desc, kind, value, values...)
	if err == nil {
		ch <- m
	}
}

// emitPrometheusText re-exports a library metric that can only render
// itself as Prometheus text, under the coderd_derp_ prefix.
func emitPrometheusText(ch chan<- prometheus.Metric, v interface{ WritePrometheus(io.Writer, string) }, name string) {
	var buf bytes.Buffer
	v.WritePrometheus(&buf, name)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(&buf)
	if err != nil {
		return
	}
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
			emit(ch, "coderd_"+strings.TrimSuffix(name, "_total")+"_total", prometheus.CounterValue, value, labels, values)
		}
	}
}
