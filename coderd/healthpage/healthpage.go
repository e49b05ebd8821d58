// Package healthpage serves GET /health: one self-contained HTML page for
// people (plain JavaScript and CSS inline, embedded in the binary) that
// asks for an API token and shows what /api/v2/debug/health and
// /api/v2/replicas answer, refreshing itself.
//
// The page itself holds no data and needs no token; its data comes from the
// token-protected JSON APIs of the same origin. It must never load anything
// from another site (clusters often have no internet), and its Content
// Security Policy allows only its own inline script and style (by hash)
// and requests to its own origin.
package healthpage

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"
)

//go:embed health.html
var page []byte

// policy is the page's Content-Security-Policy, computed once from page.
var policy = mustPolicy(page)

// Handler serves the page. It answers every request it gets with the page
// (route it at GET /health); the page asks for no token, the APIs it
// calls do.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Security-Policy", policy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		h.Set("Cross-Origin-Resource-Policy", "same-origin")
		// The page is small and changes with the binary: always fetch it
		// again, so an upgraded replica serves its own page.
		h.Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			_, _ = w.Write(page)
		}
	})
}

// ContentSecurityPolicy is the policy Handler sends: nothing by default,
// the page's own inline script and style by their SHA-256, fetches to the
// same origin only, its empty data: icon, no framing, no form submission,
// no <base>, and
// Trusted Types required, so that assigning a string as HTML
// (innerHTML) throws instead of parsing text from the API as markup.
func ContentSecurityPolicy() string { return policy }

func mustPolicy(html []byte) string {
	script, err := inline(html, "script")
	if err != nil {
		panic(err)
	}
	style, err := inline(html, "style")
	if err != nil {
		panic(err)
	}
	return strings.Join([]string{
		"default-src 'none'",
		"script-src " + hash(script),
		"style-src " + hash(style),
		"connect-src 'self'",
		// Only the empty icon the page declares (<link rel="icon"
		// href="data:,">), which keeps browsers from asking for a
		// /favicon.ico that is not there.
		"img-src data:",
		"base-uri 'none'",
		"form-action 'none'",
		"frame-ancestors 'none'",
		"require-trusted-types-for 'script'",
		"trusted-types 'none'",
	}, "; ")
}

// inline returns the text of the one <tag> element of html (without
// attributes): exactly what a browser hashes for a CSP hash source.
func inline(html []byte, tag string) ([]byte, error) {
	open, closing := []byte("<"+tag+">"), []byte("</"+tag+">")
	if n := bytes.Count(html, []byte("<"+tag)); n != 1 {
		return nil, fmt.Errorf("healthpage: want exactly one <%s> in health.html, found %d", tag, n)
	}
	start := bytes.Index(html, open)
	end := bytes.Index(html, closing)
	if start < 0 || end < start {
		return nil, fmt.Errorf("healthpage: <%s> in health.html must have no attributes and a closing tag", tag)
	}
	return html[start+len(open) : end], nil
}

func hash(b []byte) string {
	sum := sha256.Sum256(b)
	return "'sha256-" + base64.StdEncoding.EncodeToString(sum[:]) + "'"
}
