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

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/upgradetest"
)

// The releases of the upgrade tests: the previous one (built from git),
// this one (the working tree) and the next one (the working tree plus the
// test-only expand migrations and contract step of
// migrations/testrelease, which never ship).
var (
	previousRelease = clitest.Release{Commit: clitest.PreviousRelease, Version: "v-old"}
	thisRelease     = clitest.Release{Version: "v-n"}
	nextRelease     = clitest.Release{Version: "v-next", Tags: []string{"upgradetest"}}
)

// Three replicas of the previous release (41c5966) behind HAProxy, under
// HTTP load and with DERP packets flowing between clients on different
// replicas, are rolled one at a time to the next release, as Kubernetes
// does with maxSurge 1 and maxUnavailable 0. While the first new replica
// starts, a reader holds a lock on replicas for 12 s, so the new release's
// migration (which alters replicas) must wait. Nothing a user would notice
// happens: no failed request, no lost packet between clients whose
// replicas stay up, no heartbeat failure on the old replicas; the new
// replica answers /healthz while it waits and is ready soon after the
// lock goes; the mixed versions show as a health warning and a metric
// while they last; every migration is applied once.
func TestRollingUpgradeFromThePreviousReleaseUnderLoad(t *testing.T) {
	const hold = 12 * time.Second
	res := upgradetest.Roll(t, upgradetest.Options{From: previousRelease, To: nextRelease, HoldLock: hold})
	t.Logf("roll of 3 replicas: %s; %d requests, %d failed; %d packets, %d lost; longest heartbeat during the migration %s; ready %s after the lock went",
		res.RollTime.Round(time.Millisecond), res.Requests, res.FailedRequests, res.Packets, res.Lost,
		res.LongestHeartbeat.Round(time.Millisecond), res.ReadyAfterLockRelease.Round(time.Millisecond))
	if res.FailedRequests != 0 {
		t.Errorf("%d of %d requests through the load balancer failed: %v", res.FailedRequests, res.Requests, res.Failures)
	}
	if res.Packets == 0 || res.Lost != 0 {
		t.Errorf("%d of %d packets between clients of replicas that stayed up were lost", res.Lost, res.Packets)
	}
	if len(res.NotReachable) != 0 {
		t.Errorf("clients on the other replicas could not reach a client of %v once it was ready", res.NotReachable)
	}
	if res.HeartbeatFailures != 0 {
		t.Errorf("the old replicas counted %v heartbeat failures while the new release migrated", res.HeartbeatFailures)
	}
	if res.LongestHeartbeat > 3*time.Second {
		t.Errorf("a heartbeat waited %s behind the migration (the reader held its lock %s)", res.LongestHeartbeat, hold)
	}
	if res.HealthzWhileLocked == 0 || res.HealthzFailed != 0 {
		t.Errorf("/healthz of the migrating replica: %d answers 200 while it waited for the lock, %d failures; want 200 throughout (a startup probe would restart it)", res.HealthzWhileLocked, res.HealthzFailed)
	}
	if res.ReadyDuringLock {
		t.Error("the new replica was ready while its migration could not have run")
	}
	if res.ReadyAfterLockRelease == 0 || res.ReadyAfterLockRelease > 30*time.Second {
		t.Errorf("the new replica became ready %s after the lock went", res.ReadyAfterLockRelease)
	}
	if !strings.Contains(res.MixedWarning, "v-old") || !strings.Contains(res.MixedWarning, "v-next") {
		t.Errorf("no replicas warning naming both versions while mixed; got %q", res.MixedWarning)
	}
	if res.VersionsMetric["v-old"] != 3 || res.VersionsMetric["v-next"] != 1 {
		t.Errorf("coderd_replica_versions while mixed = %v, want v-old 3 and v-next 1", res.VersionsMetric)
	}
	if !res.WarningCleared {
		t.Error("the mixed-version warning did not clear once the last old replica left")
	}
	for _, v := range []int64{1, 2, 90001, 90002} {
		if res.AppliedCounts[v] != 1 {
			t.Errorf("migration %d recorded %d times, want once (all: %v)", v, res.AppliedCounts[v], res.AppliedCounts)
		}
	}
}

// Replicas of the previous release and of the next one started at the
// same moment on an empty database all come up, and every migration is
// applied once: the old one's session lock and the new one's transaction
// lock are the same advisory lock.
func TestPreviousAndNextReleaseStartingTogetherMigrateOnce(t *testing.T) {
	oldBin := clitest.BuildRelease(t, previousRelease)
	nextBin := clitest.BuildRelease(t, nextRelease)
	pg := dbtest.NewEmptyURL(t)
	var nodes []*clitest.Process
	for i := 0; i < 2; i++ {
		for _, bin := range []string{oldBin, nextBin} {
			nodes = append(nodes, clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("r%d", len(nodes)+1), PostgresURL: pg, Binary: bin}))
		}
	}
	for _, n := range nodes {
		n.WaitReady(2 * time.Minute)
	}
	ctx := context.Background()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, `SELECT version_id, count(*) FROM goose_db_version WHERE is_applied GROUP BY version_id ORDER BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for rows.Next() {
		var v int64
		var n int
		if err := rows.Scan(&v, &n); err != nil {
			t.Fatal(err)
		}
		seen++
		if n != 1 {
			t.Errorf("migration %d recorded %d times, want once", v, n)
		}
	}
	if seen != 5 { // 0 (goose's), 1, 2, 90001, 90002
		t.Errorf("%d versions recorded, want 5", seen)
	}
}

// One release of skew, both ways, with real processes: release N keeps
// running (and starts) on N+1's expanded schema, saying so in a WARN line
// and a database health warning naming both schema versions; N+1's
// finalize is refused while N replicas are live, naming them; once they
// are gone it runs, and N then refuses to start with one line naming the
// oldest release that may.
func TestOneReleaseOfSkewAndFinalize(t *testing.T) {
	nBin := clitest.BuildRelease(t, thisRelease)
	nextBin := clitest.BuildRelease(t, nextRelease)
	pg := dbtest.NewEmptyURL(t)
	token := clitest.CreateTokenWith(t, nBin, pg)
	startN := func(name string) *clitest.Process {
		return clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, Binary: nBin,
			Env: []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=1s"}})
	}
	r1 := startN("n-1")
	r1.WaitReady(2 * time.Minute)
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "next-1", PostgresURL: pg, Binary: nextBin,
		Env: []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=1s"}})
	r2.WaitReady(2 * time.Minute)

	// An N replica started on N+1's schema runs, and says so at once.
	r3 := startN("n-2")
	r3.WaitReady(2 * time.Minute)
	if out := r3.Output(); !strings.Contains(out, "database schema is newer than this release knows") || !strings.Contains(out, `"schema_found": 90002`) {
		t.Errorf("no WARN line naming the newer schema in the output of N started on N+1's schema:\n%s", out)
	}
	skewed := func(n *clitest.Process) bool {
		var h struct {
			Database struct{ Warnings []string } `json:"database"`
		}
		n.GetJSON("/api/v2/debug/health", token, &h)
		w := strings.Join(h.Database.Warnings, "\n")
		return strings.Contains(w, "version 90002") && strings.Contains(w, "v-next") && strings.Contains(w, "(v-n)") && strings.Contains(w, "version 2)")
	}
	if !skewed(r3) {
		t.Error("N on N+1's schema has no database health warning naming both schema versions and releases")
	}
	// The N replica that ran before N+1 migrated notices too.
	if !clitest.Eventually(45*time.Second, func() bool { return skewed(r1) }) {
		t.Error("an N replica running while N+1 migrated never warned about the newer schema")
	}

	migrate := func(bin string, args ...string) (int, string) {
		p := clitest.StartBinary(t, bin, "migrate", []string{"CODER_PG_CONNECTION_URL=" + pg}, append([]string{"server", "migrate"}, args...)...)
		code := p.Wait(2 * time.Minute)
		return code, p.Output()
	}
	code, out := migrate(nextBin, "--finalize")
	if code == 0 {
		t.Fatalf("finalize ran while N replicas are live:\n%s", out)
	}
	for _, want := range []string{"refusing to finalize", r1.URL, r3.URL, "v-n", "v-next"} {
		if !strings.Contains(out, want) {
			t.Errorf("the refused finalize does not name %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, r2.URL) {
		t.Errorf("the refused finalize names the N+1 replica:\n%s", out)
	}

	var wg sync.WaitGroup
	for _, n := range []*clitest.Process{r1, r3} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n.Signal(syscall.SIGTERM)
			n.Wait(time.Minute)
		}()
	}
	wg.Wait()
	code, out = migrate(nextBin, "--finalize")
	if code != 0 || !strings.Contains(out, "finalized: applied 90002_drop_widget_legacy.sql") {
		t.Fatalf("finalize once the N replicas left: exit %d\n%s", code, out)
	}

	r4 := startN("n-3")
	if code := r4.Wait(time.Minute); code == 0 || code == -1 {
		t.Fatalf("N started after the finalize: exit %d\n%s", code, r4.Output())
	}
	last := lastLine(r4.Output())
	if !strings.HasPrefix(last, "error: this release (v-n) is too old") || !strings.Contains(last, "the oldest release that may run is v-next") {
		t.Errorf("N after the finalize does not end with one clear line; last line %q", last)
	}
	if strings.Contains(r4.Output(), "server started") {
		t.Error("N registered before refusing")
	}
	if code, out := migrate(nBin); code == 0 || !strings.Contains(out, "too old") {
		t.Errorf("`coder server migrate` of N after the finalize: exit %d\n%s", code, out)
	}
	if r2.Status("/readyz") != http.StatusOK {
		t.Error("the N+1 replica is not ready after the finalize")
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
