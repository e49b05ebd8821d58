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

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

// Site config keys of the schema floor a finalize raises.
const (
	keyMinSchemaVersion = "min_schema_version"
	keyMinRelease       = "min_release"
)

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
	return o, nil
}

// SchemaStatus is the database's schema as one binary sees it.
type SchemaStatus struct {
	// Known is the newest expand version this binary carries.
	Known int64
	// Found is the newest expand version applied in the database.
	Found int64
	// FoundRelease is the first release recorded as knowing Found (empty
	// when none is recorded: a release before expand/contract).
	FoundRelease string
	// Unknown are applied expand versions this binary does not carry: the
	// schema is newer than it knows (a newer release migrated).
	Unknown []int64
	// Pending are the expand migrations this binary carries that are not
	// applied.
	Pending []migrations.File
	// PendingContract are the contract steps this binary carries that are
	// not applied.
	PendingContract []migrations.File
	// MinSchema is the expand version a finalized contract step requires
	// every binary to know (0: none), and MinRelease the oldest release
	// recorded as knowing it.
	MinSchema  int64
	MinRelease string

	hasReleases bool
}

// Newer reports whether the database's schema is newer than the binary
// knows: applied expand versions it does not carry.
func (s SchemaStatus) Newer() bool { return len(s.Unknown) > 0 }

// SkewWarning describes a schema newer than the binary knows, naming both
// versions; empty when it is not.
func (s SchemaStatus) SkewWarning(release string) string {
	if !s.Newer() {
		return ""
	}
	from := ""
	if s.FoundRelease != "" {
		from = ", from release " + s.FoundRelease
	}
	return fmt.Sprintf("the database schema (version %d%s) is newer than this release (%s) knows (version %d): it runs on it for one release of skew during a rolling upgrade; upgrade this replica",
		s.Found, from, release, s.Known)
}

// TooOldError is a binary that does not know the schema version a
// finalized contract step requires: it must not run.
type TooOldError struct {
	Release    string
	Known      int64
	MinSchema  int64
	MinRelease string
}

func (e *TooOldError) Error() string {
	oldest := fmt.Sprintf("a release that knows schema version %d", e.MinSchema)
	if e.MinRelease != "" {
		oldest = e.MinRelease
	}
	return fmt.Sprintf("this release (%s) is too old for this database: a finalized contract step requires schema version %d and this release knows up to %d; the oldest release that may run is %s",
		orDev(e.Release), e.MinSchema, e.Known, oldest)
}

func orDev(release string) string {
	if release == "" {
		return "unknown version"
	}
	return release
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
		start := time.Now()
		for _, f := range st.Pending {
			if err := db.applyExpand(ctx, o, f); err != nil {
				return st, err
			}
		}
		if st, err = db.schemaStatus(ctx, o); err != nil {
			return st, err
		}
		o.Logger.Info("database schema is up to date", zap.Int64("schema", st.Found), zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	}
	if o.Release != "" && st.hasReleases {
		if err := db.recordRelease(ctx, o.Release, st.Known); err != nil {
			return st, err
		}
	}
	return st, nil
}

// SchemaStatus reads the schema's state without changing anything.
func (db *DB) SchemaStatus(ctx context.Context, opts MigrateOptions) (SchemaStatus, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return SchemaStatus{}, err
	}
	return db.schemaStatus(ctx, o)
}

// NewestSchemaVersion is the newest expand version applied (0 before the
// first migration): one cheap query, for replicas that watch whether a
// newer release migrated under them.
func (db *DB) NewestSchemaVersion(ctx context.Context) (int64, error) {
	var v int64
	err := db.pool.QueryRow(ctx, `SELECT COALESCE(max(version_id), 0) FROM goose_db_version WHERE is_applied`).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("read the schema version: %w", err)
	}
	return v, nil
}

// CheckSchemaFloor returns a *TooOldError when a finalized contract step
// requires a newer schema than known. A starting replica calls it again
// once registered: a finalize that checked the live replicas before this
// one registered has raised the floor by then, so one of the two always
// sees the other.
func (db *DB) CheckSchemaFloor(ctx context.Context, release string, known int64) error {
	min, minRelease, err := db.schemaFloor(ctx, db.pool)
	if err != nil {
		return err
	}
	st := SchemaStatus{Known: known, MinSchema: min, MinRelease: minRelease}
	return st.allows(release)
}

func (s SchemaStatus) allows(release string) error {
	if s.MinSchema > s.Known {
		return &TooOldError{Release: release, Known: s.Known, MinSchema: s.MinSchema, MinRelease: s.MinRelease}
	}
	return nil
}

// sqlRunner is the pool or a transaction.
type sqlRunner interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// tables reports which of the bookkeeping tables exist.
type tables struct{ versions, siteConfigs, releases, contractSteps bool }

func readTables(ctx context.Context, q sqlRunner) (tables, error) {
	var t tables
	err := q.QueryRow(ctx, `SELECT to_regclass('goose_db_version') IS NOT NULL, to_regclass('site_configs') IS NOT NULL,
	to_regclass('releases') IS NOT NULL, to_regclass('contract_steps') IS NOT NULL`).
		Scan(&t.versions, &t.siteConfigs, &t.releases, &t.contractSteps)
	if err != nil {
		return t, fmt.Errorf("read schema state: %w", err)
	}
	return t, nil
}

// appliedVersions are the expand versions goose_db_version records as
// applied (goose's rule: the newest row of a version says).
func appliedVersions(ctx context.Context, q sqlRunner) (map[int64]bool, error) {
	rows, err := q.Query(ctx, `SELECT DISTINCT ON (version_id) version_id, is_applied FROM goose_db_version ORDER BY version_id, id DESC`)
	if err != nil {
		return nil, fmt.Errorf("read applied migrations: %w", err)
	}
	defer rows.Close()
	out := map[int64]bool{}
	for rows.Next() {
		var v int64
		var applied bool
		if err := rows.Scan(&v, &applied); err != nil {
			return nil, fmt.Errorf("read applied migrations: %w", err)
		}
		if applied && v > 0 {
			out[v] = true
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read applied migrations: %w", err)
	}
	return out, nil
}

func (db *DB) schemaStatus(ctx context.Context, o MigrateOptions) (SchemaStatus, error) {
	st := SchemaStatus{Known: migrations.Known(o.Expand)}
	t, err := readTables(ctx, db.pool)
	if err != nil {
		return st, err
	}
	st.hasReleases = t.releases
	applied := map[int64]bool{}
	if t.versions {
		if applied, err = appliedVersions(ctx, db.pool); err != nil {
			return st, err
		}
	}
	known := map[int64]bool{}
	for _, f := range o.Expand {
		known[f.Version] = true
		if !applied[f.Version] {
			st.Pending = append(st.Pending, f)
		}
	}
	for v := range applied {
		st.Found = max(st.Found, v)
		if !known[v] {
			st.Unknown = append(st.Unknown, v)
		}
	}
	if t.siteConfigs {
		if st.MinSchema, st.MinRelease, err = db.schemaFloor(ctx, db.pool); err != nil {
			return st, err
		}
	}
	if t.releases && st.Found > 0 {
		err := db.pool.QueryRow(ctx, `SELECT version FROM releases WHERE schema_version = $1 ORDER BY first_seen LIMIT 1`, st.Found).Scan(&st.FoundRelease)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return st, fmt.Errorf("read releases: %w", err)
		}
	}
	done := map[string]bool{}
	if t.contractSteps {
		rows, err := db.pool.Query(ctx, `SELECT name FROM contract_steps`)
		if err != nil {
			return st, fmt.Errorf("read contract steps: %w", err)
		}
		names, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return st, fmt.Errorf("read contract steps: %w", err)
		}
		for _, n := range names {
			done[n] = true
		}
	}
	for _, f := range o.Contract {
		if !done[f.Name] {
			st.PendingContract = append(st.PendingContract, f)
		}
	}
	return st, nil
}

// schemaFloor reads the floor a finalize raised (0 when none).
func (db *DB) schemaFloor(ctx context.Context, q sqlRunner) (int64, string, error) {
	rows, err := q.Query(ctx, `SELECT key, value FROM site_configs WHERE key IN ($1, $2)`, keyMinSchemaVersion, keyMinRelease)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // no site_configs yet
			return 0, "", nil
		}
		return 0, "", fmt.Errorf("read the schema floor: %w", err)
	}
	defer rows.Close()
	var min int64
	var release string
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			return 0, "", fmt.Errorf("read the schema floor: %w", err)
		}
		switch k {
		case keyMinSchemaVersion:
			min, _ = strconv.ParseInt(v, 10, 64)
		case keyMinRelease:
			release = v
		}
	}
	if err := rows.Err(); err != nil {
		return 0, "", fmt.Errorf("read the schema floor: %w", err)
	}
	return min, release, nil
}

// recordRelease notes that release knows schema version known. A version
// string seen with two schemas (two dev builds) keeps the older: finalize
// then errs on the side of refusing.
func (db *DB) recordRelease(ctx context.Context, release string, known int64) error {
	_, err := db.pool.Exec(ctx, `INSERT INTO releases (version, schema_version) VALUES ($1, $2)
ON CONFLICT (version) DO UPDATE SET schema_version = LEAST(releases.schema_version, EXCLUDED.schema_version), last_seen = now()`, release, known)
	if err != nil {
		return fmt.Errorf("record release %s: %w", release, err)
	}
	return nil
}

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
	start := time.Now()
	var lastLog, lastLost time.Time
	progress := func(msg string, fields ...zap.Field) {
		if time.Since(lastLog) < 5*time.Second {
			return
		}
		lastLog = time.Now()
		log.Info(msg, append(fields, zap.Duration("waited", time.Since(start).Round(time.Millisecond)))...)
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
			lostSince = time.Now()
		}
		switch {
		case err == nil && applied:
			log.Info("applied migration", zap.String("kind", string(s.file.Kind)), zap.Int("attempts", attempt),
				zap.Duration("took", time.Since(start).Round(time.Millisecond)))
			return nil
		case err == nil:
			log.Info("migration already applied by another replica")
			return nil
		case ctx.Err() != nil:
			return fmt.Errorf("migration %s: %w", s.file.Name, ctx.Err())
		case errors.Is(err, errLockBusy):
			progress("waiting for another replica's migration to finish")
			pause = jitter(o.RetryWait / 4)
		case lost && time.Since(lostSince) < o.UnavailableTimeout:
			if time.Since(lastLost) >= 5*time.Second {
				lastLost = time.Now()
				log.Warn("lost the database during a migration (a restart, a failover?); trying again until it is back",
					zap.Int("attempt", attempt), zap.Duration("unavailable_for", time.Since(lostSince).Round(time.Millisecond)),
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
		t := time.NewTimer(pause)
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
				if err := db.dropInvalidIndex(ctx, o.Logger.With(zap.String("file", s.file.Name)), strings.Trim(m[1], `"`)); err != nil {
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
func (db *DB) dropInvalidIndex(ctx context.Context, log *zap.Logger, name string) error {
	var lastLog time.Time
	start := time.Now()
	for {
		var building bool
		err := db.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index WHERE index_relid = to_regclass($1))`, name).Scan(&building)
		if err != nil {
			return err
		}
		if !building {
			break
		}
		if time.Since(lastLog) >= 5*time.Second {
			lastLog = time.Now()
			log.Info("waiting for an index build a previous migrator left running (killed mid-build?) to end",
				zap.String("index", name), zap.Duration("waited", time.Since(start).Round(time.Millisecond)))
		}
		t := time.NewTimer(buildPollInterval)
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
func ensureVersionTable(ctx context.Context, tx pgx.Tx) error {
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass('goose_db_version') IS NOT NULL`).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return nil
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE goose_db_version (
	id integer PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY,
	version_id bigint NOT NULL,
	is_applied boolean NOT NULL,
	tstamp timestamp NOT NULL DEFAULT now()
)`); err != nil {
		return fmt.Errorf("create goose_db_version: %w", err)
	}
	_, err := tx.Exec(ctx, `INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true)`)
	return err
}
