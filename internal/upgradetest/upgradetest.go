// Package upgradetest rolls a cluster of real coder processes from one
// release to the next the way a Kubernetes Deployment does (maxSurge 1,
// maxUnavailable 0: start a new replica, wait until it is ready, SIGTERM an
// old one with a grace period) behind a real HAProxy, under steady HTTP
// load and paced DERP flows between clients on different replicas, and
// measures what users and operators would notice. The ha suite asserts on
// the result; make bench reports its numbers. It only talks to loopback.
package upgradetest

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
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

// heartbeatProbe writes to replicas as a heartbeat does (an UPDATE takes
// the same lock), every 50 ms, on a stopped row no replica counts, and
// keeps how long each write took.
type heartbeatProbe struct {
	mu      sync.Mutex
	samples []sample
	done    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

type sample struct {
	at   time.Time
	took time.Duration
}

func startHeartbeatProbe(t testing.TB, pg string) *heartbeatProbe {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	if _, err := c.Exec(ctx, `INSERT INTO replicas (id, hostname, region_id, stopped_at, updated_at)
VALUES ($1, 'heartbeat-probe', 0, now() - interval '1 hour', now() - interval '1 hour')`, id); err != nil {
		t.Fatal(err)
	}
	p := &heartbeatProbe{done: make(chan struct{}), stopped: make(chan struct{})}
	go func() {
		defer close(p.stopped)
		defer c.Close(context.Background())
		for {
			select {
			case <-p.done:
				return
			case <-time.After(50 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			began := time.Now()
			_, err := c.Exec(ctx, `UPDATE replicas SET error = '' WHERE id = $1`, id)
			took := time.Since(began)
			cancel()
			if err != nil {
				took = 30 * time.Second
			}
			p.mu.Lock()
			p.samples = append(p.samples, sample{at: began, took: took})
			p.mu.Unlock()
		}
	}()
	return p
}

// longest is the longest write that started between from and to.
func (p *heartbeatProbe) longest(from, to time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	var d time.Duration
	for _, s := range p.samples {
		if !s.at.Before(from) && !s.at.After(to) {
			d = max(d, s.took)
		}
	}
	return d
}

func (p *heartbeatProbe) stop() {
	p.once.Do(func() { close(p.done) })
	<-p.stopped
}

// startLoadBalancer runs HAProxy in front of every old and new port (the
// new ones are down until their replicas start and pass /readyz) and
// waits until it routes to the old ones and holds the new ones down.
func startLoadBalancer(t testing.TB, haproxy string, oldPorts, newPorts []int) string {
	var servers strings.Builder
	for i, p := range oldPorts {
		fmt.Fprintf(&servers, "    server old-%d 127.0.0.1:%d check\n", i+1, p)
	}
	for i, p := range newPorts {
		fmt.Fprintf(&servers, "    server new-%d 127.0.0.1:%d check\n", i+1, p)
	}
	lbPort, statsPort := clitest.FreePort(t), clitest.FreePort(t)
	clitest.StartHAProxy(t, haproxy, clitest.HAProxyConfig(lbPort, statsPort, servers.String()))
	statsURL := fmt.Sprintf("http://127.0.0.1:%d/stats;csv", statsPort)
	ok := wait.Until(30*time.Second, func() bool {
		st := serverStates(statsURL)
		for i := range oldPorts {
			if !strings.HasPrefix(st[fmt.Sprintf("old-%d", i+1)], "UP") {
				return false
			}
		}
		for i := range newPorts {
			if !strings.HasPrefix(st[fmt.Sprintf("new-%d", i+1)], "DOWN") {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("haproxy did not settle: %v", serverStates(statsURL))
	}
	return "http://127.0.0.1:" + strconv.Itoa(lbPort)
}

// serverStates reads HAProxy's CSV stats: server name → status.
func serverStates(statsURL string) map[string]string {
	out := map[string]string{}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(statsURL)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	status := -1
	for sc.Scan() {
		f := strings.Split(sc.Text(), ",")
		if strings.HasPrefix(sc.Text(), "# ") {
			for i, name := range f {
				if name == "status" {
					status = i
				}
			}
			continue
		}
		if status >= 0 && len(f) > status && f[0] == "coder" {
			out[f[1]] = f[status]
		}
	}
	return out
}

// load sends GET /api/v2/buildinfo through the load balancer from two
// workers, 5 ms apart each, and counts what did not answer 200.
type load struct {
	sent, failed atomic.Int64
	mu           sync.Mutex
	msgs         []string
	done         chan struct{}
	wg           sync.WaitGroup
	once         sync.Once
}

func startLoad(lbURL string) *load {
	l := &load{done: make(chan struct{})}
	client := &http.Client{Timeout: 5 * time.Second}
	for w := 0; w < 2; w++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.done:
					return
				case <-time.After(5 * time.Millisecond):
				}
				l.sent.Add(1)
				resp, err := client.Get(lbURL + "/api/v2/buildinfo")
				switch {
				case err != nil:
					l.fail(err.Error())
				case resp.StatusCode != http.StatusOK:
					l.fail(resp.Status)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
		}()
	}
	return l
}

func (l *load) fail(msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.msgs) < 20 {
		l.msgs = append(l.msgs, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

func (l *load) failures() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.msgs...)
}

func (l *load) stop() {
	l.once.Do(func() { close(l.done) })
	l.wg.Wait()
}

// flows keeps paced packet flows in a ring over a set of DERP clients
// (each on its own replica), so every replica sends to and receives from
// another one; set replaces the ring.
type flows struct {
	active     []*flow
	sent, lost int
}

type flow struct {
	a, b       *derptest.Client
	stop, done chan struct{}
	sent, lost int
}

func (f *flows) set(clients []*derptest.Client) {
	f.stopAll()
	if len(clients) < 2 {
		return
	}
	for i, a := range clients {
		b := clients[(i+1)%len(clients)]
		if len(clients) == 2 && i == 1 {
			b = clients[0]
		}
		fl := &flow{a: a, b: b, stop: make(chan struct{}), done: make(chan struct{})}
		f.active = append(f.active, fl)
		go fl.run()
	}
}

func (f *flows) stopAll() {
	for _, fl := range f.active {
		close(fl.stop)
	}
	for _, fl := range f.active {
		<-fl.done
		f.sent += fl.sent
		f.lost += fl.lost
	}
	f.active = nil
}

// run exchanges windows of packets, 32 at a time with a pause between, so
// that the relays' queues never overflow (real traffic is paced too).
func (fl *flow) run() {
	defer close(fl.done)
	for {
		select {
		case <-fl.stop:
			return
		case <-time.After(20 * time.Millisecond):
		}
		fl.lost += derptest.Exchange(fl.a, fl.b, 32, 256, 8, 3*time.Second)
		fl.sent += 32
	}
}

// scrapeSum is the sum of every series of name on a /metrics page.
func scrapeSum(url, name string) float64 {
	var sum float64
	for _, v := range scrape(url, name, "") {
		sum += v
	}
	return sum
}

// scrapeLabels is name's series by the value of label.
func scrapeLabels(url, name, label string) map[string]float64 {
	return scrape(url, name, label)
}

func scrape(url, name, label string) map[string]float64 {
	out := map[string]float64{}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			continue
		}
		key := ""
		if label != "" {
			if i := strings.Index(line, label+`="`); i >= 0 {
				rest := line[i+len(label)+2:]
				key = rest[:strings.IndexByte(rest, '"')]
			}
		}
		out[key] += v
	}
	return out
}

// appliedCounts is how often goose_db_version records each version.
func appliedCounts(t testing.TB, pg string) map[int64]int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	return dbtest.AppliedCounts(t, c)
}
