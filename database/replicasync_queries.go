package database

import (
	"context"
	"fmt"

	"github.com/google/uuid"
)

// UnstoppedReplicaIDs returns those of ids whose rows exist and are not
// marked stopped, however long ago they last beat. Right after a database
// outage every peer's heartbeat looks stale until it beats again;
// replicasync asks this to keep such peers (they did not leave) while
// dropping the ones that stopped or were deleted meanwhile. One round trip.
func (db *DB) UnstoppedReplicaIDs(ctx context.Context, ids []uuid.UUID) ([]uuid.UUID, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	rows, err := db.pool.Query(ctx, `SELECT id FROM replicas WHERE id = ANY($1) AND stopped_at IS NULL`, ids)
	if err != nil {
		return nil, fmt.Errorf("list unstopped replicas: %w", err)
	}
	defer rows.Close()
	var out []uuid.UUID
	for rows.Next() {
		var id uuid.UUID
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("list unstopped replicas: %w", err)
		}
		out = append(out, id)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list unstopped replicas: %w", err)
	}
	return out, nil
}
