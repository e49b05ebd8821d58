package derpmesh

import (
	"errors"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"
)

// errForwarderClosed is returned to the local DERP server for a packet
// handed to a forwarder whose mesh connection has ended.
var errForwarderClosed = errors.New("derpmesh: mesh connection to the peer is closed")

// maxBatchBytes bounds one write to a peer: a long queue is written in
// chunks of about this size, so memory stays bounded and the peer starts
// receiving before the whole queue is encoded.
const maxBatchBytes = 64 << 10

// fwdPacket is one packet waiting to be forwarded to a peer.
type fwdPacket struct {
	src, dst key.NodePublic
	payload  []byte
}

// forwarder is the derpserver.PacketForwarder installed on the local
// server for every client of one peer, for the life of one mesh
// connection. The library's own forwarder (derphttp.Client) writes and
// flushes each packet synchronously on the sending client's read loop, so
// one slow or stopped peer stalls that client's traffic to every
// destination. This one never blocks the caller: ForwardPacket puts the
// packet in a bounded queue (dropping the oldest when it is full, counted
// in coderd_derpmesh_forward_dropped_total) and one writer goroutine per
// peer drains it, encoding every queued packet into one buffer and writing
// it with one syscall when the queue is empty (or every maxBatchBytes).
//
// The writer is owned by the session that created it: the first packet
// starts it (an idle link, most of them in a large fleet, has none), and
// close stops it and waits. A write that fails or does not finish within the write timeout
// closes the connection, which ends the session (failed is closed).
type forwarder struct {
	c       *derphttp.Client
	bc      *batchConn // nil if the connection was not dialed through it
	dropped prometheus.Counter
	name    string

	mu      sync.Mutex
	ring    []fwdPacket // grows on demand up to max; nil while idle
	max     int         // the queue size: packets beyond it drop the oldest
	head    int         // index of the oldest queued packet
	n       int         // packets queued
	closed  bool
	started bool  // the writer was started (by the first packet) or never will be
	err     error // why the writer stopped on its own

	wake   chan struct{} // cap 1
	stop   chan struct{}
	done   chan struct{}
	failed chan struct{} // closed when the writer stopped on an error
	once   sync.Once
}

func newForwarder(c *derphttp.Client, bc *batchConn, queue int, dropped prometheus.Counter, name string) *forwarder {
	f := &forwarder{
		c:       c,
		bc:      bc,
		dropped: dropped,
		name:    name,
		max:     queue,
		wake:    make(chan struct{}, 1),
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		failed:  make(chan struct{}),
	}
	return f
}

// ForwardPacket queues a packet for the peer and returns at once. When the
// queue is full the oldest queued packet is dropped: under overload the
// freshest packets are the ones worth delivering (DERP carries WireGuard,
// which recovers from loss, not from delay).
func (f *forwarder) ForwardPacket(src, dst key.NodePublic, payload []byte) error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		f.dropped.Inc()
		return errForwarderClosed
	}
	if f.n == len(f.ring) {
		if len(f.ring) < f.max {
			f.growLocked()
		} else {
			f.ring[f.head] = fwdPacket{}
			f.head = (f.head + 1) % len(f.ring)
			f.n--
			f.dropped.Inc()
		}
	}
	// The server allocates payload per packet and never reuses it.
	f.ring[(f.head+f.n)%len(f.ring)] = fwdPacket{src: src, dst: dst, payload: payload}
	f.n++
	if !f.started { // the first packet starts the writer: idle links have none
		f.started = true
		go f.run()
	}
	f.mu.Unlock()
	select {
	case f.wake <- struct{}{}:
	default:
	}
	return nil
}

// String names the forwarder in the DERP server's debug logs.
func (f *forwarder) String() string { return "derpmesh.forwarder(" + f.name + ")" }

// minRing is the queue's first allocation. The queue doubles from there
// up to its size while packets wait, and a queue grown past keepRing is
// released once the writer has drained it: an idle mesh link (most of them,
// in a large fleet) holds no queue memory, and a busy one only what its
// bursts need. (Preallocating the full queue and the writer's batch cost
// 180 KB per peer: 18 MB per replica at N=100, a third of its heap.)
const (
	minRing  = 16
	keepRing = 64
)

// growLocked doubles the ring (up to max), keeping the queued packets in
// order from index 0.
func (f *forwarder) growLocked() {
	next := make([]fwdPacket, min(max(2*len(f.ring), minRing), f.max))
	for i := 0; i < f.n; i++ {
		next[i] = f.ring[(f.head+i)%len(f.ring)]
	}
	f.ring, f.head = next, 0
}

// take moves every queued packet into batch. A large ring found empty
// afterwards is released (see minRing).
func (f *forwarder) take(batch []fwdPacket) []fwdPacket {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ; f.n > 0; f.n-- {
		batch = append(batch, f.ring[f.head])
		f.ring[f.head] = fwdPacket{}
		f.head = (f.head + 1) % len(f.ring)
	}
	if len(batch) == 0 && len(f.ring) > keepRing {
		f.ring, f.head = nil, 0
	}
	return batch
}

func (f *forwarder) run() {
	defer close(f.done)
	var batch []fwdPacket // grows with the queue; released with it
	for {
		select {
		case <-f.stop:
			return
		case <-f.wake:
		}
		for {
			batch = f.take(batch[:0])
			if len(batch) == 0 {
				if cap(batch) > keepRing {
					batch = nil
				}
				break
			}
			if err := f.write(batch); err != nil {
				for i := range batch {
					batch[i] = fwdPacket{}
				}
				f.fail(err)
				return
			}
			for i := range batch {
				batch[i] = fwdPacket{}
			}
		}
	}
}

// write encodes batch into the connection's buffer and writes it out.
func (f *forwarder) write(batch []fwdPacket) error {
	f.bc.hold()
	for i, p := range batch {
		if err := f.c.ForwardPacket(p.src, p.dst, p.payload); err != nil {
			_ = f.bc.flush()
			f.dropped.Add(float64(len(batch) - i))
			return err
		}
		if f.bc.buffered() >= maxBatchBytes {
			if err := f.bc.flush(); err != nil {
				f.dropped.Add(float64(len(batch) - i - 1))
				return err
			}
			f.bc.hold()
		}
	}
	return f.bc.flush()
}

// fail stops accepting packets, counts the queued ones as dropped and
// tells the session.
func (f *forwarder) fail(err error) {
	f.mu.Lock()
	f.closed = true
	f.err = err
	f.dropped.Add(float64(f.n))
	f.clearLocked()
	f.mu.Unlock()
	close(f.failed)
}

// clearLocked forgets every queued packet and the queue's memory.
func (f *forwarder) clearLocked() {
	f.ring, f.head, f.n = nil, 0, 0
}

// failure is why the writer stopped (after failed is closed).
func (f *forwarder) failure() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// close stops the writer and waits for it; queued packets are dropped and
// counted, later ForwardPacket calls fail. Idempotent.
func (f *forwarder) close() {
	f.once.Do(func() {
		f.mu.Lock()
		started := f.started
		f.started = true // no writer starts from now on
		if !f.closed {
			f.closed = true
			f.dropped.Add(float64(f.n))
			f.clearLocked()
		}
		f.mu.Unlock()
		close(f.stop)
		if !started {
			close(f.done)
		}
	})
	<-f.done
}

// batchConn is the TCP connection under a mesh client (and under its TLS,
// if any). Between hold and flush, writes are collected in memory, so the
// DERP client's per-packet flush costs a copy instead of a syscall; at
// flush they go out in one write, bounded by the write timeout (which
// closes the connection when it passes). Outside a batch, writes (pings,
// the handshake) go straight through, under the same timeout.
type batchConn struct {
	net.Conn
	timeout time.Duration

	mu       sync.Mutex // serializes writes to Conn and guards the rest
	batching bool
	buf      []byte
}

func newBatchConn(c net.Conn, timeout time.Duration) *batchConn {
	return &batchConn{Conn: c, timeout: timeout}
}

// Write collects p during a batch, and writes it through otherwise.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.batching {
		b.buf = append(b.buf, p...)
		return len(p), nil
	}
	return b.writeLocked(p)
}

func (b *batchConn) writeLocked(p []byte) (int, error) {
	// A deadline on the socket, which the runtime's poller enforces on real
	// time: it stays off Options.Clock (a mock clock could not expire it).
	_ = b.Conn.SetWriteDeadline(time.Now().Add(b.timeout))
	n, err := b.Conn.Write(p)
	if err != nil {
		// A peer that does not take our bytes within the timeout is
		// stopped or hung: give up on this connection.
		_ = b.Conn.Close()
	}
	return n, err
}

// hold starts a batch. A nil batchConn (a connection not dialed through
// one) does nothing.
func (b *batchConn) hold() {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.batching = true
	b.mu.Unlock()
}

// buffered is how many bytes the batch holds.
func (b *batchConn) buffered() int {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.buf)
}

// flush ends the batch and writes what it collected in one write.
func (b *batchConn) flush() error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.batching = false
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.writeLocked(b.buf)
	if cap(b.buf) > 4*maxBatchBytes {
		b.buf = nil // a one-off large batch: do not keep its memory
	} else {
		b.buf = b.buf[:0]
	}
	return err
}
