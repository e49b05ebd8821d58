// Package coderd is the server: it wires the database, replica discovery
// (replicasync) and the relay mesh (derpmesh) together and serves the HTTP
// API, health endpoints and the embedded DERP relay.
//
// It owns the process's lifecycle from "config validated" to "listeners
// closed". It must never write to the database before the start-up rules
// have passed, and never log a secret (the Postgres password, the mesh key,
// API tokens).
package coderd
