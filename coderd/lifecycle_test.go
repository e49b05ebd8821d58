package coderd

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// Shutdown may be called more than once, also at the same time (a second
// SIGTERM while draining, a deferred cleanup): every call returns the
// first one's result once the replica is fully stopped: listeners closed
// and its row marked stopped for its peers.
func TestShutdownIsIdempotentAndWaits(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	pg := dbtest.NewURL(t)
	port := clitest.FreePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	s := startServer(ctx, t, Config{
		HTTPAddress:        fmt.Sprintf("127.0.0.1:%d", port),
		AccessURL:          "https://coder.example.com",
		DERPServerRelayURL: base,
		PostgresURL:        pg,
		DERPServerEnable:   true,
	})
	wait.For(t, 30*time.Second, "the replica is ready", func() bool { return s.ready.Load() })

	cut, cutNow := context.WithCancel(ctx)
	cutNow() // no grace period: the drain itself is not under test
	errs := wait.Concurrently(3, func() error { return s.Shutdown(cut) })
	for i, err := range errs {
		if err != errs[0] {
			t.Fatalf("Shutdown call %d returned %v, the first %v", i, err, errs[0])
		}
	}
	if err := s.Shutdown(ctx); err != errs[0] {
		t.Fatalf("Shutdown after Shutdown returned %v, the first %v", err, errs[0])
	}

	// Every call returned only after the work was done.
	if resp, err := http.Get(base + "/healthz"); err == nil {
		_ = resp.Body.Close()
		t.Fatalf("/healthz still answers (%s) after Shutdown returned", resp.Status)
	}
	db, err := database.Connect(ctx, pg, database.ConnectOptions{MaxConns: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.RecentReplicas(ctx, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.ID == s.ReplicaID() {
			if r.StoppedAt == nil {
				t.Fatal("Shutdown returned before the row was marked stopped")
			}
			return
		}
	}
	t.Fatal("the replica's row is gone")
}
