package database

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

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
	// Logger receives a progress line every few seconds while waiting.
	// Default: no logging.
	Logger *zap.Logger
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
	return o
}

// DB is the server's handle on Postgres: a pgx pool plus the queries run
// through it. It is safe for concurrent use.
type DB struct {
	pool *pgxpool.Pool
	url  string
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
	// pgxpool pings a connection idle for more than a second before handing
	// it out: with a 5s heartbeat that is an extra round trip per beat.
	// Only long-idle connections are pinged; a dead one fails its query
	// and is replaced, and callers retry.
	cfg.ShouldPing = func(_ context.Context, p pgxpool.ShouldPingParams) bool {
		return p.IdleDuration > time.Minute
	}
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
			return &DB{pool: pool, url: rawURL}, nil
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

// Pool is the underlying pgx pool, for packages (pubsub) that need raw
// access.
func (db *DB) Pool() *pgxpool.Pool { return db.pool }

// URL is the connection URL the pool was opened with. It contains the
// password: never log it; use Describe.
func (db *DB) URL() string { return db.url }

// Close closes the pool. It is safe to call more than once.
func (db *DB) Close() { db.pool.Close() }

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
