package coderd

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/coder-ha/coder/replicasync"
)

// The health report an operator reads: each warning in its section, the
// database's first (heartbeat, LISTEN, schema, then replica sync's words
// about the database), the replicas' sorted, the mesh's in the mesh's
// order; a section is unhealthy only for a failure, never for advice
// (latency, skew, mixed versions). The JSON is the wire form.
func TestHealthReportPutsEachWarningInItsSection(t *testing.T) {
	t.Parallel()
	report := healthReportOf([]healthWarning{
		{kind: warnHeartbeatFailing},
		{kind: warnListenDown},
		{kind: warnSchemaNewer, text: "the schema is newer"},
		{kind: warnMixedVersions, text: "2 versions are live"},
		{kind: warnReplicaSync, sync: replicasync.Warning{Kind: replicasync.WarnDatabaseSlow, Latency: 12 * time.Millisecond, Threshold: 10 * time.Millisecond}},
		{kind: warnReplicaSync, sync: replicasync.Warning{Kind: replicasync.WarnPeerSlow, Hostname: "b", RelayURL: "http://b:1", Latency: 30 * time.Millisecond, Threshold: 10 * time.Millisecond}},
		{kind: warnPeerUnreachable, host: "a", text: "connection refused"},
		{kind: warnMeshDown, host: "c", url: "http://c:1", text: "connecting"},
	})
	got, err := json.Marshal(report)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"healthy":false,` +
		`"database":{"healthy":false,"warnings":["heartbeats are failing: the database is unreachable (the relay keeps serving with the last known peers)","the LISTEN connection is down: peers are seen only at heartbeats until it reconnects","the schema is newer","the database is 12ms away; every replica must be within 10ms of Postgres"]},` +
		`"replicas":{"healthy":false,"warnings":["2 versions are live","replica \"a\" (no relay URL) is unreachable: connection refused","replica \"b\" (http://b:1) is 30ms away; every replica must be within 10ms of each other"]},` +
		`"derp_mesh":{"healthy":false,"warnings":["cannot mesh with replica \"c\" (http://c:1): connecting"]}}`
	if string(got) != want {
		t.Fatalf("health report\n got %s\nwant %s", got, want)
	}

	advice := healthReportOf([]healthWarning{
		{kind: warnSchemaNewer, text: "the schema is newer"},
		{kind: warnMixedVersions, text: "2 versions are live"},
		{kind: warnReplicaSync, sync: replicasync.Warning{Kind: replicasync.WarnDatabaseSlow, Latency: 12 * time.Millisecond, Threshold: 10 * time.Millisecond}},
	})
	if !advice.Healthy || !advice.Database.Healthy || !advice.Replicas.Healthy {
		t.Fatalf("advice alone made the report unhealthy: %+v", advice)
	}
	empty := healthReportOf(nil)
	if b, _ := json.Marshal(empty); string(b) != `{"healthy":true,"database":{"healthy":true,"warnings":[]},"replicas":{"healthy":true,"warnings":[]},"derp_mesh":{"healthy":true,"warnings":[]}}` {
		t.Fatalf("no warnings: %s", b)
	}
}
