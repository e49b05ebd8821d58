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
	alive := true
	err = raw.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EWOULDBLOCK), errors.Is(err, syscall.EINTR):
			alive = true // nothing to read: the normal idle state
		case err != nil:
			alive = false
		default:
			alive = false // n == 0: end of stream; n > 0: unsolicited bytes
			_ = n
		}
		return true // never wait for readability
	})
	if err != nil {
		return false // the socket is already closed
	}
	return alive
}
