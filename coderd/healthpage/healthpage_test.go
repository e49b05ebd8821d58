package healthpage

import (
	"crypto/sha256"
	"encoding/base64"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"
)

func get(t *testing.T, method string) *http.Response {
	t.Helper()
	rec := httptest.NewRecorder()
	Handler().ServeHTTP(rec, httptest.NewRequest(method, "/health", nil))
	return rec.Result()
}

// directives parses a Content-Security-Policy into directive → sources.
func directives(policy string) map[string][]string {
	out := map[string][]string{}
	for _, d := range strings.Split(policy, ";") {
		f := strings.Fields(d)
		if len(f) > 0 {
			out[f[0]] = f[1:]
		}
	}
	return out
}

// sha256Source is the CSP hash source of the text between <tag> and </tag>,
// computed here independently of the package.
func sha256Source(t *testing.T, html, tag string) string {
	t.Helper()
	m := regexp.MustCompile(`(?s)<`+tag+`>(.*?)</`+tag+`>`).FindAllStringSubmatch(html, -1)
	if len(m) != 1 {
		t.Fatalf("want one <%s>, got %d", tag, len(m))
	}
	sum := sha256.Sum256([]byte(m[0][1]))
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}

// The page is served without a token, as HTML, never cached, with a policy
// that allows only the page's own inline script and style and requests to
// its own origin: nothing from another site, no eval, no inline handlers,
// no framing, no form posts, and no string-to-HTML assignment.
func TestPageIsServedWithAStrictContentSecurityPolicy(t *testing.T) {
	resp := get(t, http.MethodGet)
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(body) != string(page) {
		t.Fatalf("GET /health: %d, %d bytes", resp.StatusCode, len(body))
	}
	for header, want := range map[string]string{
		"Content-Type":           "text/html; charset=utf-8",
		"X-Content-Type-Options": "nosniff",
		"X-Frame-Options":        "DENY",
		"Referrer-Policy":        "no-referrer",
		"Cache-Control":          "no-store",
	} {
		if got := resp.Header.Get(header); got != want {
			t.Errorf("%s: %q, want %q", header, got, want)
		}
	}

	policy := resp.Header.Get("Content-Security-Policy")
	d := directives(policy)
	want := map[string][]string{
		"default-src":               {"'none'"},
		"script-src":                {sha256Source(t, string(page), "script")},
		"style-src":                 {sha256Source(t, string(page), "style")},
		"connect-src":               {"'self'"},
		"img-src":                   {"data:"},
		"base-uri":                  {"'none'"},
		"form-action":               {"'none'"},
		"frame-ancestors":           {"'none'"},
		"require-trusted-types-for": {"'script'"},
		"trusted-types":             {"'none'"},
	}
	for name, sources := range want {
		if strings.Join(d[name], " ") != strings.Join(sources, " ") {
			t.Errorf("%s: %q, want %q (policy %q)", name, d[name], sources, policy)
		}
	}
	for name := range d {
		if _, ok := want[name]; !ok {
			t.Errorf("unexpected directive %q in %q", name, policy)
		}
	}
	for _, bad := range []string{"unsafe-inline", "unsafe-eval", "unsafe-hashes", "*", "http:", "https:", "blob:", "'self' data:"} {
		if strings.Contains(policy, bad) {
			t.Errorf("policy allows %s: %q", bad, policy)
		}
	}

	head := get(t, http.MethodHead)
	if b, _ := io.ReadAll(head.Body); head.StatusCode != http.StatusOK || len(b) != 0 || head.Header.Get("Content-Security-Policy") != policy {
		t.Errorf("HEAD /health: %d, %d bytes", head.StatusCode, len(b))
	}
}

// Clusters often have no internet: the page references nothing outside
// itself (no URL with a scheme or protocol-relative, no external script,
// style sheet, image, font or frame) and calls only the two same-origin
// APIs.
func TestPageLoadsNothingFromOtherSites(t *testing.T) {
	html := string(page)
	for _, re := range []string{
		`(?i)[a-z][a-z0-9+.-]*://`, // any absolute URL
		`(?i)["'(=]\s*//[^\s/]`,    // protocol-relative
		`(?i)<(img|iframe|object|embed|audio|video|source|base|frame)\b`,
		`(?i)<link\b[^>]*\srel="(stylesheet|preload|prefetch|modulepreload|preconnect|dns-prefetch|import)"`,
		`(?i)\s(src|srcset|action|formaction|poster)\s*=`,
		`(?i)\burl\s*\(`,
		`(?i)@import`,
		`(?i)@font-face`,
		`(?i)\bimport\s*\(`,
		`(?i)new\s+(WebSocket|EventSource|Worker|SharedWorker)\b`,
		`(?i)\b(XMLHttpRequest|sendBeacon|importScripts)\b`,
		`(?i)<script\s[^>]*>`,
		`(?i)<style\s[^>]*>`,
	} {
		if m := regexp.MustCompile(re).FindString(html); m != "" {
			t.Errorf("page matches %s: %q", re, m)
		}
	}
	// The one href is the empty icon, which keeps browsers from asking for
	// /favicon.ico.
	if hrefs := regexp.MustCompile(`(?i)\shref\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)`).FindAllStringSubmatch(html, -1); len(hrefs) != 1 || hrefs[0][1] != `"data:,"` {
		t.Errorf("hrefs: %q, want only the empty data: icon", hrefs)
	}
	// Every request goes through apiGet, and apiGet is called with the two
	// same-origin API paths only.
	if n := strings.Count(html, "fetch("); n != 1 {
		t.Errorf("fetch( appears %d times, want once (in apiGet)", n)
	}
	calls := regexp.MustCompile(`apiGet\(([^,)]*)`).FindAllStringSubmatch(html, -1)
	var paths []string
	for _, c := range calls {
		if c[1] == "path" { // the definition
			continue
		}
		paths = append(paths, c[1])
	}
	if strings.Join(paths, " ") != "'/api/v2/replicas' '/api/v2/debug/health'" {
		t.Errorf("apiGet is called with %q, want the replicas and health APIs only", paths)
	}
}

// Text from the API reaches the DOM as text only, and the token only as a
// header: no HTML sinks, no inline handlers or styles (the policy would
// block them anyway), one password field without a name (a form submission
// can never put it in a URL), and no cookie or localStorage.
func TestPageInsertsTextAsTextAndKeepsTheTokenInTheTab(t *testing.T) {
	html := string(page)
	for _, re := range []string{
		`innerHTML`, `outerHTML`, `insertAdjacentHTML`, `document\.write`, `createContextualFragment`,
		`DOMParser`, `\beval\s*\(`, `new\s+Function`, `setTimeout\(\s*['"]`, `setInterval`,
		`(?i)\son[a-z]+\s*=`, `(?i)\sstyle\s*=`, `(?i)javascript:`,
		`document\.cookie`, `localStorage`, `location\.(href|search|hash)\s*=`, `history\.`,
	} {
		if m := regexp.MustCompile(re).FindString(html); m != "" {
			t.Errorf("page matches %s: %q", re, m)
		}
	}
	inputs := regexp.MustCompile(`<input\b[^>]*>`).FindAllString(html, -1)
	if len(inputs) != 1 || !strings.Contains(inputs[0], `type="password"`) || strings.Contains(inputs[0], "name=") {
		t.Errorf("want one password input without a name, got %q", inputs)
	}
	for _, want := range []string{`sessionStorage.setItem(TOKEN_KEY`, `'Coder-Session-Token': token`, `credentials: 'omit'`, `preventDefault()`} {
		if !strings.Contains(html, want) {
			t.Errorf("page does not contain %q", want)
		}
	}
}
