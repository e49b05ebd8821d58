// Package wait polls a condition in tests instead of sleeping: the test
// moves on the moment the condition holds, and fails with what it waited
// for when it does not hold in time.
//
// It is the one polling helper of the test harnesses (clitest, derptest,
// e2e, hatest, bench): For fails the test, Until lets the caller decide.
package wait

import (
	"sync"
	"testing"
	"time"
)

// Interval is how often conditions are polled: short enough that a wait
// ends within a few milliseconds of the condition holding, long enough
// that polling HTTP endpoints does not load the machine.
const Interval = 5 * time.Millisecond

// For polls cond every Interval until it holds, failing t after d with
// what it waited for.
func For(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Until(d, cond) {
		t.Fatalf("timed out after %s waiting for: %s", d, what)
	}
}

// Until polls cond every Interval until it holds or d passes, and reports
// whether it held. cond is always called at least once, and once more
// after the deadline, so a condition that holds just in time counts.
func Until(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(Interval)
	}
}

// Concurrently calls f n times at once and returns each call's error once
// every call has returned: for "may be called more than once, also at the
// same time" contracts (Close, Shutdown, Stop).
func Concurrently(n int, f func() error) []error {
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f()
		}()
	}
	wg.Wait()
	return errs
}
