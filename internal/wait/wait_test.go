package wait_test

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/wait"
)

func TestUntilReturnsAsSoonAsTheConditionHolds(t *testing.T) {
	start := time.Now()
	calls := 0
	if !wait.Until(10*time.Second, func() bool { calls++; return calls == 3 }) {
		t.Fatal("Until reported false for a condition that held")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Until took %v for a condition that held at the third poll", d)
	}
}

func TestUntilGivesUpAfterTheDeadline(t *testing.T) {
	start := time.Now()
	if wait.Until(50*time.Millisecond, func() bool { return false }) {
		t.Fatal("Until reported true for a condition that never held")
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("Until gave up after %v, before its deadline", d)
	}
}

// Concurrently's calls overlap (each waits for all to have started) and
// every call's error comes back in its place.
func TestConcurrentlyCallsAtOnceAndReturnsEveryError(t *testing.T) {
	var started sync.WaitGroup
	started.Add(3)
	var n atomic.Int32
	errs := wait.Concurrently(3, func() error {
		started.Done()
		started.Wait() // only returns once all three run at the same time
		if n.Add(1) == 2 {
			return errors.New("second")
		}
		return nil
	})
	failed := 0
	for _, err := range errs {
		if err != nil {
			failed++
		}
	}
	if len(errs) != 3 || failed != 1 {
		t.Fatalf("errors %v: want 3 results, one failed", errs)
	}
}
