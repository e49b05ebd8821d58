package database

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// PeerReport is what one replica measured of one peer. It is stored in the
// measuring replica's row, so any replica can show the whole matrix.
type PeerReport struct {
	ID        uuid.UUID `json:"id"`
	LatencyMS float64   `json:"latency_ms"`
	Error     string    `json:"error"`
}

// Replica is one row of the replicas table.
type Replica struct {
	ID              uuid.UUID
	CreatedAt       time.Time
	StartedAt       time.Time
	StoppedAt       *time.Time
	UpdatedAt       time.Time
	Hostname        string
	RegionID        int32
	RelayAddress    string
	Version         string
	DatabaseLatency time.Duration
	Error           string
	Peers           []PeerReport
	Warnings        []string
	// Live is whether the row counted as live (not stopped, updated within
	// the stale window of the database's now()) when it was read; set by
	// the reads that judge liveness.
	Live bool

	raw *rawReplica // set between a scan and decode
}

// ReplicaState is what a replica writes about itself on every heartbeat.
type ReplicaState struct {
	ID              uuid.UUID
	Hostname        string
	RegionID        int32
	RelayAddress    string
	Version         string
	DatabaseLatency time.Duration
	Error           string
	Peers           []PeerReport
	Warnings        []string
}

const replicaColumns = `id, created_at, started_at, stopped_at, updated_at, hostname, region_id,
	relay_address, version, database_latency, error, peers, warnings`

// rawReplica holds the columns that need decoding after a scan.
type rawReplica struct {
	latencyUS int64
	peers     []byte
	warnings  []byte
}

func scanTargets(r *Replica, extra ...any) []any {
	r.raw = &rawReplica{}
	return append([]any{&r.ID, &r.CreatedAt, &r.StartedAt, &r.StoppedAt, &r.UpdatedAt, &r.Hostname, &r.RegionID,
		&r.RelayAddress, &r.Version, &r.raw.latencyUS, &r.Error, &r.raw.peers, &r.raw.warnings}, extra...)
}

// decode fills the fields that need decoding. The peers and warnings
// columns are reports for display: a row whose JSON has another shape (a
// newer version's format during a rolling update, a hand edit) reads with
// empty reports instead of failing the read, because one odd row must
// never hide every other replica from membership.
func (r *Replica) decode() error {
	raw := r.raw
	r.raw = nil
	r.DatabaseLatency = time.Duration(raw.latencyUS) * time.Microsecond
	if json.Unmarshal(raw.peers, &r.Peers) != nil {
		r.Peers = nil
	}
	if json.Unmarshal(raw.warnings, &r.Warnings) != nil {
		r.Warnings = nil
	}
	if r.Peers == nil {
		r.Peers = []PeerReport{}
	}
	if r.Warnings == nil {
		r.Warnings = []string{}
	}
	return nil
}

func scanReplica(row pgx.Row) (Replica, error) {
	var r Replica
	if err := row.Scan(scanTargets(&r)...); err != nil {
		return Replica{}, err
	}
	return r, r.decode()
}

// Beat is the result of a heartbeat write.
type Beat struct {
	// Replica is the row as written.
	Replica Replica
	// Revived is true when the beat re-created a deleted row or cleared a
	// stopped_at that someone else set on this live replica: peers have
	// dropped it and must be told (announce) that it is back.
	Revived bool
}

// querier is what a heartbeat needs: the pool, or a transaction in tests.
type querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// BeatReplica writes s as the replica's current state and stamps
// updated_at with the database clock. A row that was deleted (by hand, or
// by retention) is recreated. A stopped_at older than this beat's
// transaction is cleared, so a live replica whose row was marked stopped
// (by an operator, or a bug) is a member again at its next beat; a beat
// whose transaction began before the stop (a heartbeat cancelled by Close
// but committed late by Postgres) leaves the row stopped, so a replica that
// left is never revived by its own last beat. One round trip.
func (db *DB) BeatReplica(ctx context.Context, s ReplicaState) (Beat, error) {
	return beatReplica(ctx, db.pool, s)
}

func beatReplica(ctx context.Context, q querier, s ReplicaState) (Beat, error) {
	peers, err := json.Marshal(nonNilPeers(s.Peers))
	if err != nil {
		return Beat{}, fmt.Errorf("encode peers: %w", err)
	}
	warnings, err := json.Marshal(nonNilStrings(s.Warnings))
	if err != nil {
		return Beat{}, fmt.Errorf("encode warnings: %w", err)
	}
	// now() is the transaction's start: "stopped_at < now()" means the stop
	// committed before this beat began.
	row := q.QueryRow(ctx, `
WITH prev AS (SELECT stopped_at FROM replicas WHERE id = $1)
INSERT INTO replicas (id, hostname, region_id, relay_address, version, database_latency, error, peers, warnings)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET
	updated_at = now(),
	stopped_at = CASE WHEN replicas.stopped_at < now() THEN NULL ELSE replicas.stopped_at END,
	hostname = EXCLUDED.hostname, region_id = EXCLUDED.region_id,
	relay_address = EXCLUDED.relay_address, version = EXCLUDED.version,
	database_latency = EXCLUDED.database_latency, error = EXCLUDED.error,
	peers = EXCLUDED.peers, warnings = EXCLUDED.warnings
RETURNING `+replicaColumns+`,
	(NOT EXISTS (SELECT 1 FROM prev)) OR ((SELECT stopped_at FROM prev) IS NOT NULL AND replicas.stopped_at IS NULL)`,
		// JSON as text, not []byte: in pgx's exec and simple-protocol modes
		// (PgBouncer in transaction pooling) bytes are sent as bytea.
		s.ID, s.Hostname, s.RegionID, s.RelayAddress, s.Version, s.DatabaseLatency.Microseconds(), s.Error, string(peers), string(warnings))
	var b Beat
	if err := row.Scan(scanTargets(&b.Replica, &b.Revived)...); err != nil {
		return Beat{}, fmt.Errorf("upsert replica %s: %w", s.ID, err)
	}
	if err := b.Replica.decode(); err != nil {
		return Beat{}, err
	}
	b.Replica.Live = b.Replica.StoppedAt == nil
	return b, nil
}

// UpsertReplica is BeatReplica without the revived flag.
func (db *DB) UpsertReplica(ctx context.Context, s ReplicaState) (Replica, error) {
	b, err := db.BeatReplica(ctx, s)
	return b.Replica, err
}

// RecentReplicas lists every row updated within staleAfter of the
// database's now(), oldest first: the live ones (Live set) and the ones
// that stopped gracefully within the window (StoppedAt set), so a reader
// can tell a departure from a replica that merely has not beaten yet.
func (db *DB) RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]Replica, error) {
	return db.recent(ctx, replicaColumns, staleAfter)
}

func (db *DB) recent(ctx context.Context, columns string, staleAfter time.Duration) ([]Replica, error) {
	rows, err := db.pool.Query(ctx, `
SELECT `+columns+`, stopped_at IS NULL FROM replicas
WHERE updated_at > now() - make_interval(secs => $1)
ORDER BY created_at, id`, staleAfter.Seconds())
	if err != nil {
		return nil, fmt.Errorf("list recent replicas: %w", err)
	}
	defer rows.Close()
	var out []Replica
	for rows.Next() {
		var r Replica
		if err := rows.Scan(scanTargets(&r, &r.Live)...); err != nil {
			return nil, fmt.Errorf("list recent replicas: %w", err)
		}
		if err := r.decode(); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list recent replicas: %w", err)
	}
	return out, nil
}

// memberColumns are the replica columns without the latency matrix
// (peers): what membership needs. The matrix holds one entry per peer in
// every row, so reading it on every beat costs each replica N² decoded
// entries; it is read only when someone asks for it (RecentReplicas).
const memberColumns = `id, created_at, started_at, stopped_at, updated_at, hostname, region_id,
	relay_address, version, database_latency, error, '[]'::jsonb, warnings`

// RecentMembers is RecentReplicas without the latency matrix: every row
// updated within staleAfter of the database's now(), oldest first, with
// Live set and Peers empty. Replicas call it on every beat.
func (db *DB) RecentMembers(ctx context.Context, staleAfter time.Duration) ([]Replica, error) {
	return db.recent(ctx, memberColumns, staleAfter)
}

// LiveReplicas lists replicas that have not stopped and were updated within
// staleAfter of the database's now(), oldest first.
func (db *DB) LiveReplicas(ctx context.Context, staleAfter time.Duration) ([]Replica, error) {
	rows, err := db.RecentReplicas(ctx, staleAfter)
	if err != nil {
		return nil, err
	}
	live := rows[:0]
	for _, r := range rows {
		if r.Live {
			live = append(live, r)
		}
	}
	return live, nil
}

// GetReplica returns one replica's row, live or not.
func (db *DB) GetReplica(ctx context.Context, id uuid.UUID) (Replica, error) {
	r, err := scanReplica(db.pool.QueryRow(ctx, `SELECT `+replicaColumns+` FROM replicas WHERE id = $1`, id))
	if err != nil {
		return Replica{}, fmt.Errorf("get replica %s: %w", id, err)
	}
	return r, nil
}

// GetReplicaIfLive returns one replica's row, without its latency matrix
// (Peers empty; every peer reads the row of every announcement, so the
// matrix would cost N² entries per replica at a mass start), and whether
// it is live (not stopped, updated within staleAfter of the database's
// now()). A missing row is (Replica{}, false, nil).
func (db *DB) GetReplicaIfLive(ctx context.Context, id uuid.UUID, staleAfter time.Duration) (Replica, bool, error) {
	var live bool
	var r Replica
	row := db.pool.QueryRow(ctx, `SELECT `+memberColumns+`, (stopped_at IS NULL AND updated_at > now() - make_interval(secs => $2))
FROM replicas WHERE id = $1`, id, staleAfter.Seconds())
	err := row.Scan(scanTargets(&r, &live)...)
	if errors.Is(err, pgx.ErrNoRows) {
		return Replica{}, false, nil
	}
	if err != nil {
		return Replica{}, false, fmt.Errorf("get replica %s: %w", id, err)
	}
	if err := r.decode(); err != nil {
		return Replica{}, false, err
	}
	r.Live = live
	return r, live, nil
}

// MarkReplicaStopped records a graceful stop: the row stays (a tombstone)
// but the replica no longer counts as live.
func (db *DB) MarkReplicaStopped(ctx context.Context, id uuid.UUID) error {
	if _, err := db.pool.Exec(ctx, `UPDATE replicas SET stopped_at = now(), updated_at = now() WHERE id = $1`, id); err != nil {
		return fmt.Errorf("mark replica %s stopped: %w", id, err)
	}
	return nil
}

// DeleteReplica removes a replica's row (tests and operators use it; the
// replica re-registers on its next beat if it is still alive).
func (db *DB) DeleteReplica(ctx context.Context, id uuid.UUID) error {
	if _, err := db.pool.Exec(ctx, `DELETE FROM replicas WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete replica %s: %w", id, err)
	}
	return nil
}

// replicaCleanupLockID serializes retention cleanup so one replica at a time
// deletes dead rows.
const replicaCleanupLockID = 7_386_412_002

// DeleteDeadReplicas deletes rows not updated for longer than retention. Only
// one caller at a time does the work; the others return (0, nil) at once.
func (db *DB) DeleteDeadReplicas(ctx context.Context, retention time.Duration) (int64, error) {
	var deleted int64
	err := pgx.BeginFunc(ctx, db.pool, func(tx pgx.Tx) error {
		var locked bool
		if err := tx.QueryRow(ctx, `SELECT pg_try_advisory_xact_lock($1)`, int64(replicaCleanupLockID)).Scan(&locked); err != nil {
			return err
		}
		if !locked {
			return nil
		}
		tag, err := tx.Exec(ctx, `DELETE FROM replicas WHERE updated_at < now() - make_interval(secs => $1)`, retention.Seconds())
		deleted = tag.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("delete dead replicas: %w", err)
	}
	return deleted, nil
}

// IsNotFound reports whether err means a row did not exist.
func IsNotFound(err error) bool { return errors.Is(err, pgx.ErrNoRows) }

func nonNilPeers(p []PeerReport) []PeerReport {
	if p == nil {
		return []PeerReport{}
	}
	return p
}

func nonNilStrings(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// NotifyReplicaChange sends a replica announcement (payload: the id)
// through the pool, without a LISTEN connection: poll-mode replicas use it
// so that peers which do LISTEN still hear of them at once (NOTIFY works
// through PgBouncer in transaction pooling; only LISTEN does not).
func (db *DB) NotifyReplicaChange(ctx context.Context, channel string, id uuid.UUID) error {
	if _, err := db.pool.Exec(ctx, "SELECT pg_notify($1, $2)", channel, id.String()); err != nil {
		return fmt.Errorf("notify replica change: %w", err)
	}
	return nil
}
