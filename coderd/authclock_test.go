package coderd

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/coder/quartz"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/dbtest"
)

// The token caches run on the injected clock: an accepted token is trusted
// without asking the database until ValidTTL has passed, and a refused one
// is refused without asking until InvalidTTL has passed; then the database
// is asked again. Stepped on a quartz mock, not slept through.
func TestTokenVerdictsExpireOnTheInjectedClock(t *testing.T) {
	t.Parallel()
	db := &countingDB{db: dbtest.NewDB(t)}
	ctx := context.Background()
	good, err := db.db.CreateAPIKey(ctx, "clock")
	if err != nil {
		t.Fatal(err)
	}
	const fake = "fake000001-notarealsecretatall"
	clock := quartz.NewMock(t)
	v := newTokenValidator(db, tokenValidatorOptions{ValidTTL: time.Minute, InvalidTTL: 10 * time.Second, Clock: clock})
	t.Cleanup(v.Close)

	check := func(token string, want error) {
		t.Helper()
		if err := v.check(ctx, token); !errors.Is(err, want) {
			t.Fatalf("check: got %v, want %v", err, want)
		}
	}
	queries := func() int64 { return db.queries.Load() }

	check(good, nil)
	check(fake, database.ErrInvalidToken)
	if q := queries(); q != 2 {
		t.Fatalf("first checks ran %d queries, want 2", q)
	}

	// Within both TTLs: answered from the caches.
	clock.Advance(9 * time.Second).MustWait(ctx)
	check(good, nil)
	check(fake, database.ErrInvalidToken)
	if q := queries(); q != 2 {
		t.Fatalf("within the TTLs the checks ran %d queries, want none more than 2", q)
	}

	// Past InvalidTTL: the refusal is asked again, the admission is not.
	clock.Advance(time.Second).MustWait(ctx)
	check(good, nil)
	check(fake, database.ErrInvalidToken)
	if q := queries(); q != 3 {
		t.Fatalf("past InvalidTTL %d queries ran, want 3 (only the refused token asked again)", q)
	}

	// Past ValidTTL: the admission is asked again.
	clock.Advance(50 * time.Second).MustWait(ctx)
	check(good, nil)
	if q := queries(); q != 4 {
		t.Fatalf("past ValidTTL %d queries ran, want 4", q)
	}
}
