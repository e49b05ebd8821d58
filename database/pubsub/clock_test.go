package pubsub_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/internal/wait"
)

// Postgres stopped and started again: the pubsub reconnects when its
// backoff timer fires on its clock, not merely because the server is back,
// and the down_for it logs is measured on that clock.
func TestReconnectWaitsForTheBackoffOnItsClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cluster := dbtest.NewCluster(t)
	db, err := database.Connect(ctx, cluster.URL(), database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	clock := quartz.NewMock(t)
	core, logs := observer.New(zap.InfoLevel)
	ps, err := pubsub.New(ctx, db, pubsub.Options{Clock: clock, Logger: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	var r recorder
	if _, err := ps.Subscribe("replica", r.listen); err != nil {
		t.Fatal(err)
	}
	backoff := clock.Trap().NewTimer("pubsub", "reconnect")
	defer backoff.Close()

	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	trapCtx, trapCancel := context.WithTimeout(ctx, 30*time.Second) // it gets there at once on the injected clock
	defer trapCancel()
	call := backoff.MustWait(trapCtx) // the connection is gone: the first backoff starts
	call.MustRelease(ctx)
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// On a real clock it would be back within the backoff (at most
	// ReconnectMin, 100ms).
	if wait.Until(2*time.Second, ps.Connected) {
		t.Fatalf("reconnected before the %s backoff elapsed on its clock", call.Duration)
	}
	if _, drops := r.snapshot(); drops > 0 {
		t.Fatal("drop notice before reconnecting")
	}
	clock.Advance(call.Duration).MustWait(ctx)
	wait.For(t, 15*time.Second, "reconnected with a drop notice", func() bool { _, d := r.snapshot(); return d > 0 && ps.Connected() })

	restored := logs.FilterMessage("pubsub connection restored").All()
	if len(restored) != 1 {
		t.Fatalf("%d 'pubsub connection restored' lines, want 1", len(restored))
	}
	if got, want := restored[0].ContextMap()["down_for"], call.Duration.Round(time.Millisecond); got != want {
		t.Errorf("down_for = %v, want %v (the backoff, on the pubsub's clock)", got, want)
	}
	wait.For(t, 5*time.Second, "messages flow again", func() bool {
		_ = ps.Publish(ctx, "replica", []byte("back"))
		got, _ := r.snapshot()
		return len(got) > 0
	})
}

// A listen connection that went silent (a frozen network path) is pinged
// once it has been silent for PingInterval on the pubsub's clock, and
// only then found hung: the ping's own deadline is real time.
func TestIdlePingIsPacedByItsClock(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	clock := quartz.NewMock(t)
	const interval, timeout = 500 * time.Millisecond, 500 * time.Millisecond
	f := listenThroughProxy(t, pubsub.Options{Clock: clock, PingInterval: interval, PingTimeout: timeout})
	ps, proxy := f.ps, f.proxy
	// The receive loop waits again, its silence timer set on the clock.
	wait.For(t, 5*time.Second, "the idle timer armed", func() bool { _, ok := clock.Peek(); return ok })

	proxy.Freeze()
	// On a real clock the hang would be found within interval + timeout.
	if wait.Until(2*time.Second, func() bool { return !ps.Connected() }) {
		t.Fatal("the frozen connection was pinged before it had been silent for PingInterval on its clock")
	}
	clock.Advance(interval).MustWait(ctx)
	wait.For(t, 10*time.Second, "Connected() false once silent for PingInterval on its clock", func() bool { return !ps.Connected() })
}
