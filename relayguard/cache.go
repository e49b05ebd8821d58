package relayguard

import (
	"sync"
	"time"

	"tailscale.com/util/lru"
)

// admitted is a cached admission.
type admitted struct {
	freshUntil time.Time // trusted without asking again until then
	staleUntil time.Time // still usable while the webhook fails
}

// verdictCache holds the webhook's recent answers per admitKey, bounded:
// at most size admissions and size refusals, each half least recently
// used out. The halves are separate so that refusals, however many, never
// push out an admission: node keys cost nothing to make, and the
// admissions are what lets known clients reconnect while the webhook
// fails. A key is in at most one half: a new answer replaces the old one.
type verdictCache struct {
	mu    sync.Mutex
	allow lru.Cache[admitKey, admitted]  // guarded by mu
	deny  lru.Cache[admitKey, time.Time] // guarded by mu: refused until
}

func newVerdictCache(size int) *verdictCache {
	c := &verdictCache{}
	c.allow.MaxEntries = size
	c.deny.MaxEntries = size
	return c
}

// fresh returns the verdict for k that may be used without asking the
// webhook at now, if there is one, and until when.
func (c *verdictCache) fresh(k admitKey, now time.Time) (allow bool, until time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if a, found := c.allow.GetOk(k); found && now.Before(a.freshUntil) {
		return true, a.freshUntil, true
	}
	if until, found := c.deny.GetOk(k); found && now.Before(until) {
		return false, until, true
	}
	return false, time.Time{}, false
}

// stale reports whether k has an admission still usable at now while the
// webhook fails.
func (c *verdictCache) stale(k admitKey, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.allow.PeekOk(k)
	return ok && now.Before(a.staleUntil)
}

// denied reports whether k has a refusal current at now.
func (c *verdictCache) denied(k admitKey, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	until, ok := c.deny.PeekOk(k)
	return ok && now.Before(until)
}

// setAllow records an admission (and forgets any refusal of k).
func (c *verdictCache) setAllow(k admitKey, a admitted) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deny.Delete(k)
	c.allow.Set(k, a)
}

// setDeny records a refusal until then (and forgets any admission of k, so
// a revoked client cannot come back on a stale admission while the
// webhook fails).
func (c *verdictCache) setDeny(k admitKey, until time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.allow.Delete(k)
	c.deny.Set(k, until)
}

// len returns how many admissions and refusals are held.
func (c *verdictCache) len() (allow, deny int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.allow.Len(), c.deny.Len()
}
