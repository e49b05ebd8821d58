package database

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/coder-ha/coder/migrations"
)

// Site config keys of the schema floor a finalize raises.
const (
	keyMinSchemaVersion = "min_schema_version"
	keyMinRelease       = "min_release"
)

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

// SchemaStatus reads the schema's state without changing anything.
func (db *DB) SchemaStatus(ctx context.Context, opts MigrateOptions) (SchemaStatus, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return SchemaStatus{}, err
	}
	return db.schemaStatus(ctx, o)
}

// WatchSchema reads the newest applied expand version and the schema
// floor in one statement, for a running replica's periodic check (one query per check
// keeps a replica's statements per heartbeat low at any fleet size). It
// returns the newest applied version, and a *TooOldError when the floor
// is above known.
func (db *DB) WatchSchema(ctx context.Context, release string, known int64) (int64, error) {
	var newest int64
	var floor, floorRelease *string
	err := db.pool.QueryRow(ctx, `SELECT
	(SELECT COALESCE(max(version_id), 0) FROM goose_db_version WHERE is_applied),
	(SELECT value FROM site_configs WHERE key = $1),
	(SELECT value FROM site_configs WHERE key = $2)`, keyMinSchemaVersion, keyMinRelease).Scan(&newest, &floor, &floorRelease)
	if err != nil {
		return 0, fmt.Errorf("read the schema version and floor: %w", err)
	}
	st := SchemaStatus{Known: known}
	if floor != nil {
		st.MinSchema, _ = strconv.ParseInt(*floor, 10, 64)
	}
	if floorRelease != nil {
		st.MinRelease = *floorRelease
	}
	return newest, st.allows(release)
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
