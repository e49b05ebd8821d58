//go:build bench

package bench_test

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/testcert"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

func TestMain(m *testing.M) { dbtest.Main(m) }

// Row is one line of the results table.
type Row struct {
	Measurement string    `json:"measurement"`
	Unit        string    `json:"unit"`
	Samples     []float64 `json:"samples"`
	Median      float64   `json:"median"`
	Min         float64   `json:"min"`
	Max         float64   `json:"max"`
	Target      string    `json:"target"`
	Met         string    `json:"met"` // "yes", "no" or "" (no target)
	Note        string    `json:"note,omitempty"`
}

type results struct {
	Machine string `json:"machine"`
	When    string `json:"when"`
	// Issue is issue 19's table: the fleet at N=10, 50, 100 against
	// today's figures and the targets.
	Issue []IssueRow `json:"issue"`
	Rows  []Row      `json:"rows"`
}

// IssueRow is one line of issue 19's table: one measurement at one fleet
// size, today's figure (the issue's, measured at N=100 on main 41c5966),
// the target, this run's result and whether it met the target.
type IssueRow struct {
	Measurement string `json:"measurement"`
	N           int    `json:"n"`
	Today       string `json:"today"`
	Target      string `json:"target"`
	Result      string `json:"result"`
	Met         string `json:"met"` // "met", "missed" or "" (no target)
}

func summarize(r Row, better string, target float64) Row {
	s := append([]float64(nil), r.Samples...)
	sort.Float64s(s)
	if len(s) > 0 {
		r.Median, r.Min, r.Max = s[len(s)/2], s[0], s[len(s)-1]
	}
	switch {
	case target == 0 || len(s) == 0:
	case better == "lower" && r.Median <= target, better == "higher" && r.Median >= target:
		r.Met = "yes"
	default:
		r.Met = "no"
	}
	return r
}

var runs = envInt("BENCH_RUNS", 3)

// section reports whether BENCH_SECTIONS (comma-separated: join, detect,
// relay, sigstop, fleet, footprint, statements, revocation, upgrade; empty:
// all) includes name.
func section(name string) bool {
	v := os.Getenv("BENCH_SECTIONS")
	if v == "" {
		return true
	}
	for _, s := range strings.Split(v, ",") {
		if strings.TrimSpace(s) == name {
			return true
		}
	}
	return false
}

// fleetSizes are the fleet rows' N (BENCH_FLEET, comma-separated; default
// 10,50,100).
func fleetSizes() []int {
	var out []int
	for _, s := range strings.Split(os.Getenv("BENCH_FLEET"), ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(s)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		out = []int{10, 50, 100}
	}
	return out
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func TestBench(t *testing.T) {
	dir := t.TempDir()
	caPEM, certFile, keyFile := writeCerts(t, dir)
	// Every TLS client in this process (DERP clients) trusts the bench CA.
	os.Setenv("SSL_CERT_FILE", caPEM)
	clitest.Binary(t)
	res := results{Machine: machine(), When: time.Now().UTC().Format(time.RFC3339)}
	add := func(r Row) {
		res.Rows = append(res.Rows, r)
		t.Logf("%s: median %.2f %s (%d runs) %s", r.Measurement, r.Median, r.Unit, len(r.Samples), r.Note)
	}

	// Joins into larger fleets (the N+1th of 10, 50 and 100) are fleet rows.
	if section("join") {
		join, ready := joinToMeshed(t, 3)
		add(summarize(Row{Measurement: "join → meshed, N=3", Unit: "ms", Samples: join, Target: "≤ 250 ms"}, "lower", 250))
		add(summarize(Row{Measurement: "start → ready (existing database, 2 peers)", Unit: "ms", Samples: ready}, "lower", 0))
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		if !section("detect") {
			break
		}
		d := detection(t, sig)
		name := map[syscall.Signal]string{syscall.SIGTERM: "leave detection (SIGTERM), every peer dropped it", syscall.SIGKILL: "crash detection (kill -9), every peer reports it unreachable"}[sig]
		add(summarize(Row{Measurement: name, Unit: "ms", Samples: d, Target: "≤ 1000 ms"}, "lower", 1000))
	}
	if section("relay") {
		for _, r := range relay(t, dir, caPEM, certFile, keyFile) {
			add(r)
		}
	}
	if section("sigstop") {
		for _, r := range sigstopForwarding(t) {
			add(r)
		}
	}
	if section("fleet") {
		stats := newStatsPostgres(t)
		for _, n := range fleetSizes() {
			rows, issue := fleetRows(fleet(t, stats, n))
			for _, r := range rows {
				add(r)
			}
			res.Issue = append(res.Issue, issue...)
		}
		sortIssue(res.Issue)
	}
	if section("footprint") {
		add(footprint(t))
	}
	if section("statements") {
		for _, r := range statementModes(t) {
			add(r)
		}
	}
	if section("revocation") {
		for _, r := range revocationRows(t) {
			add(r)
		}
	}
	if section("upgrade") {
		for _, r := range upgrade(t) {
			add(r)
		}
	}

	res.Machine += "; load average at the end " + loadavg()
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = "bench-results"
	}
	_ = os.MkdirAll(out, 0o755)
	j, _ := json.MarshalIndent(res, "", "  ")
	_ = os.WriteFile(filepath.Join(out, "results.json"), j, 0o644)
	table := markdown(res)
	_ = os.WriteFile(filepath.Join(out, "results.md"), []byte(table), 0o644)
	fmt.Println(table)
}

func markdown(r results) string {
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s; %s\n\n", r.Machine, r.When)
	if len(r.Issue) > 0 {
		b.WriteString("| N replicas, relay on, 5 s beats | N | today (N=100, main 41c5966) | target | result | met |\n|---|---|---|---|---|---|\n")
		for _, row := range r.Issue {
			fmt.Fprintf(&b, "| %s | %d | %s | %s | %s | %s |\n", row.Measurement, row.N, row.Today, row.Target, row.Result, row.Met)
		}
		b.WriteString("\n")
	}
	b.WriteString("| measurement | median | min – max | runs | target | met |\n|---|---|---|---|---|---|\n")
	for _, row := range r.Rows {
		fmt.Fprintf(&b, "| %s | %s %s | %s – %s | %d | %s | %s |\n", row.Measurement, num(row.Median), row.Unit, num(row.Min), num(row.Max), len(row.Samples), row.Target, row.Met)
	}
	for _, row := range r.Rows {
		if row.Note != "" {
			fmt.Fprintf(&b, "\n- %s: %s", row.Measurement, row.Note)
		}
	}
	b.WriteString("\n")
	return b.String()
}

func num(f float64) string {
	switch {
	case f >= 100:
		return fmt.Sprintf("%.0f", f)
	case f >= 10:
		return fmt.Sprintf("%.1f", f)
	}
	return fmt.Sprintf("%.2f", f)
}

func machine() string {
	model := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				model = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	return fmt.Sprintf("%d cores (%s), %s, %s/%s; load average at the start %s (other work shares the machine)", runtime.NumCPU(), model, runtime.Version(), runtime.GOOS, runtime.GOARCH, loadavg())
}

func connectRetry(url string, d time.Duration) *derptest.Client {
	c, err := derptest.ConnectRetry(url, d)
	if err != nil {
		return nil
	}
	return c
}

// joinToMeshed: from starting a replica to the first packet crossing the
// mesh from an existing replica's client to a client of the new one.
func joinToMeshed(t *testing.T, n int) (join, ready []float64) {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	for i := 0; i < n-1; i++ {
		c.Add().WaitReady(2 * time.Minute)
	}
	time.Sleep(time.Second) // let the existing mesh settle
	x := connectRetry(c.Nodes[0].URL, 10*time.Second)
	if x == nil {
		t.Fatal("cannot connect to replica 1")
	}
	defer x.Close()
	for run := 0; run < runs; run++ {
		start := time.Now()
		p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("joiner-%d", run), PostgresURL: c.PostgresURL})
		y := connectRetry(p.URL, 30*time.Second)
		if y == nil {
			t.Fatalf("cannot connect to the joining replica:\n%s", p.Output())
		}
		crossed := false
		for time.Since(start) < 30*time.Second && !crossed {
			_ = x.Send(y.Key, []byte("hello"))
			crossed = len(y.WaitPackets(x.Key, 1, 2*time.Millisecond)) > 0
		}
		if !crossed {
			t.Fatalf("no packet crossed to the joining replica at N=%d", n)
		}
		join = append(join, ms(time.Since(start)))
		if wait.Until(30*time.Second, func() bool { return p.Status("/readyz") == http.StatusOK }) {
			ready = append(ready, ms(time.Since(start)))
		}
		_ = y.Close()
		p.Signal(syscall.SIGTERM)
		p.Wait(30 * time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	return join, ready
}

// detection: time until every peer has dropped a replica stopped with sig
// (SIGTERM: gone from every peer's list; kill -9: every peer reports it
// unreachable, from its own probes).
func detection(t *testing.T, sig syscall.Signal) []float64 {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	token := clitest.CreateToken(t, c.PostgresURL)
	for i := 0; i < 3; i++ {
		c.Add().WaitReady(time.Minute)
	}
	var out []float64
	for run := 0; run < runs; run++ {
		victim := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("victim-%d", run), PostgresURL: c.PostgresURL})
		victim.WaitReady(time.Minute)
		var info coderd.BuildInfo
		victim.GetJSON("/api/v2/buildinfo", "", &info)
		id := info.ReplicaID
		wait.Until(10*time.Second, func() bool { return allMeasured(c.Nodes, token, id.String()) })
		start := time.Now()
		if sig == syscall.SIGKILL {
			victim.Kill()
		} else {
			victim.Signal(sig)
		}
		ok := wait.Until(30*time.Second, func() bool {
			for _, n := range c.Nodes {
				var rs []coderd.Replica
				n.GetJSON("/api/v2/replicas", token, &rs)
				if sig == syscall.SIGTERM && listed(rs, id.String()) {
					return false
				}
				if sig == syscall.SIGKILL && listed(rs, id.String()) && !unreachable(rs, info.ReplicaID.String(), n) {
					return false
				}
			}
			return true
		})
		if ok {
			out = append(out, ms(time.Since(start)))
		}
		victim.Wait(30 * time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	return out
}

func listed(rs []coderd.Replica, id string) bool {
	for _, r := range rs {
		if r.ID.String() == id {
			return true
		}
	}
	return false
}

// unreachable: n's own row reports the peer with an error.
func unreachable(rs []coderd.Replica, peer string, n *clitest.Process) bool {
	var self coderd.BuildInfo
	n.GetJSON("/api/v2/buildinfo", "", &self)
	for _, r := range rs {
		if r.ID != self.ReplicaID {
			continue
		}
		for _, p := range r.Peers {
			if p.ID.String() == peer {
				return p.Error != ""
			}
		}
	}
	return false
}

func allMeasured(nodes []*clitest.Process, token, peer string) bool {
	for _, n := range nodes {
		var rs []coderd.Replica
		n.GetJSON("/api/v2/replicas", token, &rs)
		var self coderd.BuildInfo
		n.GetJSON("/api/v2/buildinfo", "", &self)
		found := false
		for _, r := range rs {
			if r.ID != self.ReplicaID {
				continue
			}
			for _, p := range r.Peers {
				if p.ID.String() == peer && p.Error == "" && p.LatencyMS > 0 {
					found = true
				}
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// relay measures 1 KB packets between two clients (windowed, no drops): on
// the same replica, on two replicas, and on two derper processes meshed
// with --mesh-with, all over TLS with the same CA, in one run.
func relay(t *testing.T, dir, caPEM, certFile, keyFile string) []Row {
	derper := buildDerper(t, dir)
	meshKey := make([]byte, 32)
	_, _ = rand.Read(meshKey)
	pskFile := filepath.Join(dir, "mesh.key")
	_ = os.WriteFile(pskFile, []byte(hex.EncodeToString(meshKey)), 0o600)
	p1, p2 := clitest.FreePort(t), clitest.FreePort(t)
	startDerper := func(port, other int) {
		cfg := filepath.Join(dir, fmt.Sprintf("derper-%d.json", port))
		cmd := exec.Command(derper, "-a", fmt.Sprintf("127.0.0.1:%d", port), "-http-port", "-1", "-stun=false",
			"-certmode", "manual", "-certdir", filepath.Join(dir, "certs"), "-hostname", "127.0.0.1",
			"-c", cfg, "-mesh-psk-file", pskFile, "-mesh-with", fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d", port, other))
		cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+caPEM)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("derper %d:\n%s", port, out.String())
			}
		})
	}
	startDerper(p1, p2)
	startDerper(p2, p1)

	pg := dbtest.NewURL(t)
	profile := os.Getenv("BENCH_PROFILE") != ""
	var pprofPorts []int
	tlsReplica := func(name string) string {
		tlsPort := clitest.FreePort(t)
		relayURL := fmt.Sprintf("https://127.0.0.1:%d", tlsPort)
		env := []string{
			"CODER_TLS_ENABLE=true", fmt.Sprintf("CODER_TLS_ADDRESS=127.0.0.1:%d", tlsPort),
			"CODER_TLS_CERT_FILE=" + certFile, "CODER_TLS_KEY_FILE=" + keyFile,
			"CODER_DERP_SERVER_MESH_CA_FILE=" + caPEM,
		}
		if profile {
			port := clitest.FreePort(t)
			pprofPorts = append(pprofPorts, port)
			env = append(env, fmt.Sprintf("CODER_DEBUG_PPROF_ADDRESS=127.0.0.1:%d", port))
		}
		p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, RelayURL: relayURL, Env: env})
		p.WaitReady(time.Minute)
		return relayURL
	}
	r1, r2 := tlsReplica("tls-1"), tlsReplica("tls-2")
	// A second pair meshed over plain HTTP (as inside a cluster, where the
	// chart's relay URLs are http://<pod IP>): the forwarder writes its
	// frames itself there.
	plain := clitest.NewCluster(t, dbtest.NewURL(t))
	defer plain.StopAll()
	h1, h2 := plain.Add(), plain.Add()
	plain.WaitReady(time.Minute)
	if profile {
		defer profileRelay(t, r1, r2, pprofPorts)
	}

	type pair struct {
		name string
		a, b string
	}
	pairs := []pair{
		{"same replica", r1, r1},
		{"two replicas (mesh)", r1, r2},
		{"two derpers (--mesh-with)", fmt.Sprintf("https://127.0.0.1:%d", p1), fmt.Sprintf("https://127.0.0.1:%d", p2)},
		{"one derper", fmt.Sprintf("https://127.0.0.1:%d", p1), fmt.Sprintf("https://127.0.0.1:%d", p1)},
		{"two replicas (mesh), plain HTTP", h1.URL, h2.URL},
	}
	const packets, window = 20000, 24
	tput := map[string][]float64{}
	lat := map[string][]float64{}
	losses := map[string]int{}
	for run := 0; run < runs; run++ {
		for _, p := range pairs { // interleaved, so the machine's state is shared fairly
			a, b := connectRetry(p.a, 20*time.Second), connectRetry(p.b, 20*time.Second)
			if a == nil || b == nil {
				t.Fatalf("%s: cannot connect", p.name)
			}
			if !derptest.Reachable(a, b, 10*time.Second) {
				t.Fatalf("%s: clients cannot reach each other", p.name)
			}
			start := time.Now()
			lost := derptest.Exchange(a, b, packets, 1024, window, 2*time.Second)
			secs := time.Since(start).Seconds()
			losses[p.name] += lost
			tput[p.name] = append(tput[p.name], float64(packets-lost)*1024/secs/1e6)
			var rtts []float64
			msg := make([]byte, 1024)
			for i := 0; i < 200; i++ {
				s := time.Now()
				_ = a.Send(b.Key, msg)
				if len(b.WaitPackets(a.Key, 1, time.Second)) == 0 {
					continue
				}
				_ = b.Send(a.Key, msg)
				if len(a.WaitPackets(b.Key, 1, time.Second)) == 0 {
					continue
				}
				rtts = append(rtts, ms(time.Since(s)))
			}
			sort.Float64s(rtts)
			if len(rtts) > 0 {
				lat[p.name] = append(lat[p.name], rtts[len(rtts)/2])
			}
			_ = a.Close()
			_ = b.Close()
		}
	}
	var rows []Row
	for _, p := range pairs {
		note := ""
		if losses[p.name] > 0 {
			note = fmt.Sprintf("%d packets lost in total", losses[p.name])
		}
		rows = append(rows, summarize(Row{Measurement: "relay throughput, 1 KB packets, " + p.name, Unit: "MB/s", Samples: tput[p.name], Note: note}, "higher", 0))
	}
	med := func(name string) float64 { return summarize(Row{Samples: tput[name]}, "", 0).Median }
	cross, same, derpers, one := med(pairs[1].name), med(pairs[0].name), med(pairs[2].name), med(pairs[3].name)
	rows = append(rows,
		summarize(Row{Measurement: "cross-replica / derper-pair throughput", Unit: "×", Samples: []float64{cross / derpers}, Target: "≥ 1.15×"}, "higher", 1.15),
		summarize(Row{Measurement: "cross-replica / one-derper throughput", Unit: "×", Samples: []float64{cross / one}, Target: "≥ 0.6×"}, "higher", 0.6),
		summarize(Row{Measurement: "cross-replica / same-replica throughput", Unit: "×", Samples: []float64{cross / same}}, "higher", 0),
	)
	for _, p := range pairs {
		rows = append(rows, summarize(Row{Measurement: "relay round trip, 1 KB, " + p.name, Unit: "ms", Samples: lat[p.name]}, "lower", 0))
	}
	latMed := func(name string) float64 { return summarize(Row{Samples: lat[name]}, "", 0).Median }
	rows = append(rows, summarize(Row{Measurement: "cross-replica / derper-pair round trip", Unit: "×",
		Samples: []float64{latMed(pairs[1].name) / latMed(pairs[2].name)}, Target: "≤ 1.0× (no worse)"}, "lower", 1.0))
	return rows
}

// profileRelay takes CPU profiles of both replicas while a client on the
// first streams windowed 1 KiB packets to a client on the second for 10 s
// (relay-cpu-replica1.pprof, relay-cpu-replica2.pprof).
func profileRelay(t *testing.T, r1, r2 string, ports []int) {
	a, b := connectRetry(r1, 20*time.Second), connectRetry(r2, 20*time.Second)
	if a == nil || b == nil {
		return
	}
	defer a.Close()
	defer b.Close()
	done := make(chan struct{})
	for i, port := range ports {
		go func() {
			saveProfile(t, port, "profile?seconds=10", fmt.Sprintf("relay-cpu-replica%d.pprof", i+1))
			done <- struct{}{}
		}()
	}
	deadline := time.Now().Add(11 * time.Second)
	for time.Now().Before(deadline) {
		derptest.Exchange(a, b, 5000, 1024, 24, 2*time.Second)
	}
	for range ports {
		<-done
	}
}

func buildDerper(t *testing.T, dir string) string {
	bin := filepath.Join(dir, "bin")
	cmd := exec.Command("go", "install", "tailscale.com/cmd/derper@v1.102.5")
	cmd.Env = append(os.Environ(), "GOBIN="+bin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build derper: %v\n%s", err, out)
	}
	return filepath.Join(bin, "derper")
}

// footprint: idle RSS of a replica in a 3-replica cluster.
func footprint(t *testing.T) Row {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	for i := 0; i < 3; i++ {
		c.Add().WaitReady(time.Minute)
	}
	time.Sleep(12 * time.Second) // a couple of beats: idle, steady state
	var rss []float64
	for _, n := range c.Nodes {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Pid()))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
				rss = append(rss, kb/1024)
			}
		}
	}
	return summarize(Row{Measurement: "idle RSS per replica (3-replica cluster)", Unit: "MB", Samples: rss, Target: "≤ 40 MB"}, "lower", 40)
}

// writeCerts makes a CA and a certificate for 127.0.0.1, in the layout
// derper's manual cert mode expects (certs/127.0.0.1.crt and .key).
func writeCerts(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	p := testcert.New(t)
	caFile = filepath.Join(dir, "ca.pem")
	certFile = filepath.Join(dir, "certs", "127.0.0.1.crt")
	keyFile = filepath.Join(dir, "certs", "127.0.0.1.key")
	p.WriteFiles(t, certFile, keyFile)
	if err := os.WriteFile(caFile, p.CAPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile, certFile, keyFile
}
