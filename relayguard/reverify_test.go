package relayguard_test

import (
	"context"
	"testing"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// A node removed from the tailnet while connected (the webhook now refuses
// its key) loses the relay within the re-verification interval, in real
// time; its reconnections are refused like any refused client. An
// admitted client on the same replica keeps relaying, to local clients and
// through the mesh, and the mesh is never asked about or cut.
func TestRevokedClientLosesRelayWithinInterval(t *testing.T) {
	t.Parallel()
	const interval = time.Second
	hook := newWebhook(t, "allow")
	core, logs := observer.New(zap.InfoLevel)
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{VerifyURL: hook.url(), VerifyInterval: interval, Logger: zap.New(core)})
	b := startRelay(t, mk, relayguard.Options{VerifyURL: hook.url(), VerifyInterval: interval})
	meshPair(t, mk, a, b)

	victimKey := key.NewNode()
	victim := connectKey(t, a, victimKey)
	stays, other := connect(t, a), connect(t, a)
	remote := connect(t, b)
	works(t, victim, stays, "the client to be revoked, before")
	works(t, stays, remote, "an admitted client and a client on the peer, before")
	// Several intervals pass with the webhook admitting everyone: nobody
	// is cut for being verified again.
	wait.For(t, eventually, "three rounds of re-verification", func() bool {
		return a.metric(t, "coderd_derp_admission_reverifications_total", map[string]string{"result": "allow"}) >= 9
	})
	works(t, victim, stays, "the client to be revoked, after rounds of re-verification")
	refusedBefore := a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "admission"})

	hook.refuseKey(victimKey.Public())
	start := time.Now()
	wait.For(t, eventually, "the revoked client to be disconnected", func() bool {
		return !a.server.IsClientConnectedForTest(victimKey.Public())
	})
	took := time.Since(start)
	t.Logf("revoked client disconnected %v after the webhook started refusing it (interval %v)", took.Round(time.Millisecond), interval)
	if took > 10*interval {
		t.Errorf("the revoked client kept its connection for %v with a %v interval", took, interval)
	}
	shutOut(t, victim, stays, 2*time.Second, "the revoked client")
	works(t, stays, other, "an admitted client on the same replica")
	works(t, stays, remote, "an admitted client and a client on the peer, through the mesh")
	if !a.meshed.Ready() || !b.meshed.Ready() {
		t.Error("a mesh link was cut")
	}

	// The revoked client keeps redialing (derphttp does); each attempt is
	// refused at admission.
	wait.For(t, eventually, "the revoked client's reconnection to be refused", func() bool {
		return a.metric(t, "coderd_derp_clients_refused_total", map[string]string{"reason": "admission"}) > refusedBefore
	})
	if a.server.IsClientConnectedForTest(victimKey.Public()) {
		t.Error("the revoked client got back onto the relay")
	}
	if got := a.metric(t, "coderd_derp_admission_reverifications_total", map[string]string{"result": "deny"}); got < 1 {
		t.Errorf("deny re-verifications = %v, want ≥ 1", got)
	}
	if got := a.metric(t, "coderd_derp_admission_disconnects_total", nil); got != 1 {
		t.Errorf("coderd_derp_admission_disconnects_total = %v, want 1", got)
	}
	if n := logs.FilterMessage("derp client disconnected: the admission webhook no longer admits it").Len(); n != 1 {
		t.Errorf("the disconnection was logged %d times, want once", n)
	}
	for _, k := range hook.seenKeys() {
		if k == a.server.PublicKey() || k == b.server.PublicKey() {
			t.Error("the webhook was asked about a replica's mesh identity")
		}
	}
}

// stepInterval advances clk one tick (a sixtieth of the interval) at a
// time through one interval, and returns how many webhook calls each tick
// made. Each Advance waits for the tick's re-verifications to finish.
func stepInterval(t *testing.T, clk *quartz.Mock, hook *webhook, interval time.Duration) []int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	per := make([]int, 60)
	for i := range per {
		before := hook.calls()
		clk.Advance(interval / 60).MustWait(ctx)
		per[i] = hook.calls() - before
	}
	return per
}

// Clients that connect together are verified again spread over the
// interval, not all at once, and each exactly once per interval.
func TestReverificationIsSpreadOverTheInterval(t *testing.T) {
	t.Parallel()
	const interval, clients = time.Minute, 12
	clk := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	hook := newWebhook(t, "allow")
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url(), VerifyInterval: interval, Clock: clk})
	var keys []key.NodePublic
	for i := 0; i < clients; i++ {
		c := connect(t, a)
		keys = append(keys, c.Key)
	}
	wait.For(t, eventually, "every client on the schedule", func() bool {
		return a.metric(t, "coderd_derp_admission_reverify_connections", nil) == clients
	})

	for round := 1; round <= 3; round++ {
		per := stepInterval(t, clk, hook, interval)
		total, busiest := 0, 0
		for _, n := range per {
			total += n
			busiest = max(busiest, n)
		}
		t.Logf("round %d: webhook calls per second of the interval: %v", round, per)
		if total != clients {
			t.Fatalf("round %d: %d re-verifications in one interval for %d clients, want one each", round, total, clients)
		}
		if busiest > 1 {
			t.Fatalf("round %d: %d re-verifications in one second, want them spread (at most 1 per second for %d clients a minute): %v", round, busiest, clients, per)
		}
		// Each sixth of the interval gets its share: none is empty.
		for s := 0; s < 6; s++ {
			n := 0
			for _, c := range per[s*10 : s*10+10] {
				n += c
			}
			if n == 0 {
				t.Fatalf("round %d: no re-verification in seconds %d-%d of the interval: %v", round, s*10, s*10+9, per)
			}
		}
		for _, k := range keys {
			if n := hook.saw(k); n != 1+round {
				t.Fatalf("round %d: client %s was asked about %d times, want %d (admission + one per round)", round, k.ShortString(), n, 1+round)
			}
		}
	}
}

// While the webhook fails, re-verification keeps every connected client
// (fail-closed is about new clients), and the log says so once. When it
// answers again, the client it now refuses is cut and the others stay.
func TestWebhookOutageDuringReverificationKeepsConnectedClients(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"down", "hang"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			const interval = time.Minute
			clk := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
			hook := newWebhook(t, "allow")
			core, logs := observer.New(zap.InfoLevel)
			a := startRelay(t, newMeshKey(), relayguard.Options{
				VerifyURL: hook.url(), VerifyInterval: interval, Clock: clk,
				// Long enough that an answering webhook never times out on a
				// loaded machine (a timeout there would count as an outage).
				WebhookTimeout: 2 * time.Second, Logger: zap.New(core),
			})
			k1 := key.NewNode()
			c1, c2 := connectKey(t, a, k1), connect(t, a)
			works(t, c1, c2, "before the outage")
			wait.For(t, eventually, "both clients on the schedule", func() bool {
				return a.metric(t, "coderd_derp_admission_reverify_connections", nil) == 2
			})

			hook.setMode(mode)
			for round := 0; round < 2; round++ {
				stepInterval(t, clk, hook, interval)
			}
			if got := a.metric(t, "coderd_derp_admission_reverifications_total", map[string]string{"result": "error"}); got != 4 {
				t.Errorf("failed re-verifications over two intervals = %v, want 4 (2 clients × 2)", got)
			}
			if got := a.metric(t, "coderd_derp_admission_disconnects_total", nil); got != 0 {
				t.Errorf("%v clients were disconnected during the webhook outage", got)
			}
			if !a.server.IsClientConnectedForTest(c1.Key) || !a.server.IsClientConnectedForTest(c2.Key) {
				t.Fatal("a connected client lost its connection during the webhook outage")
			}
			works(t, c1, c2, "connected clients through the webhook outage")
			if n := logs.FilterMessage("derp admission webhook is failing: connected clients keep their connections; new clients are admitted only from recent verdicts").Len(); n != 1 {
				t.Errorf("the outage was logged %d times, want once", n)
			}

			hook.refuseKey(k1.Public())
			hook.setMode("allow")
			stepInterval(t, clk, hook, interval)
			wait.For(t, eventually, "the refused client to be disconnected", func() bool {
				return !a.server.IsClientConnectedForTest(k1.Public())
			})
			if !a.server.IsClientConnectedForTest(c2.Key) {
				t.Fatal("the admitted client lost its connection")
			}
			if n := logs.FilterMessage("derp admission webhook is answering again").Len(); n != 1 {
				t.Errorf("the recovery was logged %d times, want once", n)
			}
			other := connect(t, a)
			works(t, c2, other, "the admitted client after the outage")
		})
	}
}

// Without a re-verification interval (0: never) nothing is verified again.
func TestZeroIntervalNeverReverifies(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "allow")
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url()})
	k := key.NewNode()
	c1, c2 := connectKey(t, a, k), connect(t, a)
	works(t, c1, c2, "before the webhook refuses the client")
	hook.refuseKey(k.Public())
	time.Sleep(2 * time.Second) // what the test claims: nothing happens meanwhile
	if !a.server.IsClientConnectedForTest(k.Public()) {
		t.Fatal("a client lost the relay with re-verification off")
	}
	works(t, c1, c2, "a client the webhook now refuses, with re-verification off")
	if n := hook.saw(k.Public()); n != 1 {
		t.Fatalf("the webhook was asked %d times about a client with re-verification off, want once", n)
	}
}

// A revoked node that reconnects (say, to another replica) on an admission
// that replica still has cached is cut by the time that cached verdict
// expires, not a whole spread interval after it reconnected: no client
// stays on the relay more than one interval after the webhook last
// admitted it.
func TestClientAdmittedFromCacheIsVerifiedWhenThatVerdictExpires(t *testing.T) {
	t.Parallel()
	const interval = time.Minute
	clk := quartz.NewMock(t).WithLogger(quartz.NoOpLogger)
	hook := newWebhook(t, "allow")
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url(), VerifyInterval: interval, Clock: clk})
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	advance := func(d time.Duration) {
		for ; d > 0; d -= time.Second {
			clk.Advance(time.Second).MustWait(ctx)
		}
	}
	// Warm the schedule's sequence so the reconnection would be spread
	// late into the interval.
	warm := connect(t, a)

	k := key.NewNode()
	first := connectKey(t, a, k) // admitted by the webhook at t0
	works(t, first, warm, "the node before it is revoked")
	_ = first.Close()
	wait.For(t, eventually, "the first connection to be gone", func() bool { return !a.server.IsClientConnectedForTest(k.Public()) })
	advance(50 * time.Second)

	hook.refuseKey(k.Public())
	again := connectKey(t, a, k) // admitted from the cache (fresh until t0+1m)
	works(t, again, warm, "the node reconnecting on its cached admission")
	if n := hook.saw(k.Public()); n != 1 {
		t.Fatalf("the webhook was asked %d times, want once (the reconnection must come from the cache)", n)
	}
	advance(11 * time.Second)
	wait.For(t, eventually, "the node to be cut when its cached admission expired", func() bool {
		return !a.server.IsClientConnectedForTest(k.Public())
	})
}

// A client on the WebSocket transport (browsers) is verified again and cut
// like one on the plain upgrade.
func TestRevokedWebSocketClientLosesRelay(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "allow")
	a := startRelay(t, newMeshKey(), relayguard.Options{VerifyURL: hook.url(), VerifyInterval: time.Second})
	other := connect(t, a)
	k := key.NewNode()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, err := dialWebSocket(ctx, a.url, k)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	if !ws.relays(other, 10*time.Second) {
		t.Fatal("an admitted WebSocket client cannot relay")
	}
	hook.refuseKey(k.Public())
	wait.For(t, eventually, "the revoked WebSocket client to be disconnected", func() bool {
		return !a.server.IsClientConnectedForTest(k.Public())
	})
	if ws.relays(other, 2*time.Second) {
		t.Fatal("the revoked WebSocket client still relays")
	}
}
