package clitest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// NeedHAProxy returns the haproxy binary's path. Without one the test is
// skipped, except in CI (CI set), where it fails: .ci/run installs it.
func NeedHAProxy(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("haproxy is not installed; .ci/run installs it (WITH_HAPROXY=1 scripts/deps.sh)")
		}
		t.Skip("haproxy is not installed (apt-get install haproxy)")
	}
	return path
}

// StartHAProxy runs haproxy in the foreground with config until the test
// ends, and shows its output if the test failed.
func StartHAProxy(t testing.TB, haproxy, config string) {
	t.Helper()
	cfgPath := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	lb := exec.Command(haproxy, "-db", "-f", cfgPath)
	var out SyncBuffer
	lb.Stdout, lb.Stderr = &out, &out
	if err := lb.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = lb.Process.Kill()
		_ = lb.Wait()
		if t.Failed() {
			t.Logf("--- haproxy ---\n%s", out.String())
		}
	})
}

// HAProxyConfig is docs/examples/haproxy.cfg's pattern on loopback: round
// robin, readiness checks on /readyz (every 250 ms, down after 2 misses),
// a long tunnel timeout for DERP, the frontend on frontPort, and servers
// (HAProxy "server" lines, one per line). With statsPort > 0 it also
// serves HAProxy's stats page there at /stats.
func HAProxyConfig(frontPort, statsPort int, servers string) string {
	stats := ""
	if statsPort > 0 {
		stats = fmt.Sprintf("listen stats\n    bind 127.0.0.1:%d\n    stats enable\n    stats uri /stats\n", statsPort)
	}
	return fmt.Sprintf(`
global
    maxconn 2000
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
    timeout http-keep-alive 5s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
frontend coder
    bind 127.0.0.1:%d
    default_backend coder
%sbackend coder
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fall 2 rise 2
%s`, frontPort, stats, servers)
}
