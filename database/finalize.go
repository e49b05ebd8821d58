package database

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// FinalizeOptions tunes Finalize.
type FinalizeOptions struct {
	MigrateOptions
	// StaleAfter: a replica that has not stopped and was updated within
	// this of the database's now() counts as live. The finalizing command
	// does not know the replicas' heartbeat intervals, so it is generous:
	// a replica killed without stopping blocks a finalize for this long.
	// Default 1m.
	StaleAfter time.Duration
}

// FinalizeResult is what a Finalize did.
type FinalizeResult struct {
	// Status is the schema before the contract steps ran.
	Status SchemaStatus
	// Applied names the contract steps this call applied.
	Applied []string
	// MinSchema and MinRelease are the schema floor afterwards: binaries
	// that do not know MinSchema refuse to start (0: no floor).
	MinSchema  int64
	MinRelease string
}

// OldReplica is a live replica too old for a contract step.
type OldReplica struct {
	ID           uuid.UUID
	Hostname     string
	RelayAddress string
	Version      string
	// Schema is the schema version its release knows; 0 when its release
	// never recorded one (a release before expand/contract).
	Schema int64
}

func (r OldReplica) String() string {
	where := r.RelayAddress
	if where == "" {
		where = "id " + r.ID.String()
	}
	v := r.Version
	if v == "" {
		v = "unknown version"
	}
	return fmt.Sprintf("%s (%s, %s)", r.Hostname, where, v)
}

// OldReplicasError is a finalize refused because live replicas run a
// release that does not know the schema version a contract step needs.
type OldReplicasError struct {
	Schema   int64
	Release  string // the oldest release that knows Schema, if recorded
	Replicas []OldReplica
}

func (e *OldReplicasError) Error() string {
	names := make([]string, len(e.Replicas))
	for i, r := range e.Replicas {
		names[i] = r.String()
	}
	need := fmt.Sprintf("schema version %d", e.Schema)
	if e.Release != "" {
		need = fmt.Sprintf("%s (schema version %d)", e.Release, e.Schema)
	}
	return fmt.Sprintf("refusing to finalize: %d live replica(s) run a release older than %s: %s; finish the rolling upgrade (or stop them), then finalize again",
		len(e.Replicas), need, strings.Join(names, ", "))
}

// Finalize runs the contract steps this binary carries that are pending,
// after applying its expand migrations (MigrateWith). It never runs by
// itself: only `coder server migrate --finalize` calls it.
//
// It refuses with an *OldReplicasError, before changing anything, while a
// live replica runs a release that does not know the newest schema version
// the pending steps require. Then it raises the schema floor (so binaries
// too old refuse to start), checks the live replicas once more (a replica
// that registered meanwhile either sees the floor when it checks after
// registering, or is seen here, and the floor is put back), and runs the
// steps, each in its own transaction under the migration lock, with
// lock_timeout and retries as for expand migrations. Running it again
// after a failure continues where it stopped.
func (db *DB) Finalize(ctx context.Context, opts FinalizeOptions) (FinalizeResult, error) {
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = time.Minute
	}
	o, err := opts.MigrateOptions.withDefaults()
	if err != nil {
		return FinalizeResult{}, err
	}
	st, err := db.MigrateWith(ctx, o)
	res := FinalizeResult{Status: st, MinSchema: st.MinSchema, MinRelease: st.MinRelease}
	if err != nil || len(st.PendingContract) == 0 {
		return res, err
	}
	var need int64
	for _, f := range st.PendingContract {
		need = max(need, f.Version)
	}
	if need > st.Known {
		return res, fmt.Errorf("contract step requires schema version %d, newer than this release knows (%d): a broken build", need, st.Known)
	}
	release, err := db.oldestReleaseFor(ctx, need)
	if err != nil {
		return res, err
	}
	if release == "" {
		release = o.Release
	}
	if err := db.refuseOldReplicas(ctx, need, release, opts.StaleAfter); err != nil {
		return res, err
	}
	restore, raised, err := db.raiseSchemaFloor(ctx, need, release)
	if err != nil {
		return res, err
	}
	if err := db.refuseOldReplicas(ctx, need, release, opts.StaleAfter); err != nil {
		if raised {
			if rerr := restore(); rerr != nil {
				o.Logger.Warn("could not put the schema floor back after a refused finalize", zap.Error(rerr))
			}
		}
		return res, err
	}
	res.MinSchema, res.MinRelease, err = db.schemaFloor(ctx, db.pool)
	if err != nil {
		return res, err
	}
	o.Logger.Info("finalizing: running contract steps", zap.Int("steps", len(st.PendingContract)),
		zap.Int64("min_schema", res.MinSchema), zap.String("min_release", res.MinRelease))
	for _, f := range st.PendingContract {
		if err := db.applyContract(ctx, o, f); err != nil {
			return res, err
		}
		res.Applied = append(res.Applied, f.Name)
	}
	return res, nil
}

// LiveReplicasOlderThan lists the replicas live within staleAfter whose
// release does not know schema version schema (or never recorded what it
// knows), oldest first.
func (db *DB) LiveReplicasOlderThan(ctx context.Context, schema int64, staleAfter time.Duration) ([]OldReplica, error) {
	rows, err := db.pool.Query(ctx, `
SELECT r.id, r.hostname, r.relay_address, r.version, COALESCE(rel.schema_version, 0)
FROM replicas r LEFT JOIN releases rel ON rel.version = r.version
WHERE r.stopped_at IS NULL AND r.updated_at > now() - make_interval(secs => $2)
	AND COALESCE(rel.schema_version, 0) < $1
ORDER BY r.created_at, r.id`, schema, staleAfter.Seconds())
	if err != nil {
		return nil, fmt.Errorf("list live replicas: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (OldReplica, error) {
		var r OldReplica
		err := row.Scan(&r.ID, &r.Hostname, &r.RelayAddress, &r.Version, &r.Schema)
		return r, err
	})
	if err != nil {
		return nil, fmt.Errorf("list live replicas: %w", err)
	}
	return out, nil
}

func (db *DB) refuseOldReplicas(ctx context.Context, schema int64, release string, staleAfter time.Duration) error {
	old, err := db.LiveReplicasOlderThan(ctx, schema, staleAfter)
	if err != nil {
		return err
	}
	if len(old) > 0 {
		return &OldReplicasError{Schema: schema, Release: release, Replicas: old}
	}
	return nil
}

// oldestReleaseFor is the first release recorded as knowing schema
// version schema or newer ("" when none is).
func (db *DB) oldestReleaseFor(ctx context.Context, schema int64) (string, error) {
	var v string
	err := db.pool.QueryRow(ctx, `SELECT version FROM releases WHERE schema_version >= $1 ORDER BY schema_version, first_seen LIMIT 1`, schema).Scan(&v)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("read releases: %w", err)
	}
	return v, nil
}

// raiseSchemaFloor sets the floor to schema (and its release) unless it is
// already as high. restore puts the previous floor back; raised says
// whether there was anything to put back.
func (db *DB) raiseSchemaFloor(ctx context.Context, schema int64, release string) (restore func() error, raised bool, err error) {
	var prevMin int64
	var prevRelease string
	err = pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLockID)); err != nil {
			return err
		}
		var err error
		if prevMin, prevRelease, err = db.schemaFloor(ctx, tx); err != nil {
			return err
		}
		if prevMin >= schema {
			return nil
		}
		raised = true
		return setFloor(ctx, tx, schema, release)
	})
	if err != nil {
		return nil, false, fmt.Errorf("raise the schema floor: %w", err)
	}
	// restore runs under the migration lock, as contract steps do: a
	// concurrent finalize (which found the floor raised already) may have
	// applied a step meanwhile, and the floor must never go below an
	// applied step (applyContract checks the other order).
	restore = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLockID)); err != nil {
				return err
			}
			var applied bool
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM contract_steps WHERE schema_version > $1)`, prevMin).Scan(&applied); err != nil {
				return err
			}
			if applied {
				return nil // another finalize ran a step the raised floor protects
			}
			if prevMin == 0 {
				_, err := tx.Exec(ctx, `DELETE FROM site_configs WHERE key IN ($1, $2)`, keyMinSchemaVersion, keyMinRelease)
				return err
			}
			return setFloor(ctx, tx, prevMin, prevRelease)
		})
	}
	return restore, raised, nil
}

func setFloor(ctx context.Context, tx pgx.Tx, schema int64, release string) error {
	for k, v := range map[string]string{keyMinSchemaVersion: strconv.FormatInt(schema, 10), keyMinRelease: release} {
		if _, err := tx.Exec(ctx, `INSERT INTO site_configs (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value`, k, v); err != nil {
			return err
		}
	}
	return nil
}
