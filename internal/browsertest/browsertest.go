// Package browsertest drives a real headless Chromium from Go tests
// (chromedp): it starts one browser per test with flags that keep it off the
// network, records everything the page writes to its console (uncaught
// exceptions, console errors, CSP violations, failed requests), and closes
// the browser when the test ends.
//
// When Chromium is not installed the test is skipped with a message that
// says how to install it, unless CODER_TEST_REQUIRE_CHROMIUM=1 (CI), in
// which case it fails.
package browsertest

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// RequireEnv names the environment variable that turns a missing Chromium
// from a skip into a failure.
const RequireEnv = "CODER_TEST_REQUIRE_CHROMIUM"

// ActionTimeout bounds each Do and Eval: generous, for a loaded machine.
const ActionTimeout = 30 * time.Second

// PollInterval is how often Poll evaluates its condition: each evaluation
// is a round trip to the browser, too costly for wait.Interval.
const PollInterval = 100 * time.Millisecond

// Browser is one headless Chromium with one tab.
type Browser struct {
	t   testing.TB
	ctx context.Context // the tab

	mu       sync.Mutex
	messages []chromedp.ConsoleMessage // guarded by mu
}

// ExecPath is the Chromium binary the tests use, or "" when none is
// installed.
func ExecPath() string {
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// New starts Chromium for t and opens one tab; both close when t ends. It
// skips t when Chromium is missing (fails it with CODER_TEST_REQUIRE_CHROMIUM=1).
func New(t testing.TB) *Browser {
	t.Helper()
	path := ExecPath()
	if path == "" {
		msg := "chromium is not installed: install it with `WITH_CHROMIUM=1 ./scripts/deps.sh` (Debian's chromium package)"
		if os.Getenv(RequireEnv) == "1" {
			t.Fatalf("%s, and %s=1", msg, RequireEnv)
		}
		t.Skip(msg)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(path),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("no-default-browser-check", true),
		// Without these Chromium keeps dialing out (updates, sync, field
		// trials, safe browsing) and logs every refused connection on a
		// closed network.
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-default-apps", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-breakpad", true),
		chromedp.Flag("disable-client-side-phishing-detection", true),
		chromedp.Flag("disable-features", "Translate,OptimizationHints,MediaRouter"),
		chromedp.Flag("metrics-recording-only", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.Flag("mute-audio", true),
		chromedp.Flag("password-store", "basic"),
		chromedp.Flag("use-mock-keychain", true),
		chromedp.WindowSize(1280, 900),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(allocCtx)
	b := &Browser{t: t, ctx: ctx}

	// The first Run starts the browser and binds it to ctx: no timeout here
	// (a timeout would stop the browser), Chromium's own start-up timeout
	// applies.
	if err := chromedp.Do(ctx); err != nil {
		cancelTab()
		cancelAlloc()
		t.Fatalf("start chromium (%s): %v", path, err)
	}
	messages := chromedp.Console(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for m, err := range messages {
			if err != nil {
				return
			}
			b.mu.Lock()
			b.messages = append(b.messages, m)
			b.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc() // waits for the browser process to exit
		<-done
		if t.Failed() {
			for _, m := range b.Messages() {
				t.Logf("browser console: %s (%s:%d)", m, m.URL, m.Line+1)
			}
		}
	})
	return b
}

// Context is the tab's chromedp context, for chromedp calls this package
// does not wrap. Bound each call with a timeout derived from it.
func (b *Browser) Context() context.Context { return b.ctx }

// Do runs actions in the tab, each call bounded by ActionTimeout.
func (b *Browser) Do(actions ...chromedp.Action[chromedp.Void]) error {
	ctx, cancel := context.WithTimeout(b.ctx, ActionTimeout)
	defer cancel()
	return chromedp.Do(ctx, actions...)
}

// MustDo is Do failing the test on error.
func (b *Browser) MustDo(actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	if err := b.Do(actions...); err != nil {
		b.t.Fatal(err)
	}
}

// Eval evaluates a JavaScript expression in the tab and decodes its JSON
// value into T.
func Eval[T any](b *Browser, expression string) (T, error) {
	ctx, cancel := context.WithTimeout(b.ctx, ActionTimeout)
	defer cancel()
	return chromedp.Run(ctx, chromedp.Evaluate[T](expression))
}

// MustEval is Eval failing the test on error.
func MustEval[T any](b *Browser, expression string) T {
	b.t.Helper()
	v, err := Eval[T](b, expression)
	if err != nil {
		b.t.Fatalf("evaluate %q: %v", expression, err)
	}
	return v
}

// Messages is everything the page wrote to the console so far.
func (b *Browser) Messages() []chromedp.ConsoleMessage {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]chromedp.ConsoleMessage(nil), b.messages...)
}

// Problems are the console messages that mean the page misbehaved:
// uncaught exceptions and unhandled rejections, console.error calls, and
// browser log errors (a Content-Security-Policy violation, a failed
// request), except those for which expected returns true (say, the 401
// the test provoked on purpose).
func (b *Browser) Problems(expected func(chromedp.ConsoleMessage) bool) []chromedp.ConsoleMessage {
	var out []chromedp.ConsoleMessage
	for _, m := range b.Messages() {
		if m.Type != chromedp.ConsoleException && m.Type != chromedp.ConsoleError {
			continue
		}
		if expected != nil && expected(m) {
			continue
		}
		out = append(out, m)
	}
	return out
}

// FailedRequestStatus is a predicate for Problems: a browser log entry for
// a request answered with HTTP status code (Chromium's "Failed to load
// resource: the server responded with a status of 401 (Unauthorized)").
func FailedRequestStatus(code string) func(chromedp.ConsoleMessage) bool {
	return func(m chromedp.ConsoleMessage) bool {
		return m.Source == "network" && strings.Contains(m.Text, "status of "+code+" ")
	}
}

// Poll evaluates cond every PollInterval until it holds, failing the test
// after d with what it waited for.
func Poll(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !PollUntil(d, cond) {
		t.Fatalf("timed out after %s waiting for: %s", d, what)
	}
}

// PollUntil is Poll reporting whether cond held instead of failing.
func PollUntil(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(PollInterval)
	}
}
