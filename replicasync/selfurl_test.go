package replicasync_test

import (
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/replicasync"
)

// A process killed -9 and restarted behind the same relay URL (same
// POD_IP) finds its previous run's row still live for a stale window. That
// row names the restarted process's own relay: it must never be handed to
// the mesh as a peer, or the relay meshes with itself (a bogus link that
// also counts as an incoming mesh link for readiness).
func TestRestartedReplicaNeverMeshesWithItsPreviousRunsRow(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		c := newMemCluster(t)
		const url, other = "http://127.0.0.1:9", "http://127.0.0.1:10"
		b := c.start("b", replicasync.Options{RelayAddress: other})
		old := c.start("old", replicasync.Options{RelayAddress: url})
		wait.For(t, 10*time.Second, "b sees old", func() bool { return sees(b, old.Self().ID) })
		old.StopBeatingForTest() // killed -9: its row stays live for a while
		c.step(memBeat / 2)
		restarted := c.start("new", replicasync.Options{RelayAddress: url})
		got := make(chan replicasync.PeerChange, 16)
		restarted.SetCallback(func(ch replicasync.PeerChange) { got <- ch })
		var last replicasync.PeerChange
		wait.For(t, 10*time.Second, "the restarted replica is told about b", func() bool {
			for {
				select {
				case ch := <-got:
					for _, p := range ch.Peers {
						if p.RelayAddress == url {
							t.Fatalf("the restarted replica was told to mesh with its own relay URL (its previous run's row %s): %+v", old.Self().ID, ch.Peers)
						}
					}
					last = ch
				default:
					return len(last.Peers) == 1 && last.Peers[0].RelayAddress == other
				}
			}
		})
		if n := c.logs.FilterMessage("ignoring an older live row with this replica's relay URL (a previous run killed before it could stop?)").Len(); n == 0 {
			t.Fatal("the restarted replica did not say why it ignores its previous run's row")
		}
		c.step(memBeat) // b's and the restarted replica's next beats and reads
		wait.For(t, 10*time.Second, "the restarted replica reads again", func() bool { return sees(restarted, b.Self().ID) })
		if n := c.logs.FilterMessage("another live replica uses this replica's relay URL: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url").Len(); n != 0 {
			t.Fatal("a restart behind the same URL was reported as a misconfigured duplicate")
		}
		for _, w := range restarted.Warnings() {
			if strings.Contains(w, "uses this replica's relay URL") {
				t.Fatalf("a restart behind the same URL is a health warning: %s", w)
			}
		}
	})
}
