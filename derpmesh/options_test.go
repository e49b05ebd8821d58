// What New and SetPeers refuse or report instead of dialing: unsafe
// options, invalid relay URLs, this relay's own URL; and Close.

package derpmesh_test

import (
	"crypto/tls"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/wait"
)

// A relay URL that leads back to this replica (two replicas claiming one
// URL) is detected, reported and not redialed, until Reconnect.
func TestOwnRelayURLIsReportedAndNotRedialed(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k}, a)

	wait.For(t, eventually, "self-connect reported", func() bool {
		s, ok := a.peerStatus(a.url)
		return ok && s.Error == "relay URL points at this replica"
	})
	accepts := func() string { return expvarValue(t, a, "accepts") }
	before := accepts()
	// Far more than the retry pause: no new dial may happen.
	time.Sleep(5 * testMaxRetry)
	if got := accepts(); got != before {
		t.Fatalf("the replica's own URL was redialed: accepts %s → %s", before, got)
	}
	if a.mesh.Ready() {
		t.Fatal("Ready() while meshing with itself")
	}
	if n := a.brokenCalls(a.url); n != 0 {
		t.Fatalf("OnPeerBroken called %d times for the replica's own URL", n)
	}
	a.mesh.Reconnect(a.url)
	wait.For(t, eventually, "Reconnect tries once more", func() bool { return accepts() != before })
}

func TestNewRejectsUnsafeOrInconsistentOptions(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	for name, opts := range map[string]derpmesh.Options{
		"no server":           {MeshKey: k},
		"short mesh key":      {Server: a.server, MeshKey: "abc123"},
		"another mesh key":    {Server: a.server, MeshKey: newMeshKey()},
		"skips verification":  {Server: a.server, MeshKey: k, TLSConfig: &tls.Config{InsecureSkipVerify: true}}, //nolint:gosec // refused, which is the point
		"custom verification": {Server: a.server, MeshKey: k, TLSConfig: &tls.Config{VerifyConnection: func(tls.ConnectionState) error { return nil }}},
	} {
		m, err := derpmesh.New(opts)
		if err == nil {
			_ = m.Close()
			t.Errorf("%s: New succeeded", name)
			continue
		}
		if strings.Contains(err.Error(), k) || strings.Contains(err.Error(), "abc123") {
			t.Errorf("%s: the error reveals the mesh key: %v", name, err)
		}
	}
}

func TestInvalidRelayURLIsReportedNotDialed(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a := startNode(t, nodeOptions{meshKey: k})
	a.meshWith(t, meshOptions{meshKey: k, extraURLs: []string{"ftp://10.0.0.1", "http://"}})
	wait.For(t, eventually, "both reported", func() bool {
		st := a.mesh.Status()
		return len(st) == 2 && strings.Contains(st[0].Error, "invalid relay URL") && strings.Contains(st[1].Error, "invalid relay URL")
	})
	if a.mesh.Ready() {
		t.Fatal("Ready() with invalid peers")
	}
}

// Close is idempotent (also when called concurrently), disconnects peers,
// and stops every goroutine: dialing, pausing, parked and connected peers,
// and the callback goroutine.
func TestCloseIsIdempotentAndLeavesNoGoroutines(t *testing.T) {
	// Not parallel: it counts goroutines.
	k := newMeshKey()
	a, b := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	c, d := startNode(t, nodeOptions{meshKey: k}), startNode(t, nodeOptions{meshKey: k})
	before := len(meshGoroutines())
	if before != 0 {
		t.Fatalf("derpmesh goroutines running before the test:\n%s", strings.Join(meshGoroutines(), "\n\n"))
	}
	extra := []string{
		c.url, d.url, // connected, then removed
		a.url,        // this replica: parked
		"gopher://x", // invalid: parked
	}
	for port := 1; port <= 10; port++ {
		extra = append(extra, fmt.Sprintf("http://127.0.0.1:%d", port)) // refused: pausing between attempts
	}
	a.meshWith(t, meshOptions{meshKey: k, extraURLs: extra}, b)
	wait.For(t, eventually, "connected to the live peers", func() bool {
		return a.connectedTo(b.url) && a.connectedTo(c.url) && a.connectedTo(d.url)
	})
	wait.For(t, eventually, "the unreachable peers reported", func() bool {
		for port := 1; port <= 10; port++ {
			if a.brokenCalls(fmt.Sprintf("http://127.0.0.1:%d", port)) == 0 {
				return false
			}
		}
		return true
	})
	if runs := peerLoops(); runs != 15 {
		t.Fatalf("%d peer loops for 15 peers", runs)
	}
	if wantCurrent := "1"; expvarValue(t, b, "gauge_current_connections") != wantCurrent {
		t.Fatalf("peer sees %s connections, want the mesh's 1", expvarValue(t, b, "gauge_current_connections"))
	}

	// Removing peers stops their goroutines before SetAddresses returns.
	a.mesh.SetAddresses(append([]string{b.url}, extra[7:]...))
	wait.For(t, time.Second, "7 removed peer loops gone", func() bool { return peerLoops() == 8 })

	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); _ = a.mesh.Close() }()
	}
	wg.Wait()
	if err := a.mesh.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// Close waited for them; a goroutine that has just signalled it is done
	// may still show its last frame for a moment.
	if leaked := waitNoMeshGoroutines(); len(leaked) != 0 {
		t.Fatalf("Close returned with derpmesh goroutines running:\n%s", strings.Join(leaked, "\n\n"))
	}
	if st := a.mesh.Status(); len(st) != 0 {
		t.Fatalf("Status after Close: %+v", st)
	}
	a.mesh.SetAddresses([]string{b.url}) // no-op after Close
	a.mesh.Reconnect(b.url)
	if leaked := waitNoMeshGoroutines(); len(leaked) != 0 {
		t.Fatal("SetAddresses after Close started goroutines")
	}
	wait.For(t, eventually, "the peer sees the mesh connection gone", func() bool {
		return expvarValue(t, b, "gauge_current_connections") == "0"
	})
}

// waitNoMeshGoroutines waits up to a second for the package's goroutines to
// be gone and returns any left.
func waitNoMeshGoroutines() []string {
	deadline := time.Now().Add(time.Second)
	for {
		leaked := meshGoroutines()
		if len(leaked) == 0 || time.Now().After(deadline) {
			return leaked
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// peerLoops counts the package's per-peer goroutines.
func peerLoops() int {
	n := 0
	for _, g := range meshGoroutines() {
		if strings.Contains(g, "derpmesh.(*peer).run(") {
			n++
		}
	}
	return n
}
