package derpmesh_test

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/testcert"

	"github.com/coder/quartz"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// TestMain fails the run if any goroutine outlives the tests (goleak):
// every Mesh, DERP server, proxy and client a test starts is closed in a
// Cleanup, and Close waits for the goroutines it started.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// meshGoroutines returns the stacks of goroutines running in, or started
// by, package derpmesh (not its tests).
func meshGoroutines() []string {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/coder-ha/coder/derpmesh.") {
			out = append(out, g)
		}
	}
	return out
}

func newMeshKey() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// eventually bounds waits for things that must happen but whose speed the
// test does not claim: generous, since the test machine may be shared and
// busy (waits end as soon as the condition holds).
const eventually = 30 * time.Second

// fast retries keep tests short; production defaults are 1s/5s.
const (
	testRetry    = 100 * time.Millisecond
	testMaxRetry = 300 * time.Millisecond
)

// node is one replica's relay: a DERP server behind real HTTP on
// 127.0.0.1, and (after meshWith) its Mesh.
type node struct {
	server  *derpserver.Server
	http    *httptest.Server
	url     string // the relay URL peers mesh with (https when TLS)
	plain   *httptest.Server
	dialURL string // where test clients connect (always plain http)
	mesh    *derpmesh.Mesh

	mu        sync.Mutex
	broken    []string // OnPeerBroken calls, in order
	connected []string // OnPeerConnected calls, in order
}

type nodeOptions struct {
	meshKey string
	addr    string      // listen here ("" = any free port)
	tls     *tls.Config // serve the relay URL over TLS with this
}

func startNode(t *testing.T, o nodeOptions) *node {
	t.Helper()
	s := derpserver.New(key.NewNode(), logger.Discard)
	if err := s.SetMeshKey(o.meshKey); err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/derp", derpmesh.Handler(s))
	mux.HandleFunc("/derp/latency-check", func(http.ResponseWriter, *http.Request) {})
	srv := httptest.NewUnstartedServer(mux)
	if o.addr != "" {
		var l net.Listener
		// The old listener on this port was just closed; binding again
		// is immediate on Linux (SO_REUSEADDR) but allow a moment.
		wait.For(t, eventually, "listen again on "+o.addr, func() bool {
			var err error
			l, err = net.Listen("tcp", o.addr)
			return err == nil
		})
		srv.Listener.Close()
		srv.Listener = l
	}
	n := &node{server: s, http: srv}
	if o.tls != nil {
		srv.TLS = o.tls
		srv.StartTLS()
		// Test clients use the library's default TLS roots, so they reach
		// the same server over a second, plain listener.
		n.plain = httptest.NewServer(mux)
		n.dialURL = n.plain.URL
	} else {
		srv.Start()
		n.dialURL = srv.URL
	}
	n.url = srv.URL
	t.Cleanup(n.stop)
	return n
}

// stop kills the replica's relay: nothing listens on its address any more
// and every DERP connection to it is closed.
func (n *node) stop() {
	n.http.Close()
	if n.plain != nil {
		n.plain.Close()
	}
	_ = n.server.Close()
}

type meshOptions struct {
	meshKey   string
	tls       *tls.Config
	retry     time.Duration // default testRetry
	maxRetry  time.Duration // default testMaxRetry
	extraURLs []string      // dialed too (unreachable, self, invalid, …)
	reg       prometheus.Registerer
	ping      time.Duration // PingInterval (default: the package default)
	confirm   time.Duration // ConfirmTimeout (default: the package default)
	maxPings  int           // MaxPingsPerInterval (default: the package default)
	clock     quartz.Clock  // Clock (default: the real clock)
}

// meshWith starts n's Mesh toward peers (closed in a Cleanup).
func (n *node) meshWith(t *testing.T, o meshOptions, peers ...*node) {
	t.Helper()
	opts := derpmesh.Options{
		Logger:           zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)).Named(strings.TrimPrefix(n.url, "http://")),
		Server:           n.server,
		MeshKey:          o.meshKey,
		TLSConfig:        o.tls,
		RetryInterval:    o.retry,
		MaxRetryInterval: o.maxRetry,
		OnPeerBroken: func(u string) {
			n.mu.Lock()
			n.broken = append(n.broken, u)
			n.mu.Unlock()
		},
		OnPeerConnected: func(u string) {
			n.mu.Lock()
			n.connected = append(n.connected, u)
			n.mu.Unlock()
		},
	}
	if opts.RetryInterval == 0 {
		opts.RetryInterval, opts.MaxRetryInterval = testRetry, testMaxRetry
	}
	opts.Registerer = o.reg
	opts.Clock = o.clock
	opts.PingInterval, opts.ConfirmTimeout, opts.MaxPingsPerInterval = o.ping, o.confirm, o.maxPings
	m, err := derpmesh.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	n.mesh = m
	urls := append([]string(nil), o.extraURLs...)
	for _, p := range peers {
		urls = append(urls, p.url)
	}
	m.SetAddresses(urls)
}

func (n *node) connectedCalls(u string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, b := range n.connected {
		if b == u {
			c++
		}
	}
	return c
}

func (n *node) brokenCalls(u string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, b := range n.broken {
		if b == u {
			c++
		}
	}
	return c
}

// peerStatus is n's view of the peer at url (ok=false: not listed).
func (n *node) peerStatus(url string) (derpmesh.PeerStatus, bool) {
	for _, s := range n.mesh.Status() {
		if s.URL == url {
			return s, true
		}
	}
	return derpmesh.PeerStatus{}, false
}

func (n *node) connectedTo(url string) bool {
	s, ok := n.peerStatus(url)
	return ok && s.State == derpmesh.StateConnected
}

// fullMesh starts count replicas sharing one mesh key, each meshing with
// all the others, and waits until every mesh is Ready.
func fullMesh(t *testing.T, count int) []*node {
	t.Helper()
	k := newMeshKey()
	nodes := make([]*node, count)
	for i := range nodes {
		nodes[i] = startNode(t, nodeOptions{meshKey: k})
	}
	for i, n := range nodes {
		var peers []*node
		for j, p := range nodes {
			if i != j {
				peers = append(peers, p)
			}
		}
		n.meshWith(t, meshOptions{meshKey: k}, peers...)
	}
	for i, n := range nodes {
		wait.For(t, 2*eventually, fmt.Sprintf("mesh %d ready", i), n.mesh.Ready)
	}
	return nodes
}

// connect attaches a real DERP client to n (closed in a Cleanup).
func connect(t *testing.T, n *node) *derptest.Client {
	t.Helper()
	return derptest.MustConnect(t, n.dialURL)
}

// exchangeBothWays sends n windowed packets a→b and then b→a and fails on
// any loss. DERP drops what overflows a client's 32-packet queue, so the
// sender waits for each window of 16 before sending the next.
func exchangeBothWays(t *testing.T, a, b *derptest.Client, n int) {
	t.Helper()
	if !derptest.Reachable(a, b, 15*time.Second) || !derptest.Reachable(b, a, 15*time.Second) {
		t.Fatal("the two clients cannot reach each other")
	}
	if lost := derptest.Exchange(a, b, n, 1024, 16, 5*time.Second); lost != 0 {
		t.Fatalf("a→b lost %d of %d packets", lost, n)
	}
	if lost := derptest.Exchange(b, a, n, 1024, 16, 5*time.Second); lost != 0 {
		t.Fatalf("b→a lost %d of %d packets", lost, n)
	}
}

// notDelivered asserts that packets a sends to b now do not arrive within
// d. Only this payload counts: a probe from an earlier Reachable may still
// be in flight.
func notDelivered(t *testing.T, a, b *derptest.Client, d time.Duration, why string) {
	t.Helper()
	const payload = "should not arrive"
	for i := 0; i < 5; i++ {
		_ = a.Send(b.Key, []byte(payload))
	}
	for _, p := range b.WaitPackets(a.Key, 1000, d) {
		if string(p) == payload {
			t.Fatalf("%s: a packet was delivered", why)
		}
	}
}

// testCA returns a CA pool and a server certificate for 127.0.0.1 signed by
// that CA.
func testCA(t *testing.T) (*x509.CertPool, *tls.Config) {
	t.Helper()
	p := testcert.New(t)
	return p.Pool(), &tls.Config{Certificates: []tls.Certificate{p.Cert}}
}
