package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/pgbouncertest"
	"github.com/coder-ha/coder/internal/wait"
)

// listsIDs reports whether p's /api/v2/replicas lists exactly the ids.
func listsIDs(p *clitest.Process, token string, ids ...string) bool {
	var rs []coderd.Replica
	if p.GetJSON("/api/v2/replicas", token, &rs) != http.StatusOK || len(rs) != len(ids) {
		return false
	}
	have := map[string]bool{}
	for _, r := range rs {
		have[r.ID.String()] = true
	}
	for _, id := range ids {
		if !have[id] {
			return false
		}
	}
	return true
}

// Behind a real PgBouncer in transaction pooling, given a plain URL (no
// driver parameters, as an operator writes it): replicas start, migrate,
// register, see each other and mesh, in poll mode and in auto mode (which
// finds that LISTEN cannot work there). Before, every replica exited at
// start with `prepared statement "stmtcache_…" already exists`.
func TestReplicasWorkThroughPgBouncerWithAPlainURL(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"poll", "auto"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			pg := dbtest.NewURL(t)
			bouncer := pgbouncertest.Start(t, pg)
			if strings.Contains(bouncer, "exec_mode") || strings.Contains(bouncer, "statement_cache") {
				t.Fatalf("the PgBouncer URL carries driver parameters: %s", bouncer)
			}
			token := clitest.CreateToken(t, pg)
			env := []string{"CODER_POSTGRES_PUBSUB=" + mode}
			r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: bouncer, Env: env})
			r1.WaitReady(60 * time.Second)
			r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: bouncer, Env: env})
			r2.WaitReady(60 * time.Second)

			var i1, i2 coderd.BuildInfo
			if r1.GetJSON("/api/v2/buildinfo", "", &i1) != http.StatusOK || r2.GetJSON("/api/v2/buildinfo", "", &i2) != http.StatusOK {
				t.Fatal("buildinfo")
			}
			ids := []string{i1.ReplicaID.String(), i2.ReplicaID.String()}
			wait.For(t, 15*time.Second, "each replica lists both", func() bool {
				return listsIDs(r1, token, ids...) && listsIDs(r2, token, ids...)
			})
			a, b := connectClient(t, r1), connectClient(t, r2)
			if !derptest.Reachable(a, b, 10*time.Second) || !derptest.Reachable(b, a, 10*time.Second) {
				t.Fatal("clients on the two replicas cannot reach each other")
			}
			for _, p := range []*clitest.Process{r1, r2} {
				if out := p.Output(); strings.Contains(out, "SQLSTATE") {
					t.Errorf("%s logged a database error through PgBouncer:\n%s", p.Name, out)
				}
			}
		})
	}
}
