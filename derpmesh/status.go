// What the Mesh reports about its peers: the states, PeerStatus, Status,
// Ready and the per-state counts behind coderd_derpmesh_peers.

package derpmesh

import (
	"sort"
	"time"

	"tailscale.com/types/key"
)

// Peer states reported by Status.
const (
	// StateConnected: the watch connection is up and the peer answered a
	// ping sent after the watch request, which proves it granted mesh
	// privileges. Packets for the peer's clients are being forwarded.
	StateConnected = "connected"
	// StateConnecting: everything else — dialing, waiting to redial,
	// refused, or parked (a relay URL that is invalid or points at this
	// replica). PeerStatus.Error says which.
	StateConnecting = "connecting"
)

// PeerStatus is one peer's mesh connection as seen from this replica.
type PeerStatus struct {
	// URL is the relay URL as given to SetAddresses, without a trailing
	// slash.
	URL string `json:"url"`
	// State is StateConnected or StateConnecting.
	State string `json:"state"`
	// Error is why the peer is not connected: the last connect error
	// (connection refused, TLS verification), a refusal of mesh privileges,
	// "relay URL points at this replica", or how the last connection broke.
	// It stays set while redialing and is empty once connected, and while
	// the first attempt (or one asked for by Reconnect) is under way.
	Error string `json:"error"`
	// Since is when State last changed (for a new peer: when it was added).
	Since time.Time `json:"since"`
	// ServerKey is the peer relay's public key while connected (zero
	// otherwise). The peer's own mesh client connects to this replica with
	// that key, so the owner can tell whether the peer holds a link to it
	// too (derpserver.Server.IsClientConnectedForTest).
	ServerKey key.NodePublic `json:"-"`
}

// Status lists every peer in the current set, sorted by URL.
func (m *Mesh) Status() []PeerStatus {
	m.mu.Lock()
	out := make([]PeerStatus, 0, len(m.peers))
	for _, p := range m.peers {
		out = append(out, p.status())
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
	return out
}

// Ready reports whether every peer in the current set is StateConnected:
// its watch connection is up and it confirmed mesh privileges. It is true
// with no peers. It turns false the moment a peer's connection breaks, and
// briefly during Reconnect; owners that must not flap (a load balancer's
// readiness) should latch it.
func (m *Mesh) Ready() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, p := range m.peers {
		if p.status().State != StateConnected {
			return false
		}
	}
	return true
}

func (m *Mesh) count(state string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, p := range m.peers {
		if p.status().State == state {
			n++
		}
	}
	return n
}
