package relayguard_test

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/relayguard"
)

// A webhook URL may carry a credential in its user info or query (many
// webhooks take a shared secret that way): no log line may show it, not
// even the transport error of a webhook that cannot be reached.
func TestWebhookCredentialsNeverLogged(t *testing.T) {
	t.Parallel()
	// A port nobody listens on: the webhook is down.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	const secret = "hunter2secret"
	core, logs := observer.New(zap.DebugLevel)
	a := startRelay(t, newMeshKey(), relayguard.Options{
		VerifyURL: "http://admin:" + secret + "pw@" + addr + "/verify?token=" + secret,
		Logger:    zap.New(core),
	})
	other := connect(t, a) // refused: fail closed
	assertRefused(t, a, key.NewNode(), other, "a client while the webhook is down")
	if logs.FilterMessageSnippet("webhook is failing").Len() == 0 {
		t.Fatal("the failing webhook was not logged")
	}
	for _, e := range logs.All() {
		if line := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(line, secret) {
			t.Errorf("a log line shows the webhook's credential: %s", line)
		}
	}
}
