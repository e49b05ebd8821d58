//go:build bench

package bench_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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
	c := dbtest.NewCluster(t)
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

// fleet starts n replicas with the relay on and 5 s beats against a fresh
// database, and measures: convergence (every replica ready and listing n,
// from the last start), queries per beat per replica (pg_stat_statements:
// the replicas' own statements), transactions per beat including
// Postgres' background work, and steady-state CPU of the fleet and of
// Postgres over a 20 s window.
func fleet(t *testing.T, s *statsPostgres, n int) []Row {
	db := fmt.Sprintf("fleet_%d", n)
	c := clitest.NewCluster(t, s.newDatabase(t, db))
	defer c.StopAll()
	token := ""
	pprofPort := clitest.FreePort(t)
	for i := 0; i < n; i++ {
		if i == 0 { // replica 1 is profiled during the steady-state window
			c.Add(fmt.Sprintf("CODER_DEBUG_PPROF_ADDRESS=127.0.0.1:%d", pprofPort))
		} else {
			c.Add()
		}
		if i == 0 { // the first one migrates; a token needs the schema
			c.Nodes[0].WaitReady(2 * time.Minute)
			token = clitest.CreateToken(t, c.PostgresURL)
		}
	}
	lastStart := time.Now()
	converge := 3 * time.Minute
	deadline := lastStart.Add(converge)
	converged := true
	for _, node := range c.Nodes { // each in turn: once one lists n, the next
		// Polled gently: at N=100 the list is ~100 rows with a latency
		// matrix each, and the bench must not be what starves the fleet.
		for {
			if !node.Exited() && node.Status("/readyz") == http.StatusOK {
				var rs []coderd.Replica
				if node.GetJSON("/api/v2/replicas", token, &rs) == http.StatusOK && len(rs) == n {
					break
				}
			}
			if time.Now().After(deadline) {
				converged = false
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if !converged {
			break
		}
	}
	took := time.Since(lastStart)
	note := fmt.Sprintf("load average at convergence %s", loadavg())
	var rows []Row
	conv := Row{Measurement: fmt.Sprintf("fleet N=%d, relay on, 5 s beats: all ready and listing %d, from the last start", n, n), Unit: "s", Note: note}
	if converged {
		conv.Samples = []float64{took.Seconds()}
	} else {
		conv.Note = fmt.Sprintf("did not converge within %s; %s", converge, note)
	}
	if n == 100 {
		conv.Target = "≤ 30 s"
		rows = append(rows, summarize(conv, "lower", 30))
	} else {
		rows = append(rows, summarize(conv, "lower", 0))
	}

	time.Sleep(6 * time.Second) // one more beat: start-up traffic is over
	var pids []int
	for _, node := range c.Nodes {
		if !node.Exited() {
			pids = append(pids, node.Pid())
		}
	}
	pgPids := s.pids()
	const window = 20 * time.Second
	st0, x0 := s.counts(db)
	f0, p0 := cpu(pids), cpu(pgPids)
	profile := make(chan struct{})
	go func() { // a CPU profile of replica 1 over most of the window
		defer close(profile)
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", pprofPort, int(window.Seconds())-2))
		if err != nil {
			return
		}
		defer resp.Body.Close()
		out := os.Getenv("BENCH_OUT")
		if out == "" {
			out = "bench-results"
		}
		_ = os.MkdirAll(out, 0o755)
		if f, err := os.Create(filepath.Join(out, fmt.Sprintf("cpu-replica1-N%d.pprof", n))); err == nil {
			_, _ = io.Copy(f, resp.Body)
			_ = f.Close()
		}
	}()
	time.Sleep(window)
	<-profile
	st1, x1 := s.counts(db)
	f1, p1 := cpu(pids), cpu(pgPids)
	beats := window.Seconds() / 5 * float64(n)
	load := fmt.Sprintf("load average %s", loadavg())
	rows = append(rows,
		summarize(Row{Measurement: fmt.Sprintf("fleet N=%d: our statements per beat per replica (pg_stat_statements)", n), Unit: "queries",
			Samples: []float64{(st1 - st0) / beats}, Target: "≤ 3"}, "lower", 3),
		summarize(Row{Measurement: fmt.Sprintf("fleet N=%d: transactions per beat per replica, Postgres background included (pg_stat_database)", n), Unit: "xacts",
			Samples: []float64{(x1 - x0) / beats}}, "lower", 0),
		summarize(Row{Measurement: fmt.Sprintf("fleet N=%d: steady-state CPU, all replicas", n), Unit: "% of a core",
			Samples: []float64{(f1 - f0).Seconds() / window.Seconds() * 100}, Note: load}, "lower", 0),
		summarize(Row{Measurement: fmt.Sprintf("fleet N=%d: steady-state CPU, Postgres", n), Unit: "% of a core",
			Samples: []float64{(p1 - p0).Seconds() / window.Seconds() * 100}, Note: fmt.Sprintf("%d Postgres processes; %s", len(pgPids), load)}, "lower", 0),
	)
	return rows
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
