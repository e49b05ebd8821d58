package database

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// healthTracer watches every query's outcome for the errors that mean the
// pool's connections are no good: a connection that broke, or a server
// that turned read-only. It also watches connection attempts for refused
// credentials (connectTracer).
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
	case conn.IsClosed() && pgconn.Timeout(data.Err):
		// Gave up waiting: the connection hung, or the server is only
		// slow, and recycling would add connection setup to its load.
		// Check the idle connections instead.
		h.db.CheckIdle()
	case conn.IsClosed() && errors.Is(data.Err, context.Canceled):
		h.db.noteBroken()
	case conn.IsClosed():
		h.db.recycle("a connection broke: " + h.db.src.Redact(rootCause(data.Err)))
	}
}

func (h healthTracer) TraceConnectStart(ctx context.Context, data pgx.TraceConnectStartData) context.Context {
	if t, ok := h.next.(pgx.ConnectTracer); ok {
		return t.TraceConnectStart(ctx, data)
	}
	return ctx
}

func (h healthTracer) TraceConnectEnd(ctx context.Context, data pgx.TraceConnectEndData) {
	if t, ok := h.next.(pgx.ConnectTracer); ok {
		t.TraceConnectEnd(ctx, data)
	}
	h.db.noteConnect(data.Err)
}

// connectTracer is the tracer of dedicated connections (OpenConn): it only
// watches connection attempts for refused credentials.
type connectTracer struct{ db *DB }

func (connectTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (connectTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (t connectTracer) TraceConnectStart(ctx context.Context, _ pgx.TraceConnectStartData) context.Context {
	return ctx
}
func (t connectTracer) TraceConnectEnd(_ context.Context, data pgx.TraceConnectEndData) {
	t.db.noteConnect(data.Err)
}

// noteConnect logs, once per episode, that the server refused the
// credentials of a new connection (a rotated password not yet in the URL
// file, or a file already holding one the server does not know yet), and
// when it accepts them again. The line names where the URL comes from,
// never the password.
func (db *DB) noteConnect(err error) {
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		if db.refused.Swap(false) {
			db.log.Info("postgres accepts this replica's credentials again", zap.String("database", db.src.Describe()),
				zap.String("url_from", db.src.Origin()))
		}
	case errors.As(err, &pgErr) && (pgErr.Code == "28P01" || pgErr.Code == "28000"):
		if !db.refused.Swap(true) {
			db.log.Warn("postgres refused the password of a new connection: retrying; open connections keep working",
				zap.String("database", db.src.Describe()), zap.String("url_from", db.src.Origin()),
				zap.String("reason", db.src.Redact(rootCause(err))))
		}
	}
}

// CheckIdle checks every idle pooled connection now: it takes them out
// of the pool at once (so no caller gets one meanwhile), pings them in
// parallel in the background (PingTimeout each), closes those that do not
// answer and gives back the others. Until it is done, any connection idle
// since before the call is pinged before use. It returns at once; while a
// check runs, another call only does the latter. The owner of a
// connection that hung (the LISTEN connection) calls it: the same path
// likely froze the pooled ones too.
func (db *DB) CheckIdle() {
	db.noteBroken()
	if db.pool == nil || !db.checking.CompareAndSwap(false, true) {
		return
	}
	conns := db.pool.AcquireAllIdle(context.Background())
	if len(conns) == 0 {
		db.checking.Store(false)
		return
	}
	db.checkWG.Add(1)
	go func() {
		defer db.checkWG.Done()
		defer db.checking.Store(false)
		var wg sync.WaitGroup
		var closed atomic.Int32
		for _, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				// Real time: a deadline on the driver's round trip.
				ctx, cancel := context.WithTimeout(context.Background(), db.opts.PingTimeout)
				err := c.Ping(ctx)
				cancel()
				if err == nil {
					c.Release()
					return
				}
				// Out of the pool and its socket closed at once: pgx's
				// own close would wait up to 15 s for a goodbye a frozen
				// path never delivers, holding a pool slot meanwhile.
				closed.Add(1)
				_ = c.Hijack().PgConn().Conn().Close()
			}()
		}
		wg.Wait()
		if n := closed.Load(); n > 0 {
			db.log.Warn("closed idle database connections that did not answer a ping", zap.String("address", db.src.Describe()),
				zap.Int32("closed", n), zap.Int("checked", len(conns)), zap.Duration("ping_timeout", db.opts.PingTimeout))
		}
	}()
}

// noteBroken records that a broken connection was seen, so idle
// connections are checked before use.
func (db *DB) noteBroken() { db.brokenAt.Store(db.opts.Clock.Now("database", "broken").UnixNano()) }

// recycle closes every pooled connection (those in use when they are
// released), so the next queries run on new connections, and logs why at
// most once every 10 seconds.
func (db *DB) recycle(reason string) {
	db.noteBroken()
	db.recycles.Add(1)
	if db.pool != nil {
		db.pool.Reset()
	}
	now := db.opts.Clock.Now("database", "recycle").UnixNano()
	last := db.lastRecycleLog.Load()
	if now-last > int64(10*time.Second) && db.lastRecycleLog.CompareAndSwap(last, now) {
		db.log.Warn("recycling database connections", zap.String("address", db.src.Describe()), zap.String("reason", reason))
	}
}

// Recycles counts how often the pool recycled its connections because one
// broke or the server was read-only (tests and metrics read it).
func (db *DB) Recycles() int64 { return db.recycles.Load() }
