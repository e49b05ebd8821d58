package e2e_test

import (
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// series returns the lines of a Prometheus text exposition that belong to
// metric name (samples only, no HELP/TYPE).
func series(body, name string) []string {
	var out []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
			out = append(out, l)
		}
	}
	return out
}

// A fresh replica's /metrics already has every counter whose labels are
// known, at 0: the STUN results from the start, and the probe error
// counter of a peer from when the peer is first seen (gone once it
// leaves), so dashboards and rate() have series before the first event.
func TestCountersExistAtZeroOnAFreshReplica(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: []string{
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
		"CODER_DERP_SERVER_STUN_ADDRESS=127.0.0.1:0",
	}})
	r1.WaitReady(60 * time.Second)
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(promPort) + "/metrics"

	body := scrape(t, metricsURL)
	for _, result := range []string{"success", "not_stun", "write_error"} {
		want := `coderd_stun_requests_total{result="` + result + `"} 0`
		if !strings.Contains(body, want) {
			t.Errorf("a fresh replica's /metrics lacks %q; it has %q", want, series(body, "coderd_stun_requests_total"))
		}
	}

	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: pg})
	r2.WaitReady(60 * time.Second)
	var info coderd.BuildInfo
	if r2.GetJSON("/api/v2/buildinfo", "", &info) != http.StatusOK {
		t.Fatal("r2 buildinfo")
	}
	peer := `peer_id="` + info.ReplicaID.String() + `"`
	var got []string
	if !wait.Until(15*time.Second, func() bool {
		got = series(scrape(t, metricsURL), "coderd_replica_peer_probe_errors_total")
		for _, l := range got {
			if strings.Contains(l, peer) {
				return strings.HasSuffix(l, "} 0")
			}
		}
		return false
	}) {
		t.Fatalf("no coderd_replica_peer_probe_errors_total series at 0 for the peer r2 (%s) on r1: %q", info.ReplicaID, got)
	}

	r2.Signal(syscall.SIGTERM)
	if code := r2.Wait(30 * time.Second); code != 0 {
		t.Fatalf("r2 exit %d", code)
	}
	wait.For(t, 15*time.Second, "r2's probe error series to go once it left", func() bool {
		got = series(scrape(t, metricsURL), "coderd_replica_peer_probe_errors_total")
		for _, l := range got {
			if strings.Contains(l, peer) {
				return false
			}
		}
		return true
	})
}
