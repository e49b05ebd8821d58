package postgres

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Start starts the server and waits until it accepts connections, creating
// the database on first start. After Close it fails: the data directory
// is no longer this cluster's.
func (c *Cluster) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errClosed
	}
	if c.cmd != nil {
		return nil
	}
	if err := c.pickPort(); err != nil {
		return err
	}
	logFile, err := openNoFollow(filepath.Join(c.opts.Dir, "postgres.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND)
	if err != nil {
		return fmt.Errorf("postgres: open log: %w", err)
	}
	args := []string{
		"-D", c.dataDir(),
		"-p", strconv.Itoa(c.port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=",
		"-c", "max_connections=" + strconv.Itoa(c.opts.MaxConnections),
		"-c", "shared_buffers=32MB",
	}
	if c.opts.Ephemeral {
		args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	cmd := exec.Command(filepath.Join(c.opts.BinDir, "postgres"), args...)
	cmd.Dir = os.TempDir()
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: c.cred,
		Setpgid:    true,           // a terminal's Ctrl-C reaches the server, which stops us in order
		Pdeathsig:  syscall.SIGINT, // if we are killed, the postmaster shuts down fast
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("postgres: start: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(done)
	}()
	c.cmd, c.done = cmd, done

	if err := c.waitReady(ctx); err != nil {
		c.stopLocked()
		return err
	}
	return nil
}

func (c *Cluster) pickPort() error {
	portPath := filepath.Join(c.opts.Dir, "port")
	want := c.opts.Port
	if want == 0 {
		if b, err := readFileNoFollow(portPath); err == nil {
			want, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
	}
	if want != 0 && portFree(want) {
		c.port = want
	} else if c.opts.Port != 0 {
		return fmt.Errorf("postgres: port %d is in use", c.opts.Port)
	} else if c.port != 0 && portFree(c.port) {
		// keep the port across a restart
	} else {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return fmt.Errorf("postgres: find a free port: %w", err)
		}
		c.port = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	return writeFileAtomic(c.opts.Dir, "port", []byte(strconv.Itoa(c.port)+"\n"))
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

func (c *Cluster) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	adminURL := c.DatabaseURL("postgres")
	start := time.Now()
	lastLog := start
	for {
		conn, err := pgx.Connect(ctx, adminURL)
		if err == nil {
			defer conn.Close(context.Background())
			return c.ensureDatabase(ctx, conn)
		}
		select {
		case <-c.done:
			return fmt.Errorf("postgres exited during start: %s", lastLines(c.readLog(), 5))
		case <-ctx.Done():
			return fmt.Errorf("postgres did not accept connections within 60s: %s", lastLines(c.readLog(), 5))
		case <-time.After(25 * time.Millisecond):
		}
		if time.Since(lastLog) > 5*time.Second {
			lastLog = time.Now()
			c.opts.Logger.Info("waiting for built-in postgres to start", zap.Duration("waited", time.Since(start).Round(time.Second)))
		}
	}
}

func (c *Cluster) ensureDatabase(ctx context.Context, conn *pgx.Conn) error {
	var exists bool
	if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", c.opts.Database).Scan(&exists); err != nil {
		return fmt.Errorf("postgres: check database: %w", err)
	}
	if exists {
		return nil
	}
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{c.opts.Database}.Sanitize()); err != nil {
		return fmt.Errorf("postgres: create database %s: %w", c.opts.Database, err)
	}
	return nil
}

func (c *Cluster) readLog() string {
	b, _ := readFileNoFollow(filepath.Join(c.opts.Dir, "postgres.log"))
	return string(b)
}

// Stop shuts the server down (fast shutdown: sessions are cut, nothing
// committed is lost) and waits for it. Start may be called again.
func (c *Cluster) Stop() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopLocked()
}

func (c *Cluster) stopLocked() error {
	if c.cmd == nil {
		return nil
	}
	cmd, done := c.cmd, c.done
	c.cmd, c.done = nil, nil
	for _, step := range []struct {
		sig  syscall.Signal
		wait time.Duration
	}{{syscall.SIGINT, 30 * time.Second}, {syscall.SIGQUIT, 5 * time.Second}, {syscall.SIGKILL, 5 * time.Second}} {
		_ = cmd.Process.Signal(step.sig)
		select {
		case <-done:
			return nil
		case <-time.After(step.wait):
		}
	}
	return errors.New("postgres: server did not stop")
}

// Close stops the server, waits for it and releases the data directory.
// It is safe to call more than once, also concurrently.
func (c *Cluster) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.stopLocked()
	c.releaseLock()
	c.closed = true
	return err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
