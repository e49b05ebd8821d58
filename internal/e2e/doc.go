// Package e2e holds end-to-end tests that run real coder server processes
// against a real Postgres and drive them with real DERP clients and the
// real CLI. It has no non-test code.
package e2e
