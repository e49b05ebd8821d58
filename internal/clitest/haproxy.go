package clitest

import (
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
