package cli_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// verifyServer answers like headscale's /verify: allow the keys it knows.
type verifyServer struct {
	srv *httptest.Server

	mu    sync.Mutex
	down  bool
	allow map[key.NodePublic]bool
	seen  map[key.NodePublic]int
}

func newVerifyServer(t *testing.T) *verifyServer {
	v := &verifyServer{allow: map[key.NodePublic]bool{}, seen: map[key.NodePublic]int{}}
	v.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v.mu.Lock()
		down := v.down
		v.mu.Unlock()
		if down {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		var req tailcfg.DERPAdmitClientRequest
		if r.URL.Path != "/verify" || json.NewDecoder(r.Body).Decode(&req) != nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		v.mu.Lock()
		v.seen[req.NodePublic]++
		allow := v.allow[req.NodePublic]
		v.mu.Unlock()
		_ = json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
	}))
	t.Cleanup(v.srv.Close)
	return v
}

func (v *verifyServer) admit(k key.NodePublic) {
	v.mu.Lock()
	v.allow[k] = true
	v.mu.Unlock()
}

// revoke stops admitting k (a node removed from the tailnet).
func (v *verifyServer) revoke(k key.NodePublic) {
	v.mu.Lock()
	delete(v.allow, k)
	v.mu.Unlock()
}

func (v *verifyServer) setDown(d bool) {
	v.mu.Lock()
	v.down = d
	v.mu.Unlock()
}

func (v *verifyServer) keys() map[key.NodePublic]int {
	v.mu.Lock()
	defer v.mu.Unlock()
	out := map[key.NodePublic]int{}
	for k, n := range v.seen {
		out[k] = n
	}
	return out
}

func dialKey(t *testing.T, p *clitest.Process, priv key.NodePrivate) (*derptest.Client, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := derptest.ConnectWithKey(ctx, p.URL, priv)
	if err == nil {
		t.Cleanup(func() { _ = c.Close() })
	}
	return c, err
}

// A client the webhook does not admit cannot use either replica; admitted
// clients on two replicas reach each other through the mesh, which the
// webhook never sees; when the webhook fails, connected clients keep
// working and new ones are refused (the default: fail closed).
func TestRelayAdmitsOnlyWebhookApprovedClients(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	hook := newVerifyServer(t)
	env := []string{"CODER_DERP_SERVER_VERIFY_CLIENT_URL=" + hook.srv.URL + "/verify"}
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: env})
	r1.WaitReady(60 * time.Second)
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: pg, Env: env})
	r2.WaitReady(60 * time.Second)
	r1.WaitReady(60 * time.Second)

	good1, good2, bad := key.NewNode(), key.NewNode(), key.NewNode()
	hook.admit(good1.Public())
	hook.admit(good2.Public())
	c1, err := dialKey(t, r1, good1)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := dialKey(t, r2, good2)
	if err != nil {
		t.Fatal(err)
	}
	if !derptest.Reachable(c1, c2, 15*time.Second) || !derptest.Reachable(c2, c1, 15*time.Second) {
		t.Fatal("admitted clients on two replicas cannot reach each other")
	}

	for _, r := range []*clitest.Process{r1, r2} {
		if b, err := dialKey(t, r, bad); err == nil {
			if derptest.Reachable(b, c1, 2*time.Second) || derptest.Reachable(c1, b, 2*time.Second) {
				t.Fatalf("a client the webhook refused relays through %s", r.Name)
			}
			_ = b.Close()
		}
	}
	for k := range hook.keys() {
		if k != good1.Public() && k != good2.Public() && k != bad.Public() {
			t.Errorf("the webhook was asked about %s, which is none of the test's clients (a mesh connection?)", k.ShortString())
		}
	}

	hook.setDown(true)
	stranger := key.NewNode()
	hook.admit(stranger.Public()) // it would be admitted, but the webhook is down
	if s, err := dialKey(t, r1, stranger); err == nil {
		if derptest.Reachable(s, c1, 2*time.Second) {
			t.Fatal("a new client was admitted while the webhook was down (fail closed is the default)")
		}
		_ = s.Close()
	}
	if !derptest.Reachable(c1, c2, 10*time.Second) || !derptest.Reachable(c2, c1, 10*time.Second) {
		t.Fatal("connected clients stopped working while the webhook was down")
	}
	if r1.Status("/readyz") != http.StatusOK || r2.Status("/readyz") != http.StatusOK {
		t.Fatal("a replica stopped being ready while the webhook was down")
	}
	if out := r1.Output(); !strings.Contains(out, "derp admission webhook is failing") {
		t.Errorf("no log line about the failing webhook:\n%s", out)
	}
}

func TestBadVerifyClientURLIsRefusedAtStart(t *testing.T) {
	t.Parallel()
	p := clitest.StartServer(t, "bad-verify-url", []string{"CODER_PG_CONNECTION_URL=postgres://127.0.0.1:1/x"}, "--derp-server-verify-client-url", "headscale/verify")
	if code := p.Wait(30 * time.Second); code != 2 {
		t.Fatalf("exit code %d, want 2; output:\n%s", code, p.Output())
	}
	if out := p.Output(); !strings.Contains(out, "--derp-server-verify-client-url") || strings.Contains(out, "goroutine") {
		t.Fatalf("want a one-line error naming the flag, got:\n%s", out)
	}
}

// Past --derp-server-max-connections a replica refuses new clients, keeps
// the ones it has, stays meshed with its peer (mesh connections never
// count), and says so in /metrics.
func TestRelayConnectionCapRefusesNewClientsOnly(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "capped", PostgresURL: pg, Env: []string{
		"CODER_DERP_SERVER_MAX_CONNECTIONS=2",
		"CODER_PROMETHEUS_ENABLE=true", "CODER_PROMETHEUS_ADDRESS=127.0.0.1:" + strconv.Itoa(promPort),
	}})
	r1.WaitReady(60 * time.Second)
	c1, err := dialKey(t, r1, key.NewNode())
	if err != nil {
		t.Fatal(err)
	}
	c2, err := dialKey(t, r1, key.NewNode())
	if err != nil {
		t.Fatal(err)
	}
	if !derptest.Reachable(c1, c2, 15*time.Second) {
		t.Fatal("two clients under the cap cannot reach each other")
	}

	// The peer joins while r1 is at its cap: the mesh forms both ways.
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "peer", PostgresURL: pg})
	r2.WaitReady(60 * time.Second)
	c3, err := dialKey(t, r2, key.NewNode())
	if err != nil {
		t.Fatal(err)
	}
	if !derptest.Reachable(c3, c1, 15*time.Second) || !derptest.Reachable(c1, c3, 15*time.Second) {
		t.Fatal("a client on the peer cannot reach a client on the capped replica: mesh connections were refused")
	}

	if extra, err := dialKey(t, r1, key.NewNode()); err == nil {
		if derptest.Reachable(extra, c1, 2*time.Second) || derptest.Reachable(c1, extra, 2*time.Second) {
			t.Fatal("a third client relayed through a replica capped at 2")
		}
		_ = extra.Close()
	}
	if !derptest.Reachable(c1, c2, 10*time.Second) || !derptest.Reachable(c2, c1, 10*time.Second) {
		t.Fatal("existing clients stopped working at the cap")
	}
	metrics := scrapeText(t, "http://127.0.0.1:"+strconv.Itoa(promPort)+"/metrics")
	for _, want := range []string{`coderd_derp_clients_refused_total{reason="limit"} `, "coderd_derp_capped_connections 2", "coderd_derp_max_connections 2"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(metrics, `coderd_derp_clients_refused_total{reason="limit"} 0`) {
		t.Error(`coderd_derp_clients_refused_total{reason="limit"} is 0 after a refusal`)
	}
	if out := r1.Output(); !strings.Contains(out, "derp connection cap reached") {
		t.Errorf("no log line about the cap")
	}
}

func scrapeText(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
