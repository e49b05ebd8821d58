// Package replicasync makes a server process a member of the cluster: it
// registers the replica through a Store (Postgres in production, through
// PostgresStore), heartbeats on the store's clock, learns its peers from
// the replicas table and from announcements (LISTEN/NOTIFY, or polling
// where LISTEN cannot work), measures every regional peer's latency (over
// the mesh link when a LinkPinger has one, else over HTTP), and warns when
// a peer or the database is slower than the threshold.
//
// The Store contract and the Manager's reads speak replicasync's own
// values (Replica, ReplicaState, Beat, PeerReport); PostgresStore converts
// the database's rows to them at the boundary.
//
// The rules live in small value types (values.go): the mesh peer set and
// its diff, the latency window, and the outage grace that keeps the mesh
// whole through a database outage. The Manager keeps only the loops and
// the wiring. Warnings are values too (Warning: a kind and its fields),
// rendered to the text the row stores by Warning.String and read back by
// ParseWarning. Lifecycle: New starts and returns once running; Leave marks
// the replica stopped and announces it; Close stops and waits for every
// goroutine (leaving first if needed) and is idempotent.
//
// It must never decide liveness from the local clock (every liveness time
// is the store's now(); the injected clock only times round trips, tickers
// and the grace window), and it never talks DERP: it tells its owner which
// relay URLs are live and lets the owner ask for a re-probe.
package replicasync
