package replicasync_test

import (
	"context"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
)

// statementCounter counts the statements the Managers send.
type statementCounter struct {
	*replicasync.PostgresStore
	calls atomic.Int64
}

func (s *statementCounter) BeatReplica(ctx context.Context, st replicasync.ReplicaState) (replicasync.Beat, error) {
	s.calls.Add(1)
	return s.PostgresStore.BeatReplica(ctx, st)
}

func (s *statementCounter) RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	s.calls.Add(1)
	return s.PostgresStore.RecentReplicas(ctx, staleAfter)
}

func (s *statementCounter) RecentMembers(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	s.calls.Add(1)
	return s.PostgresStore.RecentMembers(ctx, staleAfter)
}

func (s *statementCounter) GetReplicaIfLive(ctx context.Context, id uuid.UUID, staleAfter time.Duration) (replicasync.Replica, bool, error) {
	s.calls.Add(1)
	return s.PostgresStore.GetReplicaIfLive(ctx, id, staleAfter)
}

func (s *statementCounter) NotifyReplicaChange(ctx context.Context, channel string, id uuid.UUID) error {
	s.calls.Add(1)
	return s.PostgresStore.NotifyReplicaChange(ctx, channel, id)
}

// TestScaleStatementsPerBeat runs REPLICASYNC_SCALE Managers (each with a
// latency-check endpoint) against one Postgres with 1 s beats and reports
// the store calls per beat per replica in the steady state. It is a
// measurement for docs/performance.md, skipped unless asked for.
func TestScaleStatementsPerBeat(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("REPLICASYNC_SCALE"))
	if n <= 0 {
		t.Skip("set REPLICASYNC_SCALE=N to run")
	}
	db := dbtest.NewDB(t)
	store := &statementCounter{PostgresStore: replicasync.NewPostgresStore(db)}
	ps := newPubsub(t, db)
	const beat = time.Second
	ms := make([]*replicasync.Manager, 0, n)
	began := time.Now()
	for i := 0; i < n; i++ {
		m, err := replicasync.New(context.Background(), store, ps, replicasync.Options{
			Hostname: "r" + strconv.Itoa(i), RelayAddress: relay(t).URL, HeartbeatInterval: beat,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close() })
		ms = append(ms, m)
	}
	wait.For(t, 2*time.Minute, "every replica lists all", func() bool {
		for _, m := range ms {
			if len(m.All()) != n {
				return false
			}
		}
		return true
	})
	t.Logf("N=%d converged %s after the first start", n, time.Since(began).Round(time.Millisecond))
	time.Sleep(3 * beat)
	c0 := store.calls.Load()
	const window = 10 * time.Second
	time.Sleep(window)
	c1 := store.calls.Load()
	t.Logf("N=%d statements per beat per replica: %.2f", n, float64(c1-c0)/(window.Seconds()/beat.Seconds()*float64(n)))
}

// matrixReads counts reads of the latency matrix (RecentReplicas).
type matrixReads struct {
	*replicasync.PostgresStore
	n atomic.Int64
}

func (s *matrixReads) RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	s.n.Add(1)
	return s.PostgresStore.RecentReplicas(ctx, staleAfter)
}

// The beats read membership only; the latency matrix every replica stores
// is read when Replicas asks, and shows what each peer measured.
func TestMatrixIsReadOnRequestNotOnEveryBeat(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	store := &matrixReads{PostgresStore: replicasync.NewPostgresStore(db)}
	const beat = 200 * time.Millisecond
	newManager := func(host string) *replicasync.Manager {
		m, err := replicasync.New(context.Background(), store, newPubsub(t, db), replicasync.Options{
			Hostname: host, RelayAddress: relay(t).URL, HeartbeatInterval: beat,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = m.Close() })
		return m
	}
	a, b := newManager("a"), newManager("b")
	wait.For(t, 15*time.Second, "a shows b's measurement of a", func() bool {
		for _, r := range a.Replicas(context.Background()) {
			if r.ID != b.Self().ID {
				continue
			}
			for _, p := range r.Peers {
				if p.ID == a.Self().ID && p.LatencyMS > 0 && p.Error == "" {
					return true
				}
			}
		}
		return false
	})
	before := store.n.Load()
	since := a.Self().UpdatedAt
	wait.For(t, 15*time.Second, "a few beats of a", func() bool { return a.Self().UpdatedAt.Sub(since) >= 5*beat })
	if n := store.n.Load() - before; n != 0 {
		t.Fatalf("beats read the latency matrix %d times", n)
	}
	for _, r := range a.All() {
		if r.ID == b.Self().ID && len(r.Peers) != 0 {
			t.Fatalf("All carries b's matrix from a beat's read: %+v", r.Peers)
		}
	}
}

// A second change within an interval is not written at once (one change
// write per interval), yet this replica's own row in Replicas shows it at
// once.
func TestASecondChangeInAnIntervalWaitsForTheBeatButShowsAtOnce(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a := start(t, db, replicasync.Options{Hostname: "a", RelayAddress: relay(t).URL}) // beats every minute
	a.SetError("first")
	wait.For(t, 10*time.Second, "the first change is written", func() bool { return a.Self().Error == "first" })
	a.SetError("second")
	var shown string
	for _, r := range a.Replicas(context.Background()) {
		if r.ID == a.Self().ID {
			shown = r.Error
		}
	}
	if shown != "second" {
		t.Fatalf("own row in Replicas shows error %q, want the current %q", shown, "second")
	}
	if got := a.Self().Error; got != "first" {
		t.Fatalf("the second change was written within the interval (row error %q)", got)
	}
}
