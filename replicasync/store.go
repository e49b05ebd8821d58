// This file holds the contracts the Manager needs of its surroundings:
// Store, Notifier, Pubsub and LinkPinger.

package replicasync

import (
	"context"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database/pubsub"
)

// Store is what the Manager needs of the replicas table, in replicasync's
// own values. PostgresStore implements it on Postgres (an adapter around
// *database.DB); storetest.Memory implements it in memory with a settable
// "database now()" for deterministic tests. Every implementation passes
// storetest.Run. Liveness is always judged by the store's clock, never the
// caller's.
type Store interface {
	// BeatReplica upserts the replica's row, stamps updated_at with the
	// store's now(), re-creates a deleted row and clears a stopped_at older
	// than the beat (Revived reports either).
	BeatReplica(ctx context.Context, s ReplicaState) (Beat, error)
	// RecentReplicas lists the rows updated within staleAfter: live ones
	// (Live) and recently stopped ones (StoppedAt set), latency matrix
	// (Peers) included. Only Manager.Replicas reads it, on request.
	RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]Replica, error)
	// RecentMembers is RecentReplicas without the latency matrix (Peers
	// empty): the read of every beat, which must not cost N² entries.
	RecentMembers(ctx context.Context, staleAfter time.Duration) ([]Replica, error)
	// GetReplicaIfLive reads one row without its latency matrix (Peers
	// empty); a missing row is (Replica{}, false, nil).
	GetReplicaIfLive(ctx context.Context, id uuid.UUID, staleAfter time.Duration) (Replica, bool, error)
	// MarkReplicaStopped records a graceful stop (a tombstone).
	MarkReplicaStopped(ctx context.Context, id uuid.UUID) error
	// DeleteDeadReplicas deletes rows older than retention, one caller at a
	// time.
	DeleteDeadReplicas(ctx context.Context, retention time.Duration) (int64, error)
}

var _ Store = (*PostgresStore)(nil)

// Notifier is optionally implemented by a Store: in poll mode (no Pubsub)
// the Manager still announces itself through it, so replicas that do
// LISTEN hear of a poll-mode replica at once.
type Notifier interface {
	NotifyReplicaChange(ctx context.Context, channel string, id uuid.UUID) error
}

var _ Notifier = (*PostgresStore)(nil)

// Pubsub is what the Manager needs of LISTEN/NOTIFY. A nil Pubsub means
// poll mode: the table is re-read every Options.PollInterval.
type Pubsub interface {
	Subscribe(channel string, l pubsub.Listener) (cancel func(), err error)
	Publish(ctx context.Context, channel string, payload []byte) error
}

// LinkPinger measures the round trip to a peer over an existing mesh link.
type LinkPinger interface {
	// PingPeer returns the round trip to the peer whose relay URL is relayURL
	// over its established mesh link. ok is false when there is no
	// established link; the manager then probes over HTTP instead.
	PingPeer(ctx context.Context, relayURL string) (rtt time.Duration, ok bool, err error)
}
