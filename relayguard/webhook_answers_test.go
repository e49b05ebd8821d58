package relayguard_test

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/coder-ha/coder/relayguard"
)

// A webhook that answers with anything but a 200 and a
// DERPAdmitClientResponse admits nobody (fail closed), and a redirect is
// not followed: the verdict of a host the operator did not configure never
// counts. The relay keeps serving admitted clients throughout.
func TestWebhookOddAnswersFailClosed(t *testing.T) {
	t.Parallel()
	// Another host that admits everyone: the redirect's target.
	var foreignCalls atomic.Int64
	foreign := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		foreignCalls.Add(1)
		_, _ = w.Write([]byte(`{"Allow":true}`))
	}))
	t.Cleanup(func() {
		// Runs after the parallel subtests.
		foreign.Close()
		if n := foreignCalls.Load(); n != 0 {
			t.Errorf("the guard followed the webhook's redirect: the other host was asked %d times", n)
		}
	})
	foreignURL := strings.Replace(foreign.URL, "127.0.0.1", "localhost", 1) + "/verify"

	answers := map[string]http.HandlerFunc{
		"redirect to another host": func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, foreignURL, http.StatusTemporaryRedirect)
		},
		"500 with an allow body": func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = w.Write([]byte(`{"Allow":true}`))
		},
		"garbage JSON": func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte(`{"Allow":tru`))
		},
		"allow after 8 KiB of whitespace": func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte(strings.Repeat(" ", 8<<10) + `{"Allow":true}`))
		},
	}
	for name, answer := range answers {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var mode atomic.Value
			mode.Store("allow")
			hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if mode.Load() == "allow" {
					_, _ = w.Write([]byte(`{"Allow":true}`))
					return
				}
				answer(w, r)
			}))
			t.Cleanup(hook.Close)
			mk := newMeshKey()
			a := startRelay(t, mk, relayguard.Options{VerifyURL: hook.URL + "/verify", WebhookTimeout: time.Second})
			c1, c2 := connect(t, a), connect(t, a)
			works(t, c1, c2, "admitted clients")

			mode.Store("odd")
			assertRefused(t, a, key.NewNode(), c1, "a new client the webhook answered oddly for")
			works(t, c1, c2, "admitted clients after the odd answer")
		})
	}
}
