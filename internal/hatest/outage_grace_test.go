//go:build ha

package hatest_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// Postgres stopped for three stale windows (heartbeat 500ms: 4.5 s) and
// started again: no replica logs "replica left", before or after Postgres
// returns, /readyz stays 200 and the mesh never stops forwarding.
func TestPostgresOutageOfThreeStaleWindowsDropsNoReplica(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	pg := cluster.URL()
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=500ms"
	const stale = 1500 * time.Millisecond
	r1, r2, r3 := start(t, "r1", pg, beat), start(t, "r2", pg, beat), start(t, "r3", pg, beat)
	ready(t, r1, r2, r3)
	a, c := client(t, r1), client(t, r3)
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("not meshed")
	}
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	outage := time.Now()
	for time.Since(outage) < 3*stale {
		for _, n := range []*node{r1, r2, r3} {
			if code := n.Status("/readyz"); code != http.StatusOK {
				t.Fatalf("%s /readyz = %d during the outage", n.Name, code)
			}
		}
		if lost := derptest.Exchange(a, c, 50, 1024, 16, 2*time.Second); lost != 0 {
			t.Fatalf("the mesh lost %d of 50 packets during the outage", lost)
		}
	}
	if err := cluster.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	within(t, 15*time.Second, "all replicas back in sync", func() bool {
		for _, n := range []*node{r1, r2, r3} {
			h := health(n, token)
			if !h.Database.Healthy || len(replicas(n, token)) != 3 {
				return false
			}
		}
		return true
	})
	time.Sleep(2 * stale) // past the grace window
	for _, n := range []*node{r1, r2, r3} {
		if strings.Contains(n.Output(), "replica left") {
			t.Fatalf("%s dropped a peer across the outage:\n%s", n.Name, n.Output())
		}
	}
	if lost := derptest.Exchange(a, c, 500, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("lost %d packets after the outage", lost)
	}
}
