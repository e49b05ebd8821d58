// Package wait polls a condition in tests instead of sleeping: the test
// moves on the moment the condition holds, and fails with what it waited
// for when it does not hold in time.
package wait

import (
	"testing"
	"time"
)

// For polls cond every 5ms until it holds, failing t after d.
func For(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
