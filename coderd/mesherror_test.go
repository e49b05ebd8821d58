package coderd

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// ownError is the error in this replica's own row, as the API shows it.
func ownError(s *Server) string {
	for _, r := range s.repl.replicas.Replicas(context.Background()) {
		if r.ID == s.replicaID {
			return r.Error
		}
	}
	return "(not listed)"
}

// A peer this replica cannot mesh with shows in its row ("cannot mesh
// with <relay URL>: …") once the first second of redialing has passed,
// and clears when the mesh heals: the row mirrors the mesh's changes (the
// mesh tells; nothing polls).
func TestMeshFailureShowsInTheRowAndClearsWhenHealed(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	pg := dbtest.NewURL(t)
	portA, portB := clitest.FreePort(t), clitest.FreePort(t)
	proxy, err := faultproxy.New(fmt.Sprintf("127.0.0.1:%d", portB))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	start := func(port int, relay string) *Server {
		return startServer(ctx, t, Config{
			HTTPAddress:        fmt.Sprintf("127.0.0.1:%d", port),
			AccessURL:          "https://coder.example.com",
			DERPServerRelayURL: relay,
			PostgresURL:        pg,
			DERPServerEnable:   true,
		})
	}
	b := start(portB, proxy.URL())
	a := start(portA, fmt.Sprintf("http://127.0.0.1:%d", portA))
	wait.For(t, 30*time.Second, "a and b are ready", func() bool { return a.ready.Load() && b.ready.Load() })
	if e := ownError(a); e != "" {
		t.Fatalf("a reports %q while meshed", e)
	}

	proxy.Cut()
	wait.For(t, 30*time.Second, "a's row names the peer it cannot mesh with", func() bool {
		return strings.Contains(ownError(a), "cannot mesh with "+proxy.URL())
	})
	proxy.Heal()
	wait.For(t, 30*time.Second, "the error clears once meshed again", func() bool { return ownError(a) == "" })
}
