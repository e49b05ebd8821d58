// This file holds the values the Store contract and the Manager's reads
// speak in: a replica's row, what it writes on a beat, the beat's result
// and one entry of the latency matrix. They are plain values, owned by
// membership rather than by any database.

package replicasync

import (
	"time"

	"github.com/google/uuid"
)

// Replica is one replica as membership knows it: its row in the store, as
// last read or written.
type Replica struct {
	// ID names the replica process (Options.ID): a new one per start, so a
	// restarted process behind the same relay URL is a different replica.
	ID uuid.UUID
	// CreatedAt is when the store created the row (again, if it had been
	// deleted), on its own clock. Lists are ordered by it, oldest first.
	CreatedAt time.Time
	// StartedAt is when the replica started, on the store's clock (its
	// row's creation). When two live replicas share a relay URL the
	// newest start wins the mesh.
	StartedAt time.Time
	// StoppedAt is set when the replica left gracefully (Leave): the row
	// stays as a tombstone, and peers drop it at once instead of waiting
	// for it to go stale. Nil while it runs.
	StoppedAt *time.Time
	// UpdatedAt is the store's clock at the replica's last beat. Liveness
	// is judged by it, against the store's now(), never a local clock.
	UpdatedAt time.Time
	// Hostname is the machine the replica runs on, for people.
	Hostname string
	// RegionID is the replica's relay region: only peers of the same
	// region are meshed and probed.
	RegionID int32
	// RelayAddress is the URL peers mesh with and probe; empty when the
	// replica runs no relay.
	RelayAddress string
	// Version is the release the replica runs.
	Version string
	// DatabaseLatency is the median round trip to the store the replica
	// measured.
	DatabaseLatency time.Duration
	// Error is the replica's own error, as it reports it; empty when well.
	Error string
	// Peers is the replica's row of the latency matrix: what it measured
	// of each regional peer. Empty (not nil) when the read leaves the
	// matrix out (Store.RecentMembers, Store.GetReplicaIfLive).
	Peers []PeerReport
	// Warnings are the replica's warnings in force, as text
	// (Warning.String, a contract with other releases).
	Warnings []string
	// Live is whether the row counted as a member when it was read: not
	// stopped, and updated within the stale window of the store's now().
	Live bool
}

// PeerReport is what one replica measured of one regional peer. It is
// written into the measuring replica's row, so any replica can show the
// whole matrix.
type PeerReport struct {
	// ID is the measured peer.
	ID uuid.UUID
	// LatencyMS is the median round trip to the peer, in milliseconds;
	// zero while unmeasured or when Error is set.
	LatencyMS float64
	// Error is why the peer could not be measured (the last probe's short
	// error, or a relay URL rule); empty when LatencyMS holds.
	Error string
}

// ReplicaState is what a replica writes about itself on every beat: the
// fields of Replica it owns (the store owns the times, StoppedAt and
// Live).
type ReplicaState struct {
	// ID, Hostname, RegionID, RelayAddress, Version, DatabaseLatency,
	// Error, Peers and Warnings mean what they mean in Replica.
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

// Beat is the result of a heartbeat write.
type Beat struct {
	// Replica is the row as written, Live set.
	Replica Replica
	// Revived is true when the beat re-created a deleted row or cleared a
	// stopped_at someone else set on this live replica: peers have dropped
	// it and must be told (announce) that it is back.
	Revived bool
}
