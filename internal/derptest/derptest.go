// Package derptest drives real tailscale DERP clients in tests: connect to a
// relay URL, and exchange windowed packets between two clients so that a
// test can count exactly what was lost. DERP drops whatever overflows a
// client's send queue, so real traffic (and these helpers) pace themselves.
package derptest

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/wire"
)

// Client is one DERP client connected to one relay, with a receive loop
// that hands every packet to Received.
type Client struct {
	Key    key.NodePublic
	URL    string
	client *derphttp.Client

	mu       sync.Mutex
	received map[key.NodePublic][][]byte
	notify   chan struct{}
	done     chan struct{}
	isClosed atomic.Bool
}

// Connect dials relayURL (the replica's base URL; "/derp" is appended) and
// starts receiving. It reconnects on its own when the connection breaks
// (the library redials on the next Send/Recv).
func Connect(ctx context.Context, relayURL string) (*Client, error) {
	return ConnectWithKey(ctx, relayURL, key.NewNode())
}

// ConnectWithKey is Connect with a given node key, so a test can reconnect
// as the same client (as a real node does after a network change).
func ConnectWithKey(ctx context.Context, relayURL string, priv key.NodePrivate) (*Client, error) {
	c, err := derphttp.NewClient(priv, wire.JoinPath(relayURL, wire.DERPPath), logger.Discard, netmon.NewStatic())
	if err != nil {
		return nil, err
	}
	if err := c.Connect(ctx); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("connect to %s: %w", relayURL, err)
	}
	cl := &Client{Key: priv.Public(), URL: relayURL, client: c, received: map[key.NodePublic][][]byte{}, notify: make(chan struct{}, 1), done: make(chan struct{})}
	go cl.recvLoop()
	return cl, nil
}

// ConnectRetry connects to relayURL like Connect, retrying every few
// milliseconds for up to d: a replica that was just started, or is
// restarting, refuses connections for a moment.
func ConnectRetry(relayURL string, d time.Duration) (*Client, error) {
	deadline := time.Now().Add(d)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), min(5*time.Second, max(time.Until(deadline), time.Second)))
		c, err := Connect(ctx, relayURL)
		cancel()
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("for %s: %w", d, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// MustConnect connects a client to relayURL for the test (retrying for up
// to 10 s), fails the test when it cannot, and closes the client when
// the test ends. It is the one DERP-client helper of derpmesh, e2e,
// hatest and bench.
func MustConnect(t testing.TB, relayURL string) *Client {
	t.Helper()
	c, err := ConnectRetry(relayURL, 10*time.Second)
	if err != nil {
		t.Fatalf("DERP client: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func (c *Client) recvLoop() {
	defer close(c.done)
	for {
		m, err := c.client.Recv()
		if err != nil {
			if c.isClosed.Load() {
				return
			}
			// Broken: derphttp redials on the next Recv. Don't spin while
			// the relay is down.
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if p, ok := m.(derp.ReceivedPacket); ok {
			c.mu.Lock()
			c.received[p.Source] = append(c.received[p.Source], append([]byte(nil), p.Data...))
			c.mu.Unlock()
			select {
			case c.notify <- struct{}{}:
			default:
			}
		}
	}
}

// Close closes the client and waits for its receive loop.
func (c *Client) Close() error {
	c.isClosed.Store(true)
	err := c.client.Close()
	<-c.done
	return err
}

// Send sends one packet to dst.
func (c *Client) Send(dst key.NodePublic, b []byte) error { return c.client.Send(dst, b) }

// Take returns and forgets every packet received from src so far.
func (c *Client) Take(src key.NodePublic) [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.received[src]
	delete(c.received, src)
	return out
}

// WaitPackets waits until at least n packets from src have arrived, or d
// passes; it returns what arrived (and forgets it).
func (c *Client) WaitPackets(src key.NodePublic, n int, d time.Duration) [][]byte {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		got := len(c.received[src])
		c.mu.Unlock()
		if got >= n {
			return c.Take(src)
		}
		select {
		case <-c.notify:
		case <-time.After(10 * time.Millisecond):
		case <-deadline.C:
			return c.Take(src)
		}
	}
}

// Reachable reports whether a packet from a reaches b within d, resending
// every 100ms (right after a client connects, relays may not know of it yet).
func Reachable(a, b *Client, d time.Duration) bool {
	deadline := time.Now().Add(d)
	probe := []byte("reachable?")
	for time.Now().Before(deadline) {
		_ = a.Send(b.Key, probe)
		if got := b.WaitPackets(a.Key, 1, 100*time.Millisecond); len(got) > 0 {
			return true
		}
	}
	return false
}

// Exchange sends n numbered packets of size bytes from a to b in windows of
// window packets, waiting for each window to arrive (up to perWindow) before
// sending the next, then waits up to perWindow more for stragglers. It
// returns how many packets never arrived: a late packet is not lost.
func Exchange(a, b *Client, n, size, window int, perWindow time.Duration) (lost int) {
	b.Take(a.Key)
	buf := make([]byte, size)
	received := 0
	for sent := 0; sent < n; {
		w := window
		if n-sent < w {
			w = n - sent
		}
		for i := 0; i < w; i++ {
			binary.BigEndian.PutUint32(buf, uint32(sent+i))
			_ = a.Send(b.Key, buf)
		}
		sent += w
		// Wait for this window (a straggler from an earlier one counts
		// too; the drain below settles the total).
		received += len(b.WaitPackets(a.Key, w, perWindow))
	}
	if received < n {
		received += len(b.WaitPackets(a.Key, n-received, perWindow))
	}
	return n - received
}
