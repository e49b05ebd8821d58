package coderd

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
	"tailscale.com/util/lru"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/wire"
)

// apiKeyChecker is what token checks need from the database.
type apiKeyChecker interface {
	// ValidateAPIKey returns nil for a valid token,
	// database.ErrInvalidToken for one that does not authenticate, and any
	// other error when the database could not answer.
	ValidateAPIKey(ctx context.Context, token string) error
	// ExistingAPIKeyIDs returns which of ids still name a key.
	ExistingAPIKeyIDs(ctx context.Context, ids []string) ([]string, error)
}

// tokenValidatorOptions tunes a tokenValidator; zero fields get the
// defaults noted.
type tokenValidatorOptions struct {
	// ValidTTL: an accepted token is trusted this long without asking the
	// database, so operators keep API access through a short Postgres
	// outage. A revocation ends the trust at once (see followRevocations);
	// the TTL is the last resort should one go unnoticed. Default 5m.
	ValidTTL time.Duration
	// InvalidTTL: a refused token is refused this long without asking the
	// database, so a flood of bad tokens costs one query per distinct
	// token. Default 30s (a token created meanwhile works after that).
	InvalidTTL time.Duration
	// CacheSize bounds each cache (least recently used out). Default 10000.
	CacheSize int
	// MaxConcurrentLookups bounds the database queries token checks run at
	// once, so a flood of distinct fake tokens cannot take the pool's
	// connections from heartbeats. Default 2.
	MaxConcurrentLookups int
	// LookupWait is how long a check waits for a lookup slot before
	// answering 503. Default 5s.
	LookupWait time.Duration
	// RecheckInterval is how often, without LISTEN (poll mode), the
	// accepted tokens are checked against the database in one query, so a
	// revocation takes effect within it there too. Default 1s, the poll
	// mode's own pace: one indexed query a second while any token is
	// cached, none otherwise.
	RecheckInterval time.Duration
	// Logger gets database failures (never the token). Default no-op.
	Logger *zap.Logger
	// Clock decides the TTLs, the lookup wait, the recheck pace and the
	// failure-log pace. Default: the real clock.
	Clock quartz.Clock
}

// tokenValidator checks API tokens against the database with a cache of
// accepted and of refused tokens (keyed by the token's SHA-256, never the
// token itself; accepted ones also by their key id, so a revocation can
// name them), one lookup at a time per token, and a bound on concurrent
// lookups.
type tokenValidator struct {
	db   apiKeyChecker
	opts tokenValidatorOptions
	sem  chan struct{}

	flight singleflight.Group

	mu      sync.Mutex
	valid   lru.Cache[string, trusted]     // guarded by mu: key id → accepted token
	invalid lru.Cache[[32]byte, time.Time] // guarded by mu: hash → refused until
	// forgets counts revocations applied (guarded by mu): a lookup that
	// began before one does not cache its answer, which may predate it.
	forgets uint64
	lastLog time.Time // guarded by mu: last database failure logged

	// The revocation feed, from followRevocations until Close.
	stopFollow  context.CancelFunc
	unsubscribe func()
	followDone  sync.WaitGroup
	closeOnce   sync.Once
}

// trusted is an accepted token: its hash, and until when it is trusted.
type trusted struct {
	sum   [32]byte
	until time.Time
}

// errTokenCheckUnavailable is a check that could not reach a verdict: the
// database failed or every lookup slot stayed busy.
var errTokenCheckUnavailable = errors.New("token check unavailable")

func newTokenValidator(db apiKeyChecker, opts tokenValidatorOptions) *tokenValidator {
	if opts.ValidTTL <= 0 {
		opts.ValidTTL = 5 * time.Minute
	}
	if opts.InvalidTTL <= 0 {
		opts.InvalidTTL = 30 * time.Second
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = 10_000
	}
	if opts.MaxConcurrentLookups <= 0 {
		opts.MaxConcurrentLookups = 2
	}
	if opts.LookupWait <= 0 {
		opts.LookupWait = 5 * time.Second
	}
	if opts.RecheckInterval <= 0 {
		opts.RecheckInterval = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Clock == nil {
		opts.Clock = quartz.NewReal()
	}
	v := &tokenValidator{db: db, opts: opts, sem: make(chan struct{}, opts.MaxConcurrentLookups), stopFollow: func() {}}
	v.valid.MaxEntries = opts.CacheSize
	v.invalid.MaxEntries = opts.CacheSize
	return v
}

// check returns nil for a valid token, database.ErrInvalidToken for an
// invalid one, and errTokenCheckUnavailable when no verdict could be had.
func (v *tokenValidator) check(ctx context.Context, token string) error {
	sum := sha256.Sum256([]byte(token))
	id, _ := database.APIKeyID(token)
	now := v.opts.Clock.Now()
	v.mu.Lock()
	if t, ok := v.valid.GetOk(id); ok && t.sum == sum && now.Before(t.until) {
		v.mu.Unlock()
		return nil
	}
	if until, ok := v.invalid.GetOk(sum); ok && now.Before(until) {
		v.mu.Unlock()
		return database.ErrInvalidToken
	}
	v.mu.Unlock()

	_, err, _ := v.flight.Do(string(sum[:]), func() (any, error) {
		return nil, v.lookup(sum, id, token)
	})
	return err
}

// lookup asks the database (under the concurrency bound) and caches the
// verdict. It runs detached from any one request so that a caller giving
// up does not fail the others waiting on the same token.
func (v *tokenValidator) lookup(sum [32]byte, id, token string) error {
	ctx, cancel := context.WithTimeout(context.Background(), v.opts.LookupWait+5*time.Second)
	defer cancel()
	wait := v.opts.Clock.NewTimer(v.opts.LookupWait, "tokenValidator", "lookupWait")
	defer wait.Stop()
	select {
	case v.sem <- struct{}{}:
	case <-wait.C:
		v.logFailure(errors.New("every token lookup slot stayed busy"))
		return errTokenCheckUnavailable
	}
	v.mu.Lock()
	forgets := v.forgets
	v.mu.Unlock()
	err := v.db.ValidateAPIKey(ctx, token)
	<-v.sem
	now := v.opts.Clock.Now()
	switch {
	case err == nil:
		v.mu.Lock()
		if v.forgets == forgets {
			v.valid.Set(id, trusted{sum: sum, until: now.Add(v.opts.ValidTTL)})
		}
		v.invalid.Delete(sum)
		v.mu.Unlock()
		return nil
	case errors.Is(err, database.ErrInvalidToken):
		v.mu.Lock()
		v.invalid.Set(sum, now.Add(v.opts.InvalidTTL))
		v.mu.Unlock()
		return database.ErrInvalidToken
	default:
		v.logFailure(err)
		return errTokenCheckUnavailable
	}
}

// followRevocations makes a revoked token stop working at once. With ps
// (LISTEN), each revocation notice (database.APIKeyRevokedChannel) drops
// that key's token, and a gap in the notices (ps re-established its
// connection: notices sent meanwhile are lost) makes the validator check
// every token it trusts against the database in one query, again every
// RecheckInterval until that check gets an answer. Without ps (poll mode)
// it does that every RecheckInterval. While checks fail (the database is
// down) tokens stay trusted until their TTL, as in any outage. Close stops
// it.
func (v *tokenValidator) followRevocations(ps *pubsub.Pubsub) error {
	ctx, cancel := context.WithCancel(context.Background())
	v.stopFollow = cancel
	if ps != nil {
		gaps := make(chan struct{}, 1)
		unsub, err := ps.Subscribe(database.APIKeyRevokedChannel, func(_ context.Context, payload []byte, err error) {
			switch {
			case errors.Is(err, pubsub.ErrDroppedMessages):
				select {
				case gaps <- struct{}{}:
				default: // a check is due already
				}
			case err == nil:
				v.forget(string(payload))
			}
		})
		if err != nil {
			cancel()
			return fmt.Errorf("follow token revocations: %w", err)
		}
		v.unsubscribe = unsub
		v.followDone.Add(1)
		go v.recheckAfterGaps(ctx, gaps)
		return nil
	}
	v.followDone.Add(1)
	go func() {
		defer v.followDone.Done()
		t := v.opts.Clock.NewTicker(v.opts.RecheckInterval, "tokenValidator", "recheck")
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				v.recheck(ctx)
			}
		}
	}()
	return nil
}

// Close stops following revocations and waits. It is safe to call more
// than once, and without followRevocations.
func (v *tokenValidator) Close() {
	v.closeOnce.Do(func() {
		v.stopFollow()
		if v.unsubscribe != nil {
			v.unsubscribe()
		}
		v.followDone.Wait()
	})
}

// recheckAfterGaps checks the trusted tokens after each gap in the
// revocation notices, and again every RecheckInterval until a check gets
// an answer (the database may still be failing right after the LISTEN
// connection came back). It runs apart from the notices, so a slow check
// never delays one. It returns when ctx ends.
func (v *tokenValidator) recheckAfterGaps(ctx context.Context, gaps <-chan struct{}) {
	defer v.followDone.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-gaps:
		}
		for !v.recheck(ctx) {
			t := v.opts.Clock.NewTimer(v.opts.RecheckInterval, "tokenValidator", "recheckAfterGap")
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// forget stops trusting the token of key id.
func (v *tokenValidator) forget(id string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.valid.Delete(id)
	v.forgets++
}

// recheck asks the database which of the trusted tokens' keys still exist
// and forgets the others. Nothing to check: no query. It reports whether
// the database answered (or there was nothing to ask).
func (v *tokenValidator) recheck(ctx context.Context) bool {
	v.mu.Lock()
	ids := make([]string, 0, v.valid.Len())
	v.valid.ForEach(func(id string, _ trusted) { ids = append(ids, id) })
	v.mu.Unlock()
	if len(ids) == 0 {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, v.opts.LookupWait+5*time.Second)
	defer cancel()
	existing, err := v.db.ExistingAPIKeyIDs(ctx, ids)
	if err != nil {
		if ctx.Err() == nil {
			v.logFailure(err)
		}
		return false
	}
	still := make(map[string]bool, len(existing))
	for _, id := range existing {
		still[id] = true
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, id := range ids {
		if !still[id] {
			v.valid.Delete(id)
			v.forgets++
		}
	}
	return true
}

// logFailure logs why token checks fail, at most every 10 seconds: the
// detail stays server-side, the caller gets a generic 503.
func (v *tokenValidator) logFailure(err error) {
	v.mu.Lock()
	now := v.opts.Clock.Now()
	if now.Sub(v.lastLog) < 10*time.Second {
		v.mu.Unlock()
		return
	}
	v.lastLog = now
	v.mu.Unlock()
	v.opts.Logger.Warn("cannot check api tokens: the database is unavailable", zap.Error(err))
}

// tokenFromRequest reads "Authorization: Bearer <t>" or
// "Coder-Session-Token: <t>".
func tokenFromRequest(r *http.Request) string {
	if t := r.Header.Get(wire.SessionTokenHeader); t != "" {
		return strings.TrimSpace(t)
	}
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// requireToken answers 401 with a JSON message unless the request carries a
// valid API token, and 503 with a generic message when the database cannot
// say: a caller without a valid token never sees database details.
func (v *tokenValidator) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := tokenFromRequest(r)
		if token == "" {
			writeError(w, http.StatusUnauthorized, "Authentication required: send an API token in the Authorization (Bearer) or "+wire.SessionTokenHeader+" header.", "create one with: coder server create-token")
			return
		}
		if err := v.check(r.Context(), token); err != nil {
			if errors.Is(err, database.ErrInvalidToken) {
				writeError(w, http.StatusUnauthorized, "Invalid API token.", "")
				return
			}
			w.Header().Set("Retry-After", "5")
			writeError(w, http.StatusServiceUnavailable, "Could not check the API token right now; try again shortly.", "")
			return
		}
		next.ServeHTTP(w, r)
	})
}
