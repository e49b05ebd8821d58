// Package derpmesh keeps this replica's embedded DERP server meshed with its
// peers: exactly one mesh connection per peer relay URL, each watching the
// peer's clients and installing packet forwarders for them on the local
// server, so a client on this replica reaches a client on any peer.
//
// It owns those connections and their goroutines, the forwarders they
// install (a bounded queue and one batching writer per peer, so a slow or
// stopped peer never stalls traffic to the others), the peers' mesh status
// (Status, Ready), round trips over the mesh links (PingPeer), the
// coderd_derpmesh_peers gauge, coderd_derpmesh_forward_dropped_total, and the export of the DERP server's own
// counters as coderd_derp_* metrics (NewServerCollector).
//
// It is told the peer set (SetPeers, SetAddresses, Reconnect) and must never discover
// it itself: it never talks to Postgres. It must never log or return the
// mesh key, and never skip TLS verification.
//
// Meshing is one-directional: a Mesh makes packets from this replica's
// clients reach the peers' clients. The peers' own Meshes carry the way
// back, so every replica runs one.
package derpmesh
