//go:build bench

// Membership timings seen from outside: join to meshed, and how fast a
// dead or frozen peer is detected.

package bench_test

import (
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

func connectRetry(url string, d time.Duration) *derptest.Client {
	c, err := derptest.ConnectRetry(url, d)
	if err != nil {
		return nil
	}
	return c
}

// joinToMeshed: from starting a replica to the first packet crossing the
// mesh from an existing replica's client to a client of the new one.
func joinToMeshed(t *testing.T, n int) (join, ready []float64) {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	for i := 0; i < n-1; i++ {
		c.Add().WaitReady(2 * time.Minute)
	}
	time.Sleep(time.Second) // let the existing mesh settle
	x := connectRetry(c.Nodes[0].URL, 10*time.Second)
	if x == nil {
		t.Fatal("cannot connect to replica 1")
	}
	defer x.Close()
	for run := 0; run < runs; run++ {
		start := time.Now()
		p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("joiner-%d", run), PostgresURL: c.PostgresURL})
		y := connectRetry(p.URL, 30*time.Second)
		if y == nil {
			t.Fatalf("cannot connect to the joining replica:\n%s", p.Output())
		}
		crossed := false
		for time.Since(start) < 30*time.Second && !crossed {
			_ = x.Send(y.Key, []byte("hello"))
			crossed = len(y.WaitPackets(x.Key, 1, 2*time.Millisecond)) > 0
		}
		if !crossed {
			t.Fatalf("no packet crossed to the joining replica at N=%d", n)
		}
		join = append(join, ms(time.Since(start)))
		if wait.Until(30*time.Second, func() bool { return p.Status("/readyz") == http.StatusOK }) {
			ready = append(ready, ms(time.Since(start)))
		}
		_ = y.Close()
		p.Signal(syscall.SIGTERM)
		p.Wait(30 * time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	return join, ready
}

// detection: time until every peer has dropped a replica stopped with sig
// (SIGTERM: gone from every peer's list; kill -9: every peer reports it
// unreachable, from its own probes).
func detection(t *testing.T, sig syscall.Signal) []float64 {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	token := clitest.CreateToken(t, c.PostgresURL)
	for i := 0; i < 3; i++ {
		c.Add().WaitReady(time.Minute)
	}
	var out []float64
	for run := 0; run < runs; run++ {
		victim := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("victim-%d", run), PostgresURL: c.PostgresURL})
		victim.WaitReady(time.Minute)
		var info coderd.BuildInfo
		victim.GetJSON("/api/v2/buildinfo", "", &info)
		id := info.ReplicaID
		wait.Until(10*time.Second, func() bool { return allMeasured(c.Nodes, token, id.String()) })
		start := time.Now()
		if sig == syscall.SIGKILL {
			victim.Kill()
		} else {
			victim.Signal(sig)
		}
		ok := wait.Until(30*time.Second, func() bool {
			for _, n := range c.Nodes {
				var rs []coderd.Replica
				n.GetJSON("/api/v2/replicas", token, &rs)
				if sig == syscall.SIGTERM && listed(rs, id.String()) {
					return false
				}
				if sig == syscall.SIGKILL && listed(rs, id.String()) && !unreachable(rs, info.ReplicaID.String(), n) {
					return false
				}
			}
			return true
		})
		if ok {
			out = append(out, ms(time.Since(start)))
		}
		victim.Wait(30 * time.Second)
		time.Sleep(500 * time.Millisecond)
	}
	return out
}

func listed(rs []coderd.Replica, id string) bool {
	for _, r := range rs {
		if r.ID.String() == id {
			return true
		}
	}
	return false
}

// unreachable: n's own row reports the peer with an error.
func unreachable(rs []coderd.Replica, peer string, n *clitest.Process) bool {
	var self coderd.BuildInfo
	n.GetJSON("/api/v2/buildinfo", "", &self)
	for _, r := range rs {
		if r.ID != self.ReplicaID {
			continue
		}
		for _, p := range r.Peers {
			if p.ID.String() == peer {
				return p.Error != ""
			}
		}
	}
	return false
}

func allMeasured(nodes []*clitest.Process, token, peer string) bool {
	for _, n := range nodes {
		var rs []coderd.Replica
		n.GetJSON("/api/v2/replicas", token, &rs)
		var self coderd.BuildInfo
		n.GetJSON("/api/v2/buildinfo", "", &self)
		found := false
		for _, r := range rs {
			if r.ID != self.ReplicaID {
				continue
			}
			for _, p := range r.Peers {
				if p.ID.String() == peer && p.Error == "" && p.LatencyMS > 0 {
					found = true
				}
			}
		}
		if !found {
			return false
		}
	}
	return true
}
