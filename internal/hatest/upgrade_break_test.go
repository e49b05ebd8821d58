//go:build ha

package hatest_test

import (
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// A replica of release N that was paused (SIGSTOP: a frozen VM, a node
// that lost its network) for longer than a finalize counts it as live
// does not block the finalize, which is right: it cannot be told apart
// from a dead one. But when it comes back it runs on a contracted schema
// its release does not know. It must not carry on as if nothing happened:
// it stops serving and exits with the same one line a start would print,
// so its pod restarts into a clear refusal instead of failing requests.
func TestAReplicaPausedThroughAFinalizeStopsWhenItComesBack(t *testing.T) {
	nBin := clitest.BuildRelease(t, thisRelease)
	nextBin := clitest.BuildRelease(t, nextRelease)
	pg := dbtest.NewEmptyURL(t)
	env := []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=1s"}
	next := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "next-1", PostgresURL: pg, Binary: nextBin, Env: env})
	next.WaitReady(2 * time.Minute)
	old := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "n-1", PostgresURL: pg, Binary: nBin, Env: env})
	old.WaitReady(2 * time.Minute)

	finalize := func() (int, string) {
		p := clitest.StartBinary(t, nextBin, "finalize", []string{"CODER_PG_CONNECTION_URL=" + pg}, "server", "migrate", "--finalize")
		code := p.Wait(2 * time.Minute)
		return code, p.Output()
	}
	old.Signal(syscall.SIGSTOP)
	paused := time.Now()
	if code, out := finalize(); code != 3 || !strings.Contains(out, old.URL) {
		t.Fatalf("finalize with a replica of N paused for a moment: exit %d, want 3 naming it:\n%s", code, out)
	}
	// A minute after its last heartbeat it no longer counts as live.
	var code int
	var out string
	if !clitest.Eventually(3*time.Minute, func() bool {
		code, out = finalize()
		return code != 3
	}) {
		t.Fatalf("finalize still refused %s after the N replica was paused:\n%s", time.Since(paused).Round(time.Second), out)
	}
	if code != 0 {
		t.Fatalf("finalize: exit %d\n%s", code, out)
	}
	t.Logf("finalize ran %s after the N replica was paused", time.Since(paused).Round(time.Second))

	old.Signal(syscall.SIGCONT)
	exit := old.Wait(time.Minute)
	if exit == -1 {
		t.Fatalf("the N replica kept running on the finalized schema for a minute after it came back (/readyz %d)", old.Status("/readyz"))
	}
	if exit == 0 {
		t.Errorf("the N replica exited 0 after finding itself too old for the database")
	}
	last := lastLine(old.Output())
	if !strings.HasPrefix(last, "error: this release (v-n) is too old") || !strings.Contains(last, "the oldest release that may run is v-next") {
		t.Errorf("the N replica did not end with one clear line; last line %q", last)
	}
	if next.Status("/readyz") != http.StatusOK {
		t.Error("the N+1 replica is not ready")
	}
}
