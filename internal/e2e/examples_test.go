package e2e_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

var examplesDir = filepath.Join("..", "..", "docs", "examples")

// metricName matches the server's metric names inside PromQL: everything
// it exports is prefixed coderd_, go_ or process_, and no label name or
// function is.
var metricName = regexp.MustCompile(`\b(?:coderd|go|process)_[A-Za-z0-9_:]*`)

// awaitingMerge names metrics the examples use that other branches add
// (the relay guard: refusals and the admission webhook; the mesh
// forwarder's drops; SPEC.md "Metrics"). Until those branches are merged a
// missing one is logged, not failed. Once merged, empty this list: the
// test then requires them like every other metric (the replicas below are
// already started with an admission webhook, so the relay guard's metrics
// exist, and meshed, so each peer's drop counter exists).
var awaitingMerge = map[string]bool{}

// dashboardQueries returns every PromQL string of a Grafana dashboard: panel
// targets (rows' nested panels included) and template variable queries.
func dashboardQueries(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		UID        string `json:"uid"`
		Title      string `json:"title"`
		Panels     []json.RawMessage
		Templating struct {
			List []struct {
				Name       string `json:"name"`
				Type       string `json:"type"`
				Definition string `json:"definition"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("%s is not valid JSON: %v", path, err)
	}
	if dash.UID == "" || dash.Title == "" || len(dash.Panels) == 0 {
		t.Fatalf("%s lacks a uid, a title or panels", path)
	}
	type target struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	}
	type panel struct {
		ID      int      `json:"id"`
		Type    string   `json:"type"`
		Title   string   `json:"title"`
		Targets []target `json:"targets"`
		Panels  []json.RawMessage
		Data    struct {
			UID string `json:"uid"`
		} `json:"datasource"`
	}
	var queries []string
	ids := map[int]bool{}
	var walk func([]json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("panel: %v", err)
			}
			if ids[p.ID] {
				t.Errorf("panel id %d is used twice", p.ID)
			}
			ids[p.ID] = true
			if p.Type != "row" && (len(p.Targets) == 0 || p.Data.UID != "${datasource}") {
				t.Errorf("panel %q has no targets or does not use the ${datasource} variable", p.Title)
			}
			for _, tg := range p.Targets {
				if tg.Expr == "" || tg.RefID == "" {
					t.Errorf("panel %q has a target without expr or refId", p.Title)
				}
				queries = append(queries, tg.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	vars := map[string]bool{}
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
		if v.Type == "query" {
			queries = append(queries, v.Definition)
		}
	}
	if !vars["datasource"] {
		t.Error("the dashboard has no datasource variable: importing it would bind it to one data source")
	}
	return queries
}

// exportedNames scrapes a /metrics body into the set of names a query can
// use: every family's name, plus _bucket/_sum/_count for histograms and
// _sum/_count for summaries.
func exportedNames(t *testing.T, body string) map[string]bool {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	names := map[string]bool{}
	for name, f := range families {
		names[name] = true
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			names[name+"_bucket"], names[name+"_sum"], names[name+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			names[name+"_sum"], names[name+"_count"] = true, true
		}
	}
	return names
}

// The shipped Grafana dashboard and Prometheus alert rules name only
// metrics a running cluster exports, so no panel or alert is silently
// empty: every metric name in the dashboard's queries and in the rules is
// on a real replica's /metrics (two replicas, meshed, so per-peer series
// exist).
func TestExampleDashboardAndAlertsNameOnlyExportedMetrics(t *testing.T) {
	t.Parallel()
	queries := dashboardQueries(t, filepath.Join(examplesDir, "grafana-dashboard.json"))
	rules, err := os.ReadFile(filepath.Join(examplesDir, "prometheus-alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	used := map[string][]string{} // metric → where
	for _, q := range queries {
		names := metricName.FindAllString(q, -1)
		if len(names) == 0 {
			t.Errorf("dashboard query names no server metric: %q", q)
		}
		for _, n := range names {
			used[n] = append(used[n], "dashboard")
		}
	}
	ruleExprs := 0
	for i, line := range strings.Split(string(rules), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if strings.HasPrefix(strings.TrimSpace(line), "expr:") {
			ruleExprs++
			if !metricName.MatchString(line) {
				t.Errorf("prometheus-alerts.yaml:%d: expr names no server metric", i+1)
			}
		}
		for _, n := range metricName.FindAllString(line, -1) {
			used[n] = append(used[n], "alerts:"+strconv.Itoa(i+1))
		}
	}
	if ruleExprs == 0 {
		t.Fatal("no alert expressions found in prometheus-alerts.yaml")
	}

	// An admission webhook in tailscale's format that admits everyone, so
	// a replica that has admission control exports its metrics.
	webhook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"Allow":true}`))
	}))
	defer webhook.Close()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: []string{
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
		"CODER_DERP_SERVER_VERIFY_CLIENT_URL=" + webhook.URL,
	}})
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: pg, Env: []string{
		"CODER_DERP_SERVER_VERIFY_CLIENT_URL=" + webhook.URL,
	}})
	r1.WaitReady(90 * time.Second)
	r2.WaitReady(90 * time.Second)
	a, b := connectClient(t, r1), connectClient(t, r2)
	if !derptest.Reachable(a, b, 10*time.Second) {
		t.Fatal("the two replicas are not meshed")
	}
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(promPort) + "/metrics"
	var exported map[string]bool
	wait.For(t, 30*time.Second, "per-peer latency on /metrics", func() bool {
		body := scrape(t, metricsURL)
		if !strings.Contains(body, "coderd_replica_peer_latency_seconds{") {
			return false
		}
		exported = exportedNames(t, body)
		return true
	})
	var missing []string
	for n, where := range used {
		if !exported[n] && awaitingMerge[n] {
			t.Logf("not exported yet, awaiting merge: %s", n)
			continue
		}
		if !exported[n] {
			missing = append(missing, n+" (used in "+strings.Join(where, ", ")+")")
		}
	}
	sort.Strings(missing)
	for _, m := range missing {
		t.Errorf("not exported by the server: %s", m)
	}
	if len(used) < 10 {
		t.Errorf("only %d distinct metrics found in the examples; the extraction is broken", len(used))
	}
}

// needPromtool returns promtool's path. Missing, it fails the test in CI
// (CI=true; scripts/deps.sh installs it with WITH_PROMTOOL=1) and skips it
// elsewhere.
func needPromtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("promtool is not installed: run WITH_PROMTOOL=1 scripts/deps.sh (Debian package prometheus)")
	}
	t.Skip("promtool is not installed (WITH_PROMTOOL=1 make deps installs it); CI=true makes this a failure")
	return ""
}

// The alert rules are valid for Prometheus (`promtool check rules`), and
// their unit tests pass (`promtool test rules`): each alert fires on the
// situation it names and a healthy cluster fires none.
func TestExampleAlertRulesPassPromtool(t *testing.T) {
	t.Parallel()
	promtool := needPromtool(t)
	for _, args := range [][]string{
		{"check", "rules", "prometheus-alerts.yaml"},
		{"test", "rules", "prometheus-alerts.test.yaml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = examplesDir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}
