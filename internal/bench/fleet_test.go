//go:build bench

package bench_test

import (
	"fmt"
	"math"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/internal/clitest"
)

// fleetOutcome is what one fleet size measured, from the outside.
type fleetOutcome struct {
	n int
	// ready: seconds from the first process start until every replica's
	// /readyz answered 200 (NaN when not within fleetBound).
	ready float64
	// listing: seconds from "all ready" until every replica's
	// /api/v2/replicas listed n (NaN when not within fleetBound).
	listing float64
	// cpu: % of a core over the idle window, replicas and Postgres.
	cpuFleet, cpuPG float64
	// rss: MB per replica at the end of the idle window.
	rss []float64
	// join: ms from starting the n+1th replica to the first packet
	// crossing the mesh to one of its clients, per run.
	join []float64
	// statements and xacts per beat per replica over the idle window.
	statements, xacts float64
	// wakeups: context switches per second per replica over the idle
	// window, all threads (each is the process woken for something).
	wakeups float64
	notes   map[string]string
}

// fleetBound bounds each convergence phase of a fleet: past it the row
// says "not within" and the bench goes on.
const fleetBound = 4 * time.Minute

// fleet cold-starts n replicas at once (relay on, 5 s beats) on a fresh
// database and measures what an operator sees from the outside:
//
//   - all ready: from the first process start until every /readyz is 200
//     (each replica polled in turn, about every 200 ms);
//   - listing: from then until every replica's GET /api/v2/replicas lists
//     n (polled by four workers);
//   - after one more beat and a whole probe cycle (⌈(N−1)/10⌉ beats), over an idle window: the CPU of the replicas
//     and of Postgres (/proc), statements and transactions per beat per
//     replica (pg_stat_statements, pg_stat_database), and then RSS per
//     replica;
//   - join → meshed for the n+1th replica, runs times.
//
// Replicas 1 and 2 serve pprof; with BENCH_PROFILE set, CPU and heap
// profiles of both (and the top statements) are written to bench-results.
func fleet(t *testing.T, s *statsPostgres, n int) fleetOutcome {
	return fleetAs(t, s, n, "")
}

// fleetAs is fleet on a database named after n and tag (several runs of
// one size share the stats Postgres).
func fleetAs(t *testing.T, s *statsPostgres, n int, tag string) fleetOutcome {
	out := fleetOutcome{n: n, ready: math.NaN(), listing: math.NaN(), notes: map[string]string{}}
	db, label := fmt.Sprintf("fleet_%d", n), fmt.Sprintf("N%d", n)
	if tag != "" {
		db, label = db+"_"+tag, label+"-"+tag
	}
	c := clitest.NewCluster(t, s.newDatabase(t, db))
	defer c.StopAll()
	profile := os.Getenv("BENCH_PROFILE") != ""
	pprofPorts := make([]int, min(n, envInt("BENCH_PPROF", 2)))
	for i := range pprofPorts {
		pprofPorts[i] = clitest.FreePort(t)
	}
	ports := make([]int, n)
	for i := range ports {
		ports[i] = clitest.FreePort(t)
	}
	start := time.Now()
	started := make([]time.Time, n) // each process's start
	for i := 0; i < n; i++ {
		started[i] = time.Now()
		var env []string
		if i < len(pprofPorts) {
			env = append(env, fmt.Sprintf("CODER_DEBUG_PPROF_ADDRESS=127.0.0.1:%d", pprofPorts[i]))
		}
		c.Nodes = append(c.Nodes, clitest.StartReplica(t, clitest.ReplicaOptions{
			Name: fmt.Sprintf("r%d", i+1), PostgresURL: c.PostgresURL, Port: ports[i], Env: env}))
	}
	startProfile := make(chan struct{})
	if profile { // the cold start of replica 1, from the first process start
		go func() {
			defer close(startProfile)
			saveProfile(t, pprofPorts[0], fmt.Sprintf("profile?seconds=%d", 30), "cpu-start-replica1-"+label+".pprof")
		}()
	} else {
		close(startProfile)
	}

	// A token needs the schema: ask for one as soon as any replica is up.
	tokenCh := make(chan string, 1)
	var tokenOnce sync.Once
	getToken := func() {
		tokenOnce.Do(func() { go func() { tokenCh <- clitest.CreateToken(t, c.PostgresURL) }() })
	}

	pending := append([]*clitest.Process(nil), c.Nodes...)
	deadline := start.Add(fleetBound)
	for len(pending) > 0 && time.Now().Before(deadline) {
		round := time.Now()
		left := pending[:0]
		for _, node := range pending {
			if node.Status("/readyz") == http.StatusOK {
				getToken()
				continue
			}
			left = append(left, node)
		}
		pending = left
		if len(pending) > 0 {
			time.Sleep(time.Until(round.Add(200 * time.Millisecond)))
		}
	}
	readyAt := time.Now()
	if len(pending) == 0 {
		out.ready = readyAt.Sub(start).Seconds()
		out.notes["phases"] = startPhases(c.Nodes, started)
	} else {
		out.notes["ready"] = fmt.Sprintf("%d of %d not ready after %s", len(pending), n, fleetBound)
		for _, node := range pending { // for the reader to see why
			writeBenchFile(fmt.Sprintf("log-notready-%s-%s.txt", node.Name, label), node.Output())
		}
		getToken()
	}
	out.notes["ready"] = strings.TrimPrefix(out.notes["ready"]+"; "+out.notes["phases"]+"; load average "+loadavg(), "; ")
	out.notes["ready"] = strings.ReplaceAll(out.notes["ready"], "; ; ", "; ")

	token := <-tokenCh
	pendingList := make(chan *clitest.Process, n)
	for _, node := range c.Nodes {
		pendingList <- node
	}
	listDeadline := readyAt.Add(fleetBound)
	var listed atomic.Int32
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				var node *clitest.Process
				select {
				case node = <-pendingList:
				default:
					return
				}
				for time.Now().Before(listDeadline) {
					var rs []coderd.Replica
					if !node.Exited() && node.GetJSON("/api/v2/replicas", token, &rs) == http.StatusOK && len(rs) == n {
						listed.Add(1)
						break
					}
					time.Sleep(200 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	if int(listed.Load()) == n {
		out.listing = time.Since(readyAt).Seconds()
	} else {
		out.notes["listing"] = fmt.Sprintf("%d of %d listed %d after %s", listed.Load(), n, n, fleetBound)
	}
	out.notes["listing"] = strings.TrimPrefix(out.notes["listing"]+"; load average "+loadavg(), "; ")
	<-startProfile

	// Idle means settled: one more beat for start-up traffic, and a whole
	// probe cycle (10 peers sampled per 5 s beat: ⌈(N−1)/10⌉ beats), so
	// that what a loaded cold start measured (peers unreachable or slow
	// while the machine was saturated) has been measured again and its
	// warnings cleared; until then each clearing is a write.
	settle := time.Duration(max(1, (n-1+9)/10))*5*time.Second + time.Second
	time.Sleep(max(6*time.Second, settle))
	var pids []int
	for _, node := range c.Nodes {
		if !node.Exited() {
			pids = append(pids, node.Pid())
		}
	}
	pgPids := s.pids()
	const window = 20 * time.Second
	if profile { // what start-up cost the database, then a clean slate for the window
		writeBenchFile("statements-start-"+label+".txt", s.topStatements(db))
		s.resetStatements()
	}
	st0, x0 := s.counts(db)
	f0, p0 := cpu(pids), cpu(pgPids)
	w0 := switches(pids)
	var prof sync.WaitGroup
	for i, port := range pprofPorts { // CPU profiles over most of the window
		prof.Add(1)
		go func() {
			defer prof.Done()
			saveProfile(t, port, fmt.Sprintf("profile?seconds=%d", int(window.Seconds())-2), fmt.Sprintf("cpu-replica%d-%s.pprof", i+1, label))
		}()
	}
	time.Sleep(window)
	prof.Wait()
	st1, x1 := s.counts(db)
	f1, p1 := cpu(pids), cpu(pgPids)
	w1 := switches(pids)
	beats := window.Seconds() / 5 * float64(n)
	out.statements = (st1 - st0) / beats
	out.xacts = (x1 - x0) / beats
	out.cpuFleet = (f1 - f0).Seconds() / window.Seconds() * 100
	out.cpuPG = (p1 - p0).Seconds() / window.Seconds() * 100
	out.wakeups = float64(w1-w0) / window.Seconds() / float64(max(len(pids), 1))
	out.notes["cpu"] = fmt.Sprintf("replicas %.1f %% + Postgres %.1f %% (%d processes); %.1f context switches per second per replica; load average %s",
		out.cpuFleet, out.cpuPG, len(pgPids), out.wakeups, loadavg())
	for _, pid := range pids {
		if mb := rssMB(pid); mb > 0 {
			out.rss = append(out.rss, mb)
		}
	}
	if profile {
		for i, port := range pprofPorts {
			saveProfile(t, port, "heap", fmt.Sprintf("heap-replica%d-%s.pprof", i+1, label))
			saveProfile(t, port, "goroutine?debug=1", fmt.Sprintf("goroutines-replica%d-%s.txt", i+1, label))
			saveProfile(t, port, "heap?debug=1", fmt.Sprintf("heap-replica%d-%s.txt", i+1, label))
		}
		writeBenchFile("statements-"+label+".txt", s.topStatements(db))
		for i := range pprofPorts {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", c.Nodes[i].Pid()))
			writeBenchFile(fmt.Sprintf("smaps-replica%d-%s.txt", i+1, label), string(b))
			writeBenchFile(fmt.Sprintf("log-replica%d-%s.txt", i+1, label), c.Nodes[i].Output())
		}
	}

	out.join = fleetJoin(t, c, n)
	return out
}

// startPhases splits each replica's start, from its own log lines: from
// its process start to "replica sync mode chosen" (connected, schema
// migrated or found current — the migration lock included —, listening,
// pubsub self-test), from there to "server started" (registered,
// announced until heard back, peers read), and from there to "replica is
// ready" (meshed with every peer it knows). It reports the median and the
// slowest of each: what the replicas themselves would say, where the
// fleet's "all ready" is the slowest replica seen from outside, polled.
func startPhases(nodes []*clitest.Process, started []time.Time) string {
	msgs := []string{"replica sync mode chosen", "server started", "replica is ready"}
	phases := make([][]float64, len(msgs))
	for i, node := range nodes {
		at := map[string]time.Time{}
		for _, l := range strings.Split(node.Output(), "\n") {
			for _, msg := range msgs {
				if _, seen := at[msg]; !seen && strings.Contains(l, "\t"+msg) {
					if ts, err := time.Parse(time.RFC3339Nano, strings.SplitN(l, "\t", 2)[0]); err == nil {
						at[msg] = ts
					}
				}
			}
		}
		prev := started[i]
		complete := true
		for _, msg := range msgs {
			if at[msg].IsZero() {
				complete = false
			}
		}
		if !complete {
			continue
		}
		for j, msg := range msgs {
			phases[j] = append(phases[j], at[msg].Sub(prev).Seconds())
			prev = at[msg]
		}
	}
	if len(phases[0]) == 0 {
		return ""
	}
	names := []string{"process start → pubsub up (connect, migrate or wait for the lock, listen, self-test)", "→ registered (register, announce, read peers)", "→ ready (meshed)"}
	var parts []string
	for j := range phases {
		sort.Float64s(phases[j])
		parts = append(parts, fmt.Sprintf("%s median %.1f s, slowest %.1f s", names[j], phases[j][len(phases[j])/2], phases[j][len(phases[j])-1]))
	}
	return "per replica, from its logs: " + strings.Join(parts, "; ")
}

// fleetJoin starts the n+1th replica runs times and measures, each time,
// from its process start to the first packet crossing the mesh from a
// client on replica 1 to a client on the new replica.
func fleetJoin(t *testing.T, c *clitest.Cluster, n int) []float64 {
	x := connectRetry(c.Nodes[0].URL, 20*time.Second)
	if x == nil {
		t.Logf("fleet N=%d: cannot connect a client to replica 1", n)
		return nil
	}
	defer x.Close()
	var join []float64
	for run := 0; run < runs; run++ {
		start := time.Now()
		p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("joiner-%d", run), PostgresURL: c.PostgresURL})
		y := connectRetry(p.URL, 60*time.Second)
		if y == nil {
			t.Logf("fleet N=%d: cannot connect to the joining replica:\n%s", n, p.Output())
			p.Kill()
			continue
		}
		crossed := false
		for time.Since(start) < 60*time.Second && !crossed {
			_ = x.Send(y.Key, []byte("hello"))
			crossed = len(y.WaitPackets(x.Key, 1, 5*time.Millisecond)) > 0
		}
		if crossed {
			join = append(join, ms(time.Since(start)))
		} else {
			t.Logf("fleet N=%d: no packet crossed to the joining replica within 60 s", n)
		}
		_ = y.Close()
		p.Signal(syscall.SIGTERM)
		p.Wait(30 * time.Second)
		time.Sleep(time.Second) // the fleet forgets it
	}
	return join
}

// issueTarget is one line of issue 19's table: today's figure at N=100
// and the target, which every fleet size must meet (the cost grows with
// N, so a smaller fleet meeting N=100's bound is the least to expect).
type issueTarget struct {
	name   string
	today  string
	target float64
	unit   string
}

var issueTargets = []issueTarget{
	{"all ready after a cold start of N at once", "128 s", 60, "s"},
	{"every API lists N, after all ready", "137 s", 15, "s"},
	{"idle fleet CPU, replicas + Postgres", "169 % + 13 % of a core", 30, "% of a core"},
	{"RSS per replica (median)", "87 MB", 45, "MB"},
	{"join → meshed, the N+1th (median)", "9.0 s", 2, "s"},
	{"queries per beat per replica", "≤ 3", 3, "queries"},
}

// fleetRows turns one fleet size's outcome into detailed rows and lines
// of issue 19's table.
func fleetRows(o fleetOutcome) ([]Row, []IssueRow) {
	name := func(s string) string { return fmt.Sprintf("fleet N=%d: %s", o.n, s) }
	one := func(v float64) []float64 {
		if math.IsNaN(v) {
			return nil
		}
		return []float64{v}
	}
	var joinS []float64
	for _, j := range o.join {
		joinS = append(joinS, j/1000)
	}
	rows := []Row{
		summarize(Row{Measurement: name("all ready after a cold start of N at once (first start → every /readyz 200)"), Unit: "s", Samples: one(o.ready), Target: "≤ 60 s", Note: o.notes["ready"]}, "lower", 60),
		summarize(Row{Measurement: name("every API lists N, after all ready"), Unit: "s", Samples: one(o.listing), Target: "≤ 15 s", Note: o.notes["listing"]}, "lower", 15),
		summarize(Row{Measurement: name("idle CPU, replicas + Postgres"), Unit: "% of a core", Samples: []float64{o.cpuFleet + o.cpuPG}, Target: "≤ 30 %", Note: o.notes["cpu"]}, "lower", 30),
		summarize(Row{Measurement: name("RSS per replica"), Unit: "MB", Samples: o.rss, Target: "≤ 45 MB"}, "lower", 45),
		summarize(Row{Measurement: name("join → meshed, the N+1th"), Unit: "s", Samples: joinS, Target: "≤ 2 s"}, "lower", 2),
		summarize(Row{Measurement: name("our statements per beat per replica (pg_stat_statements)"), Unit: "queries", Samples: []float64{o.statements}, Target: "≤ 3"}, "lower", 3),
		summarize(Row{Measurement: name("transactions per beat per replica, Postgres background included (pg_stat_database)"), Unit: "xacts", Samples: []float64{o.xacts}}, "lower", 0),
	}
	var issue []IssueRow
	for i, tg := range issueTargets {
		r := rows[i]
		ir := IssueRow{Measurement: tg.name, N: o.n, Target: fmt.Sprintf("≤ %g %s", tg.target, tg.unit)}
		if o.n == 100 {
			ir.Today = tg.today
		}
		switch {
		case len(r.Samples) == 0:
			ir.Result, ir.Met = "not within "+fleetBound.String(), "missed"
		default:
			ir.Result = num(r.Median) + " " + tg.unit
			ir.Met = map[string]string{"yes": "met", "no": "missed"}[r.Met]
		}
		issue = append(issue, ir)
	}
	return rows, issue
}

// sortIssue orders issue 19's table by measurement, then N, so each
// measurement's growth reads down the table.
func sortIssue(rows []IssueRow) {
	order := map[string]int{}
	for i, tg := range issueTargets {
		order[tg.name] = i
	}
	sort.SliceStable(rows, func(i, j int) bool {
		if order[rows[i].Measurement] != order[rows[j].Measurement] {
			return order[rows[i].Measurement] < order[rows[j].Measurement]
		}
		return rows[i].N < rows[j].N
	})
}
