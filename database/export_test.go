package database

import (
	"context"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/migrations"
)

// BeatReplicaInTx runs a heartbeat inside tx, so a test can start the
// beat's transaction before a stop and commit it after (a late beat).
func BeatReplicaInTx(ctx context.Context, tx pgx.Tx, s ReplicaState) (Beat, error) {
	return beatReplica(ctx, tx, s)
}

// RaiseSchemaFloor is Finalize's step that raises the floor, for tests
// that interleave two finalizes.
func RaiseSchemaFloor(ctx context.Context, db *DB, schema int64, release string) (restore func() error, raised bool, err error) {
	return db.raiseSchemaFloor(ctx, schema, release)
}

// ApplyContractStep is Finalize's step that runs one contract step, for
// tests that interleave two finalizes.
func ApplyContractStep(ctx context.Context, db *DB, opts MigrateOptions, f migrations.File) error {
	o, err := opts.withDefaults()
	if err != nil {
		return err
	}
	return db.applyContract(ctx, o, f)
}
