package e2e_test

import (
	"net/http"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// `make build VERSION=x` stamps x: `coder version`, /api/v2/buildinfo and
// the replica's row (what the upgrade warnings and coderd_replica_versions
// name) all say x. The test runs the Makefile's own build command (make -n
// prints it) with the output moved to a temporary directory.
func TestMakeBuildStampsTheVersion(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed")
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	const version = "v9.8.7-stamp"
	dry, err := exec.Command("make", "-s", "-n", "-C", root, "build", "VERSION="+version).Output()
	if err != nil {
		t.Fatalf("make -n build: %v", err)
	}
	line := ""
	for _, l := range strings.Split(string(dry), "\n") {
		if strings.Contains(l, " build ") && strings.Contains(l, "-o bin/coder") {
			line = l
		}
	}
	if line == "" {
		t.Fatalf("no build command in make -n's output:\n%s", dry)
	}
	bin := filepath.Join(t.TempDir(), "coder")
	cmd := exec.Command("sh", "-c", strings.Replace(line, "-o bin/coder", "-o "+bin, 1))
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", line, err, out)
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil || strings.TrimSpace(string(out)) != "coder "+version {
		t.Fatalf("coder version = %q (%v), want %q", out, err, "coder "+version)
	}

	pg := dbtest.NewURL(t)
	p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "stamped", PostgresURL: pg, Binary: bin})
	p.WaitReady(90 * time.Second)
	var info coderd.BuildInfo
	if p.GetJSON("/api/v2/buildinfo", "", &info) != http.StatusOK || info.Version != version {
		t.Fatalf("buildinfo version = %q, want %q", info.Version, version)
	}
	token := clitest.CreateTokenWith(t, bin, pg)
	var rs []coderd.Replica
	if p.GetJSON("/api/v2/replicas", token, &rs) != http.StatusOK || len(rs) != 1 || rs[0].Version != version {
		t.Fatalf("replicas = %+v, want one of version %q", rs, version)
	}
}
