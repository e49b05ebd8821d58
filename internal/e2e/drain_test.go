package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// balancer stands in for a load balancer in front of one client: a TCP
// proxy the client dials, sending new connections to one replica at a
// time. The test moves it when that replica's /readyz fails, as a load
// balancer does; open connections stay where they are until they close.
type balancer struct {
	*faultproxy.Proxy
	target *clitest.Process
}

func newBalancer(t *testing.T, target *clitest.Process) *balancer {
	t.Helper()
	p, err := faultproxy.New("127.0.0.1:" + strconv.Itoa(target.Port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return &balancer{Proxy: p, target: target}
}

func (b *balancer) moveTo(p *clitest.Process) {
	b.SetTarget("127.0.0.1:" + strconv.Itoa(p.Port))
	b.target = p
}

func dial(t *testing.T, url string) *derptest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := derptest.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// exchangeAll sends n packets along every ordered pair of clients and
// returns how many were lost, and along which pairs.
func exchangeAll(clients map[string]*derptest.Client, n int) (lost int, where []string) {
	for an, a := range clients {
		for bn, b := range clients {
			if a == b {
				continue
			}
			if l := derptest.Exchange(a, b, n, 512, 16, 2*time.Second); l > 0 {
				lost += l
				where = append(where, fmt.Sprintf("%s→%s lost %d of %d", an, bn, l, n))
			}
		}
	}
	return lost, where
}

// allReachable reports whether every ordered pair of clients reaches the
// other within d (the first packets after a reconnect may be lost while
// the relays learn where the client went).
func allReachable(clients map[string]*derptest.Client, d time.Duration) (bool, string) {
	for an, a := range clients {
		for bn, b := range clients {
			if a != b && !derptest.Reachable(a, b, d) {
				return false, an + "→" + bn
			}
		}
	}
	return true, ""
}

func listsReplicas(p *clitest.Process, token string) int {
	var replicas []coderd.Replica
	if p.GetJSON("/api/v2/replicas", token, &replicas) != http.StatusOK {
		return -1
	}
	return len(replicas)
}

// exchangeThroughGrace keeps every pair exchanging from the signal until
// margin before the grace period ends (before the listeners close) and
// fails the test on any lost packet.
func exchangeThroughGrace(t *testing.T, clients map[string]*derptest.Client, signalled time.Time, grace, margin time.Duration, during func()) (rounds int) {
	t.Helper()
	for time.Since(signalled) < grace-margin {
		round := time.Since(signalled)
		if lost, where := exchangeAll(clients, 50); lost > 0 {
			t.Fatalf("in the round that started %s into the grace period, %d packets lost: %s", round.Round(time.Millisecond), lost, strings.Join(where, "; "))
		}
		if during != nil {
			during()
		}
		rounds++
	}
	return rounds
}

// The drain order operators rely on: on SIGTERM /readyz fails at once, but
// for the whole grace period the replica stays in the mesh and relays both
// ways, for its own clients and to them, with nothing lost; then its
// listeners close, its clients reconnect elsewhere through the load
// balancer and reach everyone again, it leaves the cluster and exits 0.
func TestDrainingReplicaRelaysBothWaysUntilItsListenersClose(t *testing.T) {
	t.Parallel()
	const grace = 8 * time.Second
	pg := dbtest.NewURL(t)
	token := createToken(t, pg)
	env := []string{"CODER_SHUTDOWN_GRACE_PERIOD=" + grace.String()}
	start := func(name string) *clitest.Process {
		return clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, Env: env})
	}
	r1, r2, r3 := start("coder-1"), start("coder-2"), start("coder-3")
	for _, r := range []*clitest.Process{r1, r2, r3} {
		r.WaitReady(90 * time.Second)
	}
	lb := newBalancer(t, r2)
	clients := map[string]*derptest.Client{
		"on-1":        dial(t, r1.URL),
		"on-draining": dial(t, lb.URL()),
		"on-3":        dial(t, r3.URL),
	}
	if ok, pair := allReachable(clients, 10*time.Second); !ok {
		t.Fatalf("not meshed before the drain: %s", pair)
	}

	r2.Signal(syscall.SIGTERM)
	signalled := time.Now()
	wait.For(t, 2*time.Second, "/readyz of the draining replica answers 503", func() bool {
		return r2.Status("/readyz") == http.StatusServiceUnavailable
	})
	lb.moveTo(r3) // the load balancer takes it out of rotation
	checked := false
	rounds := exchangeThroughGrace(t, clients, signalled, grace, 2*time.Second, func() {
		if checked || time.Since(signalled) < grace/2 {
			return
		}
		checked = true
		for _, r := range []*clitest.Process{r1, r3} {
			if n := listsReplicas(r, token); n != 3 {
				t.Fatalf("%s lists %d replicas halfway through the grace period; the draining one must stay a member", r.Name, n)
			}
		}
		if r2.Exited() {
			t.Fatal("the draining replica exited before its grace period ended")
		}
	})
	t.Logf("%d rounds of 50 packets along 6 pairs through the grace period, none lost", rounds)

	if code := r2.Wait(60 * time.Second); code != 0 {
		t.Fatalf("drained replica exit %d", code)
	}
	exited := time.Now()
	wait.For(t, 5*time.Second, "the peers drop the replica that left", func() bool {
		return listsReplicas(r1, token) == 2 && listsReplicas(r3, token) == 2
	})
	if ok, pair := allReachable(clients, 10*time.Second); !ok {
		t.Fatalf("the drained replica's client did not reconnect elsewhere: %s unreachable", pair)
	}
	t.Logf("every pair reachable again %s after the drained replica exited", time.Since(exited).Round(time.Millisecond))
	if lost, where := exchangeAll(clients, 200); lost > 0 {
		t.Fatalf("after the client moved: %s", strings.Join(where, "; "))
	}

	// What an operator reads in the drained replica's log, in this order.
	out := r2.Output()
	last := -1
	for _, msg := range []string{"draining: /readyz now answers 503", "closing listeners", "leaving the cluster", "server stopped"} {
		i := strings.Index(out, msg)
		if i < 0 || i < last {
			t.Fatalf("log line %q missing or out of order:\n%s", msg, out)
		}
		last = i
	}
}

// A rolling restart of all three replicas, one after the other with a
// grace period, while a client behind each "load balancer" exchanges with
// the others: nothing is lost during any grace period, and after each
// restart every client reaches every other again.
func TestRollingRestartKeepsClientsExchanging(t *testing.T) {
	t.Parallel()
	const grace = 5 * time.Second
	pg := dbtest.NewURL(t)
	token := createToken(t, pg)
	env := []string{"CODER_SHUTDOWN_GRACE_PERIOD=" + grace.String()}
	ports := []int{clitest.FreePort(t), clitest.FreePort(t), clitest.FreePort(t)}
	nodes := make([]*clitest.Process, 3)
	startNode := func(i int, name string) {
		nodes[i] = clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, Port: ports[i], Env: env})
	}
	for i := range nodes {
		startNode(i, fmt.Sprintf("coder-%d", i+1))
	}
	for _, n := range nodes {
		n.WaitReady(90 * time.Second)
	}
	lbs := make([]*balancer, 3)
	clients := map[string]*derptest.Client{}
	for i, n := range nodes {
		lbs[i] = newBalancer(t, n)
		clients[fmt.Sprintf("client-%d", i+1)] = dial(t, lbs[i].URL())
	}
	if ok, pair := allReachable(clients, 10*time.Second); !ok {
		t.Fatalf("not meshed: %s", pair)
	}

	for i := range nodes {
		victim, next := nodes[i], nodes[(i+1)%3]
		victim.Signal(syscall.SIGTERM)
		signalled := time.Now()
		wait.For(t, 2*time.Second, victim.Name+" /readyz answers 503", func() bool {
			return victim.Status("/readyz") == http.StatusServiceUnavailable
		})
		for _, lb := range lbs {
			if lb.target == victim {
				lb.moveTo(next)
			}
		}
		exchangeThroughGrace(t, clients, signalled, grace, 1500*time.Millisecond, nil)
		if code := victim.Wait(60 * time.Second); code != 0 {
			t.Fatalf("%s exit %d", victim.Name, code)
		}
		exited := time.Now()
		if ok, pair := allReachable(clients, 10*time.Second); !ok {
			t.Fatalf("after %s stopped: %s unreachable", victim.Name, pair)
		}
		t.Logf("%s: every pair reachable again %s after it exited", victim.Name, time.Since(exited).Round(time.Millisecond))
		startNode(i, victim.Name+"-restarted")
		nodes[i].WaitReady(90 * time.Second)
	}
	wait.For(t, 10*time.Second, "every replica lists the three restarted ones", func() bool {
		for _, n := range nodes {
			if listsReplicas(n, token) != 3 {
				return false
			}
		}
		return true
	})
	if ok, pair := allReachable(clients, 10*time.Second); !ok {
		t.Fatalf("after the rolling restart: %s unreachable", pair)
	}
	if lost, where := exchangeAll(clients, 200); lost > 0 {
		t.Fatalf("after the rolling restart: %s", strings.Join(where, "; "))
	}
}
