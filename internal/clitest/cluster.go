package clitest

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ReplicaOptions describes one replica configured the way the HA guide's
// table does: CODER_ADDRESS, CODER_DERP_SERVER_RELAY_URL, CODER_ACCESS_URL
// and the Postgres URL.
type ReplicaOptions struct {
	Name        string
	PostgresURL string
	// Port to listen on; 0 picks a free one.
	Port int
	// RelayURL overrides http://127.0.0.1:Port (e.g. a fault proxy in
	// front of the replica).
	RelayURL string
	// Env is appended (later entries win).
	Env []string
}

// StartReplica starts `coder server` from opts. The latency threshold is
// raised to 200ms unless Env sets it: loopback under the race detector on
// two busy cores is not a datacenter.
func StartReplica(t testing.TB, opts ReplicaOptions) *Process {
	t.Helper()
	if opts.Port == 0 {
		opts.Port = FreePort(t)
	}
	addr := "127.0.0.1:" + strconv.Itoa(opts.Port)
	relay := opts.RelayURL
	if relay == "" {
		relay = "http://" + addr
	}
	env := append([]string{
		"CODER_ADDRESS=" + addr,
		"CODER_DERP_SERVER_RELAY_URL=" + relay,
		"CODER_ACCESS_URL=https://coder.big.corp",
		"CODER_PG_CONNECTION_URL=" + opts.PostgresURL,
		"CODER_REPLICA_LATENCY_THRESHOLD=200ms",
	}, opts.Env...)
	p := Start(t, opts.Name, env, "server")
	p.Port, p.URL = opts.Port, "http://"+addr
	return p
}

// CreateToken runs `coder server create-token` and returns the token.
func CreateToken(t testing.TB, postgresURL string) string {
	t.Helper()
	p := Start(t, "create-token", []string{"CODER_PG_CONNECTION_URL=" + postgresURL}, "server", "create-token", "--name", "test")
	if code := p.Wait(60 * time.Second); code != 0 {
		t.Fatalf("create-token exit %d: %s", code, p.Output())
	}
	tok := strings.TrimSpace(p.Output())
	if tok == "" || strings.ContainsAny(tok, " \n") {
		t.Fatalf("create-token printed more than a token: %q", p.Output())
	}
	return tok
}

// GetJSON GETs path with the token (if any), decodes the body into v (if
// not nil) and returns the status code (0 if the request failed).
func (p *Process) GetJSON(path, token string, v any) int {
	req, err := http.NewRequest(http.MethodGet, p.URL+path, nil)
	if err != nil {
		return 0
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	if v != nil {
		_ = json.NewDecoder(resp.Body).Decode(v)
	}
	return resp.StatusCode
}
