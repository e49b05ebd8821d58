package database

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

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
	return o
}

// DB is the server's handle on Postgres: a pgx pool plus the queries run
// through it. It is safe for concurrent use.
//
// The pool heals itself after the server restarts or fails over, so that
// dead connections do not each cost a failed query:
//   - before a pooled connection is handed out, a non-blocking check of its
//     socket discards it if the server closed it (a restart sends every
//     session a goodbye and closes it);
//   - when a query finds its connection broken, or the server read-only
//     (SQLSTATE 25006: a standby, or an old primary behind an endpoint that
//     moved), every pooled connection is recycled;
//   - when a query times out with its connection, the idle connections
//     are pinged (PingTimeout) before use rather than recycled, since the
//     server may only be slow.
type DB struct {
	pool *pgxpool.Pool
	url  string
	log  *zap.Logger
	// brokenAt is when (unix nanoseconds) a broken connection or a
	// read-only server was last seen; connections idle since before then
	// are pinged before use.
	brokenAt atomic.Int64
	// lastRecycleLog rate-limits the WARN line (unix nanoseconds).
	lastRecycleLog atomic.Int64
	recycles       atomic.Int64
	// conns lets Close cut sockets a hung server never lets go of.
	conns connTracker
}

// Connect opens a pool to rawURL and checks that the server answers. A
// server that refuses connections is retried until opts.Timeout; a wrong
// password, database or URL fails at once. The returned error names the
// host and the cause and never contains the password.
func Connect(ctx context.Context, rawURL string, opts ConnectOptions) (*DB, error) {
	opts = opts.withDefaults()
	where := Describe(rawURL)
	cfg, err := pgxpool.ParseConfig(rawURL)
	if err != nil {
		return nil, fmt.Errorf("postgres URL %s is invalid: %s", where, Redact(rawURL, rootCause(err)))
	}
	cfg.MaxConns = opts.MaxConns
	db := &DB{url: rawURL, log: opts.Logger}
	// pgxpool pings a connection idle for more than a second before handing
	// it out: with a 5s heartbeat that is an extra round trip per beat.
	// Only long-idle connections are pinged, and every idle one after a
	// broken connection was seen; a closed socket is caught for free below.
	cfg.ShouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool {
		idleSince := time.Now().Add(-p.IdleDuration).UnixNano()
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
	cfg.ConnConfig.Tracer = healthTracer{db: db, next: cfg.ConnConfig.Tracer}
	cfg.ConnConfig.DialFunc = db.conns.wrap(cfg.ConnConfig.DialFunc)
	if cfg.ConnConfig.ConnectTimeout == 0 || cfg.ConnConfig.ConnectTimeout > 10*time.Second {
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()

	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgres at %s: %s", where, Redact(rawURL, rootCause(err)))
	}
	start := time.Now()
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
				return nil, fmt.Errorf("connect to postgres at %s: gave up after %s: %s", where, opts.Timeout, Redact(rawURL, rootCause(lastErr)))
			}
			return nil, fmt.Errorf("connect to postgres at %s: %s", where, Redact(rawURL, rootCause(err)))
		}
		if time.Since(lastLog) >= 5*time.Second {
			lastLog = time.Now()
			opts.Logger.Info("waiting for postgres", zap.String("address", where),
				zap.Duration("waited", time.Since(start).Round(time.Second)), zap.String("reason", Redact(rawURL, rootCause(err))))
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// healthTracer watches every query's outcome for the errors that mean the
// pool's connections are no good: a connection that broke, or a server
// that turned read-only.
type healthTracer struct {
	db   *DB
	next pgx.QueryTracer // a tracer the URL's config already had, or nil
}

func (h healthTracer) TraceQueryStart(ctx context.Context, conn *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	if h.next != nil {
		return h.next.TraceQueryStart(ctx, conn, data)
	}
	return ctx
}

func (h healthTracer) TraceQueryEnd(ctx context.Context, conn *pgx.Conn, data pgx.TraceQueryEndData) {
	if h.next != nil {
		h.next.TraceQueryEnd(ctx, conn, data)
	}
	if data.Err == nil {
		return
	}
	var pgErr *pgconn.PgError
	switch {
	case errors.As(data.Err, &pgErr) && pgErr.Code == "25006":
		h.db.recycle("the database is read-only (a standby, or a primary that was demoted)")
	case conn.IsClosed() && (pgconn.Timeout(data.Err) || errors.Is(data.Err, context.Canceled)):
		// Gave up waiting: the server may only be slow, and recycling
		// would add connection setup to its load. Check idle connections
		// before use instead.
		h.db.noteBroken()
	case conn.IsClosed():
		h.db.recycle("a connection broke: " + Redact(h.db.url, rootCause(data.Err)))
	}
}

// noteBroken records that a broken connection was seen, so idle
// connections are checked before use.
func (db *DB) noteBroken() { db.brokenAt.Store(time.Now().UnixNano()) }

// recycle closes every pooled connection (those in use when they are
// released), so the next queries run on new connections, and logs why at
// most once every 10 seconds.
func (db *DB) recycle(reason string) {
	db.noteBroken()
	db.recycles.Add(1)
	if db.pool != nil {
		db.pool.Reset()
	}
	now := time.Now().UnixNano()
	last := db.lastRecycleLog.Load()
	if now-last > int64(10*time.Second) && db.lastRecycleLog.CompareAndSwap(last, now) {
		db.log.Warn("recycling database connections", zap.String("address", Describe(db.url)), zap.String("reason", reason))
	}
}

// Recycles counts how often the pool recycled its connections because one
// broke or the server was read-only (tests and metrics read it).
func (db *DB) Recycles() int64 { return db.recycles.Load() }

// Pool is the underlying pgx pool, for packages (pubsub) that need raw
// access.
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// URL is the connection URL the pool was opened with. It contains the
// password: never log it; use Describe.
func (db *DB) URL() string { return db.url }

// Close closes the pool, within about 2 s even when the server hangs (it
// then closes the sockets without a goodbye). It is safe to call more than
// once.
func (db *DB) Close() {
	done := make(chan struct{})
	go func() {
		defer close(done)
		db.pool.Close()
	}()
	t := time.NewTimer(closeWait)
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
func (db *DB) Ping(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	_, err := db.pool.Exec(ctx, "SELECT 1")
	return time.Since(start), err
}

// retryable reports whether err means "the server is not there yet" rather
// than "the server said no".
func retryable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// 57P03: the database system is starting up.
		return pgErr.Code == "57P03"
	}
	msg := err.Error()
	for _, s := range []string{"connection refused", "no such host", "i/o timeout", "connection reset", "timeout", "network is unreachable", "server closed the connection"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// rootCause strips pgx's long prefixes ("failed to connect to `user=…`:")
// so the one-line error stays readable.
func rootCause(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return fmt.Sprintf("%s (SQLSTATE %s)", pgErr.Message, pgErr.Code)
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, "): "); i >= 0 && strings.HasPrefix(msg, "failed to connect") {
		msg = msg[i+3:]
	}
	return msg
}

// Describe renders a Postgres URL as host:port/database for messages,
// without the user's password.
func Describe(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		if cfg, err := pgconnParse(rawURL); err == nil {
			return fmt.Sprintf("%s:%d/%s", cfg.Host, cfg.Port, cfg.Database)
		}
		return "(unparsable URL)"
	}
	return u.Host + u.Path
}

func pgconnParse(s string) (*pgconn.Config, error) { return pgconn.ParseConfig(s) }

// Redact removes the password of rawURL from msg.
func Redact(rawURL, msg string) string {
	if u, err := url.Parse(rawURL); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			msg = strings.ReplaceAll(msg, pw, "xxxxx")
			msg = strings.ReplaceAll(msg, url.QueryEscape(pw), "xxxxx")
		}
	}
	if cfg, err := pgconn.ParseConfig(rawURL); err == nil && cfg.Password != "" {
		msg = strings.ReplaceAll(msg, cfg.Password, "xxxxx")
	}
	return msg
}
