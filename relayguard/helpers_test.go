package relayguard_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
	"github.com/coder-ha/coder/relayguard"
)

// eventually bounds waits whose speed the test does not claim (a shared,
// busy 2-core machine).
const eventually = 30 * time.Second

// webhook is a real admission server answering like headscale's /verify.
type webhook struct {
	srv     *httptest.Server
	release chan struct{} // closed at cleanup: hung calls return

	mu    sync.Mutex
	mode  string // "allow", "deny", "down" (connection closed), "hang"
	allow map[key.NodePublic]bool
	deny  map[key.NodePublic]bool
	seen  []key.NodePublic
}

func newWebhook(t *testing.T, mode string) *webhook {
	w := &webhook{mode: mode, release: make(chan struct{}), allow: map[key.NodePublic]bool{}, deny: map[key.NodePublic]bool{}}
	w.srv = httptest.NewServer(http.HandlerFunc(w.serve))
	t.Cleanup(func() {
		close(w.release)
		w.srv.Close()
	})
	return w
}

func (w *webhook) url() string { return w.srv.URL + "/verify" }

func (w *webhook) setMode(m string) {
	w.mu.Lock()
	w.mode = m
	w.mu.Unlock()
}

// admitKey allows k even in "deny" mode.
func (w *webhook) admitKey(k key.NodePublic) {
	w.mu.Lock()
	w.allow[k] = true
	delete(w.deny, k)
	w.mu.Unlock()
}

// refuseKey refuses k even in "allow" mode (a node removed from the
// tailnet).
func (w *webhook) refuseKey(k key.NodePublic) {
	w.mu.Lock()
	w.deny[k] = true
	delete(w.allow, k)
	w.mu.Unlock()
}

func (w *webhook) serve(rw http.ResponseWriter, r *http.Request) {
	w.mu.Lock()
	mode := w.mode
	w.mu.Unlock()
	switch mode {
	case "down":
		if hj, ok := rw.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				_ = c.Close()
			}
		}
		return
	case "hang":
		select {
		case <-w.release:
		case <-r.Context().Done():
		}
		return
	}
	var req tailcfg.DERPAdmitClientRequest
	if r.Method != http.MethodPost || json.NewDecoder(r.Body).Decode(&req) != nil {
		http.Error(rw, "bad request", http.StatusBadRequest)
		return
	}
	w.mu.Lock()
	w.seen = append(w.seen, req.NodePublic)
	allow := (mode == "allow" || w.allow[req.NodePublic]) && !w.deny[req.NodePublic]
	w.mu.Unlock()
	_ = json.NewEncoder(rw).Encode(tailcfg.DERPAdmitClientResponse{Allow: allow})
}

// calls is how many answers the webhook has given.
func (w *webhook) calls() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.seen)
}

// saw reports how often the webhook was asked about k.
func (w *webhook) saw(k key.NodePublic) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range w.seen {
		if s == k {
			n++
		}
	}
	return n
}

func (w *webhook) seenKeys() []key.NodePublic {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]key.NodePublic(nil), w.seen...)
}

// relay is one replica's relay: a real DERP server behind a Guard, served
// over real HTTP, optionally meshed with peers by derpmesh.
type relay struct {
	server *derpserver.Server
	guard  *relayguard.Guard
	http   *httptest.Server
	reg    *prometheus.Registry
	url    string
	meshed *derpmesh.Mesh
}

func newMeshKey() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func startRelay(t *testing.T, meshKey string, opts relayguard.Options) *relay {
	t.Helper()
	s := derpserver.New(key.NewNode(), logger.Discard)
	if err := s.SetMeshKey(meshKey); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	opts.Registerer = reg
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
	}
	g, err := relayguard.New(s, opts)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", g.Handler(derpmesh.Handler(s)))
	mux.HandleFunc("/derp/latency-check", func(http.ResponseWriter, *http.Request) {})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("OK")) })
	ts := httptest.NewUnstartedServer(mux)
	ts.Listener = g.Listener(ts.Listener)
	ts.Start()
	r := &relay{server: s, guard: g, http: ts, reg: reg, url: ts.URL}
	t.Cleanup(func() {
		if r.meshed != nil {
			_ = r.meshed.Close()
		}
		ts.Close()
		_ = s.Close()
		_ = g.Close()
	})
	return r
}

// meshWith meshes r with peers (one direction; call it on each side).
func (r *relay) meshWith(t *testing.T, meshKey string, peers ...*relay) {
	t.Helper()
	m, err := derpmesh.New(derpmesh.Options{
		Server: r.server, MeshKey: meshKey,
		RetryInterval: 100 * time.Millisecond, MaxRetryInterval: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.meshed = m
	var urls []string
	for _, p := range peers {
		urls = append(urls, p.url)
	}
	m.SetAddresses(urls)
}

func meshPair(t *testing.T, meshKey string, a, b *relay) {
	t.Helper()
	a.meshWith(t, meshKey, b)
	b.meshWith(t, meshKey, a)
	wait.For(t, eventually, "the two relays are meshed", func() bool { return a.meshed.Ready() && b.meshed.Ready() })
}

// metric reads one series from r's registry (0 when absent).
func (r *relay) metric(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				if !hasLabel(m, k, v) {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			}
		}
	}
	return 0
}

func hasLabel(m *dto.Metric, k, v string) bool {
	for _, l := range m.GetLabel() {
		if l.GetName() == k && l.GetValue() == v {
			return true
		}
	}
	return false
}

func connect(t *testing.T, r *relay) *derptest.Client {
	t.Helper()
	return connectKey(t, r, key.NewNode())
}

func connectKey(t *testing.T, r *relay, priv key.NodePrivate) *derptest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := derptest.ConnectWithKey(ctx, r.url, priv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// works asserts a and b exchange packets both ways.
func works(t *testing.T, a, b *derptest.Client, what string) {
	t.Helper()
	if !derptest.Reachable(a, b, 10*time.Second) || !derptest.Reachable(b, a, 10*time.Second) {
		t.Fatalf("%s: packets do not get through", what)
	}
}

// shutOut asserts that nothing gets through between refused and other, in
// either direction, for d.
func shutOut(t *testing.T, refused, other *derptest.Client, d time.Duration, what string) {
	t.Helper()
	if derptest.Reachable(refused, other, d) {
		t.Fatalf("%s: a refused client could send", what)
	}
	if derptest.Reachable(other, refused, d) {
		t.Fatalf("%s: a refused client could receive", what)
	}
}
