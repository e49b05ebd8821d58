package relayguard_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// Close may be called more than once, also at the same time, and each call
// returns only when the guard has stopped: after it, the relay fails
// closed (a new client is refused) while a client admitted before keeps
// its connection until the relay itself closes.
func TestCloseIsIdempotentAndFailsClosed(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "allow")
	r := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url()})
	a, b := connect(t, r), connect(t, r)
	works(t, a, b, "before Close")

	for i, err := range wait.Concurrently(3, r.guard.Close) {
		if err != nil {
			t.Fatalf("Close call %d: %v", i, err)
		}
	}
	if err := r.guard.Close(); err != nil {
		t.Fatalf("Close after Close: %v", err)
	}

	works(t, a, b, "a client admitted before Close")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := derptest.Connect(ctx, r.url); err == nil {
		// The library may report the refusal only at the first read: a
		// refused client must not get packets through either way.
		t.Cleanup(func() { _ = c.Close() })
		shutOut(t, c, a, 2*time.Second, "a client arriving after Close")
	}
}
