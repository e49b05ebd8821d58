//go:build bench

package bench_test

import (
	"context"
	"fmt"
	"net/url"
	"os/exec"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/pgbouncertest"
)

// beatPeers is how many other replica rows the measured beat reads back:
// a 10-replica fleet.
const beatPeers = 9

// oneBeat is what a replica sends Postgres per heartbeat interval: the
// row's write and the read of its peers (replicasync's periodic beat).
func oneBeat(ctx context.Context, db *database.DB, st database.ReplicaState) error {
	if _, err := db.BeatReplica(ctx, st); err != nil {
		return err
	}
	_, err := db.RecentMembers(ctx, 15*time.Second)
	return err
}

// withExecMode sets pgx's default_query_exec_mode in rawURL ("" leaves the
// URL plain: the server's default).
func withExecMode(t *testing.T, rawURL, mode string) string {
	t.Helper()
	if mode == "" {
		return rawURL
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("default_query_exec_mode", mode)
	u.RawQuery = q.Encode()
	return u.String()
}

// statementModes measures what the statement mode costs against a direct
// Postgres: the latency of one beat (sequential, on a warm connection) and
// the beats per second 8 concurrent callers get, with pgx's own default
// (cache_statement: named prepared statements, which PgBouncer in
// transaction pooling breaks) and with the server's default for a plain
// URL (exec: the unnamed statement, one round trip, parsed and planned
// every time).
func statementModes(t *testing.T) []Row {
	t.Helper()
	pg := dbtest.NewURL(t)
	ctx := context.Background()
	seed, err := database.Connect(ctx, pg, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < beatPeers; i++ {
		if _, err := seed.BeatReplica(ctx, database.ReplicaState{ID: uuid.New(), Hostname: fmt.Sprintf("peer-%d", i), RegionID: 999,
			RelayAddress: fmt.Sprintf("http://10.0.0.%d:8080", i+1), Version: "bench"}); err != nil {
			t.Fatal(err)
		}
	}
	seed.Close()

	type mode struct{ name, url string }
	modes := []mode{
		{"direct Postgres, cache_statement (pgx default)", withExecMode(t, pg, "cache_statement")},
		{"direct Postgres, exec (server default, plain URL)", pg},
	}
	if havePgBouncer() {
		// cache_statement does not work there at all (42P05).
		modes = append(modes, mode{"PgBouncer (transaction pooling), exec (server default, plain URL)", pgbouncertest.Start(t, pg)})
	}
	latency := map[string][]float64{}
	rate := map[string][]float64{}
	for run := 0; run < runs; run++ {
		for _, m := range modes {
			db, err := database.Connect(ctx, m.url, database.ConnectOptions{MaxConns: 8})
			if err != nil {
				t.Fatal(err)
			}
			st := database.ReplicaState{ID: uuid.New(), Hostname: "bench", RegionID: 999, RelayAddress: "http://10.0.0.100:8080", Version: "bench"}
			for i := 0; i < 50; i++ { // warm: connection, caches
				if err := oneBeat(ctx, db, st); err != nil {
					t.Fatal(err)
				}
			}
			const n = 500
			each := make([]float64, 0, n)
			for i := 0; i < n; i++ {
				start := time.Now()
				if err := oneBeat(ctx, db, st); err != nil {
					t.Fatal(err)
				}
				each = append(each, float64(time.Since(start).Microseconds()))
			}
			sort.Float64s(each)
			latency[m.name] = append(latency[m.name], each[n/2])

			var beats atomic.Int64
			var wg sync.WaitGroup
			deadline := time.Now().Add(2 * time.Second)
			for w := 0; w < 8; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					st := database.ReplicaState{ID: uuid.New(), Hostname: "bench", RegionID: 999, RelayAddress: "http://10.0.0.101:8080", Version: "bench"}
					for time.Now().Before(deadline) {
						if err := oneBeat(ctx, db, st); err != nil {
							t.Error(err)
							return
						}
						beats.Add(1)
					}
				}()
			}
			wg.Wait()
			rate[m.name] = append(rate[m.name], float64(beats.Load())/2)
			db.Close()
		}
	}
	var rows []Row
	for _, m := range modes {
		rows = append(rows, summarize(Row{Measurement: "one beat (write + read of 10 rows), " + m.name, Unit: "µs",
			Samples: latency[m.name], Note: "median of 500 sequential beats per run"}, "lower", 0))
	}
	for _, m := range modes {
		rows = append(rows, summarize(Row{Measurement: "beats/s, 8 concurrent callers, " + m.name, Unit: "beats/s",
			Samples: rate[m.name]}, "higher", 0))
	}
	return rows
}

func havePgBouncer() bool {
	for _, p := range []string{"pgbouncer", "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"} {
		if _, err := exec.LookPath(p); err == nil {
			return true
		}
	}
	return false
}

// TestStatementModeCost runs only the statement mode rows:
// go test -tags bench -run TestStatementModeCost -v ./internal/bench/
func TestStatementModeCost(t *testing.T) {
	for _, r := range statementModes(t) {
		t.Logf("%s: median %.0f %s, %.0f – %.0f (%d runs)", r.Measurement, r.Median, r.Unit, r.Min, r.Max, len(r.Samples))
	}
}
