package database

import (
	"context"
	"net"
	"sync"
	"syscall"
	"time"
)

// closeWait is how long Close lets the pool say goodbye to the server
// before it closes the sockets itself: against a hung server (a black-holed
// network, a stalled proxy) pgxpool waits up to 15 s per connection, which
// would push a drain past Kubernetes' termination grace period.
const closeWait = 2 * time.Second

// connTracker knows every socket the pool dialed, so Close can cut them.
type connTracker struct {
	mu    sync.Mutex
	conns map[*trackedConn]struct{}
}

func (t *connTracker) wrap(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		tc := &trackedConn{Conn: c, t: t}
		t.mu.Lock()
		if t.conns == nil {
			t.conns = map[*trackedConn]struct{}{}
		}
		t.conns[tc] = struct{}{}
		t.mu.Unlock()
		return tc, nil
	}
}

func (t *connTracker) closeAll() {
	t.mu.Lock()
	conns := make([]*trackedConn, 0, len(t.conns))
	for c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

// trackedConn is a pool socket; it keeps the socket checks working
// (NetConn, SyscallConn) and leaves the tracker when closed.
type trackedConn struct {
	net.Conn
	t    *connTracker
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}

// NetConn is the dialed socket.
func (c *trackedConn) NetConn() net.Conn { return c.Conn }

// SyscallConn is the dialed socket's, for the non-blocking liveness check.
func (c *trackedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, syscall.EINVAL
	}
	return sc.SyscallConn()
}
