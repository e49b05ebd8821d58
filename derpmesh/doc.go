// Package derpmesh keeps this replica's embedded DERP server meshed with
// its peers: exactly one mesh connection per peer relay URL, each watching
// the peer's clients and installing packet forwarders for them, so a client
// on this replica reaches a client on any peer.
//
// It is told the peer set (SetAddresses) and never talks to Postgres. It
// must never log the mesh key, and never skip TLS verification.
package derpmesh
