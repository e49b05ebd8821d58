// Package replicasync makes a server process a member of the cluster: it
// registers the replica in Postgres, heartbeats on the database clock,
// learns its peers from the replicas table and from LISTEN/NOTIFY, probes
// every regional peer's relay for latency, and warns when a peer or the
// database is slower than the threshold.
//
// It must never decide liveness from the local clock (every liveness time
// is the database's now()), and it never talks DERP: it only tells its
// owner which relay URLs are live, and lets the owner ask for a re-probe.
package replicasync
