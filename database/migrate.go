package database

import (
	"context"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/migrations"
)

// migrationLockID is the advisory lock that serializes migrations. Releases
// before expand/contract took it as a session lock (pg_advisory_lock) for
// their whole run; this runner takes it as a transaction lock around each
// migration. The two kinds conflict, so an old and a new binary starting at
// once never both migrate. Arbitrary, but fixed forever.
//
// A concurrent index build cannot hold it: the build waits for every
// transaction with an older snapshot, and a statement blocked on this lock
// (an old release starting, a finalize raising the schema floor) has one,
// so the build and its lock holder would wait for each other forever.
// Steps of this runner therefore also take stepLockID, and a concurrent
// build holds only that: new migrators still run one at a time, and what
// blocks on migrationLockID never blocks on, or holds up, a build. (The
// old release applies only migrations that precede any such build.)
const migrationLockID = 7_386_412_001

// stepLockID is held by every step of this runner, with migrationLockID
// except during a concurrent index build (see migrationLockID). Only ever
// taken without waiting. Arbitrary, but fixed forever.
const stepLockID = 7_386_412_003

// MigrateOptions tunes MigrateWith and Finalize. The zero value is usable.
type MigrateOptions struct {
	// Logger receives progress: what is pending, each migration applied,
	// and a line every few seconds while waiting for a lock. Default: no
	// logging.
	Logger *zap.Logger
	// Release is this binary's version. It is recorded with the schema
	// version the binary knows (the releases table), so a finalize can
	// tell which live replicas are too old, and it names this binary in
	// errors. Empty: nothing is recorded.
	Release string
	// Expand and Contract are the migrations this binary carries. Default
	// migrations.Expand() and migrations.Contract(); tests give others.
	Expand   []migrations.File
	Contract []migrations.File
	// LockTimeout bounds each wait for a table lock (SET LOCAL
	// lock_timeout in the migration's transaction, so it works through
	// PgBouncer). While a migration waits for a lock, every query that
	// needs a conflicting lock on that table (a heartbeat's UPDATE behind
	// an ALTER TABLE) queues behind it: this is the longest a running
	// replica's heartbeat waits on a migration. Shorter means more
	// attempts against a long reader. Default 500ms.
	LockTimeout time.Duration
	// RetryWait is the pause after an attempt that timed out, jittered
	// between half and one and a half times it, so queued heartbeats go
	// through and several migrators do not retry in step. Default 1s.
	RetryWait time.Duration
	// IdleTimeout bounds how long Postgres keeps a migration's
	// transaction open while waiting for the migrator's next statement
	// (SET LOCAL idle_in_transaction_session_timeout). A live migrator
	// sends its statements back to back; one that went silent mid-way (a
	// network partition, a middlebox that lost the connection, a paused
	// VM) would otherwise hold the table locks its statements took, and
	// every heartbeat behind them, until TCP gives up on it (hours). Past
	// it Postgres ends the session, which rolls the transaction back; a
	// migrator that was merely slow retries. Default 2s.
	IdleTimeout time.Duration
	// UnavailableTimeout is how long a migration keeps trying while the
	// database cannot be reached (a restart, a failover): each attempt
	// that lost its connection is rolled back by Postgres and tried again.
	// Past it, the error is returned. Default 30s (the start-up rule for
	// an unreachable database).
	UnavailableTimeout time.Duration
	// Clock paces the migration's local time decisions: the pauses
	// between attempts, how long the database has been unreachable
	// (against UnavailableTimeout), the progress lines, the poll for an
	// index build left running, and the durations logged. LockTimeout and
	// IdleTimeout are enforced by Postgres, on its own clock. Timer tags
	// start with "database", "migrate". Default: the real clock; tests
	// step a quartz.Mock.
	Clock quartz.Clock
}

func (o MigrateOptions) withDefaults() (MigrateOptions, error) {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	var err error
	if o.Expand == nil {
		if o.Expand, err = migrations.Expand(); err != nil {
			return o, err
		}
	}
	if o.Contract == nil {
		if o.Contract, err = migrations.Contract(); err != nil {
			return o, err
		}
	}
	if o.LockTimeout <= 0 {
		o.LockTimeout = 500 * time.Millisecond
	}
	if o.RetryWait <= 0 {
		o.RetryWait = time.Second
	}
	if o.IdleTimeout <= 0 {
		o.IdleTimeout = 2 * time.Second
	}
	if o.UnavailableTimeout <= 0 {
		o.UnavailableTimeout = 30 * time.Second
	}
	if o.Clock == nil {
		o.Clock = quartz.NewReal()
	}
	return o, nil
}

// Migrate applies every pending expand migration this binary carries (see
// MigrateWith). Any number of replicas may call it at once.
func (db *DB) Migrate(ctx context.Context, log *zap.Logger) error {
	_, err := db.MigrateWith(ctx, MigrateOptions{Logger: log})
	return err
}

// MigrateWith brings the schema up to what this binary knows, as safely as
// a rolling upgrade needs:
//
//   - it reads the applied versions first, without any lock, and returns
//     at once when nothing is pending (every start of an up-to-date
//     replica);
//   - a binary older than a finalized contract step allows gets a
//     *TooOldError before anything is written;
//   - each pending migration runs in its own transaction that holds the
//     migration lock (a transaction-scoped advisory lock: it works through
//     PgBouncer in transaction pooling, and conflicts with the session
//     lock older releases take), re-checks under the lock that it is still
//     pending (another replica may have applied it), and runs every
//     statement under a short lock_timeout. When a statement times out
//     waiting for a table lock, the transaction is rolled back (queued
//     heartbeats go through) and retried after a jittered pause, logging
//     progress, until ctx ends;
//   - a NO TRANSACTION migration (a concurrent index build) runs its
//     statements outside a transaction while a second transaction holds
//     the migration lock, after dropping an invalid index a broken earlier
//     build left behind.
//
// A schema newer than the binary knows is not an error: the status says
// so (Newer), and the caller warns. With opts.Release set, the release
// and the schema version it knows are recorded. The status returned is as
// of after the migrations.
func (db *DB) MigrateWith(ctx context.Context, opts MigrateOptions) (SchemaStatus, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return SchemaStatus{}, err
	}
	st, err := db.schemaStatus(ctx, o)
	if err != nil {
		return st, err
	}
	if err := st.allows(o.Release); err != nil {
		return st, err
	}
	if len(st.Pending) > 0 {
		o.Logger.Info("migrating the database", zap.Int("pending", len(st.Pending)),
			zap.Int64("schema_found", st.Found), zap.Int64("schema_known", st.Known))
		start := o.Clock.Now("database", "migrate")
		for _, f := range st.Pending {
			if err := db.applyExpand(ctx, o, f); err != nil {
				return st, err
			}
		}
		if st, err = db.schemaStatus(ctx, o); err != nil {
			return st, err
		}
		o.Logger.Info("database schema is up to date", zap.Int64("schema", st.Found), zap.Duration("took", o.Clock.Since(start, "database", "migrate").Round(time.Millisecond)))
	}
	if o.Release != "" && st.hasReleases {
		if err := db.recordRelease(ctx, o.Release, st.Known); err != nil {
			return st, err
		}
	}
	return st, nil
}
