package replicasync_test

import (
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
)

func warnsAboutRelay(m *replicasync.Manager) bool {
	return strings.Contains(strings.Join(m.Warnings(), "\n"), "no relay URL")
}

// The relay URL warning is about a one-way mesh: a region whose replicas
// all run without a relay (the DERP server disabled everywhere; Postgres is
// the sole rendezvous) warns nobody, and the warning goes once the replica
// without a relay URL leaves.
func TestNoRelayURLWarningOnlyForAOneWayMesh(t *testing.T) {
	t.Parallel()
	db := dbtest.NewDB(t)
	a := start(t, db, replicasync.Options{Hostname: "a"})
	b := start(t, db, replicasync.Options{Hostname: "b"})
	wait.For(t, 10*time.Second, "a and b see each other", func() bool { return sees(a, b.Self().ID) && sees(b, a.Self().ID) })
	if warnsAboutRelay(a) || warnsAboutRelay(b) {
		t.Fatalf("replicas that all run without a relay warn: %q %q", a.Warnings(), b.Warnings())
	}

	c := start(t, db, replicasync.Options{Hostname: "c", RelayAddress: relay(t).URL})
	wait.For(t, 10*time.Second, "every replica warns about the one-way mesh", func() bool {
		return warnsAboutRelay(a) && warnsAboutRelay(b) && warnsAboutRelay(c)
	})
	if w := strings.Join(c.Warnings(), "\n"); !strings.Contains(w, `"a"`) || !strings.Contains(w, `"b"`) {
		t.Fatalf("c's warnings do not name both replicas without a relay URL: %q", w)
	}
	if err := c.Leave(t.Context()); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 10*time.Second, "the warnings go with the only replica that has a relay URL", func() bool {
		return !warnsAboutRelay(a) && !warnsAboutRelay(b)
	})
}
