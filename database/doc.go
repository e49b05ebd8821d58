// Package database owns every conversation with Postgres: the connection
// pool, schema migrations, and the queries the rest of the server runs.
//
// Subpackages: pubsub (LISTEN/NOTIFY), postgres (running a local PostgreSQL
// cluster for the built-in database and tests) and dbtest (fresh migrated
// databases for tests).
//
// It must never print a connection password, and never read the local clock
// for a time that is stored: every stored timestamp is the database's now().
package database
