package cli_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/cmd/cli"
	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/replicasync"
)

// `coder replicas` marks a latency cell with "!" when the measuring
// replica warns that the peer is slow, and only that cell: a fast peer
// whose relay URL is a prefix of the slow one's (http://b:1 and
// http://b:10) is not marked, and neither is a peer named only by
// another kind of warning.
func TestReplicasMarksOnlyThePeerWarnedSlow(t *testing.T) {
	t.Parallel()
	a, slow, fast := uuid.MustParse("00000000-0000-4000-8000-00000000000a"),
		uuid.MustParse("00000000-0000-4000-8000-00000000000b"),
		uuid.MustParse("00000000-0000-4000-8000-00000000000c")
	slowWarning := replicasync.Warning{Kind: replicasync.WarnPeerSlow, Hostname: "slow", RelayURL: "http://b:10",
		Latency: 31200 * time.Microsecond, Threshold: 10 * time.Millisecond}.String()
	replicas := []coderd.Replica{
		{ID: a, Hostname: "a", RelayAddress: "http://a:1", RegionID: 999, Version: "v1",
			Peers:    []coderd.ReplicaPeer{{ID: slow, LatencyMS: 31.2}, {ID: fast, LatencyMS: 0.4}},
			Warnings: []string{slowWarning}},
		{ID: slow, Hostname: "slow", RelayAddress: "http://b:10", RegionID: 999, Version: "v1",
			Peers: []coderd.ReplicaPeer{{ID: a, LatencyMS: 0.5}, {ID: fast, LatencyMS: 0.6}}, Warnings: []string{}},
		{ID: fast, Hostname: "fast", RelayAddress: "http://b:1", RegionID: 999, Version: "v1",
			Peers: []coderd.ReplicaPeer{{ID: a, LatencyMS: 0.7}, {ID: slow, LatencyMS: 0.8}}, Warnings: []string{}},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v2/replicas" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(replicas)
	}))
	defer srv.Close()

	var stdout, stderr bytes.Buffer
	if code := cli.Main([]string{"replicas", "--url", srv.URL, "--token", "t"}, &stdout, &stderr); code != 0 {
		t.Fatalf("coder replicas exited %d: %s", code, stderr.String())
	}
	out := stdout.String()
	var row string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "a ") && strings.Contains(line, "ms") && !strings.Contains(line, "http") {
			row = line
		}
	}
	if got, want := strings.Join(strings.Fields(row), " "), "a - 31.2ms ! 0.4ms"; got != want {
		t.Fatalf("latency row of a: %q (want the slow peer marked, the fast one not)\n%s", row, out)
	}
	if !strings.Contains(out, "WARNINGS\n! "+slowWarning+"\n") {
		t.Fatalf("the warning is not listed as served:\n%s", out)
	}
}
