package database

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/coder/quartz"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/migrations"
)

// step is one migration file and its bookkeeping.
type step struct {
	file migrations.File
	// versionTable: create goose_db_version when missing (expand only).
	versionTable bool
	// applied reports, under the lock, whether the step already ran.
	applied func(ctx context.Context, tx pgx.Tx) (bool, error)
	// record marks the step done, in the lock holder's transaction.
	record func(ctx context.Context, tx pgx.Tx) error
}

func (db *DB) applyExpand(ctx context.Context, o MigrateOptions, f migrations.File) error {
	return db.runStep(ctx, o, step{
		file:         f,
		versionTable: true,
		applied: func(ctx context.Context, tx pgx.Tx) (bool, error) {
			var done bool
			err := tx.QueryRow(ctx, `SELECT COALESCE((SELECT is_applied FROM goose_db_version WHERE version_id = $1 ORDER BY id DESC LIMIT 1), false)`, f.Version).Scan(&done)
			return done, err
		},
		record: func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `INSERT INTO goose_db_version (version_id, is_applied) VALUES ($1, true)`, f.Version)
			return err
		},
	})
}

func (db *DB) applyContract(ctx context.Context, o MigrateOptions, f migrations.File) error {
	return db.runStep(ctx, o, step{
		file: f,
		applied: func(ctx context.Context, tx pgx.Tx) (bool, error) {
			var done bool
			err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM contract_steps WHERE name = $1)`, f.Name).Scan(&done)
			if err != nil || done {
				return done, err
			}
			// Under the lock: the floor must still protect the step. A
			// concurrent finalize that was refused (an old replica
			// registered) puts back the floor it raised.
			min, _, err := db.schemaFloor(ctx, tx)
			if err != nil {
				return false, err
			}
			if min < f.Version {
				return false, fmt.Errorf("the schema floor (%d) is below what contract step %s requires (%d): a concurrent finalize was refused and put the floor back; run finalize again", min, f.Name, f.Version)
			}
			return false, nil
		},
		record: func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `INSERT INTO contract_steps (name, schema_version, applied_by) VALUES ($1, $2, $3)`, f.Name, f.Version, o.Release)
			return err
		},
	})
}

// errLockBusy: another migrator holds the migration lock.
var errLockBusy = errors.New("another migrator holds the migration lock")

// isLockTimeout: SQLSTATE 55P03, lock_not_available (lock_timeout).
func isLockTimeout(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "55P03"
}

// isIdleSessionEnded: SQLSTATE 25P03, Postgres ended the session because
// the migration's transaction sat idle past IdleTimeout (the transaction
// was rolled back; trying again is safe).
func isIdleSessionEnded(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "25P03"
}

// isConnectionLost: the attempt failed because the database went away or
// cannot be reached yet (a restart, a failover): its transaction, if any,
// is rolled back by Postgres, so trying again is safe.
func isConnectionLost(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"), // connection exception
			pgErr.Code == "57P01", // admin shutdown
			pgErr.Code == "57P02", // crash shutdown
			pgErr.Code == "57P03": // cannot connect now (starting, shutting down)
			return true
		}
		return false
	}
	var connectErr *pgconn.ConnectError
	var netErr net.Error
	return errors.As(err, &connectErr) || errors.As(err, &netErr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		strings.Contains(err.Error(), "conn closed")
}

// runStep applies one step, retrying while the migration lock is taken or
// a table lock is not granted within LockTimeout.
func (db *DB) runStep(ctx context.Context, o MigrateOptions, s step) error {
	log := o.Logger.With(zap.String("file", s.file.Name))
	clock := o.Clock
	now := func() time.Time { return clock.Now("database", "migrate") }
	since := func(t time.Time) time.Duration { return clock.Since(t, "database", "migrate") }
	start := now()
	var lastLog, lastLost time.Time
	progress := func(msg string, fields ...zap.Field) {
		if !lastLog.IsZero() && since(lastLog) < 5*time.Second {
			return
		}
		lastLog = now()
		log.Info(msg, append(fields, zap.Duration("waited", since(start).Round(time.Millisecond)))...)
	}
	var lostSince time.Time // the first of the latest run of lost connections
	for attempt := 1; ; attempt++ {
		var applied bool
		var err error
		if s.file.NoTransaction {
			applied, err = db.tryStepOutsideTx(ctx, o, s)
		} else {
			applied, err = db.tryStepInTx(ctx, o, s)
		}
		var pause time.Duration
		lost := err != nil && ctx.Err() == nil && isConnectionLost(err)
		if !lost {
			lostSince = time.Time{}
		} else if lostSince.IsZero() {
			lostSince = now()
		}
		switch {
		case err == nil && applied:
			log.Info("applied migration", zap.String("kind", string(s.file.Kind)), zap.Int("attempts", attempt),
				zap.Duration("took", since(start).Round(time.Millisecond)))
			return nil
		case err == nil:
			log.Info("migration already applied by another replica")
			return nil
		case ctx.Err() != nil:
			return fmt.Errorf("migration %s: %w", s.file.Name, ctx.Err())
		case errors.Is(err, errLockBusy):
			progress("waiting for another replica's migration to finish")
			pause = jitter(o.RetryWait / 4)
		case lost && since(lostSince) < o.UnavailableTimeout:
			if lastLost.IsZero() || since(lastLost) >= 5*time.Second {
				lastLost = now()
				log.Warn("lost the database during a migration (a restart, a failover?); trying again until it is back",
					zap.Int("attempt", attempt), zap.Duration("unavailable_for", since(lostSince).Round(time.Millisecond)),
					zap.Duration("gives_up_after", o.UnavailableTimeout), zap.Error(err))
			}
			pause = jitter(o.RetryWait / 2)
		case isIdleSessionEnded(err):
			log.Warn("Postgres ended the migration's session: it sat idle in its transaction too long (a slow or stalled connection to the database?); trying again",
				zap.Int("attempt", attempt), zap.Duration("idle_timeout", o.IdleTimeout))
			pause = jitter(o.RetryWait / 4)
		case isLockTimeout(err):
			progress("migration is waiting for a table lock held by another session (a long transaction, a report, a backup?); retrying in short attempts so heartbeats keep flowing",
				zap.Int("attempt", attempt), zap.Duration("lock_timeout", o.LockTimeout))
			pause = jitter(o.RetryWait)
		default:
			return fmt.Errorf("migration %s: %w", s.file.Name, err)
		}
		t := clock.NewTimer(pause, "database", "migrate", "retry")
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("migration %s: %w", s.file.Name, ctx.Err())
		case <-t.C:
		}
	}
}

// jitter is d scaled by a random factor in [0.5, 1.5).
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.5 + rand.Float64()))
}

// lockStep opens the lock holder's transaction: the migration lock
// (without waiting), goose_db_version if asked for and missing, and
// whether the step already ran. The caller commits or rolls back tx.
// With bounded, the transaction's waits for table locks are bounded by
// o.LockTimeout and its idle time between statements by o.IdleTimeout
// (both transaction-local: they work through PgBouncer).
func (db *DB) lockStep(ctx context.Context, s step, o MigrateOptions, bounded bool) (tx pgx.Tx, done bool, err error) {
	tx, err = db.pool.Begin(ctx)
	if err != nil {
		return nil, false, err
	}
	fail := func(err error) (pgx.Tx, bool, error) {
		rollback(tx)
		return nil, false, err
	}
	if bounded {
		if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true), set_config('idle_in_transaction_session_timeout', $2, true)`,
			strconv.FormatInt(o.LockTimeout.Milliseconds(), 10), strconv.FormatInt(o.IdleTimeout.Milliseconds(), 10)); err != nil {
			return fail(err)
		}
	}
	// bounded steps run in this transaction and take both locks; an
	// unbounded one (a concurrent build, outside it) only the step lock.
	// On a refusal the rollback releases whichever was taken.
	var got bool
	lock := `SELECT pg_try_advisory_xact_lock($1) AND pg_try_advisory_xact_lock($2)`
	args := []any{int64(stepLockID), int64(migrationLockID)}
	if !bounded {
		lock, args = `SELECT pg_try_advisory_xact_lock($1)`, args[:1]
	}
	if err := tx.QueryRow(ctx, lock, args...).Scan(&got); err != nil {
		return fail(err)
	}
	if !got {
		return fail(errLockBusy)
	}
	if s.versionTable {
		if err := ensureVersionTable(ctx, tx); err != nil {
			return fail(err)
		}
	}
	done, err = s.applied(ctx, tx)
	if err != nil {
		return fail(err)
	}
	return tx, done, nil
}

func rollback(tx pgx.Tx) {
	// Real time: a deadline on the driver's round trip.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = tx.Rollback(ctx)
}

// tryStepInTx runs a step's statements in the lock holder's transaction.
func (db *DB) tryStepInTx(ctx context.Context, o MigrateOptions, s step) (applied bool, err error) {
	tx, done, err := db.lockStep(ctx, s, o, true)
	if err != nil {
		return false, err
	}
	defer rollback(tx) // a no-op after Commit
	if !done {
		for i, stmt := range s.file.Statements {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return false, fmt.Errorf("statement %d: %w", i+1, err)
			}
		}
		if err := s.record(ctx, tx); err != nil {
			return false, fmt.Errorf("record: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return false, err
	}
	return !done, nil
}

// reIndexName finds the index a CREATE INDEX CONCURRENTLY IF NOT EXISTS
// builds (the only statement a NO TRANSACTION expand file may hold).
var reIndexName = regexp.MustCompile(`(?is)^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+("?[\w.]+"?)`)

// tryStepOutsideTx runs a NO TRANSACTION step: a transaction holds the
// migration lock (idle: it takes no snapshot and no table lock, so a
// concurrent index build does not wait for it) while each statement runs
// on its own through the pool; the holder then records the step.
// Statements run without lock_timeout: the concurrent builds they are
// limited to never queue ahead of a heartbeat's lock.
func (db *DB) tryStepOutsideTx(ctx context.Context, o MigrateOptions, s step) (applied bool, err error) {
	holder, done, err := db.lockStep(ctx, s, o, false)
	if err != nil {
		return false, err
	}
	defer rollback(holder)
	// The queries with arguments above ran through the extended protocol:
	// their unnamed portal lives until the next one or a simple query, and
	// keeps a snapshot (an xmin) that a concurrent build would wait for
	// forever. A simple query drops it.
	if _, err := holder.Exec(ctx, "SELECT 1"); err != nil {
		return false, err
	}
	if !done {
		for i, stmt := range s.file.Statements {
			if m := reIndexName.FindStringSubmatch(stmt); m != nil {
				if err := db.dropInvalidIndex(ctx, o.Clock, o.Logger.With(zap.String("file", s.file.Name)), strings.Trim(m[1], `"`)); err != nil {
					return false, fmt.Errorf("statement %d: %w", i+1, err)
				}
			}
			if _, err := db.pool.Exec(ctx, stmt); err != nil {
				return false, fmt.Errorf("statement %d: %w", i+1, err)
			}
		}
		if err := s.record(ctx, holder); err != nil {
			return false, fmt.Errorf("record: %w", err)
		}
	}
	if err := holder.Commit(ctx); err != nil {
		return false, err
	}
	return !done, nil
}

// buildPollInterval is how often a migrator checks whether an index build
// a killed migrator left running has ended.
const buildPollInterval = 250 * time.Millisecond

// dropInvalidIndex drops index name if a concurrent build that failed or
// was interrupted left it invalid (IF NOT EXISTS would keep it forever).
// An index is invalid while it is being built, too: a migrator killed
// mid-build (its lock holder's session ended, so this one got the lock)
// leaves its build running in its backend, which knows nothing of the
// kill. Dropping the index under that build collides with it ("tuple
// concurrently updated") or throws its work away, so this waits for such
// a build to end first, then looks again.
func (db *DB) dropInvalidIndex(ctx context.Context, clock quartz.Clock, log *zap.Logger, name string) error {
	var lastLog time.Time
	start := clock.Now("database", "migrate", "build")
	for {
		var building bool
		err := db.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index WHERE index_relid = to_regclass($1))`, name).Scan(&building)
		if err != nil {
			return err
		}
		if !building {
			break
		}
		if lastLog.IsZero() || clock.Since(lastLog, "database", "migrate", "build") >= 5*time.Second {
			lastLog = clock.Now("database", "migrate", "build")
			log.Info("waiting for an index build a previous migrator left running (killed mid-build?) to end",
				zap.String("index", name), zap.Duration("waited", clock.Since(start, "database", "migrate", "build").Round(time.Millisecond)))
		}
		t := clock.NewTimer(buildPollInterval, "database", "migrate", "build")
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	var invalid bool
	err := db.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1) AND NOT indisvalid)`, name).Scan(&invalid)
	if err != nil || !invalid {
		return err
	}
	_, err = db.pool.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+pgx.Identifier(strings.Split(name, ".")).Sanitize())
	return err
}

// ensureVersionTable creates goose's version table as goose does (with its
// version 0 row, which releases that run goose expect), when missing.
// It runs under the migration lock, but it does not trust a catalog
// lookup (to_regclass) to see a table another migrator's transaction
// created and committed while this transaction waited: this backend may
// not have processed that catalog change yet (seen through PgBouncer: 1
// run in a loaded suite failed with "goose_db_version already exists").
// CREATE TABLE IF NOT EXISTS checks with the catalog up to date, and the
// version 0 row is inserted only into an empty table.
func ensureVersionTable(ctx context.Context, tx pgx.Tx) error {
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS goose_db_version (
	id integer PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY,
	version_id bigint NOT NULL,
	is_applied boolean NOT NULL,
	tstamp timestamp NOT NULL DEFAULT now()
)`); err != nil {
		return fmt.Errorf("create goose_db_version: %w", err)
	}
	_, err := tx.Exec(ctx, `INSERT INTO goose_db_version (version_id, is_applied) SELECT 0, true WHERE NOT EXISTS (SELECT 1 FROM goose_db_version)`)
	return err
}
