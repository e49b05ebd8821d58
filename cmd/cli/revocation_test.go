package cli_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
	"github.com/coder-ha/coder/internal/wait"
)

// A token revoked with `coder server revoke-token` is refused by every
// replica at once, though both had just accepted it (and cached it): with
// LISTEN through the revocation's notification, in poll mode through the
// per-second recheck.
func TestRevokedTokenIsRefusedOnEveryReplicaAtOnce(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"listen", "poll"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			pg := dbtest.NewURL(t)
			c := clitest.NewCluster(t, pg)
			a, b := c.Add("CODER_POSTGRES_PUBSUB="+mode), c.Add("CODER_POSTGRES_PUBSUB="+mode)
			c.WaitReady(60 * time.Second)
			token := clitest.CreateToken(t, pg)
			other := clitest.CreateToken(t, pg)
			for _, r := range []*clitest.Process{a, b} {
				for _, tok := range []string{token, other} {
					if code := r.GetJSON("/api/v2/replicas", tok, nil); code != http.StatusOK {
						t.Fatalf("%s: a new token got %d", r.Name, code)
					}
				}
			}

			rev := clitest.Start(t, "revoke-token", []string{"CODER_PG_CONNECTION_URL=" + pg}, "server", "revoke-token", token)
			if code := rev.Wait(60 * time.Second); code != 0 {
				t.Fatalf("revoke-token exit %d: %s", code, rev.Output())
			}
			revoked := time.Now()
			id, secret, _ := strings.Cut(token, "-")
			if out := rev.Output(); !strings.Contains(out, "revoked token "+id) || strings.Contains(out, secret) {
				t.Fatalf("revoke-token should name the token's id and never its secret: %q", out)
			}
			for _, r := range []*clitest.Process{a, b} {
				wait.For(t, 30*time.Second, r.Name+" to refuse the revoked token", func() bool {
					return r.GetJSON("/api/v2/replicas", token, nil) == http.StatusUnauthorized
				})
				took := time.Since(revoked)
				t.Logf("%s mode: %s refuses the revoked token %v after revoke-token exited", mode, r.Name, took.Round(time.Millisecond))
				if took > 5*time.Second {
					t.Errorf("%s refused the revoked token only after %v", r.Name, took)
				}
				if code := r.GetJSON("/api/v2/replicas", other, nil); code != http.StatusOK {
					t.Errorf("%s: another token got %d after one was revoked", r.Name, code)
				}
			}

			again := clitest.Start(t, "revoke-token-again", []string{"CODER_PG_CONNECTION_URL=" + pg}, "server", "revoke-token", id)
			if code := again.Wait(60 * time.Second); code != 1 || !strings.Contains(again.Output(), "no token with id "+id) {
				t.Fatalf("revoking it again: exit %d, %q; want 1 naming the id", code, again.Output())
			}
		})
	}
}

// revoke-token --name revokes every token of that name; a malformed
// argument is refused without echoing it.
func TestRevokeTokenByNameAndBadArguments(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	env := []string{"CODER_PG_CONNECTION_URL=" + pg}
	var ids []string
	for i := 0; i < 2; i++ {
		p := clitest.Start(t, "create", env, "server", "create-token", "--name", "ci")
		if code := p.Wait(60 * time.Second); code != 0 {
			t.Fatalf("create-token: %d %s", code, p.Output())
		}
		id, _, _ := strings.Cut(strings.TrimSpace(p.Output()), "-")
		ids = append(ids, id)
	}
	keep := clitest.CreateToken(t, pg)
	p := clitest.Start(t, "revoke", env, "server", "revoke-token", "--name", "ci")
	if code := p.Wait(60 * time.Second); code != 0 {
		t.Fatalf("revoke-token --name: %d %s", code, p.Output())
	}
	for _, id := range ids {
		if !strings.Contains(p.Output(), "revoked token "+id) {
			t.Errorf("revoke-token --name did not revoke %s: %q", id, p.Output())
		}
	}
	keepID, _, _ := strings.Cut(keep, "-")
	if strings.Contains(p.Output(), keepID) {
		t.Errorf("revoke-token --name ci revoked a token of another name")
	}
	bad := clitest.Start(t, "revoke-bad", env, "server", "revoke-token", "not-a-token-supersecret")
	if code := bad.Wait(60 * time.Second); code != 2 || strings.Contains(bad.Output(), "supersecret") {
		t.Fatalf("a malformed token: exit %d, %q; want 2 without echoing it", code, bad.Output())
	}
}

// With a real process and real clients: a client the webhook stops
// admitting loses the relay within --derp-server-verify-client-interval,
// its reconnections are refused, the other clients keep relaying, and
// /metrics counts the re-verifications and the disconnection.
func TestRelayCutsAClientTheWebhookNoLongerAdmits(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	hook := newVerifyServer(t)
	promPort := clitest.FreePort(t)
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: []string{
		"CODER_DERP_SERVER_VERIFY_CLIENT_URL=" + hook.srv.URL + "/verify",
		"CODER_DERP_SERVER_VERIFY_CLIENT_INTERVAL=1s",
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
	}})
	r.WaitReady(60 * time.Second)
	metricsURL := "http://127.0.0.1:" + strconv.Itoa(promPort) + "/metrics"
	victim, stays, other := key.NewNode(), key.NewNode(), key.NewNode()
	for _, k := range []key.NodePrivate{victim, stays, other} {
		hook.admit(k.Public())
	}
	cv, err := dialKey(t, r, victim)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := dialKey(t, r, stays)
	if err != nil {
		t.Fatal(err)
	}
	co, err := dialKey(t, r, other)
	if err != nil {
		t.Fatal(err)
	}
	if !derptest.Reachable(cv, cs, 15*time.Second) || !derptest.Reachable(cs, cv, 15*time.Second) {
		t.Fatal("admitted clients cannot reach each other")
	}

	hook.revoke(victim.Public())
	start := time.Now()
	wait.For(t, 30*time.Second, "the revoked client to be disconnected", func() bool {
		return scrapeValue(t, metricsURL, "coderd_derp_admission_disconnects_total") >= 1
	})
	t.Logf("the revoked client was disconnected %v after the webhook started refusing it (interval 1s)", time.Since(start).Round(time.Millisecond))
	if derptest.Reachable(cv, cs, 2*time.Second) || derptest.Reachable(cs, cv, 2*time.Second) {
		t.Fatal("the revoked client still relays")
	}
	if !derptest.Reachable(cs, co, 10*time.Second) || !derptest.Reachable(co, cs, 10*time.Second) {
		t.Fatal("admitted clients stopped relaying")
	}
	wait.For(t, 30*time.Second, "the revoked client's reconnection to be refused", func() bool {
		return scrapeValue(t, metricsURL, `coderd_derp_clients_refused_total{reason="admission"}`) >= 1
	})
	if scrapeValue(t, metricsURL, `coderd_derp_admission_reverifications_total{result="deny"}`) < 1 {
		t.Error("no denied re-verification in /metrics")
	}
	if out := r.Output(); !strings.Contains(out, "derp client disconnected: the admission webhook no longer admits it") {
		t.Error("no log line for the disconnection")
	}
}

// A fresh replica exports every relay guard series whose labels are known
// in advance, at 0, before anything happens (dashboards and rate() need
// them).
func TestFreshReplicaExportsRelayGuardSeriesAtZero(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "fresh", PostgresURL: pg, Env: []string{
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
	}})
	r.WaitReady(60 * time.Second)
	text := scrapeText(t, "http://127.0.0.1:"+strconv.Itoa(promPort)+"/metrics")
	var want []string
	for _, d := range []string{"allow", "deny"} {
		for _, s := range []string{"webhook", "cache", "stale_cache", "fail_open", "fail_closed"} {
			want = append(want, fmt.Sprintf(`coderd_derp_admission_decisions_total{decision=%q,source=%q} 0`, d, s))
		}
	}
	for _, res := range []string{"allow", "deny", "error"} {
		want = append(want, fmt.Sprintf(`coderd_derp_admission_reverifications_total{result=%q} 0`, res))
	}
	for _, res := range []string{"hit", "miss"} {
		want = append(want, fmt.Sprintf(`coderd_derp_admission_cache_lookups_total{result=%q} 0`, res))
	}
	for _, v := range []string{"allow", "deny"} {
		want = append(want, fmt.Sprintf(`coderd_derp_admission_cache_entries{verdict=%q} 0`, v))
	}
	for _, res := range []string{"refused", "evicted"} {
		want = append(want, fmt.Sprintf(`coderd_derp_pending_connections_closed_total{reason=%q} 0`, res))
	}
	want = append(want,
		"coderd_derp_admission_disconnects_total 0",
		"coderd_derp_admission_reverify_connections 0",
		"coderd_derp_max_pending_connections 1000",
		"coderd_derp_pending_connections ",
	)
	for _, w := range want {
		if !strings.Contains(text, "\n"+w) {
			t.Errorf("/metrics of a fresh replica lacks %q", w)
		}
	}
}

// scrapeValue returns the value of the series line starting with series
// (a name, or a name with its labels) in url's Prometheus text, -1 if
// absent.
func scrapeValue(t *testing.T, url, series string) float64 {
	t.Helper()
	for _, line := range strings.Split(scrapeText(t, url), "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err == nil {
				return v
			}
		}
	}
	return -1
}

// A negative re-verification interval is a one-line start-up error naming
// the flag.
func TestNegativeVerifyClientIntervalIsRefusedAtStart(t *testing.T) {
	t.Parallel()
	p := clitest.StartServer(t, "bad-interval", []string{"CODER_PG_CONNECTION_URL=postgres://127.0.0.1:1/x", "CODER_DERP_SERVER_VERIFY_CLIENT_INTERVAL=-1s"})
	if code := p.Wait(30 * time.Second); code != 2 {
		t.Fatalf("exit code %d, want 2; output:\n%s", code, p.Output())
	}
	if out := p.Output(); !strings.Contains(out, "--derp-server-verify-client-interval") || strings.Contains(out, "goroutine") {
		t.Fatalf("want a one-line error naming the flag, got:\n%s", out)
	}
}

// A running server counts connections that never finish a request as
// pending: the bound on unfinished connections wraps its real listener
// (it is built before the listener is bound, not after).
func TestSilentConnectionsCountAsPendingOnARunningServer(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "pending", PostgresURL: pg, Env: []string{
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
	}})
	r.WaitReady(60 * time.Second)
	metrics := "http://127.0.0.1:" + strconv.Itoa(promPort) + "/metrics"
	const silent = 20
	for i := 0; i < silent; i++ {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(r.Port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
	}
	wait.For(t, 30*time.Second, "the silent connections counted as pending", func() bool {
		return scrapeValue(t, metrics, "coderd_derp_pending_connections") >= silent
	})
	if code := r.GetJSON("/healthz", "", nil); code != http.StatusOK {
		t.Fatalf("/healthz beside the silent connections = %d, want 200", code)
	}
}

// revokeWithCommand runs `coder server revoke-token token` against pg and
// returns when it exited 0.
func revokeWithCommand(t *testing.T, pg, token string) time.Time {
	t.Helper()
	rev := clitest.Start(t, "revoke-token", []string{"CODER_PG_CONNECTION_URL=" + pg}, "server", "revoke-token", token)
	if code := rev.Wait(60 * time.Second); code != 0 {
		t.Fatalf("revoke-token exit %d: %s", code, rev.Output())
	}
	return time.Now()
}

// refusedBy waits until r answers 401 to token and returns how long after
// since that was.
func refusedBy(t *testing.T, r *clitest.Process, token string, since time.Time, d time.Duration) time.Duration {
	t.Helper()
	wait.For(t, d, r.Name+" to refuse the revoked token", func() bool {
		return r.GetJSON("/api/v2/replicas", token, nil) == http.StatusUnauthorized
	})
	return time.Since(since)
}

// A revocation committed while every database connection of a replica is
// frozen (a stalled proxy or middlebox: connections stay open, nothing
// moves, the notice is lost) still reaches it: the hung connections are
// noticed and replaced, and the replica checks the tokens it trusts. With
// LISTEN and in poll mode.
func TestRevocationReachesAReplicaWhoseDatabaseConnectionsFroze(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"listen", "poll"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			pg := dbtest.NewURL(t)
			proxy, viaProxy := faultproxy.InFrontOf(t, pg)
			r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: viaProxy, Env: []string{"CODER_POSTGRES_PUBSUB=" + mode}})
			r.WaitReady(60 * time.Second)
			token := clitest.CreateToken(t, pg)
			if code := r.GetJSON("/api/v2/replicas", token, nil); code != http.StatusOK {
				t.Fatalf("a new token got %d", code)
			}
			proxy.Freeze()
			took := refusedBy(t, r, token, revokeWithCommand(t, pg, token), 60*time.Second)
			t.Logf("%s mode, database connections frozen: the revoked token was refused %v after the revocation", mode, took.Round(time.Millisecond))
		})
	}
}

// A replica stopped (SIGSTOP: a long GC pause, a frozen VM) while a token
// is revoked refuses it as soon as it runs again.
func TestRevocationWhileAReplicaIsStoppedTakesEffectWhenItResumes(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	c := clitest.NewCluster(t, pg)
	a, b := c.Add(), c.Add()
	c.WaitReady(60 * time.Second)
	token := clitest.CreateToken(t, pg)
	for _, r := range []*clitest.Process{a, b} {
		if code := r.GetJSON("/api/v2/replicas", token, nil); code != http.StatusOK {
			t.Fatalf("%s: a new token got %d", r.Name, code)
		}
	}
	b.Signal(syscall.SIGSTOP)
	revoked := revokeWithCommand(t, pg, token)
	refusedBy(t, a, token, revoked, 30*time.Second)
	time.Sleep(3 * time.Second) // what the test claims: b stays stopped a while
	b.Signal(syscall.SIGCONT)
	resumed := time.Now()
	took := refusedBy(t, b, token, resumed, 30*time.Second)
	t.Logf("the stopped replica refused the revoked token %v after it resumed", took.Round(time.Millisecond))
}

// A token revoked as soon as Postgres is back from a restart is refused
// (whether the replica's LISTEN connection is back by then, or comes back
// after the notice and checks the tokens it trusts).
func TestRevocationRightAfterAPostgresRestart(t *testing.T) {
	t.Parallel()
	cluster := dbtest.NewCluster(t)
	pg := cluster.URL()
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg})
	r.WaitReady(60 * time.Second)
	token := clitest.CreateToken(t, pg)
	if code := r.GetJSON("/api/v2/replicas", token, nil); code != http.StatusOK {
		t.Fatalf("a new token got %d", code)
	}
	if err := cluster.Stop(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := cluster.Start(ctx); err != nil {
		t.Fatal(err)
	}
	took := refusedBy(t, r, token, revokeWithCommand(t, pg, token), 30*time.Second)
	t.Logf("revoked right after a Postgres restart: refused %v later", took.Round(time.Millisecond))
}
