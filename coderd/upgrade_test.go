package coderd_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
	"tailscale.com/derp/derphttp"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// server is one in-process replica on a port known before it starts.
type server struct {
	url  string
	srv  *coderd.Server
	err  error
	done chan struct{}
}

// startServer runs coderd.New in the background (it may block while
// migrating); wait on done. cfg gets the address, relay URL and database.
func startServer(t *testing.T, pg string, log *zap.Logger, cfg coderd.Config) *server {
	t.Helper()
	port := clitest.FreePort(t)
	s := &server{url: fmt.Sprintf("http://127.0.0.1:%d", port), done: make(chan struct{})}
	cfg.HTTPAddress = fmt.Sprintf("127.0.0.1:%d", port)
	cfg.PostgresURL = pg
	cfg.DERPServerEnable = true
	cfg.DERPServerRelayURL = s.url
	if cfg.ReplicaLatencyThreshold == 0 {
		cfg.ReplicaLatencyThreshold = time.Second
	}
	go func() {
		defer close(s.done)
		s.srv, s.err = coderd.New(context.Background(), cfg, log)
	}()
	t.Cleanup(func() {
		<-s.done
		if s.srv != nil {
			_ = s.srv.Shutdown(context.Background())
		}
	})
	return s
}

func (s *server) started(t *testing.T) *coderd.Server {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("coderd.New did not return")
	}
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.srv
}

func status(url string) int {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func getJSON(t *testing.T, url, token string, v any) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	if v != nil {
		_ = json.NewDecoder(resp.Body).Decode(v)
	}
	return resp.StatusCode
}

func connectDB(t *testing.T, pg string) *database.DB {
	t.Helper()
	db, err := database.Connect(context.Background(), pg, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

// A replica waiting to migrate (here: another migrator holds the lock, as
// a replica of the previous release does during its own migration) is
// alive: /healthz answers 200, so a startup or liveness probe does not
// restart it, while /readyz and the API answer 503.
func TestHealthzAnswersWhileMigrating(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewEmptyURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	holder, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(context.Background())
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_lock(7386412001)"); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, pg, zaptest.NewLogger(t), coderd.Config{})
	if !wait.Until(30*time.Second, func() bool { return status(s.url+"/healthz") == http.StatusOK }) {
		t.Fatal("/healthz does not answer while the replica waits to migrate")
	}
	for i := 0; i < 10; i++ {
		select {
		case <-s.done:
			t.Fatalf("New returned while the migration lock was held: %v", s.err)
		default:
		}
		if code := status(s.url + "/healthz"); code != http.StatusOK {
			t.Fatalf("/healthz = %d while migrating", code)
		}
		if code := status(s.url + "/readyz"); code != http.StatusServiceUnavailable {
			t.Fatalf("/readyz = %d while migrating, want 503", code)
		}
		var body struct{ Message string }
		if code := getJSON(t, s.url+"/api/v2/buildinfo", "", &body); code != http.StatusServiceUnavailable || body.Message == "" {
			t.Fatalf("/api/v2/buildinfo = %d %q while migrating, want 503 with a JSON message", code, body.Message)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := holder.Exec(ctx, "SELECT pg_advisory_unlock(7386412001)"); err != nil {
		t.Fatal(err)
	}
	s.started(t)
	if !wait.Until(30*time.Second, func() bool { return status(s.url+"/readyz") == http.StatusOK }) {
		t.Fatal("not ready after the migration")
	}
}

// fakePeer is a live replica row whose relay is a real DERP server this
// test controls: its mesh client connects to the replica under test only
// when the test says so (a peer that learned of the join late).
type fakePeer struct {
	srv       *derpserver.Server
	url       string
	row       database.ReplicaState
	stopBeats func()
}

func startFakePeer(t *testing.T, db *database.DB, region int32, version string) *fakePeer {
	t.Helper()
	meshKey, err := db.DERPMeshKey(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	srv := derpserver.New(key.NewNode(), logger.Discard)
	if err := srv.SetMeshKey(meshKey); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", derpmesh.Handler(srv))
	mux.HandleFunc("/derp/latency-check", func(w http.ResponseWriter, r *http.Request) {})
	hs := httptest.NewServer(mux)
	t.Cleanup(func() { hs.Close(); _ = srv.Close() })
	p := &fakePeer{srv: srv, url: hs.URL, row: database.ReplicaState{
		ID: uuid.New(), Hostname: "fake-peer", RegionID: region, RelayAddress: hs.URL, Version: version,
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	p.stopBeats = func() { cancel(); <-done }
	t.Cleanup(p.stopBeats)
	row := p.row
	if _, err := db.BeatReplica(ctx, row); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
			_, _ = db.BeatReplica(ctx, row)
		}
	}()
	return p
}

// leave stops the fake peer's beats and marks it stopped, announcing it
// as a replica does on SIGTERM.
func (p *fakePeer) leave(t *testing.T, db *database.DB) {
	t.Helper()
	p.stopBeats()
	ctx := context.Background()
	if err := db.MarkReplicaStopped(ctx, p.row.ID); err != nil {
		t.Fatal(err)
	}
	if err := db.NotifyReplicaChange(ctx, "replica", p.row.ID); err != nil {
		t.Fatal(err)
	}
}

// meshTo connects the fake peer's mesh client to relayURL, as derpmesh
// does: with the peer relay's own private key and the mesh key.
func (p *fakePeer) meshTo(t *testing.T, relayURL string) {
	t.Helper()
	c, err := derphttp.NewClient(p.srv.PrivateKey(), relayURL+"/derp", logger.Discard, netmon.NewStatic())
	if err != nil {
		t.Fatal(err)
	}
	c.MeshKey = p.srv.MeshKey()
	c.WatchConnectionChanges = true
	if err := c.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	go func() { // drain the peer updates
		for {
			if _, err := c.Recv(); err != nil {
				return
			}
		}
	}()
}

// A joining replica is ready only once every live regional peer holds a
// mesh link to it too, not only it to them: before that, packets from the
// peer's clients to this replica's clients would be dropped. While it
// waits, the log names the peer.
func TestReadyOnlyOnceEveryPeerMeshesBack(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	db := connectDB(t, pg)
	peer := startFakePeer(t, db, 999, "dev")
	core, logs := observer.New(zapcore.InfoLevel)
	s := startServer(t, pg, zap.New(core), coderd.Config{ReplicaHeartbeatInterval: time.Second})
	s.started(t)
	// Our link to the peer comes up quickly; the peer's to us never does.
	if !wait.Until(30*time.Second, func() bool { return logs.FilterMessageSnippet("meshed with peer").Len() > 0 }) {
		t.Fatal("never meshed with the fake peer")
	}
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		if status(s.url+"/readyz") == http.StatusOK {
			t.Fatal("ready while a live peer holds no mesh link to this replica")
		}
		time.Sleep(100 * time.Millisecond)
	}
	waiting := logs.FilterMessageSnippet("not ready yet").All()
	if len(waiting) == 0 || !strings.Contains(fmt.Sprint(waiting[len(waiting)-1].ContextMap()["waiting_for_links_from"]), peer.url) {
		t.Errorf("the log does not name the peer readiness waits for: %v", waiting)
	}
	peer.meshTo(t, s.url)
	if !wait.Until(15*time.Second, func() bool { return status(s.url+"/readyz") == http.StatusOK }) {
		t.Fatal("not ready after the peer meshed back")
	}
}

// While more than one version is live, the replicas section of the health
// report names each version and its replicas, and coderd_replica_versions
// counts them; both clear when the last replica of the other version
// leaves. coderd_build_info names this replica's version.
func TestMixedVersionsAreWarnedAboutAndCounted(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	db := connectDB(t, pg)
	token, err := db.CreateAPIKey(context.Background(), "test")
	if err != nil {
		t.Fatal(err)
	}
	// Another region: not meshed with, still a live replica of the cluster.
	old := startFakePeer(t, db, 1000, "v-old")
	s := startServer(t, pg, zaptest.NewLogger(t), coderd.Config{Version: "v-new", ReplicaHeartbeatInterval: time.Second})
	srv := s.started(t)
	warning := func() string {
		var h coderd.HealthReport
		getJSON(t, s.url+"/api/v2/debug/health", token, &h)
		for _, w := range h.Replicas.Warnings {
			if strings.Contains(w, "versions are live") {
				return w
			}
		}
		return ""
	}
	var w string
	if !wait.Until(15*time.Second, func() bool { w = warning(); return w != "" }) {
		t.Fatal("no replicas warning while v-old and v-new are live")
	}
	for _, want := range []string{`v-old on "fake-peer" (` + old.url + `)`, `v-new on`, s.url} {
		if !strings.Contains(w, want) {
			t.Errorf("warning %q does not name %q", w, want)
		}
	}
	if got := gauges(t, srv.Registry(), "coderd_replica_versions", "version"); got["v-old"] != 1 || got["v-new"] != 1 {
		t.Errorf("coderd_replica_versions = %v, want v-old 1 and v-new 1", got)
	}
	if got := gauges(t, srv.Registry(), "coderd_build_info", "version"); len(got) != 1 || got["v-new"] != 1 {
		t.Errorf("coderd_build_info = %v, want v-new 1", got)
	}

	old.leave(t, db)
	if !wait.Until(15*time.Second, func() bool { return warning() == "" }) {
		t.Fatalf("the warning did not clear after the last v-old replica left: %q", warning())
	}
	if got := gauges(t, srv.Registry(), "coderd_replica_versions", "version"); len(got) != 1 || got["v-new"] != 1 {
		t.Errorf("coderd_replica_versions after the old replica left = %v, want only v-new 1", got)
	}
}

func gauges(t *testing.T, reg *prometheus.Registry, name, label string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			value := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == label {
					value = l.GetValue()
				}
			}
			out[value] = m.GetGauge().GetValue()
		}
	}
	return out
}

// A release started on a schema newer than it knows (the next release
// migrated) runs, with a WARN line and a database health warning naming
// the schema it found (and the release that brought it) and the newest it
// knows.
func TestNewerSchemaRunsWithAWarning(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	db := connectDB(t, pg)
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, `INSERT INTO goose_db_version (version_id, is_applied) VALUES (90001, true);
INSERT INTO releases (version, schema_version) VALUES ('v-next', 90001)`); err != nil {
		t.Fatal(err)
	}
	token, err := db.CreateAPIKey(ctx, "test")
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.InfoLevel)
	s := startServer(t, pg, zap.New(core), coderd.Config{Version: "v-n"})
	s.started(t)
	warned := logs.FilterMessageSnippet("database schema is newer than this release knows").FilterLevelExact(zapcore.WarnLevel).All()
	if len(warned) != 1 {
		t.Fatalf("%d WARN lines about the newer schema, want 1", len(warned))
	}
	fields := warned[0].ContextMap()
	if fields["schema_found"] != int64(90001) || fields["schema_found_release"] != "v-next" || fields["schema_known"] != int64(2) {
		t.Errorf("WARN fields %v do not name both versions", fields)
	}
	var h coderd.HealthReport
	getJSON(t, s.url+"/api/v2/debug/health", token, &h)
	w := strings.Join(h.Database.Warnings, "\n")
	for _, want := range []string{"version 90001", "v-next", "(v-n)", "(version 2)"} {
		if !strings.Contains(w, want) {
			t.Errorf("database warnings %q do not name %q", w, want)
		}
	}
}

// After a finalize raised the schema floor, a release that does not know
// it refuses to start, with one line naming the oldest release that may,
// before writing anything (no replica row, no release record).
func TestReleaseOlderThanTheSchemaFloorRefusesBeforeWriting(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	db := connectDB(t, pg)
	ctx := context.Background()
	if _, err := db.Pool().Exec(ctx, `INSERT INTO site_configs (key, value) VALUES ('min_schema_version', '90002'), ('min_release', 'v-next')`); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, pg, zaptest.NewLogger(t), coderd.Config{Version: "v-n"})
	<-s.done
	var tooOld *database.TooOldError
	if !errors.As(s.err, &tooOld) {
		t.Fatalf("New: %v, want a refusal", s.err)
	}
	if msg := s.err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "v-next") || !strings.Contains(msg, "v-n") {
		t.Errorf("refusal %q is not one line naming this release and the oldest that may run", msg)
	}
	var rows, releases int
	if err := db.Pool().QueryRow(ctx, `SELECT (SELECT count(*) FROM replicas), (SELECT count(*) FROM releases)`).Scan(&rows, &releases); err != nil {
		t.Fatal(err)
	}
	if rows != 0 || releases != 0 {
		t.Errorf("a refused start wrote %d replica rows and %d release records", rows, releases)
	}
}
