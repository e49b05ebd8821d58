//go:build bench

package bench_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/postgres"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// statsPostgres is a dedicated Postgres with pg_stat_statements loaded, so
// the fleet rows count the replicas' own statements (not autovacuum).
type statsPostgres struct {
	c    *postgres.Cluster
	conn *pgx.Conn // to the cluster's own database, never a fleet's
}

func newStatsPostgres(t *testing.T) *statsPostgres {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Its own cluster, with room for a 100-replica fleet's connections
	// (about three per replica) and the joiners'.
	dir := t.TempDir()
	c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Ephemeral: true, MaxConnections: 1000})
	if err != nil {
		t.Fatalf("start the stats postgres: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close(ctx)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err = pgx.Connect(ctx, c.URL())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return &statsPostgres{c: c, conn: conn}
}

// newDatabase creates an empty database (the replicas migrate it).
func (s *statsPostgres) newDatabase(t *testing.T, name string) string {
	t.Helper()
	if _, err := s.conn.Exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	return s.c.DatabaseURL(name)
}

// counts are the fleet database's statements (pg_stat_statements calls)
// and transactions (pg_stat_database, background work included).
func (s *statsPostgres) counts(db string) (statements, xacts float64) {
	ctx := context.Background()
	_ = s.conn.QueryRow(ctx, `SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements s
		JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1`, db).Scan(&statements)
	_ = s.conn.QueryRow(ctx, `SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = $1`, db).Scan(&xacts)
	return statements, xacts
}

// pids are the cluster's processes: the postmaster (found by its port
// argument) and its children.
func (s *statsPostgres) pids() []int {
	port := strconv.Itoa(s.c.Port())
	var master int
	procs := map[int]int{} // pid → ppid
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		procs[pid] = st.ppid
		if st.comm == "postgres" && master == 0 {
			cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			args := strings.Split(string(cmd), "\x00")
			for i := 0; i+1 < len(args); i++ {
				if args[i] == "-p" && args[i+1] == port {
					master = pid
				}
			}
		}
	}
	if master == 0 {
		return nil
	}
	out := []int{master}
	for pid, ppid := range procs {
		if ppid == master {
			out = append(out, pid)
		}
	}
	return out
}

type procStat struct {
	comm  string
	ppid  int
	ticks int64 // utime + stime
}

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	s := string(b)
	open, closeIdx := strings.Index(s, "("), strings.LastIndex(s, ")")
	if open < 0 || closeIdx < 0 {
		return procStat{}, fmt.Errorf("bad stat")
	}
	f := strings.Fields(s[closeIdx+2:])
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("short stat")
	}
	ppid, _ := strconv.Atoi(f[1])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	sy, _ := strconv.ParseInt(f[12], 10, 64)
	return procStat{comm: s[open+1 : closeIdx], ppid: ppid, ticks: u + sy}, nil
}

// cpu is the CPU time used so far by pids (those still alive).
func cpu(pids []int) time.Duration {
	var ticks int64
	for _, pid := range pids {
		if st, err := readStat(pid); err == nil {
			ticks += st.ticks
		}
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

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

// switches counts the context switches (voluntary and not) of every
// thread of pids so far.
func switches(pids []int) int64 {
	var n int64
	for _, pid := range pids {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		for _, task := range tasks {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
			for _, l := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(l, "voluntary_ctxt_switches:") || strings.HasPrefix(l, "nonvoluntary_ctxt_switches:") {
					v, _ := strconv.ParseInt(strings.TrimSpace(strings.SplitN(l, ":", 2)[1]), 10, 64)
					n += v
				}
			}
		}
	}
	return n
}

// rssMB is VmRSS of pid in MB (0 when unknown).
func rssMB(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// benchOut is where result files go (BENCH_OUT, default bench-results).
func benchOut() string {
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = "bench-results"
	}
	_ = os.MkdirAll(out, 0o755)
	return out
}

func writeBenchFile(name, content string) {
	_ = os.WriteFile(filepath.Join(benchOut(), name), []byte(content), 0o644)
}

// saveProfile GETs /debug/pprof/<what> from the pprof port into a file.
func saveProfile(t *testing.T, port int, what, name string) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/%s", port, what))
	if err != nil {
		t.Logf("profile %s: %v", name, err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(filepath.Join(benchOut(), name))
	if err != nil {
		return
	}
	_, _ = io.Copy(f, resp.Body)
	_ = f.Close()
}

// resetStatements clears pg_stat_statements (the profile's top list covers
// the idle window only).
func (s *statsPostgres) resetStatements() {
	_, _ = s.conn.Exec(context.Background(), "SELECT pg_stat_statements_reset()")
}

// topStatements lists the fleet database's statements by total time (a
// lock's time is its wait).
func (s *statsPostgres) topStatements(db string) string {
	rows, err := s.conn.Query(context.Background(), `SELECT calls, round(total_exec_time::numeric, 1)::float8, regexp_replace(query, '\s+', ' ', 'g')
		FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY total_exec_time DESC LIMIT 20`, db)
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var calls int64
		var total float64
		var q string
		if rows.Scan(&calls, &total, &q) == nil {
			fmt.Fprintf(&b, "%8d calls %10.1f ms  %s\n", calls, total, q)
		}
	}
	return b.String()
}

// sigstopForwarding: three replicas; a client on replica 1 streams ~10 MB/s
// to a client on replica 3, which is then SIGSTOPped, while it exchanges
// windowed packets with a client on replica 2. Row: a→b throughput while
// replica 3 is stopped, relative to before; and the drops replica 1
// counted for replica 3.
func sigstopForwarding(t *testing.T) []Row {
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	c := clitest.NewCluster(t, pg)
	defer c.StopAll()
	r1 := c.Add("CODER_PROMETHEUS_ENABLE=true", fmt.Sprintf("CODER_PROMETHEUS_ADDRESS=127.0.0.1:%d", promPort))
	r2, r3 := c.Add(), c.Add()
	c.WaitReady(2 * time.Minute)
	a, b, cc := connectRetry(r1.URL, 20*time.Second), connectRetry(r2.URL, 20*time.Second), connectRetry(r3.URL, 20*time.Second)
	if a == nil || b == nil || cc == nil {
		t.Fatal("sigstop: cannot connect clients")
	}
	defer a.Close()
	defer b.Close()
	defer cc.Close()
	if !derptest.Reachable(a, b, 20*time.Second) || !derptest.Reachable(a, cc, 20*time.Second) {
		t.Fatal("sigstop: clients cannot reach each other")
	}
	const packets = 5000
	exchange := func() float64 {
		start := time.Now()
		lost := derptest.Exchange(a, b, packets, 1024, 24, 2*time.Second)
		return float64(packets-lost) * 1024 / time.Since(start).Seconds() / 1e6
	}
	var before, during []float64
	for i := 0; i < runs; i++ {
		before = append(before, exchange())
	}
	r3.Signal(syscall.SIGSTOP)
	defer r3.Signal(syscall.SIGCONT)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		payload := make([]byte, 1024)
		for ctx.Err() == nil {
			for i := 0; i < 10; i++ {
				_ = a.Send(cc.Key, payload)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(1500 * time.Millisecond) // the kernel buffers toward replica 3 fill
	for i := 0; i < runs; i++ {
		during = append(during, exchange())
	}
	cancel()
	wg.Wait()
	dropped := scrapeSum(fmt.Sprintf("http://127.0.0.1:%d/metrics", promPort), "coderd_derpmesh_forward_dropped_total")
	med := func(v []float64) float64 { return summarize(Row{Samples: v}, "", 0).Median }
	ratio := med(during) / med(before)
	return []Row{
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: a→b throughput before", Unit: "MB/s", Samples: before}, "higher", 0),
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: a→b throughput while a streams to the stopped peer", Unit: "MB/s", Samples: during,
			Note: fmt.Sprintf("replica 1 counted %.0f packets dropped for the stopped peer (coderd_derpmesh_forward_dropped_total)", dropped)}, "higher", 0),
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: during / before", Unit: "×", Samples: []float64{ratio}, Target: "≥ 0.8× (unchanged)"}, "higher", 0.8),
	}
}

// scrapeSum adds up every series of a metric in a Prometheus text page.
func scrapeSum(url, name string) float64 {
	resp, err := http.Get(url)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
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
