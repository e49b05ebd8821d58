//go:build bench

package bench_test

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/coder-ha/coder/internal/clitest"
)

// TestFleetAB compares builds of coder on the fleet rows, back to back
// under the same conditions: BENCH_AB=name=path,name=path (two or more
// binaries), BENCH_FLEET the sizes (default 10,50,100), BENCH_AB_ROUNDS
// how many times each (default 1; the order of the builds alternates from
// round to round). It prints one table per size and writes ab.md.
//
//	go build -o /tmp/a ./cmd/coder   # before
//	go build -o /tmp/b ./cmd/coder   # after
//	BENCH_AB=before=/tmp/a,after=/tmp/b BENCH_FLEET=50 go test -tags bench -run TestFleetAB -v ./internal/bench/
func TestFleetAB(t *testing.T) {
	spec := os.Getenv("BENCH_AB")
	if spec == "" {
		t.Skip("BENCH_AB not set")
	}
	type build struct{ name, path string }
	var builds []build
	for _, kv := range strings.Split(spec, ",") {
		name, path, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			t.Fatalf("BENCH_AB entry %q is not name=path", kv)
		}
		builds = append(builds, build{name, path})
	}
	defer func() { clitest.BinaryOverride = "" }()
	rounds := envInt("BENCH_AB_ROUNDS", 1)
	stats := newStatsPostgres(t)
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s\n\n", machine())
	for _, n := range fleetSizes() {
		got := map[string][]fleetOutcome{}
		for r := 0; r < rounds; r++ {
			order := append([]build(nil), builds...)
			if r%2 == 1 {
				for i, j := 0, len(order)-1; i < j; i, j = i+1, j-1 {
					order[i], order[j] = order[j], order[i]
				}
			}
			for _, bd := range order {
				clitest.BinaryOverride = bd.path
				o := fleetAs(t, stats, n, fmt.Sprintf("%s_r%d", bd.name, r))
				got[bd.name] = append(got[bd.name], o)
				t.Logf("N=%d %s round %d: ready %.1fs listing %.1fs cpu %.1f%%+%.1f%% wakeups %.1f/s rss %.1fMB join %v statements %.2f", n, bd.name, r, o.ready, o.listing, o.cpuFleet, o.cpuPG, o.wakeups, med(o.rss), o.join, o.statements)
			}
		}
		fmt.Fprintf(&b, "N=%d (%d round(s); medians over rounds)\n\n| build | all ready (s) | lists N after (s) | idle CPU replicas + Postgres (%% of a core) | context switches per replica per s | RSS per replica (MB) | join → meshed (s) | statements per beat |\n|---|---|---|---|---|---|---|---|\n", n, rounds)
		for _, bd := range builds {
			os := got[bd.name]
			pick := func(f func(fleetOutcome) float64) string {
				var v []float64
				for _, o := range os {
					v = append(v, f(o))
				}
				return num(med(v))
			}
			fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", bd.name,
				pick(func(o fleetOutcome) float64 { return o.ready }),
				pick(func(o fleetOutcome) float64 { return o.listing }),
				pick(func(o fleetOutcome) float64 { return o.cpuFleet + o.cpuPG }),
				pick(func(o fleetOutcome) float64 { return o.wakeups }),
				pick(func(o fleetOutcome) float64 { return med(o.rss) }),
				pick(func(o fleetOutcome) float64 { return med(o.join) / 1000 }),
				pick(func(o fleetOutcome) float64 { return o.statements }))
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "load average at the end %s\n", loadavg())
	_ = os.WriteFile(filepath.Join(benchOut(), "ab.md"), []byte(b.String()), 0o644)
	fmt.Println(b.String())
}

// med is the median of v (NaN when empty).
func med(v []float64) float64 {
	s := append([]float64(nil), v...)
	var clean []float64
	for _, x := range s {
		if !math.IsNaN(x) {
			clean = append(clean, x)
		}
	}
	if len(clean) == 0 {
		return math.NaN()
	}
	sort.Float64s(clean)
	return clean[len(clean)/2]
}

// TestRelayAB compares builds on the relay rows (throughput and round
// trip, 1 KiB windowed, same replica / two replicas / derper pair / one
// derper, over TLS; and two replicas over plain HTTP), back to back:
// BENCH_AB as for TestFleetAB. It writes relay-ab.md.
func TestRelayAB(t *testing.T) {
	spec := os.Getenv("BENCH_AB")
	if spec == "" {
		t.Skip("BENCH_AB not set")
	}
	dir := t.TempDir()
	caPEM, certFile, keyFile := writeCerts(t, dir)
	os.Setenv("SSL_CERT_FILE", caPEM)
	defer func() { clitest.BinaryOverride = "" }()
	var b strings.Builder
	fmt.Fprintf(&b, "Machine: %s\n\n| build | measurement | median | min – max |\n|---|---|---|---|\n", machine())
	for _, kv := range strings.Split(spec, ",") {
		name, path, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			t.Fatalf("BENCH_AB entry %q is not name=path", kv)
		}
		clitest.BinaryOverride = path
		for _, r := range relay(t, dir, caPEM, certFile, keyFile) {
			fmt.Fprintf(&b, "| %s | %s | %s %s | %s – %s |\n", name, r.Measurement, num(r.Median), r.Unit, num(r.Min), num(r.Max))
		}
	}
	fmt.Fprintf(&b, "\nload average at the end %s\n", loadavg())
	_ = os.WriteFile(filepath.Join(benchOut(), "relay-ab.md"), []byte(b.String()), 0o644)
	fmt.Println(b.String())
}
