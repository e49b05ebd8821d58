package e2e_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/testcert"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// testCertificate writes a CA and a server certificate for 127.0.0.1 into
// dir and returns the cert and key paths and a pool trusting the CA.
func testCertificate(t *testing.T, dir string) (certFile, keyFile string, roots *x509.CertPool) {
	t.Helper()
	p := testcert.New(t)
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	p.WriteFiles(t, certFile, keyFile)
	return certFile, keyFile, p.Pool()
}

// fetchDERPMap GETs /api/v2/derp-map and decodes it strictly as tailscale's
// tailcfg.DERPMap, the way headscale's derp.urls consumes it.
func fetchDERPMap(t *testing.T, baseURL string, client *http.Client) *tailcfg.DERPMap {
	t.Helper()
	resp, err := client.Get(baseURL + "/api/v2/derp-map")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /api/v2/derp-map: %s", resp.Status)
	}
	dec := json.NewDecoder(resp.Body)
	dec.DisallowUnknownFields()
	var m tailcfg.DERPMap
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("/api/v2/derp-map does not decode as tailcfg.DERPMap: %v", err)
	}
	return &m
}

// stunBinding sends one STUN binding request from a fresh loopback UDP
// socket to addr and returns the socket's own address and the address the
// server says it saw.
func stunBinding(t *testing.T, addr string) (local, mapped netip.AddrPort) {
	t.Helper()
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	dst, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	txid := stun.NewTxID()
	buf := make([]byte, 1500)
	for attempt := 0; attempt < 10; attempt++ { // UDP: resend on loss
		if _, err := conn.WriteToUDP(stun.Request(txid), dst); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, _, err := conn.ReadFromUDP(buf)
		if err != nil {
			continue
		}
		got, addrPort, err := stun.ParseResponse(buf[:n])
		if err != nil {
			t.Fatalf("STUN response does not parse: %v", err)
		}
		if got != txid {
			t.Fatal("STUN response carries another transaction id")
		}
		return conn.LocalAddr().(*net.UDPAddr).AddrPort(), addrPort
	}
	t.Fatalf("no STUN response from %s", addr)
	return
}

// regionClient connects a tailscale DERP client to region the way
// tailscaled does (nodes from the map, TLS, roots as extra trust) and
// returns it, its key, and a channel of the packets it receives.
func regionClient(ctx context.Context, t *testing.T, region *tailcfg.DERPRegion, roots *x509.CertPool) (*derphttp.Client, key.NodePrivate, chan []byte) {
	t.Helper()
	priv := key.NewNode()
	c := derphttp.NewRegionClient(priv, logger.Discard, netmon.NewStatic(), func() *tailcfg.DERPRegion { return region })
	c.TLSConfig = &tls.Config{RootCAs: roots}
	if err := c.Connect(ctx); err != nil {
		_ = c.Close()
		t.Fatalf("region client from the DERP map cannot connect: %v", err)
	}
	received := make(chan []byte, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			msg, err := c.Recv()
			if err != nil {
				return // closed
			}
			if p, ok := msg.(derp.ReceivedPacket); ok {
				select {
				case received <- bytes.Clone(p.Data):
				default:
				}
			}
		}
	}()
	t.Cleanup(func() {
		_ = c.Close()
		<-done
	})
	return c, priv, received
}

// sendUntil resends payload from c to dst every 100ms until got reports
// it arrived or d passes.
func sendUntil(t *testing.T, d time.Duration, send func() error, got func() bool) bool {
	t.Helper()
	deadline := time.Now().Add(d)
	for !got() {
		if time.Now().After(deadline) {
			return false
		}
		if err := send(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // the resend interval, not a synchronization
	}
	return true
}

// arrived reports whether want arrives on ch within 100ms.
func arrived(ch chan []byte, want string) bool {
	for {
		select {
		case p := <-ch:
			if string(p) == want {
				return true
			}
		case <-time.After(100 * time.Millisecond):
			return false
		}
	}
}

// The cluster works as a tailnet's DERP region, the way headscale uses it
// with derp.urls pointing at /api/v2/derp-map: the map decodes as
// tailcfg.DERPMap; a tailscale region client built from that map alone
// (region and node from the map, TLS to the access URL as tailscale
// clients require) reaches a client on another replica through the mesh,
// both ways; and the node's STUN port answers a real binding request with
// the sender's address. A replica without --derp-server-stun-address
// advertises STUNPort -1.
func TestDERPMapServesATailnetRegionWithSTUN(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	certFile, keyFile, roots := testCertificate(t, t.TempDir())
	tlsPort := clitest.FreePort(t)
	accessURL := "https://127.0.0.1:" + strconv.Itoa(tlsPort)
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: pg, Env: []string{
		"CODER_ACCESS_URL=" + accessURL,
		"CODER_TLS_ENABLE=true",
		"CODER_TLS_ADDRESS=127.0.0.1:" + strconv.Itoa(tlsPort),
		"CODER_TLS_CERT_FILE=" + certFile,
		"CODER_TLS_KEY_FILE=" + keyFile,
		"CODER_DERP_SERVER_STUN_ADDRESS=127.0.0.1:0",
		"CODER_DERP_SERVER_REGION_ID=900",
		"CODER_DERP_SERVER_REGION_CODE=hq",
		"CODER_DERP_SERVER_REGION_NAME=HQ relay",
	}})
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURL: pg, Env: []string{
		"CODER_ACCESS_URL=" + accessURL,
		"CODER_DERP_SERVER_REGION_ID=900",
		"CODER_DERP_SERVER_REGION_CODE=hq",
		"CODER_DERP_SERVER_REGION_NAME=HQ relay",
	}})
	r1.WaitReady(90 * time.Second)
	r2.WaitReady(90 * time.Second)

	httpsClient := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	m := fetchDERPMap(t, accessURL, httpsClient)
	region := m.Regions[900]
	if region == nil || region.RegionID != 900 || region.RegionCode != "hq" || region.RegionName != "HQ relay" || len(region.Nodes) != 1 {
		t.Fatalf("the map lacks region 900 (hq, HQ relay) with one node: %+v", m.Regions)
	}
	node := region.Nodes[0]
	if node.HostName != "127.0.0.1" || node.DERPPort != tlsPort || node.RegionID != 900 {
		t.Fatalf("the node is not the access URL: %+v", node)
	}
	if node.STUNPort <= 0 {
		t.Fatalf("STUN is on but the node advertises STUNPort %d", node.STUNPort)
	}
	if off := fetchDERPMap(t, r2.URL, http.DefaultClient); off.Regions[900] == nil || off.Regions[900].Nodes[0].STUNPort != -1 {
		t.Fatalf("a replica without STUN must advertise STUNPort -1: %+v", off.Regions[900])
	}

	// A tailscale region client, from the map alone.
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	a, priv, received := regionClient(ctx, t, region, roots)
	b, err := derptest.Connect(ctx, r2.URL) // a client homed on the other replica
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()

	if !sendUntil(t, 15*time.Second, func() error { return a.Send(b.Key, []byte("hello from the tailnet")) },
		func() bool { return len(b.Take(priv.Public())) > 0 }) {
		t.Fatal("the region client's packets never reached the client on the other replica")
	}
	if !sendUntil(t, 15*time.Second, func() error { return b.Send(priv.Public(), []byte("hello back")) },
		func() bool { return arrived(received, "hello back") }) {
		t.Fatal("the client on the other replica cannot reach the region client")
	}

	// STUN at the node's address and STUN port, as tailscale's netcheck
	// does.
	host := node.IPv4
	if host == "" {
		host = node.HostName
	}
	local, mapped := stunBinding(t, net.JoinHostPort(host, strconv.Itoa(node.STUNPort)))
	if mapped != local {
		t.Fatalf("STUN mapped address %s, want the sender's %s", mapped, local)
	}
}

// haproxyTCPConfig turns docs/examples/haproxy-tcp.cfg into a loopback
// configuration: the frontend binds lbPort, and the example's servers are
// replaced by the given TLS ports, each checked on its plain HTTP port.
// Everything else is the documented file, unchanged.
func haproxyTCPConfig(t *testing.T, lbPort int, tlsPorts, httpPorts []int) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(examplesDir, "haproxy-tcp.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	replaced := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "bind *:443":
			line = "    bind 127.0.0.1:" + strconv.Itoa(lbPort)
			replaced["bind"] = true
		case strings.HasPrefix(trimmed, "default-server ") && strings.HasSuffix(trimmed, " check port 80"):
			line = "    default-server inter 250ms fall 2 rise 2 check"
			replaced["default-server"] = true
		case strings.HasPrefix(trimmed, "server coder-"):
			if !replaced["server"] {
				for i := range tlsPorts {
					out = append(out, fmt.Sprintf("    server coder-%d 127.0.0.1:%d port %d", i+1, tlsPorts[i], httpPorts[i]))
				}
			}
			replaced["server"] = true
			continue
		case strings.HasPrefix(trimmed, "maxconn "):
			line = "    maxconn 2000" // within a test machine's file descriptor limit
		}
		out = append(out, line)
	}
	for _, k := range []string{"bind", "default-server", "server"} {
		if !replaced[k] {
			t.Fatalf("docs/examples/haproxy-tcp.cfg changed shape: no %q line to adapt", k)
		}
	}
	return strings.Join(out, "\n")
}

// The documented TCP-mode HAProxy (docs/examples/haproxy-tcp.cfg) in front
// of two replicas that terminate TLS themselves: the DERP map fetched
// through it names it, and two tailscale region clients built from that map
// connect through it (TLS passed through to the replicas) and reach each
// other both ways.
func TestTailnetRegionThroughHAProxyInTCPMode(t *testing.T) {
	t.Parallel()
	haproxy := needHAProxy(t)
	if out, err := exec.Command(haproxy, "-c", "-f", filepath.Join(examplesDir, "haproxy-tcp.cfg")).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c docs/examples/haproxy-tcp.cfg: %v\n%s", err, out)
	}
	pg := dbtest.NewURL(t)
	certFile, keyFile, roots := testCertificate(t, t.TempDir())
	lbPort := clitest.FreePort(t)
	accessURL := "https://127.0.0.1:" + strconv.Itoa(lbPort)
	var tlsPorts, httpPorts []int
	for i := 0; i < 2; i++ {
		tlsPort := clitest.FreePort(t)
		r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: fmt.Sprintf("coder-%d", i+1), PostgresURL: pg, Env: []string{
			"CODER_ACCESS_URL=" + accessURL,
			"CODER_TLS_ENABLE=true",
			"CODER_TLS_ADDRESS=127.0.0.1:" + strconv.Itoa(tlsPort),
			"CODER_TLS_CERT_FILE=" + certFile,
			"CODER_TLS_KEY_FILE=" + keyFile,
		}})
		r.WaitReady(90 * time.Second)
		tlsPorts, httpPorts = append(tlsPorts, tlsPort), append(httpPorts, r.Port)
	}

	startHAProxy(t, haproxy, haproxyTCPConfig(t, lbPort, tlsPorts, httpPorts))
	httpsClient := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}}
	wait.For(t, 15*time.Second, "/readyz over TLS through haproxy", func() bool {
		resp, err := httpsClient.Get(accessURL + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	m := fetchDERPMap(t, accessURL, httpsClient)
	region := m.Regions[999]
	if region == nil || len(region.Nodes) != 1 || region.Nodes[0].DERPPort != lbPort || region.Nodes[0].STUNPort != -1 {
		t.Fatalf("the map does not name the load balancer as the region's node (STUN off): %+v", region)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	a, aKey, aGot := regionClient(ctx, t, region, roots)
	b, bKey, bGot := regionClient(ctx, t, region, roots)
	if !sendUntil(t, 15*time.Second, func() error { return a.Send(bKey.Public(), []byte("a to b")) },
		func() bool { return arrived(bGot, "a to b") }) {
		t.Fatal("a's packets never reached b through haproxy and the cluster")
	}
	if !sendUntil(t, 15*time.Second, func() error { return b.Send(aKey.Public(), []byte("b to a")) },
		func() bool { return arrived(aGot, "b to a") }) {
		t.Fatal("b's packets never reached a through haproxy and the cluster")
	}
}
