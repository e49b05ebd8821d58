package coderd

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder-ha/coder/database"
)

// tokenValidator checks API tokens against the database and remembers
// tokens it has accepted for a while, so the API keeps answering operators
// through a short Postgres outage.
type tokenValidator struct {
	db  *database.DB
	ttl time.Duration

	mu    sync.Mutex
	valid map[string]time.Time // token → accepted until
}

func newTokenValidator(db *database.DB) *tokenValidator {
	return &tokenValidator{db: db, ttl: 5 * time.Minute, valid: map[string]time.Time{}}
}

func (v *tokenValidator) check(ctx context.Context, token string) error {
	v.mu.Lock()
	until, ok := v.valid[token]
	v.mu.Unlock()
	if ok && time.Now().Before(until) {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := v.db.ValidateAPIKey(ctx, token); err != nil {
		return err
	}
	v.mu.Lock()
	if len(v.valid) > 10_000 { // bounded: forget everything rather than grow
		v.valid = map[string]time.Time{}
	}
	v.valid[token] = time.Now().Add(v.ttl)
	v.mu.Unlock()
	return nil
}

// tokenFromRequest reads "Authorization: Bearer <t>" or
// "Coder-Session-Token: <t>".
func tokenFromRequest(r *http.Request) string {
	if t := r.Header.Get("Coder-Session-Token"); t != "" {
		return strings.TrimSpace(t)
	}
	if h := r.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "bearer ") {
		return strings.TrimSpace(h[7:])
	}
	return ""
}

// requireToken answers 401 with a JSON message unless the request carries a
// valid API token.
func (v *tokenValidator) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token := tokenFromRequest(r)
		if token == "" {
			writeError(w, http.StatusUnauthorized, "Authentication required: send an API token in the Authorization (Bearer) or Coder-Session-Token header.", "create one with: coder server create-token")
			return
		}
		if err := v.check(r.Context(), token); err != nil {
			if errors.Is(err, database.ErrInvalidToken) {
				writeError(w, http.StatusUnauthorized, "Invalid API token.", "")
				return
			}
			writeError(w, http.StatusServiceUnavailable, "Could not check the API token: the database is unavailable.", err.Error())
			return
		}
		next.ServeHTTP(w, r)
	})
}
