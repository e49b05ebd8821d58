package cli_test

import (
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/clitest"
)

// `coder replicas` follows a redirect, but sends its token only to the
// origin (scheme, host, port) it was given: another port on the same host
// never sees it; a same-origin redirect still carries it.
func TestClientDoesNotForwardTokenAcrossRedirectToAnotherHost(t *testing.T) {
	t.Parallel()
	const token = "abcdefghij-thisisthesecretpart"
	var mu sync.Mutex
	var otherSaw, originSaw []string
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		otherSaw = append(otherSaw, r.Header.Get("Coder-Session-Token")+r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte("[]"))
	}))
	defer other.Close()
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		originSaw = append(originSaw, r.Header.Get("Coder-Session-Token"))
		mu.Unlock()
		switch r.URL.Path {
		case "/api/v2/replicas":
			http.Redirect(w, r, "/moved/api/v2/replicas", http.StatusTemporaryRedirect)
		default:
			http.Redirect(w, r, other.URL+"/api/v2/replicas", http.StatusFound)
		}
	}))
	defer origin.Close()

	p := clitest.Start(t, "replicas", nil, "replicas", "--url", origin.URL, "--token", token, "-o", "json")
	if code := p.Wait(30 * time.Second); code != 0 {
		t.Fatalf("coder replicas exited %d:\n%s", code, p.Output())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(otherSaw) != 1 {
		t.Fatalf("the other host got %d requests, want 1 (the redirect was not followed?)", len(otherSaw))
	}
	if otherSaw[0] != "" {
		t.Fatalf("the token was forwarded to another host: %q", otherSaw[0])
	}
	if len(originSaw) != 2 || originSaw[0] != token || originSaw[1] != token {
		t.Fatalf("the origin saw tokens %q, want the token on both same-origin requests", originSaw)
	}
}
