package faultproxy_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/faultproxy"
)

func get(t *testing.T, client *http.Client, url string) (time.Duration, error) {
	start := time.Now()
	resp, err := client.Get(url)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return time.Since(start), nil
}

// Delay is added to each direction; Cut refuses connections until Heal.
func TestProxyDelaysCutsAndHeals(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	p, err := faultproxy.New(srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	fast, err := get(t, client, p.URL())
	if err != nil {
		t.Fatal(err)
	}
	p.SetDelay(30 * time.Millisecond)
	slow, err := get(t, client, p.URL())
	if err != nil {
		t.Fatal(err)
	}
	if slow < 60*time.Millisecond || slow < fast {
		t.Fatalf("with 30ms each way a request took %s (without: %s); want ≥ 60ms", slow, fast)
	}
	p.SetDelay(0)
	p.Cut()
	if _, err := get(t, client, p.URL()); err == nil {
		t.Fatal("request through a cut proxy succeeded")
	}
	p.Heal()
	if _, err := get(t, client, p.URL()); err != nil {
		t.Fatalf("request after heal: %v", err)
	}
}

// Options.Delay applies from the first byte; Cut breaks connections that
// are already open, not just new ones.
func TestProxyStartsDelayedAndCutBreaksOpenConnections(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	p, err := faultproxy.New(srv.Listener.Addr().String(), faultproxy.Options{Delay: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Addr() == srv.Listener.Addr().String() {
		t.Fatal("Addr is the target's, not the proxy's")
	}
	client := &http.Client{Timeout: 2 * time.Second} // keep-alive: one connection
	d, err := get(t, client, p.URL())
	if err != nil {
		t.Fatal(err)
	}
	if d < 40*time.Millisecond {
		t.Fatalf("first request took %s; want ≥ 40ms with 20ms each way from the start", d)
	}
	p.Cut()
	if _, err := get(t, client, p.URL()); err == nil {
		t.Fatal("a kept-alive connection survived the cut")
	}
	p.Heal()
	if _, err := get(t, client, p.URL()); err != nil {
		t.Fatalf("after heal: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	_ = p.Close() // idempotent
}

// Freeze black-holes the open (kept-alive) connection while a new one
// works; SetTarget moves new connections to another server and leaves the
// open ones where they are.
func TestFreezeBlackHolesOpenConnectionsAndSetTargetMovesNewOnes(t *testing.T) {
	named := func(name string) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, name) }))
	}
	a, b := named("a"), named("b")
	defer a.Close()
	defer b.Close()
	p, err := faultproxy.New(a.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	body := func(client *http.Client) (string, error) {
		resp, err := client.Get(p.URL())
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	kept := &http.Client{Timeout: 500 * time.Millisecond} // keep-alive: one connection
	fresh := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if got, err := body(kept); err != nil || got != "a" {
		t.Fatalf("before any fault: %q, %v", got, err)
	}
	p.SetTarget(b.Listener.Addr().String())
	if got, err := body(kept); err != nil || got != "a" {
		t.Fatalf("an open connection moved with SetTarget: %q, %v", got, err)
	}
	if got, err := body(fresh); err != nil || got != "b" {
		t.Fatalf("a new connection after SetTarget: %q, %v (want b)", got, err)
	}
	p.Freeze()
	if got, err := body(kept); err == nil {
		t.Fatalf("a frozen connection answered %q", got)
	}
	if got, err := body(fresh); err != nil || got != "b" {
		t.Fatalf("a new connection after Freeze: %q, %v", got, err)
	}
}
