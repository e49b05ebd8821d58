package database

import (
	"context"

	"github.com/jackc/pgx/v5"
)

// BeatReplicaInTx runs a heartbeat inside tx, so a test can start the
// beat's transaction before a stop and commit it after (a late beat).
func BeatReplicaInTx(ctx context.Context, tx pgx.Tx, s ReplicaState) (Beat, error) {
	return beatReplica(ctx, tx, s)
}
