package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/wire"
)

// clientFlags are the flags every client command takes.
type clientFlags struct {
	url    string
	token  string
	output string
}

func (c *clientFlags) register(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&c.url, "url", "", "The server's URL, normally the access URL")
	bindEnv(f, "url", "CODER_URL")
	f.StringVar(&c.token, "token", "", "An API token (coder server create-token)")
	bindEnv(f, "token", "CODER_SESSION_TOKEN")
	f.StringVarP(&c.output, "output", "o", "table", "Output format: table or json")
}

func (c *clientFlags) validate() error {
	if c.url == "" {
		return &exitError{code: 2, msg: "--url (or CODER_URL) is required"}
	}
	u, err := url.Parse(c.url)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return &exitError{code: 2, msg: fmt.Sprintf("--url must be an absolute http or https URL, got %q", c.url)}
	}
	if c.output != "table" && c.output != "json" {
		return &exitError{code: 2, msg: fmt.Sprintf("-o must be table or json, got %q", c.output)}
	}
	return nil
}

// get fetches path from the server into v, turning an error answer into a
// one-line error.
func (c *clientFlags) get(ctx context.Context, path string, v any) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, wire.JoinPath(c.url, path), nil)
	if err != nil {
		return err
	}
	if c.token != "" {
		req.Header.Set(wire.SessionTokenHeader, c.token)
	}
	resp, err := apiClient.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("GET %s: read: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e coderd.Response
		if json.Unmarshal(body, &e) == nil && e.Message != "" {
			return fmt.Errorf("GET %s: %s %s", path, resp.Status, e.Message)
		}
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: decode: %w", path, err)
	}
	return nil
}

// apiClient is the HTTP client of the client commands. It follows at most
// 10 redirects and sends the session token only to the origin it was given
// for: Go's client drops Authorization on a cross-host redirect but not our
// own Coder-Session-Token header, so a redirect (a misconfigured proxy, a
// hostile server) must not carry it to another scheme, host or port.
var apiClient = &http.Client{CheckRedirect: func(req *http.Request, via []*http.Request) error {
	if len(via) >= 10 {
		return fmt.Errorf("stopped after %d redirects", len(via))
	}
	if !sameOrigin(req.URL, via[0].URL) {
		req.Header.Del(wire.SessionTokenHeader)
		req.Header.Del("Authorization")
	}
	return nil
}}

// sameOrigin compares scheme, host and port (default ports made explicit).
func sameOrigin(a, b *url.URL) bool {
	port := func(u *url.URL) string {
		if p := u.Port(); p != "" {
			return p
		}
		if strings.EqualFold(u.Scheme, "https") {
			return "443"
		}
		return "80"
	}
	return strings.EqualFold(a.Scheme, b.Scheme) && strings.EqualFold(a.Hostname(), b.Hostname()) && port(a) == port(b)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
