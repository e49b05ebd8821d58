//go:build linux || darwin || freebsd

package database

import (
	"errors"
	"net"
	"syscall"
)

// socketAlive reports whether an idle connection's socket is still usable,
// without blocking and without sending a byte: it peeks at the socket. An
// end of stream, or bytes the client did not ask for (a server's goodbye:
// Postgres sends FATAL 57P01 to every session when it shuts down), mean the
// connection is dead. A socket that cannot be inspected counts as alive.
func socketAlive(c net.Conn) bool {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok { // TLS
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	// Control, not Read: pgx may have a background reader parked in a
	// Read on this socket (after a slow write), and Read would wait for it.
	// A peek consumes nothing, so that reader loses nothing either; and if
	// it already took a goodbye message, the end of stream is still there
	// to see.
	alive := true
	err = raw.Control(func(fd uintptr) {
		var b [1]byte
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EWOULDBLOCK), errors.Is(err, syscall.EINTR):
			alive = true // nothing to read: the normal idle state
		default:
			// err == nil: end of stream (0 bytes) or bytes nobody asked
			// for; any other error: a reset or closed socket.
			alive = false
		}
	})
	if err != nil {
		return false // the socket is already closed
	}
	return alive
}
