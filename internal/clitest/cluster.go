package clitest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// ReplicaOptions describes one replica configured the way the HA guide's
// table does: CODER_ADDRESS, CODER_DERP_SERVER_RELAY_URL, CODER_ACCESS_URL
// and the Postgres URL.
type ReplicaOptions struct {
	Name        string
	PostgresURL string
	// PostgresURLFile, when set, is given instead of PostgresURL
	// (CODER_PG_CONNECTION_URL_FILE).
	PostgresURLFile string
	// Port to listen on; 0 picks a free one.
	Port int
	// RelayURL overrides http://127.0.0.1:Port (e.g. a fault proxy in
	// front of the replica).
	RelayURL string
	// Env is appended (later entries win).
	Env []string
	// Binary is the coder binary to run (BuildRelease); empty: Binary(t).
	Binary string
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
	pg := "CODER_PG_CONNECTION_URL=" + opts.PostgresURL
	if opts.PostgresURLFile != "" {
		pg = "CODER_PG_CONNECTION_URL_FILE=" + opts.PostgresURLFile
	}
	env := append([]string{
		"CODER_ADDRESS=" + addr,
		"CODER_DERP_SERVER_RELAY_URL=" + relay,
		"CODER_ACCESS_URL=https://coder.big.corp",
		pg,
		"CODER_REPLICA_LATENCY_THRESHOLD=200ms",
	}, opts.Env...)
	bin := opts.Binary
	if bin == "" {
		bin = Binary(t)
	}
	p := StartBinary(t, bin, opts.Name, env, "server")
	p.Port, p.URL = opts.Port, "http://"+addr
	return p
}

// CreateToken runs `coder server create-token` and returns the token.
func CreateToken(t testing.TB, postgresURL string) string {
	t.Helper()
	return CreateTokenWith(t, Binary(t), postgresURL)
}

// CreateTokenWith is CreateToken with another coder binary (it migrates
// the database to what that binary knows first).
func CreateTokenWith(t testing.TB, bin, postgresURL string) string {
	t.Helper()
	p := StartBinary(t, bin, "create-token", []string{"CODER_PG_CONNECTION_URL=" + postgresURL}, "server", "create-token", "--name", "test")
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

// Cluster is a set of replicas sharing one Postgres, each configured by
// StartReplica: the one cluster helper of e2e, hatest and bench.
type Cluster struct {
	// T owns the replicas: they are killed when its test ends.
	T testing.TB
	// PostgresURL is the database every replica is started with.
	PostgresURL string
	// Nodes are the replicas started by Add, in order.
	Nodes []*Process
}

// NewCluster returns an empty cluster on postgresURL. Every replica still
// running when the test ends is killed (Start's cleanup); StopAll stops
// them gracefully before that.
func NewCluster(t testing.TB, postgresURL string) *Cluster {
	return &Cluster{T: t, PostgresURL: postgresURL}
}

// Add starts replica r<N> with env appended to StartReplica's.
func (c *Cluster) Add(env ...string) *Process {
	c.T.Helper()
	p := StartReplica(c.T, ReplicaOptions{Name: fmt.Sprintf("r%d", len(c.Nodes)+1), PostgresURL: c.PostgresURL, Env: env})
	c.Nodes = append(c.Nodes, p)
	return p
}

// WaitReady waits up to d for every replica's /readyz (each gets the full
// d: they started together).
func (c *Cluster) WaitReady(d time.Duration) {
	c.T.Helper()
	for _, n := range c.Nodes {
		n.WaitReady(d)
	}
}

// StopAll sends SIGTERM to every running replica, waits up to 30 s for
// each, and forgets them.
func (c *Cluster) StopAll() {
	for _, n := range c.Nodes {
		if !n.Exited() {
			n.Signal(syscall.SIGTERM)
		}
	}
	for _, n := range c.Nodes {
		n.Wait(30 * time.Second)
	}
	c.Nodes = nil
}
