package cli_test

import (
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// A password with a '/' that was not percent-encoded (a base64 or
// generated password pasted into a URL) makes the rest of the URL parse
// as a path: the host becomes "user:<first part of the password>" and the
// database "<rest of the password>@host/db". The server refuses such a
// URL at once, says what to encode, and prints no part of the password,
// given as --postgres-url, through --postgres-url-file, and to
// create-token.
func TestUnescapedPasswordInPostgresURLIsRefusedWithoutPrintingIt(t *testing.T) {
	t.Parallel()
	const password = "4417/s3cretPart"
	u, err := url.Parse(dbtest.NewURL(t))
	if err != nil {
		t.Fatal(err)
	}
	raw := "postgres://" + u.User.Username() + ":" + password + "@" + u.Host + u.Path + "?" + u.RawQuery
	file := filepath.Join(t.TempDir(), "url")
	if err := os.WriteFile(file, []byte(raw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	clitest.Binary(t)
	runs := []*clitest.Process{
		clitest.StartServer(t, "url", []string{"CODER_PG_CONNECTION_URL=" + raw}),
		clitest.StartServer(t, "file", []string{"CODER_PG_CONNECTION_URL_FILE=" + file}),
		clitest.Start(t, "create-token", []string{"CODER_PG_CONNECTION_URL=" + raw}, "server", "create-token"),
	}
	for _, p := range runs {
		start := time.Now()
		code := p.Wait(45 * time.Second)
		out := p.Output()
		for _, part := range []string{password, "4417", "s3cretPart", url.PathEscape(password), url.QueryEscape(password)} {
			if strings.Contains(out, part) {
				t.Errorf("%s printed (part of) the password (%q):\n%s", p.Name, part, out)
			}
		}
		if code <= 0 {
			t.Errorf("%s: exit code %d, want non-zero:\n%s", p.Name, code, out)
			continue
		}
		if took := time.Since(start); took > 15*time.Second {
			t.Errorf("%s took %s to refuse the URL, want at once", p.Name, took.Round(time.Second))
		}
		if !strings.Contains(out, "percent-encoded") {
			t.Errorf("%s does not say what is wrong with the URL:\n%s", p.Name, out)
		}
	}
}
