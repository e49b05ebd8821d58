package postgres_test

import (
	"context"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/postgres"
)

func requireRootWithPostgres(t *testing.T) (uid, gid int) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("only meaningful as root")
	}
	if _, err := postgres.FindBinDir(); err != nil {
		t.Skip(err)
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Skip("no postgres user")
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

func tempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "coder-layout-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

func run(t *testing.T, opts postgres.Options) *postgres.Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	opts.Ephemeral = true
	c, err := postgres.Run(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		t.Fatalf("connect to the built-in postgres: %v", err)
	}
	_ = conn.Close(ctx)
	return c
}

// The postgres user owned the cache dir in older versions and could plant
// symlinks where root writes: root must replace them, never write through
// them, and take the directory back.
func TestRootDoesNotFollowSymlinksThePostgresUserPlanted(t *testing.T) {
	t.Parallel()
	uid, gid := requireRootWithPostgres(t)
	dir := tempDir(t)
	victims := tempDir(t)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	names := []string{"port", "password", "postgres.log", "lock", ".port.tmp"}
	for _, name := range names {
		victim := filepath.Join(victims, name)
		if err := os.WriteFile(victim, []byte("precious\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(dir, name)
		if err := os.Symlink(victim, link); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(link, uid, gid); err != nil {
			t.Fatal(err)
		}
	}

	c := run(t, postgres.Options{Dir: dir})

	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(victims, name))
		if err != nil || string(b) != "precious\n" {
			t.Errorf("root wrote through the planted %s symlink: the target now holds %q (err %v)", name, b, err)
		}
	}
	for _, name := range []string{"port", "password"} {
		st, err := os.Lstat(filepath.Join(dir, name))
		if err != nil || !st.Mode().IsRegular() {
			t.Errorf("%s is not a regular file after start: %v %v", name, st, err)
		}
	}
	st, err := os.Lstat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 0 || st.Mode().Perm()&0o022 != 0 {
		t.Errorf("the cache dir is owned by uid %d with mode %v: the postgres user could still plant files where root writes", sys.Uid, st.Mode().Perm())
	}
	if got := c.DataDir(); !strings.HasPrefix(got, dir+string(filepath.Separator)) {
		t.Errorf("data dir %s, want it inside %s", got, dir)
	}
	// ReadURL (coder server postgres-builtin-url) reads what root wrote.
	if u, err := postgres.ReadURL(dir, "", ""); err != nil || u != c.URL() {
		t.Errorf("ReadURL = %q, %v; want the cluster's URL", u, err)
	}
}

// A cache dir below a directory the postgres user cannot traverse (like
// /root, mode 0700) is not made reachable by loosening that directory: the
// data goes to the shared directory instead.
func TestRootNeverLoosensParentDirectories(t *testing.T) {
	t.Parallel()
	requireRootWithPostgres(t)
	home := tempDir(t) // stands for /root: 0700
	if err := os.Chmod(home, 0o700); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(home, ".cache", "coder", "postgres")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	lib := tempDir(t) // stands for /var/lib: 0755
	if err := os.Chmod(lib, 0o755); err != nil {
		t.Fatal(err)
	}
	shared := filepath.Join(lib, "coder", "postgres")

	c := run(t, postgres.Options{Dir: dir, SharedDir: shared})

	for p := dir; p != filepath.Dir(home); p = filepath.Dir(p) {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if p != dir && st.Mode().Perm() != 0o700 {
			t.Errorf("%s changed to mode %v: a parent's permissions were loosened", p, st.Mode().Perm())
		}
	}
	if got := c.DataDir(); !strings.HasPrefix(got, shared+string(filepath.Separator)) {
		t.Errorf("data dir %s, want it under the shared directory %s", got, shared)
	}
	if _, err := os.Stat(filepath.Join(dir, "password")); err != nil {
		t.Errorf("the password is not kept in the cache dir: %v", err)
	}
}

// Cache directories the server creates itself (a first start) are made
// traversable, so the data stays in the cache dir.
func TestRootKeepsDataInACacheDirItCreates(t *testing.T) {
	t.Parallel()
	requireRootWithPostgres(t)
	base := tempDir(t)
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "cache", "coder", "postgres")
	shared := filepath.Join(tempDir(t), "shared")
	c := run(t, postgres.Options{Dir: dir, SharedDir: shared})
	if got := c.DataDir(); got != filepath.Join(dir, "data") {
		t.Errorf("data dir %s, want %s", got, filepath.Join(dir, "data"))
	}
	if _, err := os.Stat(shared); err == nil {
		t.Errorf("the shared directory was created although the cache dir is reachable")
	}
}

// startWithin runs f and fails the test if it has not returned within d;
// unblock then releases whatever f is stuck on so its goroutine ends.
func startWithin(t *testing.T, d time.Duration, what string, f func() error, unblock func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(d):
		unblock()
		<-done
		t.Fatalf("%s hung for %v on a file the postgres user planted", what, d)
	}
}

// openFifoAsOtherEnd unblocks a process stuck opening the FIFO at path.
func openFifoAsOtherEnd(path string, flag int) {
	f, err := os.OpenFile(path, flag|syscall.O_NONBLOCK, 0)
	if err == nil {
		_ = f.Close()
	}
}

// The postgres user owns the data directory (and owned the cache dir in
// older versions): a FIFO it plants where root reads or writes must not
// hang the server's start.
func TestRootIsNotStalledByAFifoThePostgresUserPlanted(t *testing.T) {
	t.Parallel()
	uid, gid := requireRootWithPostgres(t)
	dir := tempDir(t)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "postgres.log")
	if err := syscall.Mkfifo(logPath, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(logPath, uid, gid); err != nil {
		t.Fatal(err)
	}
	opts := postgres.Options{Dir: dir, Ephemeral: true}
	var c *postgres.Cluster
	startWithin(t, 60*time.Second, "start with a FIFO as the log file", func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		c, err = postgres.Run(ctx, opts)
		return err
	}, func() { openFifoAsOtherEnd(logPath, os.O_RDONLY) })
	data := c.DataDir()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}

	// The next start looks for a postmaster left by a killed predecessor.
	pidPath := filepath.Join(data, "postmaster.pid")
	if err := syscall.Mkfifo(pidPath, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(pidPath, uid, gid); err != nil {
		t.Fatal(err)
	}
	startWithin(t, 60*time.Second, "prepare with a FIFO as postmaster.pid", func() (err error) {
		c, err = postgres.New(opts)
		if err == nil {
			_ = c.Close()
		}
		return err
	}, func() { openFifoAsOtherEnd(pidPath, os.O_WRONLY) })
}

// A hard link the postgres user planted in the cache dir it owned in older
// versions (possible for any file with fs.protected_hardlinks=0) must not
// make root hand that file to the server as its log.
func TestRootDoesNotWriteThroughAHardLinkThePostgresUserPlanted(t *testing.T) {
	t.Parallel()
	uid, gid := requireRootWithPostgres(t)
	dir := tempDir(t)
	victims := tempDir(t)
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	names := []string{"postgres.log", "lock"}
	for _, name := range names {
		victim := filepath.Join(victims, name)
		if err := os.WriteFile(victim, []byte("precious\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Link(victim, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}

	run(t, postgres.Options{Dir: dir})

	for _, name := range names {
		b, err := os.ReadFile(filepath.Join(victims, name))
		if err != nil || string(b) != "precious\n" {
			t.Errorf("root wrote through the planted %s hard link: the target now holds %.200q (err %v)", name, b, err)
		}
		st, err := os.Stat(filepath.Join(victims, name))
		if err != nil {
			t.Fatal(err)
		}
		if n := st.Sys().(*syscall.Stat_t).Nlink; n != 1 {
			t.Errorf("%s is still linked into the cache dir (%d links)", name, n)
		}
	}
}
