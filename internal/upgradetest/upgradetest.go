// Package upgradetest rolls a cluster of real coder processes from one
// release to the next the way a Kubernetes Deployment does (maxSurge 1,
// maxUnavailable 0: start a new replica, wait until it is ready, SIGTERM an
// old one with a grace period) behind a real HAProxy, under steady HTTP
// load and paced DERP flows between clients on different replicas, and
// measures what users and operators would notice. The ha suite asserts on
// the result; make bench reports its numbers. It only talks to loopback.
package upgradetest

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// Options describes one rolling upgrade.
type Options struct {
	// From is the release the cluster runs first, To the one it is rolled
	// to.
	From, To clitest.Release
	// Replicas is the cluster's size. Default 3.
	Replicas int
	// Grace is every replica's --shutdown-grace-period: longer than
	// HAProxy's detection (inter 250ms × fall 2, plus an interval).
	// Default 2s.
	Grace time.Duration
	// HoldLock: while the first new replica starts (and migrates), a
	// reader holds ACCESS SHARE on replicas this long, as a long report
	// or pg_dump would. 0: no reader.
	HoldLock time.Duration
}

func (o Options) withDefaults() Options {
	if o.Replicas <= 0 {
		o.Replicas = 3
	}
	if o.Grace <= 0 {
		o.Grace = 2 * time.Second
	}
	return o
}

// Result is what the upgrade looked like from outside.
type Result struct {
	// RollTime is from starting the first new replica to the exit of the
	// last old one.
	RollTime time.Duration
	// Requests went through HAProxy during the roll; FailedRequests did
	// not answer 200 (Failures says how, at most 20).
	Requests, FailedRequests int64
	Failures                 []string
	// Packets were sent between DERP clients on different replicas, each
	// flow only while both replicas were up; Lost never arrived.
	Packets, Lost int
	// NotReachable lists new replicas whose client a client on another
	// replica could not reach within 5 s of the new replica being ready.
	NotReachable []string
	// LongestHeartbeat is the longest heartbeat-shaped write (an UPDATE
	// on replicas, every 50 ms) while the first new replica migrated: what
	// a running replica's heartbeat waited behind the migration.
	LongestHeartbeat time.Duration
	// HeartbeatFailures is the increase of the old replicas'
	// coderd_replica_heartbeat_failures_total during the roll.
	HeartbeatFailures float64
	// HealthzWhileLocked counts the first new replica's /healthz answers
	// of 200 while the reader held its lock (it was waiting to migrate);
	// HealthzFailed its other answers before it was ready, once it had
	// answered one.
	HealthzWhileLocked, HealthzFailed int
	// ReadyDuringLock: the first new replica answered /readyz 200 while
	// the reader held its lock (it cannot have migrated).
	ReadyDuringLock bool
	// ReadyAfterLockRelease is from the reader's COMMIT to the first new
	// replica's /readyz 200.
	ReadyAfterLockRelease time.Duration
	// MixedWarning is the replicas health warning the first new replica
	// showed while both versions were live; VersionsMetric its
	// coderd_replica_versions then.
	MixedWarning   string
	VersionsMetric map[string]float64
	// WarningCleared: no replica showed a mixed-version warning once the
	// last old replica had left.
	WarningCleared bool
	// AppliedCounts is how often goose_db_version records each version.
	AppliedCounts map[int64]int
}

// replica is one process of the roll.
type replica struct {
	*clitest.Process
	name    string
	metrics string // its /metrics URL
	client  *derptest.Client
}

// Roll runs the upgrade described by o. It fails the test only when the
// scenario itself cannot run (a build, a start); everything a user would
// notice is in the Result for the caller to judge.
func Roll(t testing.TB, o Options) Result {
	o = o.withDefaults()
	fromBin := clitest.BuildRelease(t, o.From)
	toBin := clitest.BuildRelease(t, o.To)
	haproxy := clitest.NeedHAProxy(t)
	pg := dbtest.NewEmptyURL(t)
	token := clitest.CreateTokenWith(t, fromBin, pg) // migrates to From's schema
	res := Result{VersionsMetric: map[string]float64{}}

	start := func(bin, name string, port int) *replica {
		prom := clitest.FreePort(t)
		p := clitest.StartReplica(t, clitest.ReplicaOptions{
			Name: name, PostgresURL: pg, Port: port, Binary: bin,
			Env: []string{
				"CODER_SHUTDOWN_GRACE_PERIOD=" + o.Grace.String(),
				"CODER_PROMETHEUS_ENABLE=true",
				"CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(prom),
			},
		})
		return &replica{Process: p, name: name, metrics: fmt.Sprintf("http://127.0.0.1:%d/metrics", prom)}
	}
	oldPorts, newPorts := make([]int, o.Replicas), make([]int, o.Replicas)
	for i := range oldPorts {
		oldPorts[i], newPorts[i] = clitest.FreePort(t), clitest.FreePort(t)
	}
	olds := make([]*replica, o.Replicas)
	for i := range olds {
		olds[i] = start(fromBin, fmt.Sprintf("old-%d", i+1), oldPorts[i])
	}
	for _, r := range olds {
		r.WaitReady(2 * time.Minute)
	}

	lbURL := startLoadBalancer(t, haproxy, oldPorts, newPorts)
	load := startLoad(lbURL)
	defer load.stop()

	for _, r := range olds {
		r.client = derptest.MustConnect(t, r.URL)
	}
	fl := &flows{}
	defer fl.stopAll()
	stable := func() []*derptest.Client {
		var out []*derptest.Client
		for _, r := range olds {
			if r != nil && r.client != nil {
				out = append(out, r.client)
			}
		}
		return out
	}
	fl.set(stable())

	probe := startHeartbeatProbe(t, pg)
	defer probe.stop()
	baseline := make([]float64, len(olds))
	for i, r := range olds {
		baseline[i] = scrapeSum(r.metrics, "coderd_replica_heartbeat_failures_total")
	}

	rollStart := time.Now()
	var news []*replica
	for i := 0; i < o.Replicas; i++ {
		var reader *pgx.Conn
		if i == 0 && o.HoldLock > 0 {
			reader = holdReplicasLock(t, pg)
		}
		n := start(toBin, fmt.Sprintf("new-%d", i+1), newPorts[i])
		migrateStart := time.Now()
		if i == 0 {
			watchFirstStart(t, n, reader, o.HoldLock, &res)
			res.LongestHeartbeat = probe.longest(migrateStart, time.Now())
			mixed(t, n, token, o, &res)
		} else {
			n.WaitReady(2 * time.Minute)
		}
		news = append(news, n)
		n.client = derptest.MustConnect(t, n.URL)
		for _, c := range append(stable(), clientsOf(news[:len(news)-1])...) {
			if !derptest.Reachable(c, n.client, 5*time.Second) {
				res.NotReachable = append(res.NotReachable, n.name)
				break
			}
		}
		fl.set(append(stable(), clientsOf(news)...))

		// Take old-i out: its flows end first (its clients would move
		// through the load balancer to another replica).
		old := olds[i]
		res.HeartbeatFailures += scrapeSum(old.metrics, "coderd_replica_heartbeat_failures_total") - baseline[i]
		olds[i] = nil
		fl.set(append(stable(), clientsOf(news)...))
		_ = old.client.Close()
		old.Signal(syscall.SIGTERM)
		if code := old.Wait(time.Minute); code != 0 {
			t.Fatalf("%s exited %d after SIGTERM", old.name, code)
		}
		t.Logf("%s replaced %s after %s", n.name, old.name, time.Since(rollStart).Round(time.Millisecond))
	}
	res.RollTime = time.Since(rollStart)

	res.WarningCleared = wait.Until(20*time.Second, func() bool {
		for _, n := range news {
			if strings.Contains(strings.Join(health(n, token).Replicas.Warnings, "\n"), "versions are live") {
				return false
			}
		}
		return true
	})
	fl.stopAll()
	res.Packets, res.Lost = fl.sent, fl.lost
	load.stop()
	res.Requests, res.FailedRequests, res.Failures = load.sent.Load(), load.failed.Load(), load.failures()
	res.AppliedCounts = appliedCounts(t, pg)
	for _, n := range news {
		n.Signal(syscall.SIGTERM)
	}
	for _, n := range news {
		n.Wait(time.Minute)
	}
	return res
}

func clientsOf(rs []*replica) []*derptest.Client {
	out := make([]*derptest.Client, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.client)
	}
	return out
}

// watchFirstStart polls the first new replica while it starts: /healthz
// once it listens, /readyz while the reader holds its lock, and the time
// from the reader's COMMIT to ready.
func watchFirstStart(t testing.TB, n *replica, reader *pgx.Conn, hold time.Duration, res *Result) {
	began := time.Now()
	listening := false
	var released time.Time
	deadline := time.Now().Add(3*time.Minute + hold)
	for time.Now().Before(deadline) {
		if n.Exited() {
			t.Fatalf("%s exited while starting", n.name)
		}
		if reader != nil && time.Since(began) >= hold {
			if _, err := reader.Exec(context.Background(), "COMMIT"); err != nil {
				t.Fatalf("release the reader's lock: %v", err)
			}
			_ = reader.Close(context.Background())
			reader = nil
			released = time.Now()
		}
		ready := n.Status("/readyz") == http.StatusOK
		if ready && reader != nil {
			res.ReadyDuringLock = true
		}
		if ready && reader == nil {
			if !released.IsZero() {
				res.ReadyAfterLockRelease = time.Since(released)
			}
			return
		}
		switch code := n.Status("/healthz"); {
		case code == http.StatusOK:
			listening = true
			if reader != nil {
				res.HealthzWhileLocked++
			}
		case listening:
			res.HealthzFailed++
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s did not become ready", n.name)
}

// mixed records, on the first new replica, the health warning and the
// versions metric while the old version is live too.
func mixed(t testing.TB, n *replica, token string, o Options, res *Result) {
	wait.Until(20*time.Second, func() bool {
		for _, w := range health(n, token).Replicas.Warnings {
			if strings.Contains(w, o.From.Version) && strings.Contains(w, o.To.Version) {
				res.MixedWarning = w
			}
		}
		res.VersionsMetric = scrapeLabels(n.metrics, "coderd_replica_versions", "version")
		return res.MixedWarning != "" && res.VersionsMetric[o.From.Version] > 0 && res.VersionsMetric[o.To.Version] > 0
	})
}

func health(n *replica, token string) coderd.HealthReport {
	var h coderd.HealthReport
	n.GetJSON("/api/v2/debug/health", token, &h)
	return h
}

// holdReplicasLock opens a transaction that holds ACCESS SHARE on
// replicas (what a long SELECT or pg_dump holds) until the caller commits.
func holdReplicasLock(t testing.TB, pg string) *pgx.Conn {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Exec(ctx, "BEGIN; LOCK TABLE replicas IN ACCESS SHARE MODE"); err != nil {
		t.Fatal(err)
	}
	return c
}
