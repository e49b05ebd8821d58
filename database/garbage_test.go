package database_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
)

// One row whose peers or warnings column holds JSON of another shape (a
// newer version's format during a rolling update, a hand edit) must not
// hide every other replica: membership reads return all rows, the odd one
// with empty reports, and its own replica's beats keep working.
func TestMalformedReportsInOneRowDoNotBreakMembershipReads(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	ctx := context.Background()
	good := database.ReplicaState{ID: uuid.New(), Hostname: "good", RegionID: 999, RelayAddress: "http://127.0.0.1:1"}
	if _, err := db.BeatReplica(ctx, good); err != nil {
		t.Fatal(err)
	}
	for i, bad := range []struct{ peers, warnings string }{
		{`{"format":2}`, `[]`},
		{`[{"id":"not-a-uuid","latency_ms":"fast"}]`, `[]`},
		{`[]`, `[1, {"x": null}]`},
		{`null`, `"just a string"`},
	} {
		id := uuid.New()
		if _, err := db.Pool().Exec(ctx, `INSERT INTO replicas (id, hostname, region_id, relay_address, peers, warnings)
VALUES ($1, 'odd', 999, 'http://127.0.0.1:2', $2::jsonb, $3::jsonb)`, id, bad.peers, bad.warnings); err != nil {
			t.Fatal(err)
		}
		rows, err := db.RecentReplicas(ctx, time.Minute)
		if err != nil {
			t.Fatalf("case %d: one odd row broke the membership read: %v", i, err)
		}
		if !hasReplica(rows, good.ID) || !hasReplica(rows, id) {
			t.Fatalf("case %d: rows %d, want both the good and the odd replica", i, len(rows))
		}
		live, err := db.LiveReplicas(ctx, time.Minute)
		if err != nil || !hasReplica(live, good.ID) {
			t.Fatalf("case %d: live replicas: %v", i, err)
		}
		if r, ok, err := db.GetReplicaIfLive(ctx, id, time.Minute); err != nil || !ok || r.Peers == nil || r.Warnings == nil {
			t.Fatalf("case %d: get the odd replica: ok=%v err=%v peers=%v warnings=%v", i, ok, err, r.Peers, r.Warnings)
		}
		// The odd row's own replica (an older version) still beats: the
		// upsert reads its row back.
		if _, err := db.BeatReplica(ctx, database.ReplicaState{ID: id, Hostname: "odd", RegionID: 999}); err != nil {
			t.Fatalf("case %d: beat after an odd row: %v", i, err)
		}
		if _, err := db.Pool().Exec(ctx, `UPDATE replicas SET peers = $2::jsonb, warnings = $3::jsonb WHERE id = $1`, id, bad.peers, bad.warnings); err != nil {
			t.Fatal(err)
		}
	}
}

func hasReplica(rows []database.Replica, id uuid.UUID) bool {
	for _, r := range rows {
		if r.ID == id {
			return true
		}
	}
	return false
}
