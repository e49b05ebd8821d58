// Package replicasync makes a server process a member of the cluster.
//
// It owns this replica's row in the replicas table: it registers it,
// heartbeats it (stamped with the database's now()), announces changes on
// the "replica" LISTEN/NOTIFY channel, and marks it stopped on Close. It
// keeps the set of live replicas (from the table, re-read on every
// notification and every beat), probes each live regional peer's relay
// latency check, keeps a median latency per peer and for the database,
// warns when one is above the threshold, stores what it measured in its
// own row, and tells its owner when the set of regional relay URLs
// changes. It deletes long-dead rows, one replica at a time.
//
// It must never decide liveness from the local clock: every liveness time
// is the database's now(), so clock skew cannot kill a replica. It never
// talks DERP: it hands the owner relay URLs and takes Reprobe requests
// back. A database outage never empties its peer set: the last known
// peers are kept until the database answers again.
package replicasync
