//go:build bench

// Where the benchmark writes its files: tables and profiles.

package bench_test

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
)

// benchOut is where result files go (BENCH_OUT, default bench-results).
func benchOut() string {
	out := os.Getenv("BENCH_OUT")
	if out == "" {
		out = "bench-results"
	}
	_ = os.MkdirAll(out, 0o755)
	return out
}

func writeBenchFile(name, content string) {
	_ = os.WriteFile(filepath.Join(benchOut(), name), []byte(content), 0o644)
}

// saveProfile GETs /debug/pprof/<what> from the pprof port into a file.
func saveProfile(t *testing.T, port int, what, name string) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/%s", port, what))
	if err != nil {
		t.Logf("profile %s: %v", name, err)
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(filepath.Join(benchOut(), name))
	if err != nil {
		return
	}
	_, _ = io.Copy(f, resp.Body)
	_ = f.Close()
}
