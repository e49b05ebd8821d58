package wait_test

import (
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
