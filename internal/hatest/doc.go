// Package hatest is the fault-injection suite (`make test-ha`): real coder
// processes, a throwaway Postgres, real DERP clients and an in-process
// fault proxy that delays, stalls and cuts connections. Its tests carry the
// "ha" build tag so that `make test` stays quick.
package hatest
