package e2e_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// shellBlocks returns the commands of every ```sh block in a markdown file,
// one entry per block: continuation lines joined, comments and blank lines
// dropped.
func shellBlocks(t *testing.T, path string) [][]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var blocks [][]string
	var cur []string
	in := false
	pending := ""
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case !in && strings.TrimSpace(line) == "```sh":
			in, cur = true, nil
			continue
		case in && strings.TrimSpace(line) == "```":
			in = false
			blocks = append(blocks, cur)
			continue
		case !in:
			continue
		}
		line = stripComment(line)
		if strings.HasSuffix(line, "\\") {
			pending += strings.TrimSuffix(line, "\\") + " "
			continue
		}
		cmd := strings.Join(strings.Fields(pending+line), " ")
		pending = ""
		if cmd != "" {
			cur = append(cur, cmd)
		}
	}
	return blocks
}

// stripComment drops a trailing "# ..." outside quotes.
func stripComment(line string) string {
	quote := rune(0)
	for i, r := range line {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote == 0 && (r == '"' || r == '\''):
			quote = r
		case quote == 0 && r == '#' && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			return strings.TrimRight(line[:i], " \t")
		}
	}
	return strings.TrimRight(line, " \t")
}

// shellProcess is one README command run by bash in its own process group.
type shellProcess struct {
	cmd  *exec.Cmd
	out  *clitest.SyncBuffer
	done chan struct{}
}

func (p *shellProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// startShell runs command with bash in dir, with env added to the test's
// environment minus CODER_ variables. The process group is stopped (SIGTERM,
// then SIGKILL) at cleanup.
func startShell(t *testing.T, name, dir string, env []string, command string) *shellProcess {
	t.Helper()
	p := &shellProcess{out: &clitest.SyncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command("bash", "-c", command)
	p.cmd.Dir = dir
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CODER_") {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		pgid := p.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- %s: %s ---\n%s", name, command, p.out.String())
		}
	})
	return p
}

// lockPort takes an exclusive flock on $TMPDIR/coder-test-ports/PORT (the
// convention clitest's port reservations use), waiting up to d for another
// test process that holds it, so two test runs on one machine never start
// the README's replicas at once. It reports false when d passed.
func lockPort(t *testing.T, port int, d time.Duration) bool {
	t.Helper()
	dir := filepath.Join(os.TempDir(), "coder-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(port)), os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(d)
	for syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		if time.Now().After(deadline) {
			_ = f.Close()
			return false
		}
		time.Sleep(100 * time.Millisecond) // polling a lock held by another process
	}
	t.Cleanup(func() { _ = f.Close() })
	return true
}

func portFree(addr string) bool {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// makeRecipe returns the commands of a Makefile target's recipe.
func makeRecipe(t *testing.T, path, target string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	in := false
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(line, target+":"):
			in = true
		case in && strings.HasPrefix(line, "\t"):
			out = append(out, strings.TrimSpace(line))
		case in:
			return out
		}
	}
	return out
}

// The README's commands work verbatim: the opening block is `make run` and
// `make test`; the two-replica recipe (a second replica beside the one
// `make run` keeps running, on its built-in Postgres, then the readiness
// curl) brings up two replicas that are ready and meshed both ways, so a
// DERP client on either reaches a client on the other; and every curl in
// the README answers. `make run` is its Makefile recipe (`make run` also
// builds, and installs missing packages); the other commands run as
// written, from a directory whose bin/coder is the binary under test; only
// the cache directory is chosen by the test (CODER_CACHE_DIRECTORY), so the
// built-in Postgres lives in a temporary directory.
func TestReadmeCommandsWorkVerbatim(t *testing.T) {
	// Not parallel with the other tests on purpose: it owns ports 3000/3001.
	blocks := shellBlocks(t, filepath.Join("..", "..", "README.md"))
	if len(blocks) < 3 {
		t.Fatalf("README has %d sh blocks, want the opening, the readiness check and the two-replica recipe", len(blocks))
	}
	if opening := strings.Join(blocks[0], "\n"); !strings.HasPrefix(opening, "make run") || !strings.Contains(opening, "make test") {
		t.Fatalf("README does not open with make run and make test:\n%s", opening)
	}
	var recipe []string
	var curls []string
	for _, b := range blocks {
		for _, c := range b {
			if strings.HasPrefix(c, "curl ") {
				curls = append(curls, c)
			}
		}
		if strings.Contains(strings.Join(b, "\n"), "postgres-builtin-url") {
			recipe = b
		}
	}
	if len(recipe) != 3 || recipe[0] != "make run" ||
		!strings.HasPrefix(recipe[1], "./bin/coder server") || !strings.HasPrefix(recipe[2], "curl ") {
		t.Fatalf("the two-replica recipe is not (make run, second replica, curl): %q", recipe)
	}
	run := makeRecipe(t, filepath.Join("..", "..", "Makefile"), "run")
	if len(run) != 1 || !strings.HasPrefix(run[0], "./bin/coder server") {
		t.Fatalf("make run's recipe is not one ./bin/coder server command: %q", run)
	}
	for _, port := range []int{3000, 3001} {
		if !lockPort(t, port, 3*time.Minute) {
			t.Skipf("port %d stays reserved by another test process; the README's commands need it", port)
		}
	}
	for _, addr := range []string{"127.0.0.1:3000", "127.0.0.1:3001"} {
		if !portFree(addr) {
			t.Skipf("%s is in use on this machine; the README's commands need it", addr)
		}
	}

	// Traversable by everyone (t.TempDir is not), so that as root the
	// built-in Postgres keeps its data in this directory rather than in
	// /var/lib/coder/postgres (docs/security.md).
	dir, err := os.MkdirTemp("", "coder-readme-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(clitest.Binary(t), filepath.Join(dir, "bin", "coder")); err != nil {
		t.Fatal(err)
	}
	env := []string{"CODER_CACHE_DIRECTORY=" + filepath.Join(dir, "cache")}
	first := startShell(t, "first replica (make run)", dir, env, "exec "+run[0])
	firstURL := "http://127.0.0.1:3000"
	r1 := &clitest.Process{URL: firstURL}
	wait.For(t, 90*time.Second, "the first replica to answer /readyz 200", func() bool {
		return first.exited() || r1.Status("/readyz") == 200
	})
	if first.exited() {
		t.Fatalf("the first replica exited:\n%s", first.out.String())
	}

	second := startShell(t, "second replica", dir, env, "exec "+recipe[1])
	r2 := &clitest.Process{URL: "http://127.0.0.1:3001"}
	wait.For(t, 90*time.Second, "the second replica to answer /readyz 200", func() bool {
		return second.exited() || r2.Status("/readyz") == 200
	})
	if second.exited() {
		t.Fatalf("the second replica exited:\n%s", second.out.String())
	}

	// The README's own curls, as written.
	for _, c := range curls {
		cmd := exec.Command("bash", "-c", c)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil || len(bytes.TrimSpace(out)) == 0 {
			t.Errorf("%s: err=%v output=%q", c, err, out)
		}
		if strings.Contains(c, "/readyz") && strings.TrimSpace(string(out)) != "OK" {
			t.Errorf("%s printed %q, want OK", c, out)
		}
	}

	// Ready means meshed: a client on one replica reaches a client on the
	// other through the two relays.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := derptest.Connect(ctx, firstURL)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := derptest.Connect(ctx, r2.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !derptest.Reachable(a, b, 10*time.Second) || !derptest.Reachable(b, a, 10*time.Second) {
		t.Fatal("a client on replica 3000 and one on replica 3001 cannot reach each other")
	}
}
