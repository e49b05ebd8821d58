// Package pgbouncertest runs a real PgBouncer in transaction pooling mode
// in front of a test Postgres, so tests can prove the server works where
// LISTEN/NOTIFY, session state and server-side prepared statements do not.
// It never talks to anything but loopback addresses.
package pgbouncertest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/clitest"
)

// Start runs pgbouncer (pool_mode = transaction) in front of the Postgres
// that pgURL points at and returns the same URL through PgBouncer, as a
// plain URL: no driver parameters, as an operator would write it (the
// server must work through the pooler without them). It is stopped at
// cleanup. The test is skipped, with a message
// saying how to install it, when the pgbouncer binary is missing.
func Start(t testing.TB, pgURL string) string {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"} {
			if _, err := os.Stat(p); err == nil {
				bin = p
			}
		}
	}
	if bin == "" {
		t.Skip("pgbouncer is not installed: run WITH_PGBOUNCER=1 scripts/deps.sh (Debian package pgbouncer)")
	}
	u, err := url.Parse(pgURL)
	if err != nil {
		t.Fatal(err)
	}
	pass, _ := u.User.Password()
	dir := t.TempDir()
	port := freePort(t)
	host, pgPort, err := net.SplitHostPort(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`[databases]
* = host=%s port=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = plain
auth_file = %s
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
ignore_startup_parameters = extra_float_digits
`, host, pgPort, port, filepath.Join(dir, "users.txt"))
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("pgbouncer.ini", cfg)
	write("users.txt", fmt.Sprintf("%q %q\n", u.User.Username(), pass))

	cmd := exec.Command(bin, filepath.Join(dir, "pgbouncer.ini"))
	var out clitest.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if os.Geteuid() == 0 { // pgbouncer refuses to run as root
		cred, err := postgresUser()
		if err != nil {
			t.Skipf("running as root and no postgres user to run pgbouncer as: %v", err)
		}
		for _, p := range []string{dir, filepath.Join(dir, "pgbouncer.ini"), filepath.Join(dir, "users.txt")} {
			if err := os.Chown(p, int(cred.Uid), int(cred.Gid)); err != nil {
				t.Fatal(err)
			}
		}
		// t.TempDir's parent must be traversable by that user.
		_ = os.Chmod(filepath.Dir(dir), 0o755)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			break
		}
		select {
		case <-done:
			t.Fatalf("pgbouncer exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbouncer did not listen on %s within 10s: %s", addr, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	u.Host = addr
	return u.String()
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func postgresUser() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, err
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return nil, err
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}
