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
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

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

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{} // closed when cmd exits
	closed bool          // Close was called: Start refuses
}

// errClosed is Start's answer after Close.
var errClosed = errors.New("postgres: the cluster is closed")

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
