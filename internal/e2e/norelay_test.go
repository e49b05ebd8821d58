package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// A replica started alone behind a load balancer without a relay URL,
// then a second one with a relay URL: they can mesh one way only. Neither
// stays silent about it: each logs a WARN line and shows a health warning
// naming the replica without a relay URL (by hostname and id).
func TestReplicaWithoutRelayURLIsAWarningOnEveryReplica(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	// No relay URL: an access URL is given, so none is defaulted.
	lone := clitest.StartServer(t, "no-relay", []string{"CODER_PG_CONNECTION_URL=" + pg, "CODER_ACCESS_URL=https://coder.big.corp"})
	lone.WaitReady(60 * time.Second)
	peer := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "with-relay", PostgresURL: pg})
	peer.WaitReady(60 * time.Second)

	var info coderd.BuildInfo
	if lone.GetJSON("/api/v2/buildinfo", "", &info) != http.StatusOK {
		t.Fatal("buildinfo")
	}
	id := info.ReplicaID.String()
	for _, p := range []*clitest.Process{lone, peer} {
		var h coderd.HealthReport
		var named string
		if !wait.Until(15*time.Second, func() bool {
			h = coderd.HealthReport{}
			p.GetJSON("/api/v2/debug/health", token, &h)
			for _, w := range h.Replicas.Warnings {
				if strings.Contains(w, "no relay URL") && strings.Contains(w, id) {
					named = w
					return true
				}
			}
			return false
		}) {
			t.Fatalf("%s: no health warning naming the replica without a relay URL (%s): %+v", p.Name, id, h)
		}
		t.Logf("%s: %s", p.Name, named)
		warned := false
		for _, l := range strings.Split(p.Output(), "\n") {
			if strings.Contains(l, "WARN") && strings.Contains(l, "no relay URL") && strings.Contains(l, id) {
				warned = true
			}
		}
		if !warned {
			t.Errorf("%s logged no WARN line naming the replica without a relay URL (%s)", p.Name, id)
		}
	}
}
