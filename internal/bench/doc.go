// Package bench is `make bench`: it measures convergence, failure
// detection, relay throughput against tailscale's derper, heartbeat cost,
// footprint and rolling upgrades with real processes, prints one markdown
// table (median and spread) and writes the same as JSON. Its code carries
// the "bench" build tag so that `make test` does not run it.
package bench
