package pubsub_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

// recorder collects what a listener is given.
type recorder struct {
	mu       sync.Mutex
	payloads []string
	drops    int
}

func (r *recorder) listen(_ context.Context, payload []byte, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if errors.Is(err, pubsub.ErrDroppedMessages) {
		r.drops++
		return
	}
	r.payloads = append(r.payloads, string(payload))
}

func (r *recorder) snapshot() ([]string, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.payloads...), r.drops
}

func newPubsub(t *testing.T, db *database.DB) *pubsub.Pubsub {
	t.Helper()
	ps, err := pubsub.New(context.Background(), db, pubsub.Options{ReconnectMin: 50 * time.Millisecond, ReconnectMax: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	return ps
}

// Two replicas sharing a database: what one publishes the other receives,
// in order, on the right channel only, until it cancels.
func TestMessagesCrossReplicasInOrderPerChannel(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a, b := newPubsub(t, db), newPubsub(t, db)
	var onReplica, onOther recorder
	cancel, err := b.Subscribe("replica", onReplica.listen)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Subscribe("other", onOther.listen); err != nil {
		t.Fatal(err)
	}
	// LISTEN is asynchronous to Subscribe: publish until the first arrives.
	wait.For(t, 5*time.Second, "first message", func() bool {
		_ = a.Publish(context.Background(), "replica", []byte("hello"))
		got, _ := onReplica.snapshot()
		return len(got) > 0
	})
	// Every warm-up message committed before this marker arrives before it.
	if err := a.Publish(context.Background(), "replica", []byte("sync")); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "sync marker", func() bool {
		got, _ := onReplica.snapshot()
		return got[len(got)-1] == "sync"
	})
	onReplica.mu.Lock()
	onReplica.payloads = nil
	onReplica.mu.Unlock()
	for i := 0; i < 50; i++ {
		if err := a.Publish(context.Background(), "replica", []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	wait.For(t, 5*time.Second, "50 messages", func() bool { got, _ := onReplica.snapshot(); return len(got) == 50 })
	got, _ := onReplica.snapshot()
	for i, p := range got {
		if p != fmt.Sprint(i) {
			t.Fatalf("message %d is %q: out of order (%v)", i, p, got)
		}
	}
	if other, _ := onOther.snapshot(); len(other) != 0 {
		t.Fatalf("channel 'other' received %v from channel 'replica'", other)
	}

	cancel()
	cancel() // idempotent
	if err := a.Publish(context.Background(), "replica", []byte("after cancel")); err != nil {
		t.Fatal(err)
	}
	// A marker on the other channel proves the connection processed past
	// the message above.
	wait.For(t, 5*time.Second, "marker", func() bool {
		_ = a.Publish(context.Background(), "other", []byte("marker"))
		o, _ := onOther.snapshot()
		return len(o) > 0
	})
	if got, _ := onReplica.snapshot(); len(got) != 50 {
		t.Fatalf("a cancelled subscription still received: %v", got[50:])
	}
}

// The listen connection killed by pg_terminate_backend: the subscriber is
// told messages may have been lost, and later messages arrive again.
func TestTerminatedListenConnectionReconnectsAndSignalsDrop(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ps := newPubsub(t, db)
	var r recorder
	if _, err := ps.Subscribe("replica", r.listen); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "subscription live", func() bool {
		_ = ps.Publish(context.Background(), "replica", []byte("x"))
		got, _ := r.snapshot()
		return len(got) > 0
	})
	pid := ps.BackendPID()
	if _, err := db.Pool().Exec(context.Background(), "SELECT pg_terminate_backend($1)", int32(pid)); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "ErrDroppedMessages after reconnect", func() bool { _, drops := r.snapshot(); return drops > 0 })
	if ps.BackendPID() == pid {
		t.Fatal("still on the terminated backend")
	}
	before, _ := r.snapshot()
	wait.For(t, 5*time.Second, "messages flow again", func() bool {
		_ = ps.Publish(context.Background(), "replica", []byte("again"))
		got, _ := r.snapshot()
		return len(got) > len(before)
	})
}

// Postgres stopped and started again: the pubsub reconnects by itself.
func TestPostgresRestartIsSurvived(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	ctx := context.Background()
	db, err := database.Connect(ctx, cluster.URL(), database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ps := newPubsub(t, db)
	var r recorder
	if _, err := ps.Subscribe("replica", r.listen); err != nil {
		t.Fatal(err)
	}
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "disconnected", func() bool { return !ps.Connected() })
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 15*time.Second, "reconnected with a drop notice", func() bool { _, d := r.snapshot(); return d > 0 && ps.Connected() })
	wait.For(t, 5*time.Second, "messages flow again", func() bool {
		_ = ps.Publish(ctx, "replica", []byte("back"))
		got, _ := r.snapshot()
		return len(got) > 0
	})
}

// A listener too slow for its queue loses messages, is told so, and does
// not hold up another subscription.
func TestSlowListenerOverflowsWithoutBlockingOthers(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ps, err := pubsub.New(context.Background(), db, pubsub.Options{QueueSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer ps.Close()
	release := make(chan struct{})
	var slow, fast recorder
	_, err = ps.Subscribe("c", func(ctx context.Context, p []byte, err error) {
		select {
		case <-release:
		case <-ctx.Done():
		}
		slow.listen(ctx, p, err)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ps.Subscribe("c", fast.listen); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "fast subscriber live", func() bool {
		_ = ps.Publish(context.Background(), "c", []byte("warmup"))
		got, _ := fast.snapshot()
		return len(got) > 0
	})
	for i := 0; i < 20; i++ {
		_ = ps.Publish(context.Background(), "c", []byte(fmt.Sprint(i)))
	}
	// The fast subscriber gets the last message while the slow one is
	// still stuck on its first.
	defer func() {
		if t.Failed() {
			got, d := fast.snapshot()
			t.Logf("fast got %v drops %d", got, d)
		}
	}()
	wait.For(t, 5*time.Second, "fast subscriber gets the last message", func() bool {
		_ = ps.Publish(context.Background(), "c", []byte("last"))
		got, _ := fast.snapshot()
		return len(got) > 0 && got[len(got)-1] == "last"
	})
	close(release)
	wait.For(t, 5*time.Second, "slow subscriber told of drops", func() bool { _, d := slow.snapshot(); return d > 0 })
}

func TestOversizedPayloadIsRefused(t *testing.T) {
	t.Parallel()
	ps := newPubsub(t, dbtest.NewDB(t))
	err := ps.Publish(context.Background(), "c", []byte(strings.Repeat("x", 8000)))
	if err == nil || !strings.Contains(err.Error(), "8000") && !strings.Contains(err.Error(), "limit") {
		t.Fatalf("8000-byte payload: got %v, want a size error", err)
	}
}

func TestCloseIsIdempotentAndCancelAfterCloseIsSafe(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ps, err := pubsub.New(context.Background(), db, pubsub.Options{})
	if err != nil {
		t.Fatal(err)
	}
	cancel, err := ps.Subscribe("c", func(context.Context, []byte, error) {})
	if err != nil {
		t.Fatal(err)
	}
	_ = ps.Close()
	_ = ps.Close()
	cancel()
	if _, err := ps.Subscribe("c", func(context.Context, []byte, error) {}); err == nil {
		t.Fatal("Subscribe after Close succeeded")
	}
}

// A publish from another connection right after Subscribe returns is
// always delivered: Subscribe returns only once the server listens.
func TestPublishRightAfterSubscribeReturnsIsAlwaysReceived(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	listener, publisher := newPubsub(t, db), newPubsub(t, db)
	for i := 0; i < 20; i++ {
		channel := fmt.Sprintf("fresh_%d", i)
		var r recorder
		if _, err := listener.Subscribe(channel, r.listen); err != nil {
			t.Fatal(err)
		}
		if err := publisher.Publish(context.Background(), channel, []byte("first")); err != nil {
			t.Fatal(err)
		}
		wait.For(t, 5*time.Second, "the message published right after Subscribe", func() bool {
			got, _ := r.snapshot()
			return len(got) == 1 && got[0] == "first"
		})
	}
}

// The listen connection black-holed (a stalled proxy, a middlebox that
// lost the connection's state: open, silent, no reset): the idle ping
// notices within seconds, Connected turns false, the Pubsub reconnects,
// the subscriber is told to resync, and a NOTIFY is delivered again, all
// within 10s.
func TestHungListenConnectionIsDetectedAndReplacedWithinSeconds(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := listenThroughProxy(t, pubsub.Options{}) // default ping interval and timeout
	ps, proxy, publisher, r := f.ps, f.proxy, f.publisher, f.r

	proxy.Freeze()
	frozen := time.Now()
	var detected time.Duration
	wait.For(t, 10*time.Second, "Connected() false after the freeze", func() bool {
		detected = time.Since(frozen)
		return !ps.Connected()
	})
	wait.For(t, 10*time.Second-time.Since(frozen), "reconnected, told to resync, and a NOTIFY delivered again", func() bool {
		_ = publisher.Publish(ctx, "replica", []byte("after"))
		got, drops := r.snapshot()
		return drops > 0 && ps.Connected() && len(got) > 1
	})
	t.Logf("hung listen connection detected after %s; delivering again after %s", detected.Round(time.Millisecond), time.Since(frozen).Round(time.Millisecond))
}

// Subscribe while the listen connection is down returns at once, and the
// new subscriber is told to resync when the connection is back, then
// receives what is published.
func TestSubscribeWhileDisconnectedReturnsAndReportsDrop(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	ctx := context.Background()
	db, err := database.Connect(ctx, cluster.URL(), database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ps := newPubsub(t, db)
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "disconnected", func() bool { return !ps.Connected() })
	var r recorder
	returned := make(chan error, 1)
	go func() {
		_, err := ps.Subscribe("late", r.listen)
		returned <- err
	}()
	select {
	case err := <-returned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Subscribe blocked while the listen connection was down")
	}
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 15*time.Second, "the late subscriber told to resync", func() bool { _, d := r.snapshot(); return d > 0 })
	wait.For(t, 5*time.Second, "the late subscriber receives", func() bool {
		_ = ps.Publish(ctx, "late", []byte("x"))
		got, _ := r.snapshot()
		return len(got) > 0
	})
}

// proxiedListen is a Pubsub whose connections go through a fault proxy,
// subscribed to "replica", and a publisher that reaches the database
// directly.
type proxiedListen struct {
	ps        *pubsub.Pubsub
	proxy     *faultproxy.Proxy
	publisher *pubsub.Pubsub
	r         *recorder
}

// listenThroughProxy starts a proxiedListen with opts and waits until one
// notification got through, so a fault injected next hits a working
// listen connection.
func listenThroughProxy(t *testing.T, opts pubsub.Options) proxiedListen {
	t.Helper()
	ctx := context.Background()
	direct := dbtest.NewDB(t)
	proxy, proxiedURL := faultproxy.InFrontOf(t, direct.URL())
	proxied, err := database.Connect(ctx, proxiedURL, database.ConnectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxied.Close)
	ps, err := pubsub.New(ctx, proxied, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	publisher := newPubsub(t, direct)
	r := &recorder{}
	if _, err := ps.Subscribe("replica", r.listen); err != nil {
		t.Fatal(err)
	}
	if err := publisher.Publish(ctx, "replica", []byte("before")); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 5*time.Second, "delivery before the fault", func() bool { got, _ := r.snapshot(); return len(got) == 1 })
	return proxiedListen{ps: ps, proxy: proxy, publisher: publisher, r: r}
}
