package clitest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// PreviousRelease is the commit of the release before expand/contract
// migrations (main when the upgrade work began): upgrades from it must
// keep working.
const PreviousRelease = "41c5966"

// Release is a coder binary for upgrade tests: a commit of this
// repository (or the working tree), a version string stamped into it, and
// build tags (upgradetest adds the test-only next release's migrations).
type Release struct {
	// Commit to build; empty builds the working tree.
	Commit string
	// Version is stamped as cli.Version (what buildinfo, the replica row
	// and coderd_build_info show).
	Version string
	// Tags are passed to go build -tags.
	Tags []string
}

func (r Release) key() string {
	return r.Commit + "|" + r.Version + "|" + strings.Join(r.Tags, ",")
}

var (
	releasesMu sync.Mutex
	releases   = map[string]*releaseBuild{}
)

type releaseBuild struct {
	once sync.Once
	path string
	err  error
	skip string
}

// BuildRelease builds r once per test process (with -race when the tests
// run with it) and returns the binary's path. A commit is exported with
// git archive from this repository. When the commit is missing from a
// shallow clone the test is skipped with a loud message; missing from a
// full clone, it fails.
func BuildRelease(t testing.TB, r Release) string {
	t.Helper()
	releasesMu.Lock()
	b := releases[r.key()]
	if b == nil {
		b = &releaseBuild{}
		releases[r.key()] = b
	}
	releasesMu.Unlock()
	b.once.Do(func() { b.path, b.skip, b.err = buildRelease(r) })
	if b.skip != "" {
		t.Skip(b.skip)
	}
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func buildRelease(r Release) (path, skip string, err error) {
	root := repoRoot()
	dir, err := os.MkdirTemp("", "coder-release-*")
	if err != nil {
		return "", "", err
	}
	src := root
	if r.Commit != "" {
		if err := exec.Command("git", "-C", root, "cat-file", "-e", r.Commit+"^{commit}").Run(); err != nil {
			out, _ := exec.Command("git", "-C", root, "rev-parse", "--is-shallow-repository").Output()
			if strings.TrimSpace(string(out)) == "true" {
				return "", fmt.Sprintf("SKIPPING: commit %s is not in this shallow clone; upgrade tests need the previous release (fetch with --unshallow)", r.Commit), nil
			}
			return "", "", fmt.Errorf("commit %s is not in this repository (%s): the upgrade tests build the previous release from it", r.Commit, root)
		}
		src = filepath.Join(dir, "src")
		if err := os.MkdirAll(src, 0o755); err != nil {
			return "", "", err
		}
		defer os.RemoveAll(src) // only the binary is kept
		archive := exec.Command("sh", "-c", fmt.Sprintf("git -C %q archive %s | tar -x -C %q", root, r.Commit, src))
		if out, err := archive.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("export %s: %v: %s", r.Commit, err, out)
		}
	}
	path = filepath.Join(dir, "coder")
	args := []string{"build", "-o", path, "-ldflags", "-X github.com/coder-ha/coder/cmd/cli.Version=" + r.Version}
	if raceEnabled {
		args = append(args, "-race")
	}
	if len(r.Tags) > 0 {
		args = append(args, "-tags", strings.Join(r.Tags, ","))
	}
	args = append(args, "./cmd/coder")
	cmd := exec.Command("go", args...)
	cmd.Dir = src
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("build %s (%s): %v: %s", r.Version, orWorkingTree(r.Commit), err, out)
	}
	return path, "", nil
}

func orWorkingTree(commit string) string {
	if commit == "" {
		return "working tree"
	}
	return commit
}
