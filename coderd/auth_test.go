package coderd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

// countingDB is the real database, counting the token lookups that reach
// it.
type countingDB struct {
	db      *database.DB
	queries atomic.Int64
}

func (c *countingDB) ValidateAPIKey(ctx context.Context, token string) error {
	c.queries.Add(1)
	return c.db.ValidateAPIKey(ctx, token)
}

func (c *countingDB) ExistingAPIKeyIDs(ctx context.Context, ids []string) ([]string, error) {
	c.queries.Add(1)
	return c.db.ExistingAPIKeyIDs(ctx, ids)
}

func authServer(t *testing.T, v *tokenValidator) *httptest.Server {
	srv := httptest.NewServer(v.requireToken(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
	})))
	t.Cleanup(srv.Close)
	return srv
}

func getWithToken(t *testing.T, url, token string) int {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Coder-Session-Token", token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err)
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// A flood of requests with fake (well-formed) tokens costs at most one
// database query per distinct token within the negative cache's TTL, even
// when they arrive all at once.
func TestFakeTokenFloodCostsOneQueryPerToken(t *testing.T) {
	t.Parallel()
	db := &countingDB{db: dbtest.NewDB(t)}
	good, err := db.db.CreateAPIKey(context.Background(), "test")
	if err != nil {
		t.Fatal(err)
	}
	srv := authServer(t, newTokenValidator(db, tokenValidatorOptions{InvalidTTL: time.Minute}))

	const distinct, each = 5, 40
	var wg sync.WaitGroup
	var unexpected atomic.Int64
	for i := 0; i < distinct; i++ {
		fake := fmt.Sprintf("fake%06d-notarealsecretatall", i)
		for j := 0; j < each; j++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if code := getWithToken(t, srv.URL, fake); code != http.StatusUnauthorized {
					unexpected.Add(1)
				}
			}()
		}
	}
	wg.Wait()
	if n := unexpected.Load(); n != 0 {
		t.Fatalf("%d fake-token requests were not answered 401", n)
	}
	if q := db.queries.Load(); q > distinct {
		t.Fatalf("%d fake-token requests (%d distinct tokens) ran %d database queries, want ≤ %d", distinct*each, distinct, q, distinct)
	}
	// A real token still works, and is cached too.
	before := db.queries.Load()
	for i := 0; i < 10; i++ {
		if code := getWithToken(t, srv.URL, good); code != http.StatusOK {
			t.Fatalf("a valid token got %d", code)
		}
	}
	if q := db.queries.Load() - before; q != 1 {
		t.Fatalf("10 requests with a valid token ran %d queries, want 1", q)
	}
}

// blockedDB never answers until released: a database whose every
// connection is stuck.
type blockedDB struct {
	release chan struct{}
	running atomic.Int64
	peak    atomic.Int64
}

func (b *blockedDB) ValidateAPIKey(ctx context.Context, token string) error {
	n := b.running.Add(1)
	defer b.running.Add(-1)
	for {
		p := b.peak.Load()
		if n <= p || b.peak.CompareAndSwap(p, n) {
			break
		}
	}
	select {
	case <-b.release:
		return database.ErrInvalidToken
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *blockedDB) ExistingAPIKeyIDs(ctx context.Context, ids []string) ([]string, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// Distinct fake tokens bypass the negative cache, so lookups are bounded:
// the pool keeps connections for heartbeats, and callers past the bound
// get "unavailable" (a 503 without database details).
func TestTokenLookupsAreBoundedSoFloodsCannotTakeThePool(t *testing.T) {
	t.Parallel()
	db := &blockedDB{release: make(chan struct{})}
	v := newTokenValidator(db, tokenValidatorOptions{MaxConcurrentLookups: 2, LookupWait: 200 * time.Millisecond})
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- v.check(context.Background(), fmt.Sprintf("fake%06d-secret", i))
		}()
	}
	// Unblock the two that got slots once the others have given up.
	deadline := time.Now().Add(30 * time.Second)
	for len(errs) < 18 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	close(db.release)
	wg.Wait()
	close(errs)
	var unavailable int
	for err := range errs {
		if errors.Is(err, errTokenCheckUnavailable) {
			unavailable++
		}
	}
	if p := db.peak.Load(); p > 2 {
		t.Fatalf("%d token lookups ran at once, want ≤ 2", p)
	}
	if unavailable != 18 {
		t.Fatalf("%d checks answered unavailable, want 18", unavailable)
	}
}

// Garbage in the token header (an id of bytes that are not UTF-8, which
// Postgres refuses to compare as text; unicode; a huge secret) is an
// invalid token like any other: 401, no database detail, no warning that
// the database is unavailable (it is not), and refused from the cache
// when repeated.
func TestGarbageTokensAreInvalidNotUnavailable(t *testing.T) {
	t.Parallel()
	db := &countingDB{db: dbtest.NewDB(t)}
	core, logs := observer.New(zap.InfoLevel)
	srv := authServer(t, newTokenValidator(db, tokenValidatorOptions{Logger: zap.New(core)}))
	for _, tok := range []string{
		"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6-secret", // a 10-byte id, not UTF-8
		"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9-secret", // a 10-byte id, UTF-8 (é×5)
		"abcde\xffghij-secret",
		"abcdefghij-\xff\xfe",
		"日本語日本-secret",
		"abcdefghij-" + strings.Repeat("s", 64<<10),
		"abcdefghij",
		"-",
	} {
		for i := 0; i < 2; i++ {
			req, _ := http.NewRequest(http.MethodGet, srv.URL, nil)
			req.Header["Coder-Session-Token"] = []string{tok}
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusUnauthorized {
				t.Errorf("token %q: %d %s, want 401", tok[:min(len(tok), 24)], res.StatusCode, body)
			}
			if strings.Contains(strings.ToLower(string(body)), "sqlstate") || strings.Contains(string(body), "UTF8") {
				t.Errorf("token %q: the answer leaks a database error: %s", tok[:min(len(tok), 24)], body)
			}
		}
	}
	if n := logs.FilterMessage("cannot check api tokens: the database is unavailable").Len(); n != 0 {
		t.Errorf("garbage tokens logged %d warnings that the database is unavailable", n)
	}
}
