// Package clitest runs real coder server processes for end-to-end tests:
// it builds the binary once per test process, starts replicas with chosen
// flags, waits for conditions by polling, and keeps each process's output
// for assertions and for failure reports.
package clitest

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/wait"
)

var (
	buildOnce sync.Once
	buildErr  error
	binPath   string
)

// BinaryOverride, when set, is the binary Binary returns instead of
// building ./cmd/coder: the bench's A/B runs compare two builds in one
// process. Tests leave it empty.
var BinaryOverride string

// Binary builds ./cmd/coder (with -race when the tests run with it) once per
// test process and returns its path (BinaryOverride when set).
func Binary(t testing.TB) string {
	t.Helper()
	if BinaryOverride != "" {
		return BinaryOverride
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "coder-bin-*")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "coder")
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		args := []string{"build", "-o", binPath}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, "./cmd/coder")
		cmd := exec.Command("go", args...)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// FreePort returns a TCP port on 127.0.0.1 for a server the test is about
// to start, reserved for the rest of the test.
//
// Ports come from below the kernel's ephemeral range
// (/proc/sys/net/ipv4/ip_local_port_range), so no outgoing connection of
// any process can take one between FreePort and the server's bind (the
// "bind: address already in use" seen at N=100 with port-0 picking). Each
// port is reserved with an exclusive flock on a file under
// $TMPDIR/coder-test-ports until the test ends, so concurrent test
// processes (go test runs packages in parallel) never hand out the same
// port; the lock goes away with the process, even after kill -9. The port
// is also checked free by binding it. Where the range cannot be read it
// falls back to a kernel-chosen port.
func FreePort(t testing.TB) int {
	t.Helper()
	port, err := reservePort(t)
	if err != nil {
		t.Fatalf("reserve a port: %v", err)
	}
	return port
}

// portRangeLow is the lowest port FreePort hands out.
const portRangeLow = 20000

func reservePort(t testing.TB) (int, error) {
	lo, hi := portRangeLow, ephemeralLow()
	if hi-lo < 1000 {
		return kernelPort()
	}
	dir := filepath.Join(os.TempDir(), "coder-test-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		return 0, err
	}
	start := lo + rand.IntN(hi-lo)
	for i := 0; i < hi-lo; i++ {
		port := lo + (start-lo+i)%(hi-lo)
		f, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(port)), os.O_CREATE|os.O_RDWR, 0o666)
		if err != nil {
			return 0, err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			_ = f.Close() // reserved by another test or process
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			_ = f.Close() // in use by something that does not reserve
			continue
		}
		_ = l.Close()
		t.Cleanup(func() { _ = f.Close() })
		return port, nil
	}
	return 0, fmt.Errorf("no free port in %d-%d", lo, hi-1)
}

// ephemeralLow is the first port of the kernel's ephemeral range (0 when
// unknown).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0
	}
	lo, _ := strconv.Atoi(f[0])
	return lo
}

func kernelPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// SyncBuffer is a bytes.Buffer safe for a process writing while a test
// reads: give it to exec.Cmd's Stdout/Stderr and read String at any time.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Process is one running coder command.
type Process struct {
	t      testing.TB
	cmd    *exec.Cmd
	out    *SyncBuffer
	done   chan struct{}
	err    error
	Name   string
	Port   int    // the HTTP port, when started by StartServer
	URL    string // http://127.0.0.1:Port
	killed bool
}

// Start runs the binary with args and extra environment. The process is
// killed at cleanup if still running; its output is logged if the test
// failed.
func Start(t testing.TB, name string, env []string, args ...string) *Process {
	t.Helper()
	return StartBinary(t, Binary(t), name, env, args...)
}

// StartBinary is Start with another coder binary (BuildRelease).
func StartBinary(t testing.TB, bin, name string, env []string, args ...string) *Process {
	t.Helper()
	p := &Process{t: t, out: &SyncBuffer{}, done: make(chan struct{}), Name: name}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = append(cleanEnv(), env...)
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.Exited() {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- output of %s ---\n%s", name, p.Output())
		}
	})
	return p
}

// cleanEnv is the test's environment without CODER_ variables that could
// change a server's behaviour behind the test's back.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if len(kv) > 6 && kv[:6] == "CODER_" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// StartServer starts `coder server` on a free port with args appended.
func StartServer(t testing.TB, name string, env []string, args ...string) *Process {
	t.Helper()
	port := FreePort(t)
	full := append([]string{"server", "--http-address", "127.0.0.1:" + strconv.Itoa(port)}, args...)
	p := Start(t, name, env, full...)
	p.Port = port
	p.URL = "http://127.0.0.1:" + strconv.Itoa(port)
	return p
}

// Output is everything the process printed so far.
func (p *Process) Output() string { return p.out.String() }

// Exited reports whether the process has exited.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to d for the process to exit and returns its exit code
// (-1 if it did not exit in time).
func (p *Process) Wait(d time.Duration) int {
	select {
	case <-p.done:
	case <-time.After(d):
		return -1
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

// Signal sends sig to the process.
func (p *Process) Signal(sig syscall.Signal) {
	_ = p.cmd.Process.Signal(sig)
}

// Kill kills the process with SIGKILL and waits for it.
func (p *Process) Kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Pid is the process id.
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Status GETs path on the server and returns the status code (0 when the
// request failed).
func (p *Process) Status(path string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, p.URL+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// WaitReady polls /readyz until it answers 200 or d passes; it fails the
// test with the process's output otherwise.
func (p *Process) WaitReady(d time.Duration) {
	p.t.Helper()
	if !Eventually(d, func() bool { return p.Status("/readyz") == http.StatusOK || p.Exited() }) || p.Exited() {
		p.t.Fatalf("%s did not become ready within %s (exited=%v)", p.Name, d, p.Exited())
	}
}

// Eventually polls cond until it holds or d passes (wait.Until; kept for
// the tests that call it by this name).
func Eventually(d time.Duration, cond func() bool) bool { return wait.Until(d, cond) }
