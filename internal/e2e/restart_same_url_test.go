package e2e_test

import (
	"net/http"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// A replica killed -9 and restarted at once behind the same relay URL (a
// pod restarted in place keeps its POD_IP) finds its previous run's row
// still live. It must not wait to mesh with that row (its own relay) before
// it is ready: readiness within seconds, not after the stale window.
func TestReplicaRestartedBehindTheSameURLIsReadyWithoutWaitingForItsOldRow(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	env := []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=10s"} // stale window 30 s
	port := clitest.FreePort(t)
	first := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "first", PostgresURL: pg, Port: port, Env: env})
	first.WaitReady(60 * time.Second)
	first.Kill()
	first.Wait(10 * time.Second)
	start := time.Now()
	again := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "again", PostgresURL: pg, Port: port, Env: env})
	const bound = 15 * time.Second
	if !clitest.Eventually(bound, func() bool { return again.Status("/readyz") == http.StatusOK }) {
		t.Fatalf("the restarted replica was not ready %v after start (its old row is live for 30 s): %s", bound, again.Output())
	}
	t.Logf("ready %v after the restart", time.Since(start).Round(time.Millisecond))
}
