//go:build ha

package hatest_test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// rowError is the error in subject's row as observer's API shows it.
func rowError(observer, subject *node, token string) (string, bool) {
	for _, r := range replicas(observer, token) {
		if r.ID.String() == subject.id {
			return r.Error, true
		}
	}
	return "", false
}

// reaches polls until a packet from a arrives at b (each try resends for
// half a second), or d passes.
func reaches(t *testing.T, d time.Duration, what string, a, b *derptest.Client) time.Duration {
	t.Helper()
	return within(t, d, what, func() bool { return derptest.Reachable(a, b, 500*time.Millisecond) })
}

// A middlebox in front of a replica's relay black-holes the connections
// open now (the proxy keeps them open and discards every byte): its
// peers' mesh links to it stop answering while its process, its
// heartbeat and new connections are fine. The peers report it unreachable
// at their next probe, redial the dead links within the documented
// keepalive bound (≈ 25 s up to 10 peers, see derpmesh.Options.PingInterval),
// and their clients reach its clients again; clients of the other
// replicas never notice.
func TestFrozenMeshLinksAreRedialedAndClientsReachEachOtherAgain(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=1s"
	a, pa := startProxied(t, "a", pg, beat)
	b, c := start(t, "b", pg, beat), start(t, "c", pg, beat)
	ready(t, a, b, c)
	ca, cb, cc := client(t, a), client(t, b), client(t, c)
	for _, pair := range [][2]*derptest.Client{{ca, cb}, {cb, ca}, {cc, ca}, {cb, cc}} {
		if !derptest.Reachable(pair[0], pair[1], 5*time.Second) {
			t.Fatal("not meshed")
		}
	}

	pa.Freeze()
	frozen := time.Now()
	within(t, 10*time.Second, "b and c report a unreachable (their probes over the frozen links time out)", func() bool {
		return reportsUnreachable(b, token, a.id) && reportsUnreachable(c, token, a.id)
	})
	if lost := derptest.Exchange(cb, cc, 500, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("clients of b and c lost %d of 500 packets while a's incoming links were frozen", lost)
	}
	reaches(t, 45*time.Second, "a client on b reaches a's client again", cb, ca)
	reaches(t, 10*time.Second, "a client on c reaches a's client again", cc, ca)
	t.Logf("links redialed %s after the freeze", time.Since(frozen).Round(time.Second))
	within(t, 10*time.Second, "b and c measure a again", func() bool {
		return !reportsUnreachable(b, token, a.id) && !reportsUnreachable(c, token, a.id) &&
			health(b, token).Healthy && health(c, token).Healthy
	})
}

// A replica stopped with SIGSTOP (a hung process, its machine up) is
// dropped by the others after three beats while their own clients keep
// exchanging; resumed with SIGCONT, it rejoins and clients on it and on
// the others exchange packets both ways again, and every replica reports a
// healthy cluster.
func TestStoppedReplicaRelaysBothWaysAgainAfterItResumes(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=1s"
	a, b, c := start(t, "a", pg, beat), start(t, "b", pg, beat), start(t, "c", pg, beat)
	ready(t, a, b, c)
	ca, cb, cc := client(t, a), client(t, b), client(t, c)
	if !derptest.Reachable(ca, cb, 5*time.Second) || !derptest.Reachable(cc, ca, 5*time.Second) {
		t.Fatal("not meshed")
	}

	a.Signal(syscall.SIGSTOP)
	t.Cleanup(func() { a.Signal(syscall.SIGCONT) })
	within(t, 10*time.Second, "b and c drop the stopped replica", func() bool {
		return !lists(b, token, a.id) && !lists(c, token, a.id)
	})
	if lost := derptest.Exchange(cb, cc, 500, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("clients of b and c lost %d of 500 packets while a was stopped", lost)
	}
	// Let a's peers' links to it, and its packets' queues, run into their
	// timeouts while it is stopped.
	time.Sleep(8 * time.Second)

	a.Signal(syscall.SIGCONT)
	within(t, 10*time.Second, "the resumed replica is listed again", func() bool {
		return lists(b, token, a.id) && lists(c, token, a.id)
	})
	reaches(t, 30*time.Second, "b's client reaches a's client", cb, ca)
	reaches(t, 30*time.Second, "a's client reaches b's client", ca, cb)
	reaches(t, 30*time.Second, "c's client reaches a's client", cc, ca)
	reaches(t, 30*time.Second, "a's client reaches c's client", ca, cc)
	within(t, 30*time.Second, "every replica reports a healthy cluster", func() bool {
		for _, n := range []*node{a, b, c} {
			if h := health(n, token); !h.Healthy {
				return false
			}
		}
		return true
	})
}

// A peer whose relay flaps (connections cut and healed, briefly and for
// longer, several times): while it is cut, the replica meshing with it
// names it in its row ("cannot mesh with <relay URL>") on every replica's
// API and in its health; once it heals, the error goes everywhere: no
// stale "cannot mesh" after the last heal, and none missed.
func TestFlappingPeerLeavesNoStaleMeshError(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=1s"
	a, pa := startProxied(t, "a", pg, beat)
	b, c := start(t, "b", pg, beat), start(t, "c", pg, beat)
	ready(t, a, b, c)
	want := "cannot mesh with " + pa.URL()
	healed := func() bool {
		for _, observer := range []*node{a, b, c} {
			for _, subject := range []*node{b, c} {
				if e, ok := rowError(observer, subject, token); !ok || e != "" {
					return false
				}
			}
		}
		return health(b, token).Healthy && health(c, token).Healthy
	}
	for round := 1; round <= 3; round++ {
		// Brief flaps first: shorter than the 1 s grace, or just past it.
		for i := 0; i < 4; i++ {
			pa.Cut()
			time.Sleep(time.Duration(300*(i+1)) * time.Millisecond)
			pa.Heal()
			time.Sleep(200 * time.Millisecond)
		}
		pa.Cut()
		within(t, 15*time.Second, fmt.Sprintf("round %d: every API shows b's and c's error about a", round), func() bool {
			for _, observer := range []*node{a, b, c} {
				for _, subject := range []*node{b, c} {
					if e, _ := rowError(observer, subject, token); !strings.Contains(e, want) {
						return false
					}
				}
			}
			h := health(b, token)
			return !h.DERPMesh.Healthy && strings.Contains(strings.Join(h.DERPMesh.Warnings, "\n"), pa.URL())
		})
		pa.Heal()
		within(t, 15*time.Second, fmt.Sprintf("round %d: the error is gone from every API and health", round), healed)
	}
	// And it stays gone.
	time.Sleep(3 * time.Second)
	if !healed() {
		t.Fatal("a mesh error came back after the last heal")
	}
}

// In a fleet of 13 replicas each has 12 peers, more than a probe round
// (ProbesPerInterval, 10), so every replica samples its latency matrix.
// A peer made slow by a delay injected in front of its relay is still
// warned about by every other replica, measured over the mesh links,
// within the documented bound (⌈12/10⌉ = 2 beats plus the confirming
// probes: about 3 s with 1 s beats; the test allows a loaded machine
// 30 s), and the warning clears everywhere once the delay goes.
func TestSlowPeerInAFleetLargerThanAProbeRoundIsWarnedAboutEverywhere(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	env := []string{"CODER_REPLICA_HEARTBEAT_INTERVAL=1s", "CODER_REPLICA_LATENCY_THRESHOLD=150ms"}
	slow, proxy := startProxied(t, "slow", pg, env...)
	nodes := []*node{slow}
	for i := 1; i < 13; i++ {
		nodes = append(nodes, start(t, fmt.Sprintf("r%d", i), pg, env...))
	}
	ready(t, nodes...)
	others := nodes[1:]
	warns := func(n *node) bool {
		return strings.Contains(strings.Join(health(n, token).Replicas.Warnings, "\n"), proxy.URL())
	}
	within(t, 60*time.Second, "every replica lists 13 and none warns about the slow one yet", func() bool {
		for _, n := range others {
			if len(replicas(n, token)) != 13 || warns(n) {
				return false
			}
		}
		return true
	})

	proxy.SetDelay(150 * time.Millisecond) // ≥ 300 ms round trip > 150 ms
	took := within(t, 30*time.Second, "every other replica warns about the slow one", func() bool {
		for _, n := range others {
			if !warns(n) {
				return false
			}
		}
		return true
	})
	t.Logf("warned everywhere %s after the delay (documented bound ≈ 3 s with 1 s beats)", took.Round(time.Millisecond))
	proxy.SetDelay(0)
	within(t, 30*time.Second, "the warning clears everywhere", func() bool {
		for _, n := range others {
			if warns(n) {
				return false
			}
		}
		return true
	})
}

// A replica that joins with a relay URL its peers cannot reach (behind a
// cut) is not left silently unmeasured because newcomers are measured over
// their mesh link, which never comes up: the peer's own measurement shows
// an error for it (its probe falls back to HTTP), its row says it cannot
// mesh with it, and the newcomer never reports ready (clients a load
// balancer sent there could not reach the others' clients).
func TestNewcomerWhoseRelayIsUnreachableIsReportedNotLeftUnmeasured(t *testing.T) {
	pg := dbtest.NewURL(t)
	token := clitest.CreateToken(t, pg)
	beat := "CODER_REPLICA_HEARTBEAT_INTERVAL=1s"
	b := start(t, "b", pg, beat)
	ready(t, b)
	n, pn := startProxied(t, "n", pg, beat)
	pn.Cut()
	within(t, 30*time.Second, "the newcomer answers its build info", func() bool {
		var info struct {
			ReplicaID string `json:"replica_id"`
		}
		if n.GetJSON("/api/v2/buildinfo", "", &info) != 200 || info.ReplicaID == "" {
			return false
		}
		n.id = info.ReplicaID
		return true
	})
	within(t, 30*time.Second, "b lists the newcomer, measures it unreachable and cannot mesh with it", func() bool {
		e, _ := rowError(b, b, token)
		return lists(b, token, n.id) && reportsUnreachable(b, token, n.id) && strings.Contains(e, "cannot mesh with "+pn.URL())
	})
	if code := n.Status("/readyz"); code == 200 {
		t.Fatal("the newcomer reports ready although its peers cannot mesh with it")
	}
	pn.Heal()
	n.WaitReady(60 * time.Second)
	within(t, 15*time.Second, "b measures the newcomer and meshes with it once the cut heals", func() bool {
		e, _ := rowError(b, b, token)
		return !reportsUnreachable(b, token, n.id) && e == "" && health(b, token).Healthy
	})
}
