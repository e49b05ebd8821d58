package coderd_test

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap/zaptest"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
)

// The wire contracts replicas of different releases meet on during a
// rolling upgrade, pinned as release 41c5966 has them: the replica
// announcement (channel and payload), the mesh key and deployment id in
// site_configs, and the JSON of /api/v2/buildinfo, /api/v2/replicas and
// /api/v2/debug/health (testdata/wire/*.golden). Additions are fine;
// a change fails here and must go through expand/contract instead.
func TestWireContractsOfThePreviousReleaseHold(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	db := connectDB(t, pg)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The announcement: NOTIFY on channel "replica" with the replica's id
	// as a 36-character lowercase uuid, nothing else (41c5966 replicas
	// parse exactly that).
	listener, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close(context.Background())
	if _, err := listener.Exec(ctx, "LISTEN replica"); err != nil {
		t.Fatal(err)
	}
	s1 := startServer(t, pg, zaptest.NewLogger(t), coderd.Config{ReplicaHeartbeatInterval: time.Second})
	srv1 := s1.started(t)
	notified := false
	for !notified {
		nctx, ncancel := context.WithTimeout(ctx, 10*time.Second)
		n, err := listener.WaitForNotification(nctx)
		ncancel()
		if err != nil {
			t.Fatalf("no announcement on channel replica: %v", err)
		}
		if n.Channel != "replica" {
			continue
		}
		if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`).MatchString(n.Payload) {
			t.Fatalf("announcement payload %q is not a lowercase uuid", n.Payload)
		}
		notified = n.Payload == srv1.ReplicaID().String()
	}

	s2 := startServer(t, pg, zaptest.NewLogger(t), coderd.Config{ReplicaHeartbeatInterval: time.Second})
	s2.started(t)
	token, err := db.CreateAPIKey(ctx, "wire")
	if err != nil {
		t.Fatal(err)
	}
	// Wait until replica 1 has measured replica 2, so peers is not empty.
	if !wait.Until(30*time.Second, func() bool {
		var rs []coderd.Replica
		getJSON(t, s1.url+"/api/v2/replicas", token, &rs)
		for _, r := range rs {
			if r.ID == srv1.ReplicaID() && len(r.Peers) > 0 && r.Peers[0].Error == "" && r.Peers[0].LatencyMS > 0 {
				return true
			}
		}
		return false
	}) {
		t.Fatal("replica 1 never measured replica 2")
	}
	for name, path := range map[string]string{
		"buildinfo": "/api/v2/buildinfo",
		"replicas":  "/api/v2/replicas",
		"health":    "/api/v2/debug/health",
	} {
		var body any
		if code := getJSON(t, s1.url+path, token, &body); code != 200 {
			t.Fatalf("GET %s: %d", path, code)
		}
		got := map[string]bool{}
		shape(body, "", got)
		want := readGolden(t, name)
		for _, line := range want {
			if !got[line] {
				t.Errorf("GET %s: %q of the previous release's answer is gone or changed type", path, line)
			}
		}
		var added []string
		for line := range got {
			if !contains(want, line) {
				added = append(added, line)
			}
		}
		sort.Strings(added)
		if len(added) > 0 {
			t.Logf("GET %s adds %v (fine: additions do not break the previous release)", path, added)
		}
	}

	// site_configs: the mesh key every release reads (64 hex characters,
	// what key.ParseDERPMesh takes) and the deployment id (a uuid).
	var meshKey, deploymentID string
	if err := db.Pool().QueryRow(ctx, `SELECT (SELECT value FROM site_configs WHERE key = 'derp_mesh_key'), (SELECT value FROM site_configs WHERE key = 'deployment_id')`).Scan(&meshKey, &deploymentID); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(meshKey) {
		t.Error("site_configs derp_mesh_key is not 64 lowercase hex characters")
	}
	if _, err := key.ParseDERPMesh(meshKey); err != nil {
		t.Errorf("site_configs derp_mesh_key does not parse as a DERP mesh key: %v", err)
	}
	if _, err := uuid.Parse(deploymentID); err != nil {
		t.Errorf("site_configs deployment_id %q is not a uuid", deploymentID)
	}
	var info coderd.BuildInfo
	getJSON(t, s1.url+"/api/v2/buildinfo", "", &info)
	if info.DeploymentID != deploymentID {
		t.Errorf("buildinfo deployment_id %q is not site_configs' %q", info.DeploymentID, deploymentID)
	}
}

// shape records every path of v with its JSON type ("a.b string",
// "[].c number"; array elements as "[]").
func shape(v any, path string, out map[string]bool) {
	join := func(k string) string {
		if path == "" || strings.HasPrefix(k, "[") {
			return path + k
		}
		return path + "." + k
	}
	typ := ""
	switch x := v.(type) {
	case map[string]any:
		typ = "object"
		for k, e := range x {
			shape(e, join(k), out)
		}
	case []any:
		typ = "array"
		for _, e := range x {
			shape(e, join("[]"), out)
		}
	case string:
		typ = "string"
	case float64, json.Number:
		typ = "number"
	case bool:
		typ = "boolean"
	case nil:
		typ = "null"
	}
	if path != "" { // the top-level value itself has no path
		out[path+" "+typ] = true
	}
}

func readGolden(t *testing.T, name string) []string {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", "wire", name+".golden"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line != "" && !strings.HasPrefix(line, "#") {
			out = append(out, line)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
