package healthpage_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/google/uuid"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/coderd/healthpage"
	"github.com/coder-ha/coder/internal/browsertest"
)

// fakeAPI serves the page and the two APIs it reads, with answers the test
// sets: text no real replica would send (hostnames with markup, a relay URL
// that breaks out of an attribute), a section the page does not know, and
// failures on demand. It records every request the browser makes.
type fakeAPI struct {
	token string

	mu        sync.Mutex
	replicas  []coderd.Replica
	health    map[string]any
	healthErr int    // status of /api/v2/debug/health when not 0
	refuseAll string // refuse every token with this message when set
	requests  []*http.Request
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests = append(f.requests, r.Clone(r.Context()))
	replicas, health, healthErr, refuseAll := f.replicas, f.health, f.healthErr, f.refuseAll
	f.mu.Unlock()
	if r.URL.Path == "/health" {
		healthpage.Handler().ServeHTTP(w, r)
		return
	}
	reply := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(v)
	}
	switch {
	case r.URL.Path != "/api/v2/replicas" && r.URL.Path != "/api/v2/debug/health":
		reply(http.StatusNotFound, coderd.Response{Message: "Route not found."})
	case refuseAll != "":
		reply(http.StatusUnauthorized, coderd.Response{Message: refuseAll})
	case r.Header.Get("Coder-Session-Token") != f.token:
		reply(http.StatusUnauthorized, coderd.Response{Message: "Invalid API token."})
	case r.URL.Path == "/api/v2/replicas":
		reply(http.StatusOK, replicas)
	case healthErr != 0:
		reply(healthErr, coderd.Response{Message: "The replica is still starting."})
	default:
		reply(http.StatusOK, health)
	}
}

func (f *fakeAPI) set(fn func(f *fakeAPI)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeAPI) seen() []*http.Request {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*http.Request(nil), f.requests...)
}

func read(t *testing.T, b *browsertest.Browser) browsertest.HealthPage {
	t.Helper()
	p, err := browsertest.ReadHealthPage(b)
	if err != nil {
		t.Fatalf("read the page: %v", err)
	}
	return p
}

// Whatever the API says is shown as text: hostnames, relay URLs, versions,
// errors and warnings full of markup appear literally and inject nothing;
// warnings of a section the page has never heard of are shown too; a wrong
// token shows the API's refusal and nothing about the cluster; the token
// travels only in the Coder-Session-Token header and survives a reload in
// sessionStorage; a failing refresh keeps the last data, marked; a revoked
// token signs out with the API's message.
func TestHealthPageShowsWhatTheAPISaysAsText(t *testing.T) {
	t.Parallel()
	a, bID, c := uuid.New(), uuid.New(), uuid.New()
	hostA := `<img src=x onerror="window.__pwned=1">`
	hostB := `<script>window.__pwned=2</script>`
	relayA := "http://10.0.0.1:8080"
	relayB := `http://10.0.0.2:8080"><b>x</b>`
	latencyWarning := `replica "` + hostB + `" (` + relayB + `) is 31.2ms away; every replica must be within 10ms of each other`
	peerErr := "<b>connection refused</b>"
	// b's warning names a's relay URL but is not about latency (a kind
	// this page does not know, from a later release, say): a's cell in b's
	// row stays a plain latency, as in coder replicas.
	otherWarning := `replica "a" (` + relayA + `) is draining; it leaves the cluster in 30s`
	f := &fakeAPI{
		token: "good-token",
		replicas: []coderd.Replica{
			{ID: a, Hostname: hostA, RelayAddress: relayA, RegionID: 999, Version: "v2.0.0", DatabaseLatencyMS: 1.5,
				Peers:    []coderd.ReplicaPeer{{ID: bID, LatencyMS: 31.2}, {ID: c, Error: peerErr}},
				Warnings: []string{latencyWarning}},
			{ID: bID, Hostname: hostB, RelayAddress: relayB, RegionID: 999, Version: "v2.1.0", DatabaseLatencyMS: 2,
				Peers: []coderd.ReplicaPeer{{ID: a, LatencyMS: 3.25}}, Warnings: []string{otherWarning}},
			{ID: c, Hostname: "c", RelayAddress: "http://10.0.0.3:8080", RegionID: 999, Version: "v2.0.0", Error: "<i>heartbeat failing</i>",
				Peers: []coderd.ReplicaPeer{{ID: a}, {ID: bID, LatencyMS: 4}}, Warnings: []string{}},
		},
		health: map[string]any{
			"healthy":   false,
			"database":  map[string]any{"healthy": true, "warnings": []string{`<svg onload="window.__pwned=3">`}},
			"replicas":  map[string]any{"healthy": false, "warnings": []string{latencyWarning, "two versions are live: v2.0.0 (a, c), v2.1.0 (b)"}},
			"derp_mesh": map[string]any{"healthy": true, "warnings": nil},
			"future":    map[string]any{"healthy": false, "warnings": []string{"a section added after this page was written"}},
		},
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	b := browsertest.New(t)
	b.MustDo(chromedp.Navigate(srv.URL + "/health"))

	// Signed out: the sign-in step, nothing about the cluster.
	p := read(t, b)
	if p.State != "signin" || p.ClusterVisible || len(p.Replicas) != 0 {
		t.Fatalf("before sign-in: %+v", p)
	}

	if err := browsertest.SignIn(b, "wrong-token"); err != nil {
		t.Fatal(err)
	}
	browsertest.Poll(t, 10*time.Second, "the API's refusal on the sign-in step", func() bool {
		p = read(t, b)
		return p.SignInError == "Invalid API token."
	})
	if p.State != "signin" || p.ClusterVisible || len(p.Replicas) != 0 || len(p.Sections) != 0 || p.Token != "" {
		t.Fatalf("a wrong token shows or keeps something: %+v", p)
	}

	if err := browsertest.SignIn(b, "good-token"); err != nil {
		t.Fatal(err)
	}
	browsertest.Poll(t, 10*time.Second, "the cluster after signing in", func() bool {
		p = read(t, b)
		return p.State == "cluster" && len(p.Replicas) == 3
	})
	if pwned, _ := browsertest.Eval[bool](b, `window.__pwned !== undefined`); pwned {
		t.Fatal("text from the API ran as script")
	}
	if p.Markup != 0 {
		t.Fatalf("text from the API became %d elements", p.Markup)
	}
	wantRows := []struct{ host, relay, version, errText string }{
		{hostA, relayA, "v2.0.0", "—"},
		{hostB, relayB, "v2.1.0", "—"},
		{"c", "http://10.0.0.3:8080", "v2.0.0", "<i>heartbeat failing</i>"},
	}
	for i, w := range wantRows {
		r := p.Replicas[i]
		if r.Hostname != w.host || r.RelayURL != w.relay || r.Version != w.version || r.Error != w.errText || r.Mixed != "true" || r.Region != "999" {
			t.Errorf("row %d: %+v, want %+v", i, r, w)
		}
	}
	if p.Replicas[0].VersionBG == p.Replicas[1].VersionBG || p.Replicas[0].VersionBG != p.Replicas[2].VersionBG {
		t.Errorf("versions are not told apart by colour: %q %q %q", p.Replicas[0].VersionBG, p.Replicas[1].VersionBG, p.Replicas[2].VersionBG)
	}
	if !strings.Contains(p.MixedVersions, "2 versions are live") || !strings.Contains(p.MixedVersions, "v2.1.0 on "+hostB) {
		t.Errorf("mixed versions notice: %q", p.MixedVersions)
	}
	if got := p.Replicas[0].Warnings; len(got) != 1 || got[0] != latencyWarning {
		t.Errorf("replica warnings: %q", got)
	}
	if p.Healthy != "false" || p.Overall != "✕ Unhealthy, 4 warnings" {
		t.Errorf("overall: %q %q, want unhealthy with 4 warnings", p.Healthy, p.Overall)
	}
	wantSections := []browsertest.HealthPageSection{
		{Name: "database", Healthy: "true", Warnings: []string{`<svg onload="window.__pwned=3">`}},
		{Name: "replicas", Healthy: "false", Warnings: []string{latencyWarning, "two versions are live: v2.0.0 (a, c), v2.1.0 (b)"}},
		{Name: "derp_mesh", Healthy: "true", Warnings: []string{}},
		{Name: "future", Healthy: "false", Warnings: []string{"a section added after this page was written"}},
	}
	if len(p.Sections) != len(wantSections) {
		t.Fatalf("sections: %+v", p.Sections)
	}
	for i, w := range wantSections {
		s := p.Sections[i]
		if s.Name != w.Name || s.Healthy != w.Healthy || strings.Join(s.Warnings, "\n") != strings.Join(w.Warnings, "\n") {
			t.Errorf("section %d: %+v, want %+v", i, s, w)
		}
	}

	// The matrix: the peer a warns about is marked (colour and symbol), an
	// error is shown as the error, and what was not measured says so.
	cell := func(from, to uuid.UUID) browsertest.HealthPageCell {
		t.Helper()
		c, ok := p.Cell(from.String(), to.String())
		if !ok {
			t.Fatalf("no cell %s → %s", from, to)
		}
		return c
	}
	over, ok := cell(a, bID), cell(bID, a)
	if over.Kind != "over" || over.Text != "▲ 31.2" || over.LatencyMS != 31.2 || over.Title != latencyWarning {
		t.Errorf("a → b: %+v, want marked above the threshold", over)
	}
	if ok.Kind != "ok" || ok.Text != "3.3" && ok.Text != "3.2" || strings.Contains(ok.Text, "▲") {
		t.Errorf("b → a: %+v, want a plain latency", ok)
	}
	if over.Background == ok.Background {
		t.Errorf("a marked cell has the colour of a plain one: %q", over.Background)
	}
	if e := cell(a, c); e.Kind != "error" || e.Error != peerErr || e.Text != "✕ error"+peerErr {
		t.Errorf("a → c: %+v, want the error", e)
	}
	if u := cell(bID, c); u.Kind != "unmeasured" {
		t.Errorf("b → c: %+v, want not measured", u)
	}
	if pe := cell(c, a); pe.Kind != "pending" {
		t.Errorf("c → a: %+v, want no sample yet", pe)
	}
	if s := cell(c, c); s.Kind != "self" {
		t.Errorf("c → c: %+v", s)
	}

	// The token: in sessionStorage, never in the URL or a cookie, sent only
	// as Coder-Session-Token.
	if p.Token != "good-token" || p.Cookie != "" || p.URL != srv.URL+"/health" {
		t.Errorf("token %q, cookie %q, url %q", p.Token, p.Cookie, p.URL)
	}
	for _, r := range f.seen() {
		if strings.Contains(r.URL.String(), "token") || r.Header.Get("Cookie") != "" || r.Header.Get("Authorization") != "" {
			t.Errorf("request %s carries the token outside its header (cookie %q)", r.URL, r.Header.Get("Cookie"))
		}
		if strings.HasPrefix(r.URL.Path, "/api/") && r.Header.Get("Coder-Session-Token") == "" {
			t.Errorf("request %s has no Coder-Session-Token", r.URL)
		}
	}

	// A phone: long unbroken text from the API wraps or scrolls inside its
	// table; the page itself does not scroll sideways.
	b.MustDo(chromedp.EmulateViewport(360, 740, chromedp.EmulateMobile))
	browsertest.Poll(t, 5*time.Second, "no horizontal overflow at 360 px", func() bool {
		p = read(t, b)
		return p.ClientWidth == 360 && p.ScrollWidth <= p.ClientWidth
	})
	b.MustDo(chromedp.EmulateReset())

	// A failing refresh keeps the data, says why in the API's words.
	f.set(func(f *fakeAPI) { f.healthErr = http.StatusServiceUnavailable })
	browsertest.Poll(t, 10*time.Second, "the refresh failure", func() bool {
		p = read(t, b)
		return p.Stale == "true" && strings.Contains(p.FetchError, "The replica is still starting.")
	})
	if len(p.Replicas) != 3 || p.State != "cluster" {
		t.Fatalf("a failed refresh dropped the data: %+v", p)
	}
	f.set(func(f *fakeAPI) { f.healthErr = 0 })
	browsertest.Poll(t, 10*time.Second, "recovery", func() bool {
		p = read(t, b)
		return p.Stale == "false" && p.FetchError == ""
	})

	// A reload keeps the tab signed in.
	b.MustDo(chromedp.Reload())
	browsertest.Poll(t, 10*time.Second, "the cluster after a reload, without signing in", func() bool {
		p = read(t, b)
		return p.State == "cluster" && len(p.Replicas) == 3
	})

	// A token revoked meanwhile signs out with the API's message and wipes
	// the cluster from the page and the token from the tab.
	f.set(func(f *fakeAPI) { f.refuseAll = "Token revoked." })
	browsertest.Poll(t, 10*time.Second, "sign-out on a refused token", func() bool {
		p = read(t, b)
		return p.State == "signin" && p.SignInError == "Token revoked."
	})
	if p.ClusterVisible || len(p.Replicas) != 0 || len(p.Cells) != 0 || len(p.Sections) != 0 || p.Token != "" {
		t.Fatalf("after the refusal the page still shows or keeps: %+v", p)
	}

	expected := func(m chromedp.ConsoleMessage) bool {
		return browsertest.FailedRequestStatus("401")(m) || browsertest.FailedRequestStatus("503")(m)
	}
	for _, m := range b.Problems(expected) {
		t.Errorf("browser console: %s (%s:%d)", m, m.URL, m.Line+1)
	}
}
