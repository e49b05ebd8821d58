//go:build bench

package bench_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
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
