package replicasync_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/pgbouncertest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
)

// Item 4: behind a real PgBouncer in transaction pooling, poll mode sees
// joins, leaves and silent deaths, with every query going through it.
func TestPollModeWorksThroughPgBouncerTransactionPooling(t *testing.T) {
	t.Parallel()
	bouncer := pgbouncertest.Start(t, dbtest.NewURL(t))
	ctx := context.Background()
	db, err := database.Connect(ctx, bouncer, database.ConnectOptions{Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	newPolling := func(name string) *replicasync.Manager {
		m, err := replicasync.New(ctx, replicasync.NewPostgresStore(db), nil, replicasync.Options{Hostname: name, HeartbeatInterval: 300 * time.Millisecond, PollInterval: 100 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close() })
		return m
	}
	a, b, c := newPolling("a"), newPolling("b"), newPolling("c")
	wait.For(t, 10*time.Second, "everyone sees three through pgbouncer", allSee(3, a, b, c))
	if err := b.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "a sees b leave", func() bool { return !sees(a, b.Self().ID) })
	c.StopBeatingForTest()
	wait.For(t, 10*time.Second, "a drops the silent c", func() bool { return !sees(a, c.Self().ID) })
	if a.HeartbeatFailing() {
		t.Fatal("heartbeats fail through pgbouncer")
	}
}
