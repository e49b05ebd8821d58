//go:build ha

package hatest_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

type node struct {
	*clitest.Process
	id string
}

func start(t *testing.T, name, pg string, env ...string) *node {
	t.Helper()
	return &node{Process: clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, Env: env})}
}

func startProxied(t *testing.T, name, pg string, env ...string) (*node, *faultproxy.Proxy) {
	t.Helper()
	port := clitest.FreePort(t)
	proxy, err := faultproxy.New(fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, Port: port, RelayURL: proxy.URL(), Env: env})
	return &node{Process: p}, proxy
}

func ready(t *testing.T, nodes ...*node) {
	t.Helper()
	for _, n := range nodes {
		n.WaitReady(120 * time.Second)
		var info coderd.BuildInfo
		if n.GetJSON("/api/v2/buildinfo", "", &info) != http.StatusOK {
			t.Fatalf("%s: buildinfo failed", n.Name)
		}
		n.id = info.ReplicaID.String()
	}
}

func client(t *testing.T, n *node) *derptest.Client {
	t.Helper()
	return derptest.MustConnect(t, n.URL)
}

func replicas(n *node, token string) []coderd.Replica {
	var out []coderd.Replica
	if n.GetJSON("/api/v2/replicas", token, &out) != http.StatusOK {
		return nil
	}
	return out
}

func lists(n *node, token, id string) bool {
	for _, r := range replicas(n, token) {
		if r.ID.String() == id {
			return true
		}
	}
	return false
}

// reportsUnreachable: n's own measurement of the peer shows an error.
func reportsUnreachable(n *node, token, peerID string) bool {
	for _, r := range replicas(n, token) {
		if r.ID.String() != n.id {
			continue
		}
		for _, p := range r.Peers {
			if p.ID.String() == peerID && p.Error != "" {
				return true
			}
		}
	}
	return false
}

func health(n *node, token string) coderd.HealthReport {
	var h coderd.HealthReport
	n.GetJSON("/api/v2/debug/health", token, &h)
	return h
}

func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	if !clitest.Eventually(d, cond) {
		t.Fatalf("not within %s: %s", d, what)
	}
	took := time.Since(start)
	t.Logf("%s: %s", what, took.Round(time.Millisecond))
	return took
}

// kill -9 of a replica while clients on two others exchange windowed
// traffic: nothing is lost between the survivors, and they report the dead
// replica unreachable within a second (its port refuses connections).
func TestKilledReplicaLosesNoPacketsBetweenSurvivors(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	r1, r2, r3 := start(t, "r1", pg), start(t, "r2", pg), start(t, "r3", pg)
	ready(t, r1, r2, r3)
	a, c := client(t, r1), client(t, r3)
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("not meshed")
	}
	var lost int
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		lost = derptest.Exchange(a, c, 4000, 1024, 16, 2*time.Second)
	}()
	time.Sleep(200 * time.Millisecond) // traffic is flowing when the kill lands
	r2.Kill()
	within(t, 2*time.Second, "both survivors report the killed replica unreachable", func() bool {
		return reportsUnreachable(r1, token, r2.id) && reportsUnreachable(r3, token, r2.id)
	})
	wg.Wait()
	if lost != 0 {
		t.Fatalf("survivors lost %d of 4000 packets while a third replica was killed", lost)
	}
}

// A replica that hangs (SIGSTOP) refuses nothing: it is dropped after 3
// heartbeats, and comes back when it resumes.
func TestHungReplicaIsDroppedAfterThreeBeatsAndRejoins(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=1s"}
	r1, r2, r3 := start(t, "r1", pg, beat...), start(t, "r2", pg, beat...), start(t, "r3", pg, beat...)
	ready(t, r1, r2, r3)
	r2.Signal(syscall.SIGSTOP)
	t.Cleanup(func() { r2.Signal(syscall.SIGCONT) })
	took := within(t, 8*time.Second, "survivors drop the hung replica", func() bool {
		return !lists(r1, token, r2.id) && !lists(r3, token, r2.id)
	})
	if took < 1500*time.Millisecond {
		t.Fatalf("dropped after %s: a replica must survive at least 2 missed beats", took)
	}
	a, c := client(t, r1), client(t, r3)
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("survivors do not forward after dropping the hung replica")
	}
	r2.Signal(syscall.SIGCONT)
	within(t, 5*time.Second, "the resumed replica is listed again", func() bool {
		return lists(r1, token, r2.id) && lists(r3, token, r2.id)
	})
}

// Postgres stopped for 60 s: no replica exits, the mesh forwards, /readyz
// stays 200; after Postgres returns the replicas are back in sync quickly.
func TestPostgresOutageOfSixtySecondsIsRiddenOut(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	pg := cluster.URL()
	token := clitest.CreateToken(t, pg)
	r1, r2, r3 := start(t, "r1", pg), start(t, "r2", pg), start(t, "r3", pg)
	ready(t, r1, r2, r3)
	a, c := client(t, r1), client(t, r3)
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("not meshed")
	}
	// Let the token be checked once, so it is cached through the outage.
	for _, n := range []*node{r1, r2, r3} {
		if len(replicas(n, token)) != 3 {
			t.Fatalf("%s does not list 3 replicas before the outage", n.Name)
		}
	}
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	outage := time.Now()
	for time.Since(outage) < 60*time.Second {
		for _, n := range []*node{r1, r2, r3} {
			if n.Exited() {
				t.Fatalf("%s exited during the outage:\n%s", n.Name, n.Output())
			}
			if code := n.Status("/readyz"); code != http.StatusOK {
				t.Fatalf("%s /readyz = %d during the outage (at %s)", n.Name, code, time.Since(outage).Round(time.Second))
			}
		}
		if lost := derptest.Exchange(a, c, 200, 1024, 16, 2*time.Second); lost != 0 {
			t.Fatalf("the mesh lost %d of 200 packets during the outage (at %s)", lost, time.Since(outage).Round(time.Second))
		}
		time.Sleep(2 * time.Second)
	}
	if h := health(r2, token); h.Database.Healthy {
		t.Fatal("health does not report the database outage")
	}
	if err := cluster.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	within(t, 10*time.Second, "all replicas back in sync after Postgres returned", func() bool {
		for _, n := range []*node{r1, r2, r3} {
			h := health(n, token)
			if !h.Database.Healthy || len(replicas(n, token)) != 3 {
				return false
			}
		}
		return true
	})
	if lost := derptest.Exchange(a, c, 500, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("lost %d packets after the outage", lost)
	}
}

// Eight replicas started at the same instant on an empty database: all
// become ready, migrations run once, one mesh key, a full mesh.
func TestEightReplicasStartedAtOnceOnAnEmptyDatabase(t *testing.T) {
	pg := dbtest.NewEmptyURL(t)
	nodes := make([]*node, 8)
	for i := range nodes {
		nodes[i] = start(t, fmt.Sprintf("r%d", i+1), pg)
	}
	ready(t, nodes...)
	token := clitest.CreateToken(t, pg)
	conn, err := pgx.Connect(context.Background(), pg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var keys, applied int
	if err := conn.QueryRow(context.Background(), "SELECT count(*) FROM site_configs WHERE key = 'derp_mesh_key'").Scan(&keys); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(context.Background(), "SELECT count(*) - count(DISTINCT version_id) FROM goose_db_version").Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if keys != 1 || applied != 0 {
		t.Fatalf("mesh keys: %d (want 1); duplicate migrations: %d (want 0)", keys, applied)
	}
	within(t, 20*time.Second, "every replica meshed with 7 peers and healthy", func() bool {
		for _, n := range nodes {
			h := health(n, token)
			if !h.DERPMesh.Healthy || len(replicas(n, token)) != 8 {
				return false
			}
		}
		return true
	})
	a, b := client(t, nodes[0]), client(t, nodes[7])
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("clients on replicas 1 and 8 cannot reach each other")
	}
}

// A partition that cuts two replicas' relays: both report the other
// unreachable, clients of the other replicas are unaffected, and the mesh
// heals when the cut ends.
func TestPartitionedReplicasReportEachOtherAndHeal(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=1s"
	a, pa := startProxied(t, "a", pg, beat)
	b, pb := startProxied(t, "b", pg, beat)
	c, d := start(t, "c", pg, beat), start(t, "d", pg, beat)
	ready(t, a, b, c, d)
	ca, cb, cc, cd := client(t, a), client(t, b), client(t, c), client(t, d)
	if !derptest.Reachable(ca, cb, 5*time.Second) || !derptest.Reachable(cc, cd, 5*time.Second) {
		t.Fatal("not meshed")
	}

	pa.Cut()
	pb.Cut()
	within(t, 5*time.Second, "a and b report each other unreachable", func() bool {
		return reportsUnreachable(a, token, b.id) && reportsUnreachable(b, token, a.id)
	})
	if h := health(a, token); h.Healthy || !strings.Contains(strings.Join(h.Replicas.Warnings, "\n"), pb.URL()) {
		t.Fatalf("a's health does not name b's relay URL: %+v", h)
	}
	if lost := derptest.Exchange(cc, cd, 1000, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("clients of unaffected replicas lost %d packets during the partition", lost)
	}

	pa.Heal()
	pb.Heal()
	within(t, 10*time.Second, "the mesh heals", func() bool {
		return health(a, token).Healthy && health(b, token).Healthy
	})
	if !derptest.Reachable(ca, cb, 5*time.Second) || !derptest.Reachable(cb, ca, 5*time.Second) {
		t.Fatal("clients of a and b cannot reach each other after the partition healed")
	}
}

// Latency injected in front of a replica's relay raises the warning on its
// peers (log line naming hostname, relay URL and latency; health); removing
// it clears the warning.
func TestInjectedLatencyRaisesAndClearsTheWarning(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	env := []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=500ms", "CODER_REPLICA_LATENCY_THRESHOLD=50ms"}
	watcher := start(t, "watcher", pg, env...)
	slow, proxy := startProxied(t, "slow", pg, env...)
	ready(t, watcher, slow)
	proxy.SetDelay(40 * time.Millisecond) // 80ms round trip > 50ms
	within(t, 10*time.Second, "the watcher warns about the slow replica", func() bool {
		return strings.Contains(strings.Join(health(watcher, token).Replicas.Warnings, "\n"), proxy.URL())
	})
	out := watcher.Output()
	if !strings.Contains(out, "peer replica latency above threshold") || !strings.Contains(out, proxy.URL()) {
		t.Fatalf("no WARN line naming the relay URL:\n%s", out)
	}
	proxy.SetDelay(0)
	within(t, 10*time.Second, "the warning clears", func() bool {
		return len(health(watcher, token).Replicas.Warnings) == 0
	})
	if !strings.Contains(watcher.Output(), "peer replica latency back under threshold") {
		t.Fatal("no INFO line on recovery")
	}
}

// A replica whose row is deleted by hand, and replicas whose clocks are an
// hour off either way, all stay members.
func TestDeletedRowAndSkewedClocksStayMembers(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=500ms"
	r1 := start(t, "r1", pg, beat)
	behind := start(t, "behind", pg, beat, "CODER_DEBUG_CLOCK_OFFSET=-1h")
	ahead := start(t, "ahead", pg, beat, "CODER_DEBUG_CLOCK_OFFSET=1h")
	ready(t, r1, behind, ahead)
	conn, err := pgx.Connect(context.Background(), pg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), "DELETE FROM replicas WHERE id = $1", r1.id); err != nil {
		t.Fatal(err)
	}
	within(t, 3*time.Second, "the deleted row is back", func() bool {
		var n int
		_ = conn.QueryRow(context.Background(), "SELECT count(*) FROM replicas WHERE id = $1", r1.id).Scan(&n)
		return n == 1
	})
	time.Sleep(5 * time.Second) // ten beats: long past a stale window
	for _, n := range []*node{r1, behind, ahead} {
		if got := len(replicas(n, token)); got != 3 {
			t.Fatalf("%s lists %d replicas, want 3", n.Name, got)
		}
	}
}
