package database_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
)

// A heartbeat whose transaction began before the replica left (cancelled
// by Close, committed late by Postgres) must not revive the stopped row.
func TestLateHeartbeatNeverRevivesAReplicaThatLeft(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx := context.Background()
	st := database.ReplicaState{ID: uuid.New(), Hostname: "h1", RegionID: 999}
	if _, err := db.BeatReplica(ctx, st); err != nil {
		t.Fatal(err)
	}
	tx, err := db.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT now()"); err != nil { // the beat's transaction has begun
		t.Fatal(err)
	}
	time.Sleep(time.Millisecond) // now() has microsecond resolution
	if err := db.MarkReplicaStopped(ctx, st.ID); err != nil {
		t.Fatal(err)
	}
	b, err := database.BeatReplicaInTx(ctx, tx, st)
	if err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Revived || b.Replica.StoppedAt == nil {
		t.Fatalf("late beat revived the replica: revived=%v stopped_at=%v", b.Revived, b.Replica.StoppedAt)
	}
	r, live, err := db.GetReplicaIfLive(ctx, st.ID, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if live || r.StoppedAt == nil {
		t.Fatal("a late heartbeat revived a stopped replica")
	}
}
