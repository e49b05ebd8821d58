//go:build ha

package hatest_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/faultproxy"
)

// joinedAt is when n logged "replica joined" for peer id (its log's
// timestamp), or the zero time.
func joinedAt(t *testing.T, n *node, id string) time.Time {
	t.Helper()
	for _, line := range strings.Split(n.Output(), "\n") {
		if !strings.Contains(line, "replica joined") || !strings.Contains(line, id) {
			continue
		}
		ts, err := time.Parse("2006-01-02T15:04:05.000Z0700", strings.Fields(line)[0])
		if err != nil {
			t.Fatalf("log timestamp of %q: %v", line, err)
		}
		return ts
	}
	return time.Time{}
}

// registeredAt is when the replica row id was created, by the database
// clock (the same machine's clock as the replicas' logs here).
func registeredAt(t *testing.T, pg, id string) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var at time.Time
	if err := conn.QueryRow(ctx, "SELECT created_at FROM replicas WHERE id = $1", id).Scan(&at); err != nil {
		t.Fatal(err)
	}
	return at
}

// seenAfterJoin starts replica name on pg and returns how long after its
// row was created r1 logged that it joined.
func seenAfterJoin(t *testing.T, r1 *node, pg, name string) time.Duration {
	t.Helper()
	n := start(t, name, pg)
	ready(t, n)
	var seen time.Time
	within(t, 10*time.Second, r1.Name+" logs that "+name+" joined", func() bool {
		seen = joinedAt(t, r1, n.id)
		return !seen.IsZero()
	})
	return seen.Sub(registeredAt(t, pg, n.id))
}

// Every Postgres connection of a replica (the pool's and the LISTEN
// connection) goes silent at once (a middlebox that lost their state; new
// connections work): the replica notices and replaces them while idle, so
// a replica that joins 12 s later is seen about as fast as before the
// fault (by LISTEN/NOTIFY), not after a query timeout and a ping timeout
// (4 s before: the re-read after the LISTEN reconnect waited out a frozen
// pooled connection, then each other frozen one cost a 2 s ping).
func TestHungConnectionsAreReplacedBeforeTheyDelayAJoin(t *testing.T) {
	pg := dbtest.NewURL(t)
	proxy, proxied := faultproxy.InFrontOf(t, pg)
	r1 := start(t, "r1", proxied)
	ready(t, r1)

	before := seenAfterJoin(t, r1, pg, "r2")
	t.Logf("before the freeze: r1 saw r2 %s after it registered", before.Round(time.Millisecond))

	proxy.Freeze()
	// The scenario: the join comes well after the fault, when a replica
	// has had every chance to notice it.
	time.Sleep(12 * time.Second)
	after := seenAfterJoin(t, r1, pg, "r3")
	t.Logf("12 s after every connection froze: r1 saw r3 %s after it registered", after.Round(time.Millisecond))
	if after > 1500*time.Millisecond {
		t.Fatalf("r1 saw a replica that joined 12 s after its connections froze only %s later; hung connections must be replaced while idle", after.Round(time.Millisecond))
	}
}
