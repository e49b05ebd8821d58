// Package postgres runs a local PostgreSQL cluster from the machine's server
// binaries: the built-in database of a server started without
// --postgres-url, and the throwaway clusters tests use.
//
// It owns the postmaster process it starts and stops it on Stop. It listens
// on loopback only and never prints its password. As root it runs the
// server as the "postgres" user, because initdb and postgres refuse root,
// and keeps the two apart: root writes only in directories root owns (Dir
// itself is root's; only the data directory belongs to postgres, and root
// never writes there), and it never changes the permissions of a parent
// directory such as /root. When the postgres user cannot reach Dir, the
// data directory goes under Options.SharedDir instead (see dataLocation).
package postgres

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
)

// Options configures a Cluster. Only DataDir is required.
type Options struct {
	// Dir holds everything the cluster keeps: data/ (PGDATA), the password,
	// the port, the server log and a lock file. Created if missing.
	Dir string
	// Database is created on first start. Default "coder".
	Database string
	// User is the superuser initdb creates. Default "coder".
	User string
	// Port to listen on. Default: the port this Dir used last time if it is
	// still free, else any free port.
	Port int
	// BinDir holds initdb and postgres. Default: FindBinDir().
	BinDir string
	// Ephemeral trades durability for speed (fsync off): for tests only.
	Ephemeral bool
	// MaxConnections of the server. Default 300: many replicas can share a
	// built-in database on one machine.
	MaxConnections int
	// SharedDir is used only as root, when the postgres user cannot reach
	// Dir (Dir is under /root, say): the data directory is then created
	// under it, named after Dir. It must sit below directories everyone may
	// traverse; it is created root-owned. Default /var/lib/coder/postgres.
	SharedDir string
	// Logger receives progress lines. Default: none.
	Logger *zap.Logger
}

func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		return o, errors.New("postgres: Dir is required")
	}
	if o.Database == "" {
		o.Database = "coder"
	}
	if o.User == "" {
		o.User = "coder"
	}
	if o.MaxConnections == 0 {
		o.MaxConnections = 300
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.SharedDir == "" {
		o.SharedDir = "/var/lib/coder/postgres"
	}
	if o.BinDir == "" {
		dir, err := FindBinDir()
		if err != nil {
			return o, err
		}
		o.BinDir = dir
	}
	abs, err := filepath.Abs(o.Dir)
	if err != nil {
		return o, fmt.Errorf("postgres: %w", err)
	}
	o.Dir = abs
	return o, nil
}

// ErrNoBinaries means the PostgreSQL server binaries are not installed.
var ErrNoBinaries = errors.New("PostgreSQL server binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: apt-get install -y postgresql) or pass --postgres-url")

// FindBinDir finds the directory holding initdb and postgres: PATH first,
// then the newest /usr/lib/postgresql/*/bin.
func FindBinDir() (string, error) {
	if p, err := exec.LookPath("initdb"); err == nil {
		dir := filepath.Dir(p)
		if _, err := os.Stat(filepath.Join(dir, "postgres")); err == nil {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	return "", ErrNoBinaries
}

func versionOf(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

// Cluster is one local PostgreSQL server. Start and Stop may be called
// repeatedly (tests stop and restart the database); Close stops it for good.
type Cluster struct {
	opts     Options
	password string
	port     int
	cred     *syscall.Credential // the postgres user when we run as root
	data     string              // PGDATA
	lock     *os.File

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd exits
}

// New prepares the cluster in opts.Dir: takes the directory's lock (so two
// servers never run one data directory), runs initdb on first use, and
// clears what a killed predecessor left behind. It does not start the server.
func New(opts Options) (*Cluster, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	c := &Cluster{opts: opts, data: filepath.Join(opts.Dir, "data")}
	// As root, directories we create on the way may be traversed (never
	// listed) by others, so the postgres user can reach the data below
	// them; existing directories are left as they are.
	perm := os.FileMode(0o700)
	if os.Geteuid() == 0 {
		perm = 0o711
	}
	if err := os.MkdirAll(opts.Dir, perm); err != nil {
		return nil, fmt.Errorf("postgres: create %s: %w", opts.Dir, err)
	}
	if os.Geteuid() == 0 {
		if c.cred, err = postgresUser(); err != nil {
			return nil, err
		}
		if err := c.rootLayout(); err != nil {
			return nil, err
		}
	}
	if err := c.takeLock(); err != nil {
		return nil, err
	}
	if err := c.prepare(); err != nil {
		c.releaseLock()
		return nil, err
	}
	return c, nil
}

// Run is New followed by Start.
func Run(ctx context.Context, opts Options) (*Cluster, error) {
	c, err := New(opts)
	if err != nil {
		return nil, err
	}
	if err := c.Start(ctx); err != nil {
		c.releaseLock()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) dataDir() string { return c.data }

// DataDir is the cluster's data directory (PGDATA).
func (c *Cluster) DataDir() string { return c.data }

// URL is the connection URL of the cluster's database, with the password.
func (c *Cluster) URL() string { return c.DatabaseURL(c.opts.Database) }

// DatabaseURL is the connection URL of another database of this cluster.
func (c *Cluster) DatabaseURL(db string) string {
	return BuildURL(c.opts.User, c.password, c.port, db)
}

// Port is the TCP port the cluster listens on, on 127.0.0.1.
func (c *Cluster) Port() int { return c.port }

// BuildURL renders a loopback Postgres URL.
func BuildURL(user, password string, port int, db string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(user, password),
		Host:     net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Path:     "/" + db,
		RawQuery: "sslmode=disable",
	}
	return u.String()
}

// ReadURL returns the URL of the built-in cluster kept in dir, from the
// password and port it saved, without starting anything.
func ReadURL(dir, database, user string) (string, error) {
	if database == "" {
		database = "coder"
	}
	if user == "" {
		user = "coder"
	}
	pw, err := readFileNoFollow(filepath.Join(dir, "password"))
	if err != nil {
		return "", fmt.Errorf("read built-in postgres password (has a server with this cache dir run yet?): %w", err)
	}
	portText, err := readFileNoFollow(filepath.Join(dir, "port"))
	if err != nil {
		return "", fmt.Errorf("read built-in postgres port: %w", err)
	}
	port, err := strconv.Atoi(strings.TrimSpace(string(portText)))
	if err != nil {
		return "", fmt.Errorf("read built-in postgres port: %w", err)
	}
	return BuildURL(user, strings.TrimSpace(string(pw)), port, database), nil
}

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

// Start starts the server and waits until it accepts connections, creating
// the database on first start.
func (c *Cluster) Start(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
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

// Close stops the server and releases the data directory.
func (c *Cluster) Close() error {
	err := c.Stop()
	c.releaseLock()
	return err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
