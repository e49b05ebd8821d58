package cli_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

const envWarning = "not a setting of this command"

// envWarnings are the lines of out that warn about an environment variable.
func envWarnings(out string) []string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, envWarning) {
			lines = append(lines, l)
		}
	}
	return lines
}

// A mistyped setting (CODER_DERP_SERVER_VERIFY_CLIENTURL: one underscore
// short, so the relay would silently stay open) is a WARN line at start
// naming the variable and the setting it was likely meant as; its value
// never appears anywhere in the output.
func TestMistypedEnvironmentVariableIsWarnedAboutWithoutItsValue(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "typo", PostgresURL: pg, Env: []string{
		"CODER_DERP_SERVER_VERIFY_CLIENTURL=secret-value",
	}})
	p.WaitReady(60 * time.Second)
	p.Signal(syscall.SIGTERM)
	if code := p.Wait(30 * time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	out := p.Output()
	lines := envWarnings(out)
	if len(lines) != 1 {
		t.Fatalf("want exactly one environment warning, got %q", lines)
	}
	for _, want := range []string{"WARN", `"variable": "CODER_DERP_SERVER_VERIFY_CLIENTURL"`, `"did_you_mean": "CODER_DERP_SERVER_VERIFY_CLIENT_URL"`, `"command": "coder server"`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the warning lacks %s: %s", want, lines[0])
		}
	}
	if strings.Contains(out, "secret-value") {
		t.Fatalf("the variable's value appears in the output:\n%s", out)
	}
}

// No warning for what a command does read: every variable of the HA
// guide's table (CODER_ADDRESS is an alias of CODER_HTTP_ADDRESS), the
// variables test helpers set (CODER_TEST_*) and the service links
// Kubernetes injects for a Service named coder. Client variables are
// settings of the client commands, and a subcommand of `coder server`
// runs in the server's environment without complaint; but `coder server`
// names a client variable it does not read, and the commands that do.
func TestSettingsOfTheCommandAreNotWarnedAbout(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewURL(t)
	p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "server", PostgresURL: pg, Env: []string{
		"CODER_TEST_PG_URL=" + pg,
		"CODER_SERVICE_HOST=10.0.0.1", "CODER_SERVICE_PORT=80", "CODER_PORT=tcp://10.0.0.1:80",
		"CODER_PORT_80_TCP_ADDR=10.0.0.1", "CODER_METRICS_SERVICE_PORT_METRICS=2112",
		"CODER_VERBOSE=false", "CODER_LOGGING_JSON=false",
		"CODER_URL=http://127.0.0.1:1",
	}})
	p.WaitReady(60 * time.Second)
	lines := envWarnings(p.Output())
	if len(lines) != 1 || !strings.Contains(lines[0], `"variable": "CODER_URL"`) || !strings.Contains(lines[0], `"setting_of": "coder debug mesh, coder replicas"`) {
		t.Fatalf("want one warning, naming CODER_URL and the client commands that read it; got %q", lines)
	}

	serverEnv := []string{
		"CODER_ACCESS_URL=https://coder.example.com", "CODER_DERP_SERVER_RELAY_URL=http://10.0.0.1:8080",
		"CODER_HTTP_ADDRESS=0.0.0.0:8080", "CODER_PG_CONNECTION_URL=" + pg,
	}
	tok := clitest.Start(t, "create-token", serverEnv, "server", "create-token")
	if code := tok.Wait(60 * time.Second); code != 0 {
		t.Fatalf("create-token exit %d: %s", code, tok.Output())
	}
	token := strings.TrimSpace(tok.Output())
	if w := envWarnings(token); len(w) > 0 || strings.Contains(token, "\n") {
		t.Fatalf("create-token in the server's environment printed more than a token: %q", tok.Output())
	}
	cli := clitest.Start(t, "replicas", []string{"CODER_URL=" + p.URL, "CODER_SESSION_TOKEN=" + token}, "replicas")
	if code := cli.Wait(30 * time.Second); code != 0 {
		t.Fatalf("coder replicas exit %d: %s", code, cli.Output())
	}
	if w := envWarnings(cli.Output()); len(w) > 0 {
		t.Fatalf("a client command warned about its own settings: %q", w)
	}
}
