package storetest

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/replicasync"
)

// Harness is one Store under test and the two things the contract needs
// beyond the interface.
type Harness struct {
	Store replicasync.Store
	// Advance lets at least d pass on the store's clock (Postgres: sleeps).
	Advance func(d time.Duration)
	// Delete removes a row as an operator would.
	Delete func(id uuid.UUID)
	// StaleAfter is the window the suite uses; short for a real database.
	StaleAfter time.Duration
}

// Run checks the Store contract the Manager relies on. newHarness is
// called once per subtest.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	ctx := context.Background()
	state := func(host string) replicasync.ReplicaState {
		return replicasync.ReplicaState{ID: uuid.New(), Hostname: host, RegionID: 999, RelayAddress: "http://127.0.0.1:1/" + host,
			Peers: []replicasync.PeerReport{{ID: uuid.New(), LatencyMS: 1.5}}, Warnings: []string{"w"}}
	}
	must := func(t *testing.T, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	find := func(rows []replicasync.Replica, id uuid.UUID) (replicasync.Replica, bool) {
		for _, r := range rows {
			if r.ID == id {
				return r, true
			}
		}
		return replicasync.Replica{}, false
	}

	t.Run("FirstBeatRegistersAndIsRevivedOnce", func(t *testing.T) {
		h := newHarness(t)
		st := state("a")
		b, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		if !b.Revived || !b.Replica.Live || b.Replica.Hostname != "a" || len(b.Replica.Peers) != 1 || len(b.Replica.Warnings) != 1 {
			t.Fatalf("first beat = %+v", b)
		}
		h.Advance(time.Millisecond)
		b2, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		if b2.Revived {
			t.Fatal("a second beat reports a revival")
		}
		if !b2.Replica.UpdatedAt.After(b.Replica.UpdatedAt) {
			t.Fatal("updated_at did not move with the store's clock")
		}
		rows, err := h.Store.RecentReplicas(ctx, h.StaleAfter)
		must(t, err)
		if r, ok := find(rows, st.ID); !ok || !r.Live || len(r.Peers) != 1 {
			t.Fatalf("recent replicas %+v lack the live a with its matrix", rows)
		}
		members, err := h.Store.RecentMembers(ctx, h.StaleAfter)
		must(t, err)
		r, ok := find(members, st.ID)
		if !ok || !r.Live || r.Hostname != "a" || len(r.Warnings) != 1 {
			t.Fatalf("recent members %+v lack the live a", members)
		}
		if r.Peers == nil || len(r.Peers) != 0 {
			t.Fatalf("recent members carry the latency matrix: %+v", r.Peers)
		}
		one, live, err := h.Store.GetReplicaIfLive(ctx, st.ID, h.StaleAfter)
		must(t, err)
		if !live || one.Hostname != "a" || one.Peers == nil || len(one.Peers) != 0 {
			t.Fatalf("targeted read = live %v %+v, want the live a without its matrix", live, one)
		}
	})

	t.Run("StaleRowIsNotLiveByTheStoreClock", func(t *testing.T) {
		h := newHarness(t)
		st := state("a")
		_, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		h.Advance(h.StaleAfter + h.StaleAfter/2)
		rows, err := h.Store.RecentReplicas(ctx, h.StaleAfter)
		must(t, err)
		if _, ok := find(rows, st.ID); ok {
			t.Fatal("a stale row is listed as recent")
		}
		r, live, err := h.Store.GetReplicaIfLive(ctx, st.ID, h.StaleAfter)
		must(t, err)
		if live || r.Live || r.ID != st.ID {
			t.Fatalf("stale row read as live=%v row=%s", live, r.ID)
		}
	})

	t.Run("StoppedRowIsListedAsStoppedAndClearedByTheNextBeat", func(t *testing.T) {
		h := newHarness(t)
		st := state("a")
		_, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		must(t, h.Store.MarkReplicaStopped(ctx, st.ID))
		rows, err := h.Store.RecentReplicas(ctx, h.StaleAfter)
		must(t, err)
		if r, ok := find(rows, st.ID); !ok || r.Live || r.StoppedAt == nil {
			t.Fatalf("a just-stopped row must be listed, not live, with stopped_at: %+v", r)
		}
		if _, live, err := h.Store.GetReplicaIfLive(ctx, st.ID, h.StaleAfter); err != nil || live {
			t.Fatalf("stopped row read as live (err %v)", err)
		}
		h.Advance(time.Millisecond)
		b, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		if !b.Revived || b.Replica.StoppedAt != nil || !b.Replica.Live {
			t.Fatalf("a beat after the stop did not clear it: %+v", b)
		}
	})

	t.Run("DeletedRowIsRecreatedAndRevived", func(t *testing.T) {
		h := newHarness(t)
		st := state("a")
		_, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		h.Delete(st.ID)
		r, live, err := h.Store.GetReplicaIfLive(ctx, st.ID, h.StaleAfter)
		must(t, err)
		if live || r.ID != uuid.Nil {
			t.Fatal("a deleted row is still read")
		}
		b, err := h.Store.BeatReplica(ctx, st)
		must(t, err)
		if !b.Revived || !b.Replica.Live {
			t.Fatalf("re-created row = %+v", b)
		}
	})

	t.Run("RetentionDeletesOnlyOldRows", func(t *testing.T) {
		h := newHarness(t)
		old, fresh := state("old"), state("fresh")
		_, err := h.Store.BeatReplica(ctx, old)
		must(t, err)
		h.Advance(2 * h.StaleAfter)
		_, err = h.Store.BeatReplica(ctx, fresh)
		must(t, err)
		n, err := h.Store.DeleteDeadReplicas(ctx, h.StaleAfter)
		must(t, err)
		if n != 1 {
			t.Fatalf("deleted %d rows, want 1", n)
		}
		if r, _, err := h.Store.GetReplicaIfLive(ctx, fresh.ID, h.StaleAfter); err != nil || r.ID != fresh.ID {
			t.Fatal("the fresh row was deleted")
		}
	})
}
