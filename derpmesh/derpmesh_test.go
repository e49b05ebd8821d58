package derpmesh_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

func newMeshKey() string {
	var b [32]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// node is one replica's relay: a DERP server behind real HTTP, plus its
// mesh.
type node struct {
	server *derpserver.Server
	http   *httptest.Server
	url    string
	mesh   *derpmesh.Mesh

	mu     sync.Mutex
	broken []string
}

func handler(s *derpserver.Server) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/derp", derpmesh.Handler(s))
	mux.HandleFunc("/derp/latency-check", func(w http.ResponseWriter, r *http.Request) {})
	return mux
}

// startNode serves a new DERP server on addr ("" = any free port).
func startNode(t *testing.T, meshKey, addr string, tlsCfg *tls.Config) *node {
	t.Helper()
	s := derpserver.New(key.NewNode(), logger.Discard)
	if err := s.SetMeshKey(meshKey); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(handler(s))
	if addr != "" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		srv.Listener.Close()
		srv.Listener = l
	}
	if tlsCfg != nil {
		srv.TLS = tlsCfg
		srv.StartTLS()
	} else {
		srv.Start()
	}
	n := &node{server: s, http: srv, url: srv.URL}
	t.Cleanup(n.stop)
	return n
}

func (n *node) stop() {
	n.http.CloseClientConnections()
	n.http.Close()
	_ = n.server.Close()
}

func (n *node) meshWith(t *testing.T, meshKey string, tlsCfg *tls.Config, peers ...*node) {
	t.Helper()
	m, err := derpmesh.New(derpmesh.Options{
		Server: n.server, MeshKey: meshKey, TLSConfig: tlsCfg, RetryInterval: 200 * time.Millisecond,
		OnPeerBroken: func(u string) { n.mu.Lock(); n.broken = append(n.broken, u); n.mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	n.mesh = m
	var urls []string
	for _, p := range peers {
		urls = append(urls, p.url)
	}
	m.SetAddresses(urls)
}

func (n *node) brokenReports(u string) int {
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

func fullMesh(t *testing.T, count int) []*node {
	t.Helper()
	k := newMeshKey()
	nodes := make([]*node, count)
	for i := range nodes {
		nodes[i] = startNode(t, k, "", nil)
	}
	for i, n := range nodes {
		var peers []*node
		for j, p := range nodes {
			if i != j {
				peers = append(peers, p)
			}
		}
		n.meshWith(t, k, nil, peers...)
	}
	for _, n := range nodes {
		wait.For(t, 60*time.Second, "mesh ready", n.mesh.Ready)
	}
	return nodes
}

func connect(t *testing.T, n *node, tlsCfg ...*tls.Config) *derptest.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := derptest.Connect(ctx, n.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestClientsOnTwoMeshedReplicasExchangeWindowedPacketsWithoutLoss(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	if !derptest.Reachable(a, b, 5*time.Second) || !derptest.Reachable(b, a, 5*time.Second) {
		t.Fatal("clients on two meshed replicas cannot reach each other")
	}
	if lost := derptest.Exchange(a, b, 2000, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("a→b lost %d of 2000 packets", lost)
	}
	if lost := derptest.Exchange(b, a, 2000, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("b→a lost %d of 2000 packets", lost)
	}
}

// A peer that goes away is reported (state, error, OnPeerBroken) while the
// survivors keep forwarding; when a replica comes back on the same address,
// Reconnect meshes with it at once.
func TestDeadPeerIsReportedAndComingBackOnTheSameAddressRemeshes(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 3)
	a, c := connect(t, nodes[0]), connect(t, nodes[2])
	dead := nodes[1]
	addr := dead.http.Listener.Addr().String()
	dead.stop()

	wait.For(t, 3*time.Second, "node 0 reports node 1 down", func() bool {
		for _, s := range nodes[0].mesh.Status() {
			if s.URL == dead.url {
				return s.State == derpmesh.StateConnecting && s.Error != ""
			}
		}
		return false
	})
	if nodes[0].brokenReports(dead.url) == 0 {
		t.Fatal("OnPeerBroken was not called for the dead peer")
	}
	if nodes[0].mesh.Ready() {
		t.Fatal("Ready() with a peer down")
	}
	if !derptest.Reachable(a, c, 5*time.Second) {
		t.Fatal("survivors stopped forwarding")
	}
	if lost := derptest.Exchange(a, c, 500, 1024, 16, 2*time.Second); lost != 0 {
		t.Fatalf("survivors lost %d packets", lost)
	}

	// A new process on the same address, sharing the mesh key.
	k := nodes[0].server.MeshKey()
	back := startNode(t, k.String(), addr, nil)
	back.meshWith(t, k.String(), nil, nodes[0], nodes[2])
	for _, n := range []*node{nodes[0], nodes[2]} {
		n.mesh.Reconnect(back.url)
	}
	wait.For(t, 2*time.Second, "mesh ready again", func() bool { return nodes[0].mesh.Ready() && nodes[2].mesh.Ready() })
	b := connect(t, back)
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("a client of the returned replica is unreachable")
	}
}

func TestRemovedPeerIsDisconnected(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("not meshed")
	}
	nodes[0].mesh.SetAddresses(nil)
	if s := nodes[0].mesh.Status(); len(s) != 0 {
		t.Fatalf("status still lists %v", s)
	}
	_ = a.Send(b.Key, []byte("after removal"))
	// Reachable's own probes may still be in flight: only this payload
	// counts.
	for _, p := range b.WaitPackets(a.Key, 1000, 300*time.Millisecond) {
		if string(p) == "after removal" {
			t.Fatal("a packet crossed a mesh connection that was removed")
		}
	}
}

func TestWrongMeshKeyGetsNoPrivileges(t *testing.T) {
	t.Parallel()
	k := newMeshKey()
	a, b := startNode(t, k, "", nil), startNode(t, k, "", nil)
	a.meshWith(t, newMeshKey(), nil, b) // a random key
	time.Sleep(500 * time.Millisecond)  // several connect attempts; none may succeed
	if a.mesh.Ready() {
		t.Fatal("a mesh with the wrong key reports ready")
	}
	st := a.mesh.Status()
	if len(st) != 1 || !strings.Contains(st[0].Error, "mesh") {
		t.Fatalf("status does not explain the refusal: %+v", st)
	}
	ca, cb := connect(t, a), connect(t, b)
	if derptest.Reachable(cb, ca, 500*time.Millisecond) {
		t.Fatal("packets were forwarded without mesh privileges")
	}
}

func TestTLSMeshWithPrivateCA(t *testing.T) {
	t.Parallel()
	caCert, serverTLS := selfSignedCA(t)
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	k := newMeshKey()
	a, b := startNode(t, k, "", serverTLS), startNode(t, k, "", serverTLS)
	trusting := &tls.Config{RootCAs: pool}
	a.meshWith(t, k, trusting, b)
	b.meshWith(t, k, trusting, a)
	wait.For(t, 5*time.Second, "TLS mesh ready", func() bool { return a.mesh.Ready() && b.mesh.Ready() })

	c := startNode(t, k, "", nil)
	c.meshWith(t, k, &tls.Config{RootCAs: x509.NewCertPool()}, a) // trusts nothing
	wait.For(t, 5*time.Second, "certificate error reported", func() bool {
		st := c.mesh.Status()
		return len(st) == 1 && strings.Contains(st[0].Error, "certificate")
	})
}

// Not parallel: setting up 380 mesh connections would starve the timing
// of the tests that run beside it.
func TestTwentyMeshesInOneProcessForwardBetweenAnyTwo(t *testing.T) {
	nodes := fullMesh(t, 20)
	a, b := connect(t, nodes[9]), connect(t, nodes[16])
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("client on mesh 9 cannot reach client on mesh 16")
	}
}

func TestServerMetricsAreExportedForSeveralServers(t *testing.T) {
	t.Parallel()
	nodes := fullMesh(t, 2)
	a, b := connect(t, nodes[0]), connect(t, nodes[1])
	derptest.Reachable(a, b, 5*time.Second)
	for _, n := range nodes {
		reg := prometheus.NewRegistry()
		reg.MustRegister(derpmesh.NewServerCollector(n.server))
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		names := map[string]bool{}
		for _, f := range families {
			names[f.GetName()] = true
		}
		for _, want := range []string{"coderd_derp_current_connections", "coderd_derp_packets_forwarded_out_total", "coderd_derp_clients_local"} {
			if !names[want] {
				t.Errorf("metric %s missing; have %v", want, names)
			}
		}
	}
}

func TestCloseIsIdempotentAndLeavesNoGoroutines(t *testing.T) {
	count := func(m *derpmesh.Mesh, state string) int {
		n := 0
		for _, s := range m.Status() {
			if s.State == state {
				n++
			}
		}
		return n
	}
	before := runtime.NumGoroutine()
	k := newMeshKey()
	a, b := startNode(t, k, "", nil), startNode(t, k, "", nil)
	m, err := derpmesh.New(derpmesh.Options{Server: a.server, MeshKey: k})
	if err != nil {
		t.Fatal(err)
	}
	m.SetAddresses([]string{b.url, "http://127.0.0.1:1"})
	wait.For(t, 5*time.Second, "one peer connected", func() bool { return count(m, derpmesh.StateConnected) == 1 })
	_ = m.Close()
	_ = m.Close()
	a.stop()
	b.stop()
	wait.For(t, 5*time.Second, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= before+2 })
}

func selfSignedCA(t *testing.T) (*x509.Certificate, *tls.Config) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "relay"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return caCert, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}}}
}
