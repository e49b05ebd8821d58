package coderd

import (
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/replicasync"
)

// BuildInfo is the answer of GET /api/v2/buildinfo.
type BuildInfo struct {
	Version      string    `json:"version"`
	DeploymentID string    `json:"deployment_id"`
	ReplicaID    uuid.UUID `json:"replica_id"`
}

// ReplicaPeer is what one replica measured of one peer.
type ReplicaPeer struct {
	ID        uuid.UUID `json:"id"`
	LatencyMS float64   `json:"latency_ms"`
	Error     string    `json:"error"`
}

// Replica is one live replica as GET /api/v2/replicas shows it.
type Replica struct {
	ID                uuid.UUID     `json:"id"`
	Hostname          string        `json:"hostname"`
	CreatedAt         time.Time     `json:"created_at"`
	RelayAddress      string        `json:"relay_address"`
	RegionID          int32         `json:"region_id"`
	Version           string        `json:"version"`
	DatabaseLatencyMS float64       `json:"database_latency_ms"`
	Error             string        `json:"error"`
	Peers             []ReplicaPeer `json:"peers"`
	Warnings          []string      `json:"warnings"`
}

// HealthSection is one part of the health report.
type HealthSection struct {
	Healthy  bool     `json:"healthy"`
	Warnings []string `json:"warnings"`
}

// HealthReport is the answer of GET /api/v2/debug/health.
type HealthReport struct {
	Healthy  bool          `json:"healthy"`
	Database HealthSection `json:"database"`
	Replicas HealthSection `json:"replicas"`
	DERPMesh HealthSection `json:"derp_mesh"`
}

// ReplicaFromRow converts a replica as the Manager reads it to its API
// form.
func ReplicaFromRow(r replicasync.Replica) Replica {
	peers := make([]ReplicaPeer, 0, len(r.Peers))
	for _, p := range r.Peers {
		peers = append(peers, ReplicaPeer(p))
	}
	warnings := r.Warnings
	if warnings == nil {
		warnings = []string{}
	}
	return Replica{
		ID:                r.ID,
		Hostname:          r.Hostname,
		CreatedAt:         r.CreatedAt,
		RelayAddress:      r.RelayAddress,
		RegionID:          r.RegionID,
		Version:           r.Version,
		DatabaseLatencyMS: float64(r.DatabaseLatency.Microseconds()) / 1000,
		Error:             r.Error,
		Peers:             peers,
		Warnings:          warnings,
	}
}
