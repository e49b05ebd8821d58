package database

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"
)

// ConnectOptions tunes Connect. The zero value is usable.
type ConnectOptions struct {
	// Timeout bounds how long Connect keeps trying an unreachable server
	// before it gives up with the last reason. Default 30s: long enough for
	// a database that is still starting, short enough that a wrong URL is
	// reported promptly.
	Timeout time.Duration
	// MaxConns caps the pool. Default 10; a replica needs few connections.
	MaxConns int32
	// Logger receives a progress line every few seconds while waiting, and
	// a WARN line when the pool recycles its connections (the server went
	// away or turned read-only). Default: no logging.
	Logger *zap.Logger
	// PingTimeout bounds the liveness ping of a pooled connection that is
	// checked before use (one idle for over a minute, or any idle one after
	// a broken connection was seen). Default 2s: a connection to a hung
	// server is replaced within that, instead of taking the caller's whole
	// deadline.
	PingTimeout time.Duration
	// Clock paces every local time decision of the DB: Connect's retry
	// pauses and progress lines, which idle connections count as older
	// than the last broken one, the rate of the recycling WARN line,
	// Close's give-up timer and Ping's round trip. Deadlines handed to the
	// driver or the kernel (Timeout, PingTimeout, the dial timeout) stay
	// on real time: they bound waits on the network. Timer tags start with
	// "database". Default: the real clock; tests step a quartz.Mock.
	Clock quartz.Clock
}

func (o ConnectOptions) withDefaults() ConnectOptions {
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 10
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.PingTimeout <= 0 {
		o.PingTimeout = 2 * time.Second
	}
	if o.Clock == nil {
		o.Clock = quartz.NewReal()
	}
	return o
}

// DB is the server's handle on Postgres: a pgx pool plus the queries run
// through it. It is safe for concurrent use.
//
// Every connection it opens (pooled, or dedicated through OpenConn) takes
// the URL from its URLSource at that moment, so a password rotated through
// --postgres-url-file applies to every connection opened afterwards.
//
// Statements are sent with pgx's "exec" mode unless the URL names a
// default_query_exec_mode: one round trip per statement on the unnamed
// prepared statement, nothing kept on the server between transactions,
// so a plain URL works through PgBouncer in transaction pooling (pgx's own
// default prepares named statements per connection, which a pooler hands
// to other clients: "prepared statement stmtcache_… already exists").
// docs/performance.md has what it costs.
//
// The pool heals itself after the server restarts or fails over, so that
// dead connections do not each cost a failed query:
//   - before a pooled connection is handed out, a non-blocking check of its
//     socket discards it if the server closed it (a restart sends every
//     session a goodbye and closes it);
//   - when a query finds its connection broken, or the server read-only
//     (SQLSTATE 25006: a standby, or an old primary behind an endpoint that
//     moved), every pooled connection is recycled;
//   - when a query times out with its connection (or the LISTEN
//     connection stops answering, see CheckIdle), the idle connections are
//     checked at once, in the background and in parallel (a ping of
//     PingTimeout each), and those that do not answer are closed: after a
//     network path froze (a middlebox that lost the connections' state, a
//     stalled proxy) the next queries get working connections instead of
//     each waiting out a silent one. Connections that answer are kept (the
//     server may only be slow), and any idle since then is pinged before
//     use until the check is done.
type DB struct {
	pool *pgxpool.Pool
	src  *URLSource
	log  *zap.Logger
	opts ConnectOptions
	// brokenAt is when (unix nanoseconds) a broken connection or a
	// read-only server was last seen; connections idle since before then
	// are pinged before use.
	brokenAt atomic.Int64
	// lastRecycleLog rate-limits the WARN line (unix nanoseconds).
	lastRecycleLog atomic.Int64
	recycles       atomic.Int64
	// conns lets Close cut sockets a hung server never lets go of.
	conns connTracker
	// checking is set while CheckIdle's pings run (one check at a time);
	// checkWG waits for them in Close.
	checking atomic.Bool
	checkWG  sync.WaitGroup

	// cfgMu guards the connection config last built from the source.
	cfgMu   sync.Mutex
	cfgURL  string
	cfgConn *pgx.ConnConfig
	// refused and unreadable latch the WARN lines about credentials the
	// server refused and a URL file that cannot be read, so each is
	// logged once per episode (and its end once).
	refused    atomic.Bool
	unreadable atomic.Bool
}

// connectRetryPause is Connect's pause between attempts while the server
// is not there yet.
const connectRetryPause = 250 * time.Millisecond

// Connect opens a pool to rawURL and checks that the server answers. A
// server that refuses connections is retried until opts.Timeout; a wrong
// password, database or URL fails at once. The returned error names the
// host and the cause and never contains the password.
func Connect(ctx context.Context, rawURL string, opts ConnectOptions) (*DB, error) {
	return ConnectSource(ctx, StaticURL(rawURL), opts)
}

// ConnectSource is Connect with the URL taken from src whenever a
// connection is opened (see URLSource): the first URL must work; a later
// one that does not (a refused password, an unreadable file) fails the
// connections opened with it, each logged once, until it works again,
// while the connections already open keep serving.
func ConnectSource(ctx context.Context, src *URLSource, opts ConnectOptions) (*DB, error) {
	opts = opts.withDefaults()
	rawURL, err := src.Read()
	if err != nil {
		return nil, err
	}
	where := Describe(rawURL)
	db := &DB{src: src, log: opts.Logger, opts: opts}
	cfg, err := db.poolConfig(rawURL)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = opts.MaxConns
	// pgxpool pings a connection idle for more than a second before handing
	// it out: with a 5s heartbeat that is an extra round trip per beat.
	// Only long-idle connections are pinged, and every idle one after a
	// broken connection was seen; a closed socket is caught for free below.
	cfg.ShouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool {
		// pgxpool measures the idle time on real time; when it started is
		// compared with brokenAt on the DB's clock.
		idleSince := opts.Clock.Now("database", "idle").Add(-p.IdleDuration).UnixNano()
		return p.IdleDuration > time.Minute || idleSince <= db.brokenAt.Load()
	}
	cfg.PingTimeout = opts.PingTimeout
	cfg.PrepareConn = func(_ context.Context, c *pgx.Conn) (bool, error) {
		if !socketAlive(c.PgConn().Conn()) {
			db.noteBroken()
			return false, nil // destroyed; the pool tries another
		}
		return true, nil
	}
	if src.Path() != "" {
		// Each new pooled connection reads the file again.
		cfg.BeforeConnect = func(_ context.Context, cc *pgx.ConnConfig) error {
			fresh, err := db.ConnConfig()
			if err != nil {
				return err
			}
			*cc = *fresh
			return nil
		}
	}
	// Real time: the deadline also bounds the driver's dials and pings.
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres at %s: %s", where, src.Redact(rootCause(err)))
	}
	clock := opts.Clock
	start := clock.Now("database", "connect")
	lastLog := start
	var lastErr error // the last reason that was not our own deadline
	for {
		err = pool.Ping(ctx)
		if err == nil {
			db.pool = pool
			return db, nil
		}
		if ctx.Err() == nil || lastErr == nil {
			lastErr = err
		}
		if !retryable(err) || ctx.Err() != nil {
			pool.Close()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("connect to postgres at %s: gave up after %s: %s", where, opts.Timeout, src.Redact(rootCause(lastErr)))
			}
			return nil, fmt.Errorf("connect to postgres at %s: %s", where, src.Redact(rootCause(err)))
		}
		if clock.Since(lastLog, "database", "connect") >= 5*time.Second {
			lastLog = clock.Now("database", "connect")
			opts.Logger.Info("waiting for postgres", zap.String("address", where),
				zap.Duration("waited", clock.Since(start, "database", "connect").Round(time.Second)), zap.String("reason", src.Redact(rootCause(err))))
		}
		t := clock.NewTimer(connectRetryPause, "database", "connect")
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}
}

// poolConfig parses rawURL and applies the server's connection policy:
// the statement mode (exec unless the URL names one), the health tracer,
// socket tracking and the connect timeout.
func (db *DB) poolConfig(rawURL string) (*pgxpool.Config, error) {
	if unencodedUserinfo(rawURL) {
		return nil, fmt.Errorf("postgres URL is invalid: %w", errUnencodedUserinfo)
	}
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		return nil, fmt.Errorf("postgres URL %s is invalid: %s", Describe(rawURL), db.src.Redact(Redact(rawURL, rootCause(err))))
	}
	cc := cfg.ConnConfig
	if !explicitExecMode(rawURL) {
		cc.DefaultQueryExecMode = pgx.QueryExecModeExec
	}
	cc.Tracer = healthTracer{db: db, next: cc.Tracer}
	cc.DialFunc = db.conns.wrap(cc.DialFunc)
	if cc.ConnectTimeout == 0 || cc.ConnectTimeout > 10*time.Second {
		cc.ConnectTimeout = 10 * time.Second
	}
	return cfg, nil
}

// explicitExecMode reports whether the connection string names pgx's
// default_query_exec_mode (the operator chose; the server respects it).
func explicitExecMode(rawURL string) bool {
	c, err := pgconn.ParseConfig(rawURL)
	if err != nil {
		return false
	}
	_, ok := c.RuntimeParams["default_query_exec_mode"]
	return ok
}

// ConnConfig is the configuration a new connection is opened with now:
// the source's URL as it reads at this moment (a file is read again), with
// the server's policy applied. The caller may modify the copy it gets.
// An unreadable file or an invalid URL is an error naming the path, never
// its contents; it is logged once until the file reads again.
func (db *DB) ConnConfig() (*pgx.ConnConfig, error) {
	rawURL, err := db.src.Read()
	if err != nil {
		if !db.unreadable.Swap(true) {
			db.log.Warn("cannot read the postgres URL: new connections fail until it reads again (open connections keep working)",
				zap.String("url_from", db.src.Origin()), zap.String("reason", err.Error()))
		}
		return nil, err
	}
	if db.unreadable.Swap(false) {
		db.log.Info("the postgres URL reads again", zap.String("url_from", db.src.Origin()))
	}
	db.cfgMu.Lock()
	defer db.cfgMu.Unlock()
	if db.cfgConn == nil || rawURL != db.cfgURL {
		cfg, err := db.poolConfig(rawURL)
		if err != nil {
			return nil, err
		}
		if db.cfgConn != nil {
			db.log.Info("the postgres URL changed: new connections use it", zap.String("url_from", db.src.Origin()),
				zap.String("database", Describe(rawURL)))
		}
		db.cfgURL, db.cfgConn = rawURL, cfg.ConnConfig
	}
	return db.cfgConn.Copy(), nil
}

// OpenConn opens a dedicated connection, outside the pool, with the URL
// as the source reads now (the LISTEN connection uses it). The caller
// closes it. Errors never contain the password.
func (db *DB) OpenConn(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := db.ConnConfig()
	if err != nil {
		return nil, err
	}
	// Not a pooled connection: the pool's query health rules do not apply,
	// only the credential warnings.
	cfg.Tracer = connectTracer{db: db}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres at %s: %s", db.src.Describe(), db.src.Redact(rootCause(err)))
	}
	return conn, nil
}

// Pool is the underlying pgx pool, for packages (pubsub) that need raw
// access.
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// URL is the connection URL as the source reads now (the last URL read, if
// the file cannot be read at the moment). It contains the password: never
// log it; use Describe or Redact.
func (db *DB) URL() string {
	if u, err := db.src.Read(); err == nil {
		return u
	}
	return db.src.Last()
}

// Source is where the connection URL comes from.
func (db *DB) Source() *URLSource { return db.src }

// Describe names the database (host:port/database) for messages.
func (db *DB) Describe() string { return db.src.Describe() }

// Redact removes every password of the connection URL (current and
// rotated out) from msg.
func (db *DB) Redact(msg string) string { return db.src.Redact(msg) }

// Close closes the pool, within about 2 s even when the server hangs (it
// then closes the sockets without a goodbye). It is safe to call more than
// once.
func (db *DB) Close() {
	done := make(chan struct{})
	go func() {
		defer close(done)
		db.pool.Close()
		db.checkWG.Wait()
	}()
	t := db.opts.Clock.NewTimer(closeWait, "database", "close")
	defer t.Stop()
	select {
	case <-done:
		return
	case <-t.C:
	}
	db.conns.closeAll()
	<-done
}

// Ping measures one round trip to the database.
// It is timed on the DB's clock, as replicasync times its round trips.
func (db *DB) Ping(ctx context.Context) (time.Duration, error) {
	start := db.opts.Clock.Now("database", "ping")
	_, err := db.pool.Exec(ctx, "SELECT 1")
	return db.opts.Clock.Since(start, "database", "ping"), err
}
