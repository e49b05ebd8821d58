package e2e_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// Every metric the contract names is served on the Prometheus address, and
// the DERP map names the embedded region with the access URL as its node.
func TestMetricsAndDERPMapMatchTheContract(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: []string{
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
	}})
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: pg})
	r1.WaitReady(60 * time.Second)
	r2.WaitReady(60 * time.Second)
	a, b := connectClient(t, r1), connectClient(t, r2)
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("not meshed")
	}
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(promPort) + "/metrics"
	want := []string{
		"coderd_replicas 2",
		"coderd_replica_peer_latency_seconds{peer_hostname=",
		"coderd_replica_database_latency_seconds ",
		"coderd_replica_heartbeat_failures_total 0",
		`coderd_derpmesh_peers{state="connected"} 1`,
		`coderd_derpmesh_peers{state="connecting"} 0`,
		`coderd_pubsub_messages_total{direction="published"}`,
		`coderd_pubsub_messages_total{direction="received"}`,
		"coderd_derp_current_connections",
		"coderd_derp_packets_forwarded_out_total",
		"coderd_db_pool_connections",
		"go_goroutines",
		"process_resident_memory_bytes",
	}
	var body string
	ok := clitest.Eventually(15*time.Second, func() bool {
		body = scrape(t, metricsURL)
		for _, w := range want {
			if !strings.Contains(body, w) {
				return false
			}
		}
		return true
	})
	if !ok {
		for _, w := range want {
			if !strings.Contains(body, w) {
				t.Errorf("/metrics lacks %q", w)
			}
		}
	}
	if code := r2.Status("/metrics"); code != http.StatusNotFound {
		t.Errorf("/metrics on the API port: %d; it belongs on the Prometheus address only", code)
	}

	var m struct {
		Regions map[string]struct {
			RegionID   int
			RegionCode string
			Nodes      []struct {
				HostName string
				DERPPort int
			}
		}
	}
	resp, err := http.Get(r1.URL + "/api/v2/derp-map")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	region, ok := m.Regions["999"]
	if !ok || region.RegionCode != "coder" || len(region.Nodes) != 1 || region.Nodes[0].HostName != "coder.big.corp" || region.Nodes[0].DERPPort != 443 {
		t.Fatalf("derp map does not carry the embedded region with the access URL's host: %+v", m)
	}
}
