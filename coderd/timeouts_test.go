package coderd

import (
	"bufio"
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"tailscale.com/derp"
	"tailscale.com/net/wsconn"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/derptest"
)

// The HTTP server's read and write timeouts cut slow ordinary requests but
// never the relay connections they upgrade: DERP clients keep exchanging
// packets long after both timeouts have passed.
func TestHTTPTimeoutsDoNotCutRelayConnections(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s := startServer(ctx, t, Config{
		HTTPAddress:      "127.0.0.1:0",
		PostgresURL:      dbtest.NewURL(t),
		DERPServerEnable: true,
		HTTPReadTimeout:  time.Second,
		HTTPWriteTimeout: time.Second,
	})
	url := "http://" + s.HTTPAddress()

	a, err := derptest.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := derptest.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !derptest.Reachable(a, b, 10*time.Second) {
		t.Fatal("clients cannot reach each other")
	}
	time.Sleep(3 * time.Second) // past both timeouts: the behaviour under test
	b.Take(a.Key)
	if lost := derptest.Exchange(a, b, 50, 100, 10, 5*time.Second); lost != 0 {
		t.Fatalf("%d of 50 packets lost after the HTTP timeouts passed: the relay connection was cut", lost)
	}

	// Browser-style clients speak DERP over WebSocket, whose connection
	// wrapper does not clear the HTTP server's deadlines by itself.
	wa, wb := dialWebSocketDERP(t, ctx, url), dialWebSocketDERP(t, ctx, url)
	time.Sleep(3 * time.Second) // past both timeouts
	got := make(chan bool, 1)
	go func() {
		for {
			m, err := wb.client.Recv()
			if err != nil {
				got <- false
				return
			}
			if p, ok := m.(derp.ReceivedPacket); ok && p.Source == wa.pub {
				got <- true
				return
			}
		}
	}()
	if err := wa.client.Send(wb.pub, []byte("still there?")); err != nil {
		t.Fatalf("a WebSocket DERP client cannot send after the HTTP timeouts passed: %v", err)
	}
	select {
	case ok := <-got:
		if !ok {
			t.Fatal("a WebSocket DERP connection was cut by the HTTP timeouts")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a packet between WebSocket DERP clients did not arrive")
	}

	// An ordinary request trickled in slower than the read timeout is cut.
	conn, err := net.Dial("tcp", s.HTTPAddress())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = conn.Write([]byte("POST /api/v2/buildinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"))
	_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	start := time.Now()
	_, _ = io.ReadAll(conn) // returns when the server closes the connection
	if d := time.Since(start); d > 15*time.Second {
		t.Fatalf("a request body that never arrived held the connection for %s", d)
	}
}

type wsDERP struct {
	client *derp.Client
	pub    key.NodePublic
}

// dialWebSocketDERP connects a real DERP client over WebSocket, as browser
// clients do.
func dialWebSocketDERP(t *testing.T, ctx context.Context, baseURL string) wsDERP {
	t.Helper()
	u := "ws://" + strings.TrimPrefix(baseURL, "http://") + "/derp"
	c, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{Subprotocols: []string{"derp"}})
	if err != nil {
		t.Fatal(err)
	}
	nc := wsconn.NetConn(context.Background(), c, websocket.MessageBinary, u)
	t.Cleanup(func() { _ = nc.Close() })
	priv := key.NewNode()
	dc, err := derp.NewClient(priv, nc, bufio.NewReadWriter(bufio.NewReader(nc), bufio.NewWriter(nc)), logger.Discard)
	if err != nil {
		t.Fatal(err)
	}
	return wsDERP{client: dc, pub: priv.Public()}
}
