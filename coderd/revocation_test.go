package coderd

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/internal/wait"
)

// revocationSetup is a validator following revocations on a real database
// (through a real LISTEN connection unless poll), trusting one token.
type revocationSetup struct {
	db    *countingDB
	ps    *pubsub.Pubsub
	v     *tokenValidator
	token string
	id    string
}

func setupRevocation(t *testing.T, poll bool) revocationSetup {
	t.Helper()
	ctx := context.Background()
	db := &countingDB{db: dbtest.NewDB(t)}
	token, err := db.db.CreateAPIKey(ctx, "ops")
	if err != nil {
		t.Fatal(err)
	}
	var ps *pubsub.Pubsub
	if !poll {
		ps, err = pubsub.New(ctx, db.db, pubsub.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ps.Close() })
	}
	v := newTokenValidator(db, tokenValidatorOptions{RecheckInterval: 100 * time.Millisecond})
	if err := v.followRevocations(ps); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	if err := v.check(ctx, token); err != nil {
		t.Fatalf("a new token is refused: %v", err)
	}
	id, _ := database.APIKeyID(token)
	return revocationSetup{db: db, ps: ps, v: v, token: token, id: id}
}

// refusedWithin waits until the validator refuses the token and returns
// how long that took.
func (r revocationSetup) refusedWithin(t *testing.T, what string) time.Duration {
	t.Helper()
	start := time.Now()
	wait.For(t, 30*time.Second, what, func() bool {
		return errors.Is(r.v.check(context.Background(), r.token), database.ErrInvalidToken)
	})
	return time.Since(start)
}

// A cached (trusted) token stops working as soon as it is revoked: the
// revocation's notification drops it from the cache.
func TestRevokedTokenIsRefusedAtOnce(t *testing.T) {
	t.Parallel()
	r := setupRevocation(t, false)
	// Trusted from the cache: no query.
	before := r.db.queries.Load()
	if err := r.v.check(context.Background(), r.token); err != nil || r.db.queries.Load() != before {
		t.Fatalf("a trusted token was not answered from the cache (err %v, %d queries)", err, r.db.queries.Load()-before)
	}
	if found, err := r.db.db.RevokeAPIKey(context.Background(), r.id); err != nil || !found {
		t.Fatalf("revoke: found %v, %v", found, err)
	}
	took := r.refusedWithin(t, "the revoked token to be refused")
	t.Logf("revoked token refused %v after the revocation committed", took.Round(time.Millisecond))
}

// A revocation whose notification was lost (it was sent while the LISTEN
// connection was down) still takes effect: the reconnect tells the
// validator notices may have been lost, and it checks the tokens it
// trusts against the database.
func TestRevocationNoticeLostWhileListenWasDownStillTakesEffect(t *testing.T) {
	t.Parallel()
	r := setupRevocation(t, false)
	ctx := context.Background()
	// Deleted behind the server's back: no notification at all.
	if _, err := r.db.db.Pool().Exec(ctx, `DELETE FROM api_keys WHERE id = $1`, r.id); err != nil {
		t.Fatal(err)
	}
	if err := r.v.check(ctx, r.token); err != nil {
		t.Fatalf("the token is no longer trusted before any notice: %v (the test assumes the cache)", err)
	}
	// The LISTEN connection breaks and comes back.
	pid := r.ps.BackendPID()
	if _, err := r.db.db.Pool().Exec(ctx, `SELECT pg_terminate_backend($1)`, int(pid)); err != nil {
		t.Fatal(err)
	}
	r.refusedWithin(t, "the token deleted while notices could have been lost to be refused")
}

// Without LISTEN (poll mode, PgBouncer in transaction pooling) a revoked
// token is refused within about the recheck interval.
func TestRevokedTokenIsRefusedInPollMode(t *testing.T) {
	t.Parallel()
	r := setupRevocation(t, true)
	if _, err := r.db.db.RevokeAPIKey(context.Background(), r.id); err != nil {
		t.Fatal(err)
	}
	took := r.refusedWithin(t, "the revoked token to be refused in poll mode")
	t.Logf("poll mode: revoked token refused %v after the revocation (recheck every 100ms)", took.Round(time.Millisecond))
}

// gatedDB answers token lookups from the real database, then holds the
// answer until released: a lookup that read the key just before it was
// revoked, and answers just after.
type gatedDB struct {
	*countingDB
	read    chan struct{}
	release chan struct{}
}

func (g *gatedDB) ValidateAPIKey(ctx context.Context, token string) error {
	err := g.countingDB.ValidateAPIKey(ctx, token)
	g.read <- struct{}{}
	<-g.release
	return err
}

// A lookup that read the key before its revocation must not put the token
// into the cache after the revocation's notice was applied: the next
// request asks the database again and is refused.
func TestLookupRacingARevocationDoesNotCacheTheToken(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	base := &countingDB{db: dbtest.NewDB(t)}
	token, err := base.db.CreateAPIKey(ctx, "ops")
	if err != nil {
		t.Fatal(err)
	}
	id, _ := database.APIKeyID(token)
	ps, err := pubsub.New(ctx, base.db, pubsub.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	db := &gatedDB{countingDB: base, read: make(chan struct{}, 1), release: make(chan struct{})}
	v := newTokenValidator(db, tokenValidatorOptions{})
	if err := v.followRevocations(ps); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)

	done := make(chan error, 1)
	go func() { done <- v.check(ctx, token) }()
	<-db.read // the lookup saw the key
	v.mu.Lock()
	forgets := v.forgets
	v.mu.Unlock()
	if _, err := base.db.RevokeAPIKey(ctx, id); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 30*time.Second, "the revocation notice to be applied", func() bool {
		v.mu.Lock()
		defer v.mu.Unlock()
		return v.forgets > forgets
	})
	close(db.release)
	if err := <-done; err != nil {
		t.Fatalf("the in-flight check: %v (it read the key before the revocation)", err)
	}
	if err := v.check(ctx, token); !errors.Is(err, database.ErrInvalidToken) {
		t.Fatalf("after the revocation the token gets %v, want refused (the racing lookup cached it)", err)
	}
}

// flakyDB is the real database, except that its first failures calls of
// ExistingAPIKeyIDs fail as a query does when the server refuses new
// connections (max_connections reached as the LISTEN connection took the
// last slot, a pool whose connections are all stuck).
type flakyDB struct {
	*countingDB
	failures atomic.Int64
}

func (f *flakyDB) ExistingAPIKeyIDs(ctx context.Context, ids []string) ([]string, error) {
	if f.failures.Add(-1) >= 0 {
		return nil, errors.New("FATAL: sorry, too many clients already (SQLSTATE 53300)")
	}
	return f.countingDB.ExistingAPIKeyIDs(ctx, ids)
}

// A revocation whose notice was lost still takes effect when the check the
// LISTEN reconnect triggers fails at first: the check is tried again until
// it gets an answer, rather than leaving the token trusted for the rest
// of its 5-minute TTL.
func TestRecheckAfterAGapIsRetriedUntilItAnswers(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	base := &countingDB{db: dbtest.NewDB(t)}
	token, err := base.db.CreateAPIKey(ctx, "ops")
	if err != nil {
		t.Fatal(err)
	}
	id, _ := database.APIKeyID(token)
	ps, err := pubsub.New(ctx, base.db, pubsub.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ps.Close() })
	db := &flakyDB{countingDB: base}
	v := newTokenValidator(db, tokenValidatorOptions{RecheckInterval: 100 * time.Millisecond})
	if err := v.followRevocations(ps); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Close)
	if err := v.check(ctx, token); err != nil {
		t.Fatalf("a new token is refused: %v", err)
	}
	// Deleted behind the server's back: no notification at all.
	if _, err := base.db.Pool().Exec(ctx, `DELETE FROM api_keys WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	db.failures.Store(2)
	pid := ps.BackendPID()
	if _, err := base.db.Pool().Exec(ctx, `SELECT pg_terminate_backend($1)`, int(pid)); err != nil {
		t.Fatal(err)
	}
	wait.For(t, 30*time.Second, "the token deleted while notices could have been lost to be refused, though the first checks failed", func() bool {
		return errors.Is(v.check(ctx, token), database.ErrInvalidToken)
	})
}
