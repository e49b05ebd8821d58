package derpmesh_test

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// gather scrapes reg and indexes the families by name.
func gather(t *testing.T, reg prometheus.Gatherer) map[string]*dto.MetricFamily {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatalf("scrape failed: %v", err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, f := range families {
		out[f.GetName()] = f
	}
	return out
}

func TestDERPServerCountersAreScrapedAsCoderdDERPMetrics(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	if !derptest.Reachable(a, b, 15*time.Second) {
		t.Fatal("not meshed")
	}
	if lost := derptest.Exchange(a, b, 64, 512, 16, 5*time.Second); lost != 0 {
		t.Fatalf("lost %d packets", lost)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(derpmesh.NewServerCollector(nodes[0].server))
	fams := gather(t, reg)
	for name, typ := range map[string]dto.MetricType{
		"coderd_derp_current_connections":         dto.MetricType_GAUGE,   // gauge_current_connections
		"coderd_derp_clients_local":               dto.MetricType_GAUGE,   //
		"coderd_derp_clients_remote":              dto.MetricType_GAUGE,   // the peer's client, via the mesh
		"coderd_derp_packets_forwarded_out_total": dto.MetricType_COUNTER, // plain counter
		"coderd_derp_packets_received_kind_total": dto.MetricType_COUNTER, // labelled map
		"coderd_derp_packets_dropped_total":       dto.MetricType_COUNTER, // process-wide, {reason,kind}
		"coderd_derp_average_queue_duration_ms":   dto.MetricType_GAUGE,   // computed value
		"coderd_derp_mesh_update_batch_size":      dto.MetricType_HISTOGRAM,
		"coderd_derp_version_info":                dto.MetricType_GAUGE,
	} {
		f, ok := fams[name]
		if !ok {
			t.Errorf("metric %s missing", name)
			continue
		}
		if f.GetType() != typ {
			t.Errorf("%s is a %v, want %v", name, f.GetType(), typ)
		}
	}
	value := func(name string) float64 {
		f := fams[name]
		if f == nil || len(f.Metric) == 0 {
			return -1
		}
		m := f.Metric[0]
		if m.Counter != nil {
			return m.Counter.GetValue()
		}
		return m.Gauge.GetValue()
	}
	if v := value("coderd_derp_packets_forwarded_out_total"); v < 64 {
		t.Errorf("coderd_derp_packets_forwarded_out_total = %v after 64 packets crossed the mesh", v)
	}
	if v := value("coderd_derp_clients_remote"); v < 1 {
		t.Errorf("coderd_derp_clients_remote = %v with a client on the peer", v)
	}
	var kinds []string
	for _, m := range fams["coderd_derp_packets_received_kind_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			kinds = append(kinds, l.GetName()+"="+l.GetValue())
		}
	}
	if !strings.Contains(strings.Join(kinds, ","), "kind=other") {
		t.Errorf("packets_received_kind labels: %v", kinds)
	}
	if h := fams["coderd_derp_mesh_update_batch_size"].GetMetric()[0].GetHistogram(); h.GetSampleCount() == 0 {
		t.Error("mesh_update_batch_size histogram is empty although the peer sent its clients")
	}
}

// Every replica in a test process has its own DERP server: their collectors
// must coexist, in separate registries or in one with a label apart.
func TestServerCollectorsForSeveralServersInOneProcess(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})

	for _, n := range []*node{a, b} {
		reg := prometheus.NewRegistry()
		reg.MustRegister(derpmesh.NewServerCollector(n.server))
		gather(t, reg)
		gather(t, reg) // scraping twice is fine too
	}

	shared := prometheus.NewRegistry()
	prometheus.WrapRegistererWith(prometheus.Labels{"server": "a"}, shared).MustRegister(derpmesh.NewServerCollector(a.server))
	prometheus.WrapRegistererWith(prometheus.Labels{"server": "b"}, shared).MustRegister(derpmesh.NewServerCollector(b.server))
	if f := gather(t, shared)["coderd_derp_current_connections"]; len(f.GetMetric()) != 2 {
		t.Fatalf("want one coderd_derp_current_connections per server, got %v", f)
	}
}

func TestMeshPeerGaugeCountsPeersByState(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	reg := prometheus.NewRegistry()
	a.meshWith(t, meshOptions{meshKey: k, reg: reg, extraURLs: []string{"http://127.0.0.1:1"}}, b)

	// peers returns coderd_derpmesh_peers by state; nil when not registered.
	peers := func() map[string]float64 {
		f := gather(t, reg)["coderd_derpmesh_peers"]
		if f == nil {
			return nil
		}
		out := map[string]float64{}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "state" {
					out[l.GetValue()] = m.GetGauge().GetValue()
				}
			}
		}
		return out
	}
	wait.For(t, eventually, "1 connected, 1 connecting", func() bool {
		p := peers()
		return p["connected"] == 1 && p["connecting"] == 1
	})
	a.mesh.SetAddresses([]string{b.url})
	if p := peers(); p["connected"] != 1 || p["connecting"] != 0 {
		t.Fatalf("after removing the unreachable peer: %v", p)
	}
	_ = a.mesh.Close()
	if p := peers(); p != nil {
		t.Fatalf("after Close the gauge is still registered: %v", p)
	}
}
