package relayguard

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// A flood of 100 000 distinct node keys (they cost nothing to make) through
// the real admission path and a real webhook keeps the verdict cache at its
// bound, and never pushes out the admission of a known client: it can
// still reconnect on that admission when the webhook then fails. Under the
// race detector (ten times slower per webhook call) the flood and the
// cache are a fifth of that: the same ten keys per cache slot.
func TestVerdictCacheStaysBoundedUnder100kKeys(t *testing.T) {
	t.Parallel()
	known := key.NewNode().Public()
	var down atomic.Bool
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req tailcfg.DERPAdmitClientRequest
		if down.Load() || json.NewDecoder(r.Body).Decode(&req) != nil {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		_ = json.NewEncoder(w).Encode(tailcfg.DERPAdmitClientResponse{Allow: req.NodePublic == known})
	}))
	t.Cleanup(hook.Close)
	s := derpserver.New(key.NewNode(), logger.Discard)
	t.Cleanup(func() { _ = s.Close() })
	flood, size := int64(100_000), DefaultCacheSize
	if raceEnabled {
		flood, size = flood/5, size/5
	}
	g, err := New(s, Options{VerifyURL: hook.URL + "/verify", CacheSize: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close() })

	src := netip.MustParseAddr("192.0.2.1")
	if !g.admit(tailcfg.DERPAdmitClientRequest{NodePublic: known, Source: src}) {
		t.Fatal("the known client was not admitted")
	}
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	const workers = 8
	var next atomic.Int64
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= flood; i = next.Add(1) {
				if g.admit(tailcfg.DERPAdmitClientRequest{NodePublic: distinctKey(i), Source: src}) {
					admitted.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if n := admitted.Load(); n != 0 {
		t.Fatalf("%d unknown keys were admitted", n)
	}
	allow, deny := g.cache.len()
	if allow > size || deny > size {
		t.Fatalf("after %d distinct keys the cache holds %d admissions and %d refusals, want each ≤ %d", flood, allow, deny, size)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	t.Logf("after %d distinct keys: %d admissions, %d refusals cached; live heap grew %.1f MiB",
		flood, allow, deny, (float64(after.HeapAlloc)-float64(before.HeapAlloc))/(1<<20))

	down.Store(true)
	if !g.admit(tailcfg.DERPAdmitClientRequest{NodePublic: known, Source: src}) {
		t.Fatal("the flood pushed out the known client's admission: it cannot reconnect while the webhook fails")
	}
}

// distinctKey is the i-th of many distinct node public keys, made without
// the cost of generating key pairs.
func distinctKey(i int64) key.NodePublic {
	var k key.NodePublic
	if err := k.UnmarshalText(fmt.Appendf(nil, "nodekey:%064x", i+1)); err != nil {
		panic(err)
	}
	return k
}
