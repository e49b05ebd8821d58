// This file holds the Store on Postgres: an adapter around *database.DB's
// replica queries that converts their rows to replicasync's values at the
// boundary.

package replicasync

import (
	"context"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
)

// PostgresStore is the Store (and Notifier) on Postgres: the queries of
// *database.DB, their rows converted to replicasync's values. Errors pass
// through unchanged, so the Manager can still tell a connection that may
// come back from a statement the server refused. Converting costs one
// allocation per list read, plus one per row that carries a latency
// matrix (none for RecentMembers' rows, which carry none).
type PostgresStore struct {
	db *database.DB
}

// NewPostgresStore returns the Store on db.
func NewPostgresStore(db *database.DB) *PostgresStore {
	return &PostgresStore{db: db}
}

// BeatReplica implements Store.
func (s *PostgresStore) BeatReplica(ctx context.Context, st ReplicaState) (Beat, error) {
	b, err := s.db.BeatReplica(ctx, stateToRow(st))
	if err != nil {
		return Beat{}, err
	}
	return Beat{Replica: replicaFromRow(b.Replica), Revived: b.Revived}, nil
}

// RecentReplicas implements Store.
func (s *PostgresStore) RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]Replica, error) {
	rows, err := s.db.RecentReplicas(ctx, staleAfter)
	if err != nil {
		return nil, err
	}
	return replicasFromRows(rows), nil
}

// RecentMembers implements Store.
func (s *PostgresStore) RecentMembers(ctx context.Context, staleAfter time.Duration) ([]Replica, error) {
	rows, err := s.db.RecentMembers(ctx, staleAfter)
	if err != nil {
		return nil, err
	}
	return replicasFromRows(rows), nil
}

// GetReplicaIfLive implements Store.
func (s *PostgresStore) GetReplicaIfLive(ctx context.Context, id uuid.UUID, staleAfter time.Duration) (Replica, bool, error) {
	r, live, err := s.db.GetReplicaIfLive(ctx, id, staleAfter)
	if err != nil {
		return Replica{}, false, err
	}
	return replicaFromRow(r), live, nil
}

// MarkReplicaStopped implements Store.
func (s *PostgresStore) MarkReplicaStopped(ctx context.Context, id uuid.UUID) error {
	return s.db.MarkReplicaStopped(ctx, id)
}

// DeleteDeadReplicas implements Store.
func (s *PostgresStore) DeleteDeadReplicas(ctx context.Context, retention time.Duration) (int64, error) {
	return s.db.DeleteDeadReplicas(ctx, retention)
}

// NotifyReplicaChange implements Notifier: NOTIFY through the pool, which
// works through PgBouncer in transaction pooling (LISTEN does not).
func (s *PostgresStore) NotifyReplicaChange(ctx context.Context, channel string, id uuid.UUID) error {
	return s.db.NotifyReplicaChange(ctx, channel, id)
}

// replicaFromRow converts a row. Warnings are shared with the row (which
// is not used again); Peers is copied, without an allocation when empty.
func replicaFromRow(r database.Replica) Replica {
	return Replica{
		ID:              r.ID,
		CreatedAt:       r.CreatedAt,
		StartedAt:       r.StartedAt,
		StoppedAt:       r.StoppedAt,
		UpdatedAt:       r.UpdatedAt,
		Hostname:        r.Hostname,
		RegionID:        r.RegionID,
		RelayAddress:    r.RelayAddress,
		Version:         r.Version,
		DatabaseLatency: r.DatabaseLatency,
		Error:           r.Error,
		Peers:           peersFromRow(r.Peers),
		Warnings:        r.Warnings,
		Live:            r.Live,
	}
}

// replicasFromRows converts a list in one allocation (plus one per row
// that carries a latency matrix).
func replicasFromRows(rows []database.Replica) []Replica {
	if rows == nil {
		return nil
	}
	out := make([]Replica, len(rows))
	for i := range rows {
		out[i] = replicaFromRow(rows[i])
	}
	return out
}

// peersFromRow copies a latency matrix row; nil stays nil and empty stays
// empty (a zero-length make does not allocate).
func peersFromRow(ps []database.PeerReport) []PeerReport {
	if ps == nil {
		return nil
	}
	out := make([]PeerReport, len(ps))
	for i, p := range ps {
		out[i] = PeerReport(p)
	}
	return out
}

// stateToRow converts what a beat writes. Warnings are shared (the store
// only encodes them); Peers is copied.
func stateToRow(s ReplicaState) database.ReplicaState {
	var peers []database.PeerReport
	if s.Peers != nil {
		peers = make([]database.PeerReport, len(s.Peers))
		for i, p := range s.Peers {
			peers[i] = database.PeerReport(p)
		}
	}
	return database.ReplicaState{
		ID:              s.ID,
		Hostname:        s.Hostname,
		RegionID:        s.RegionID,
		RelayAddress:    s.RelayAddress,
		Version:         s.Version,
		DatabaseLatency: s.DatabaseLatency,
		Error:           s.Error,
		Peers:           peers,
		Warnings:        s.Warnings,
	}
}
