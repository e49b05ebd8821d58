package relayguard_test

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// assertRefused connects a new client with priv to r and asserts it cannot
// use the relay: either the connection fails, or nothing it sends reaches
// other and nothing sent to it arrives.
func assertRefused(t *testing.T, r *relay, priv key.NodePrivate, other *derptest.Client, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := derptest.ConnectWithKey(ctx, r.url, priv)
	if err != nil {
		return // refused during the handshake
	}
	defer c.Close()
	shutOut(t, c, other, 2*time.Second, what)
}

func TestWebhookRefusedClientCannotRelayAdmittedCan(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "deny")
	mk := newMeshKey()
	opts := relayguard.Options{VerifyURL: hook.url()}
	a, b := startRelay(t, mk, opts), startRelay(t, mk, opts)
	meshPair(t, mk, a, b)

	good1, good2 := key.NewNode(), key.NewNode()
	hook.admitKey(good1.Public())
	hook.admitKey(good2.Public())
	c1 := connectKey(t, a, good1)
	c2 := connectKey(t, b, good2)
	works(t, c1, c2, "admitted clients on two meshed replicas")

	bad := key.NewNode()
	assertRefused(t, a, bad, c1, "refused client on the same replica")
	assertRefused(t, b, bad, c1, "refused client on the other replica")
	if got := a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "admission"}); got < 1 {
		t.Errorf("coderd_derp_clients_refused_total{reason=admission} = %v, want ≥ 1", got)
	}
	if got := a.metric(t, "coderd_derp_admission_decisions_total", map[string]string{"decision": "deny", "source": "webhook"}); got < 1 {
		t.Errorf("deny decisions from the webhook = %v, want ≥ 1", got)
	}

	// The mesh never asks the webhook: it saw only the test's clients.
	for _, k := range hook.seenKeys() {
		if k != good1.Public() && k != good2.Public() && k != bad.Public() {
			t.Errorf("the webhook was asked about %v, which is not a client (a mesh connection?)", k.ShortString())
		}
	}
	if hook.saw(a.server.PublicKey())+hook.saw(b.server.PublicKey()) != 0 {
		t.Error("the webhook was asked about a replica's mesh identity")
	}
	works(t, c1, c2, "admitted clients after the refusals")
}

// outage runs the webhook-outage scenario for one failure mode ("down" or
// "hang") and fail-open setting.
func outage(t *testing.T, mode string, failOpen bool) {
	hook := newWebhook(t, "allow")
	mk := newMeshKey()
	opts := relayguard.Options{VerifyURL: hook.url(), FailOpen: failOpen, WebhookTimeout: 300 * time.Millisecond}
	a, b := startRelay(t, mk, opts), startRelay(t, mk, opts)
	meshPair(t, mk, a, b)

	known := key.NewNode()
	c1 := connect(t, a)
	c2 := connect(t, b)
	k := connectKey(t, a, known)
	works(t, c1, c2, "before the outage")
	works(t, k, c2, "the known client before the outage")
	_ = k.Close()

	hook.setMode(mode)
	works(t, c1, c2, "connected clients during the webhook outage")
	// A known client reconnects (verdicts are cached per replica).
	k2 := connectKey(t, a, known)
	if !derptest.Reachable(k2, c1, 10*time.Second) {
		t.Fatalf("a known client reconnecting during the outage cannot send (webhook asked %d times; stale_cache decisions %v)",
			hook.saw(known.Public()), a.metric(t, "coderd_derp_admission_decisions_total", map[string]string{"decision": "allow", "source": "stale_cache"}))
	}
	works(t, k2, c1, "a known client reconnecting during the outage")

	stranger := key.NewNode()
	if failOpen {
		s := connectKey(t, a, stranger)
		works(t, s, c2, "a new client with fail-open")
		if got := a.metric(t, "coderd_derp_admission_decisions_total", map[string]string{"decision": "allow", "source": "fail_open"}); got < 1 {
			t.Errorf("fail_open decisions = %v, want ≥ 1", got)
		}
	} else {
		assertRefused(t, a, stranger, c1, "a new client while the webhook is "+mode)
		if got := a.metric(t, "coderd_derp_admission_decisions_total", map[string]string{"decision": "deny", "source": "fail_closed"}); got < 1 {
			t.Errorf("fail_closed decisions = %v, want ≥ 1", got)
		}
	}
	if got := a.metric(t, "coderd_derp_admission_webhook_up", nil); got != 0 {
		t.Errorf("coderd_derp_admission_webhook_up = %v during the outage, want 0", got)
	}
	if a.metric(t, "coderd_derp_admission_webhook_errors_total", nil) < 1 {
		t.Error("webhook errors were not counted")
	}
	if !a.meshed.Ready() || !b.meshed.Ready() {
		t.Error("the replicas left the mesh during the webhook outage")
	}
	works(t, c1, c2, "connected clients at the end of the outage")

	hook.setMode("allow")
	late := connect(t, a)
	works(t, late, c2, "a new client once the webhook is back")
	wait.For(t, eventually, "webhook_up back to 1", func() bool {
		return a.metric(t, "coderd_derp_admission_webhook_up", nil) == 1
	})
}

func TestWebhookDownFailClosedKeepsConnectedAndKnownClients(t *testing.T) {
	t.Parallel()
	outage(t, "down", false)
}

func TestWebhookHangingFailClosedKeepsConnectedAndKnownClients(t *testing.T) {
	t.Parallel()
	outage(t, "hang", false)
}

func TestWebhookDownFailOpenAdmitsNewClients(t *testing.T) {
	t.Parallel()
	outage(t, "down", true)
}

func TestAdmissionIsCached(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "allow")
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url()})
	priv := key.NewNode()
	for i := 0; i < 3; i++ {
		c := connectKey(t, a, priv)
		other := connect(t, a)
		works(t, c, other, "a reconnecting client")
		_ = c.Close()
	}
	if n := hook.saw(priv.Public()); n != 1 {
		t.Errorf("the webhook was asked %d times about a client that connected 3 times within the TTL, want 1", n)
	}
	// 3 reconnections and 3 other clients: the reconnections after the
	// first are hits.
	if hit, miss := a.metric(t, "coderd_derp_admission_cache_lookups_total", map[string]string{"result": "hit"}),
		a.metric(t, "coderd_derp_admission_cache_lookups_total", map[string]string{"result": "miss"}); hit != 2 || miss != 4 {
		t.Errorf("cache lookups: %v hits, %v misses, want 2 and 4", hit, miss)
	}
	if got := a.metric(t, "coderd_derp_admission_cache_entries", map[string]string{"verdict": "allow"}); got != 4 {
		t.Errorf("cached admissions = %v, want 4", got)
	}
}

func TestConnectionCapRefusesNewClientsButNotExistingOrMesh(t *testing.T) {
	t.Parallel()
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{MaxConnections: 2})
	b := startRelay(t, mk, relayguard.Options{})
	c1, c2 := connect(t, a), connect(t, a)
	wait.For(t, eventually, "two counted connections", func() bool { return a.guard.Connections() == 2 })

	assertRefused(t, a, key.NewNode(), c1, "a third client past the cap")
	if got := a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "limit"}); got < 1 {
		t.Errorf("coderd_derp_clients_refused_total{reason=limit} = %v, want ≥ 1", got)
	}
	works(t, c1, c2, "existing clients at the cap")

	// Mesh connections arrive while a is at its cap: they are admitted
	// by the mesh key and not counted.
	meshPair(t, mk, a, b)
	c3 := connect(t, b)
	works(t, c1, c3, "a client on the peer reaching a client on the capped replica")
	if n := a.guard.Connections(); n != 2 {
		t.Errorf("counted connections = %d, want 2 (mesh connections must not count)", n)
	}
	if got := a.metric(t, "coderd_derp_capped_connections", nil); got != 2 {
		t.Errorf("coderd_derp_capped_connections = %v, want 2", got)
	}

	// A slot frees up when a client leaves.
	_ = c2.Close()
	wait.For(t, eventually, "the slot to be released", func() bool { return a.guard.Connections() == 1 })
	c4 := connect(t, a)
	works(t, c4, c1, "a new client after one left")
}

func TestAcceptRateLimitRefusesBursts(t *testing.T) {
	t.Parallel()
	mk := newMeshKey()
	// One new client per minute, burst 1: the second is refused.
	a := startRelay(t, mk, relayguard.Options{AcceptRate: 1.0 / 60})
	c1 := connect(t, a)
	wait.For(t, eventually, "the first client to be counted", func() bool { return a.guard.Connections() == 1 })
	assertRefused(t, a, key.NewNode(), c1, "a client over the accept rate")
	if got := a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "rate"}); got < 1 {
		t.Errorf("coderd_derp_clients_refused_total{reason=rate} = %v, want ≥ 1", got)
	}
	// The mesh is never rate limited.
	b := startRelay(t, mk, relayguard.Options{})
	meshPair(t, mk, a, b)
	works(t, c1, connect(t, b), "a mesh formed while the rate limit is exhausted")
}

// Webhook health is logged once per change, not once per client.
func TestWebhookHealthIsLoggedOncePerChange(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "down")
	core, logs := observer.New(zap.InfoLevel)
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url(), Logger: zap.New(core)})
	other := connect(t, a) // refused too: the webhook is down
	for i := 0; i < 4; i++ {
		assertRefused(t, a, key.NewNode(), other, "a new client while the webhook is down")
	}
	if n := logs.FilterMessage("derp admission webhook is failing: connected clients keep their connections; new clients are admitted only from recent verdicts").Len(); n != 1 {
		t.Fatalf("the failing webhook was logged %d times for 5 refused clients, want once", n)
	}
	hook.setMode("allow")
	c1, c2 := connect(t, a), connect(t, a)
	works(t, c1, c2, "clients once the webhook is back")
	if n := logs.FilterMessage("derp admission webhook is answering again").Len(); n != 1 {
		t.Fatalf("the recovery was logged %d times, want once", n)
	}
}

func TestPerIPAcceptRateRefusesBurstsFromOneAddress(t *testing.T) {
	t.Parallel()
	// The replica-wide rate is unlimited; one new client per minute per IP.
	a := startRelay(t, newMeshKey(), relayguard.Options{AcceptRate: -1, AcceptRatePerIP: 1.0 / 60})
	c1 := connect(t, a)
	wait.For(t, eventually, "the first client to be counted", func() bool { return a.guard.Connections() == 1 })
	assertRefused(t, a, key.NewNode(), c1, "a second client from the same IP within the minute")
	if got := a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "rate"}); got < 1 {
		t.Errorf("coderd_derp_clients_refused_total{reason=rate} = %v, want ≥ 1", got)
	}
}
