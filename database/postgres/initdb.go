package postgres

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"
)

func postgresUser() (*syscall.Credential, error) {
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, the built-in PostgreSQL must run as the 'postgres' user, which does not exist (apt-get install -y postgresql creates it): %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (c *Cluster) takeLock() error {
	f, err := openNoFollow(filepath.Join(c.opts.Dir, "lock"), os.O_CREATE|os.O_RDWR)
	if err != nil {
		return fmt.Errorf("postgres: open lock file: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("the built-in PostgreSQL in %s is in use by another coder server; join it with --postgres-url \"$(coder server postgres-builtin-url)\" or use another --cache-dir", c.opts.Dir)
	}
	c.lock = f
	return nil
}

func (c *Cluster) releaseLock() {
	if c.lock != nil {
		_ = syscall.Flock(int(c.lock.Fd()), syscall.LOCK_UN)
		c.lock.Close()
		c.lock = nil
	}
}

// prepare makes the password, the port and the data directory ready.
func (c *Cluster) prepare() error {
	pwPath := filepath.Join(c.opts.Dir, "password")
	if b, err := readFileNoFollow(pwPath); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		c.password = strings.TrimSpace(string(b))
	} else {
		var raw [16]byte
		if _, err := rand.Read(raw[:]); err != nil {
			return fmt.Errorf("postgres: generate password: %w", err)
		}
		c.password = hex.EncodeToString(raw[:])
	}
	// Rewritten every time: a file left by an older layout becomes a
	// regular root-owned file.
	if err := writeFileAtomic(c.opts.Dir, "password", []byte(c.password+"\n")); err != nil {
		return fmt.Errorf("postgres: save password: %w", err)
	}

	if _, err := os.Stat(filepath.Join(c.dataDir(), "PG_VERSION")); errors.Is(err, os.ErrNotExist) {
		if err := c.initdb(); err != nil {
			return err
		}
	}
	c.stopOrphan()
	return nil
}

func (c *Cluster) initdb() error {
	start := time.Now()
	c.opts.Logger.Info("initializing built-in postgres", zap.String("dir", c.dataDir()))
	// A half-made directory from an interrupted initdb. RemoveAll never
	// follows a symlink inside the tree.
	_ = os.RemoveAll(c.dataDir())
	if err := c.makeDataDir(); err != nil {
		return err
	}
	pwFile, cleanup, err := c.passwordFileForInitdb()
	if err != nil {
		return err
	}
	defer cleanup()
	args := []string{"-D", c.dataDir(), "-U", c.opts.User, "--pwfile", pwFile, "-A", "scram-sha-256", "-E", "UTF8", "--locale", "C"}
	if c.opts.Ephemeral {
		args = append(args, "--no-sync")
	}
	cmd := exec.Command(filepath.Join(c.opts.BinDir, "initdb"), args...)
	cmd.Dir = os.TempDir()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("postgres: initdb failed: %v: %s", err, lastLines(string(out), 5))
	}
	c.opts.Logger.Info("initialized built-in postgres", zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	return nil
}

// makeDataDir creates the (empty) data directory, owned by the user the
// server runs as.
func (c *Cluster) makeDataDir() error {
	if err := os.Mkdir(c.dataDir(), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("postgres: create %s: %w", c.dataDir(), err)
	}
	st, err := os.Lstat(c.dataDir())
	if err != nil || !st.IsDir() {
		return fmt.Errorf("postgres: %s is not a directory", c.dataDir())
	}
	if c.cred != nil {
		if err := os.Lchown(c.dataDir(), int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			return fmt.Errorf("postgres: hand %s to the postgres user: %w", c.dataDir(), err)
		}
	}
	return nil
}

// passwordFileForInitdb writes the password where initdb (running as the
// postgres user when we are root) can read it and nobody else can: a fresh
// root-owned directory that others may only traverse, holding one file
// owned by the server's user, mode 0400.
func (c *Cluster) passwordFileForInitdb() (string, func(), error) {
	dir, err := os.MkdirTemp("", "coder-initdb-*")
	if err != nil {
		return "", nil, fmt.Errorf("postgres: password file: %w", err)
	}
	cleanup := func() { _ = os.RemoveAll(dir) }
	path := filepath.Join(dir, "pw")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o400)
	if err == nil {
		_, err = f.WriteString(c.password + "\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil && c.cred != nil {
		if err = f.Chown(int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			// Chown on a closed file fails; use the path (we created it,
			// in a directory only we can write).
			err = os.Lchown(path, int(c.cred.Uid), int(c.cred.Gid))
		}
		if err == nil {
			err = os.Chmod(dir, 0o711)
		}
	}
	if err != nil {
		cleanup()
		return "", nil, fmt.Errorf("postgres: password file: %w", err)
	}
	return path, cleanup, nil
}

// stopOrphan stops a postmaster left running on our data directory by a
// predecessor that was killed (kill -9 gives it no chance to stop it). We
// hold the directory's lock, so no live server owns that postmaster. A stale
// postmaster.pid whose process is gone is removed.
func (c *Cluster) stopOrphan() {
	pidPath := filepath.Join(c.dataDir(), "postmaster.pid")
	// The postgres user owns the data directory: the pid file may be a
	// symlink, a FIFO or a device; such a file is no postmaster's.
	b, err := readFileNoFollow(pidPath)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		c.opts.Logger.Info("removing a postmaster.pid that is not a regular file", zap.Error(err))
		_ = os.Remove(pidPath)
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil || pid <= 0 {
		_ = os.Remove(pidPath)
		return
	}
	// The pid file belongs to the server's user, who could write any pid
	// in it: only a postgres process of that user is ever signalled.
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if syscall.Kill(pid, 0) != nil || !strings.Contains(string(cmdline), "postgres") || !c.ownedByServerUser(pid) {
		c.opts.Logger.Info("removing stale postmaster.pid", zap.Int("pid", pid))
		_ = os.Remove(pidPath)
		return
	}
	c.opts.Logger.Warn("stopping orphaned built-in postgres left by a killed server", zap.Int("pid", pid))
	_ = syscall.Kill(pid, syscall.SIGINT) // fast shutdown
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGQUIT)
}

// ownedByServerUser reports whether process pid runs as the user the
// server runs as.
func (c *Cluster) ownedByServerUser(pid int) bool {
	st, err := os.Stat(fmt.Sprintf("/proc/%d", pid))
	if err != nil {
		return false
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	want := uint32(os.Geteuid())
	if c.cred != nil {
		want = c.cred.Uid
	}
	return sys.Uid == want
}
