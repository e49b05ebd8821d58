package relayguard_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"tailscale.com/derp"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/relayguard"
)

// rawClient is a DERP client speaking the protocol over a connection the
// test dialed itself, so it can pick the transport, the request line and
// the mesh key a stock client would not.
type rawClient struct {
	priv key.NodePrivate
	c    *derp.Client
	nc   net.Conn
}

func (rc *rawClient) Close() { _ = rc.nc.Close() }

// relays reports whether a packet rc sends reaches other within d.
func (rc *rawClient) relays(other *derptest.Client, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if err := rc.c.Send(other.Key, []byte("bypass?")); err != nil {
			return false
		}
		if len(other.WaitPackets(rc.priv.Public(), 1, 100*time.Millisecond)) > 0 {
			return true
		}
	}
	return false
}

// dialWebSocket connects over the WebSocket transport (/derp with the
// "derp" subprotocol).
func dialWebSocket(ctx context.Context, base string, priv key.NodePrivate, opts ...derp.ClientOpt) (*rawClient, error) {
	u := "ws" + strings.TrimPrefix(base, "http") + "/derp"
	ws, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{Subprotocols: []string{"derp"}})
	if err != nil {
		return nil, err
	}
	nc := websocket.NetConn(context.Background(), ws, websocket.MessageBinary)
	return handshake(nc, priv, opts...)
}

// dialUpgrade sends a hand-written upgrade request for target (a path with
// an optional query) and speaks DERP on the upgraded connection.
func dialUpgrade(base, target string, priv key.NodePrivate, opts ...derp.ClientOpt) (*rawClient, error) {
	return dialUpgradeFrom("", base, target, priv, opts...)
}

// dialUpgradeFrom is dialUpgrade from the local address from ("": any).
func dialUpgradeFrom(from, base, target string, priv key.NodePrivate, opts ...derp.ClientOpt) (*rawClient, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	nc, err := dialFrom(from, u.Host)
	if err != nil {
		return nil, err
	}
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(nc, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n", target, u.Host)
	br := bufio.NewReader(nc)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		nc.Close()
		return nil, err
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		nc.Close()
		return nil, fmt.Errorf("no upgrade: %s", res.Status)
	}
	_ = nc.SetDeadline(time.Time{})
	return handshakeBuffered(nc, br, priv, opts...)
}

// dialFrom dials addr over TCP from the local IP from ("": any). Linux
// routes all of 127.0.0.0/8 to loopback, so tests can tell apart clients,
// peers and attackers on one machine by their source address.
func dialFrom(from, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	return d.Dial("tcp", addr)
}

func handshake(nc net.Conn, priv key.NodePrivate, opts ...derp.ClientOpt) (*rawClient, error) {
	return handshakeBuffered(nc, bufio.NewReader(nc), priv, opts...)
}

func handshakeBuffered(nc net.Conn, br *bufio.Reader, priv key.NodePrivate, opts ...derp.ClientOpt) (*rawClient, error) {
	brw := bufio.NewReadWriter(br, bufio.NewWriter(nc))
	c, err := derp.NewClient(priv, nc, brw, logger.Discard, opts...)
	if err != nil {
		nc.Close()
		return nil, err
	}
	return &rawClient{priv: priv, c: c, nc: nc}, nil
}

// No transport, request line or mesh key gets a client the webhook refused
// onto the relay; the same transports work for an admitted client, so the
// refusals are the guard's doing.
func TestNoWayAroundAdmission(t *testing.T) {
	t.Parallel()
	hook := newWebhook(t, "deny")
	mk := newMeshKey()
	a := startRelay(t, mk, relayguard.Options{VerifyURL: hook.url()})
	good := key.NewNode()
	hook.admitKey(good.Public())
	other := connectKey(t, a, good)

	wrongMesh, err := key.ParseDERPMesh(newMeshKey())
	if err != nil {
		t.Fatal(err)
	}
	dials := map[string]func(priv key.NodePrivate) (*rawClient, error){
		"websocket": func(priv key.NodePrivate) (*rawClient, error) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			return dialWebSocket(ctx, a.url, priv)
		},
		"upgrade with a query": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, "/derp?derp=1&mesh=1", priv)
		},
		"upgrade with a wrong mesh key": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, "/derp", priv, derp.MeshKey(wrongMesh))
		},
		"upgrade of /derp/": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, "/derp/", priv)
		},
		"upgrade of //derp": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, "//derp", priv)
		},
		"upgrade of /./derp": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, "/./derp", priv)
		},
		"upgrade of an absolute URL": func(priv key.NodePrivate) (*rawClient, error) {
			return dialUpgrade(a.url, a.url+"/derp", priv)
		},
	}
	// Transports an admitted client can use: the control group.
	reachable := map[string]bool{"websocket": true, "upgrade with a query": true, "upgrade with a wrong mesh key": true, "upgrade of an absolute URL": true}
	for name, dial := range dials {
		if reachable[name] {
			admitted := key.NewNode()
			hook.admitKey(admitted.Public())
			rc, err := dial(admitted)
			if err != nil {
				t.Fatalf("%s: an admitted client cannot connect: %v", name, err)
			}
			if !rc.relays(other, 10*time.Second) {
				t.Errorf("%s: an admitted client cannot relay (the control case)", name)
			}
			rc.Close()
		}
		rc, err := dial(key.NewNode())
		if err != nil {
			continue // refused before or during the handshake
		}
		if rc.relays(other, 2*time.Second) {
			t.Errorf("%s: a client the webhook refused relayed a packet", name)
		}
		rc.Close()
	}
}
