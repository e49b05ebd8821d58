package coderd

import (
	"errors"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// The relay URL may equal the access URL only when the access URL is the
// implicit default (this replica's own listen address): an explicit access
// URL is the load balancer, and peers must never relay through it.
func TestRelayURLEqualToAccessURLIsRefusedOnlyWhenAccessURLIsExplicit(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		cfg     Config
		refused bool
	}{
		{"implicit access URL, same machine replica", Config{HTTPAddress: "127.0.0.1:3001", DERPServerRelayURL: "http://127.0.0.1:3001"}, false},
		{"implicit access URL from all interfaces", Config{HTTPAddress: "0.0.0.0:3000", DERPServerRelayURL: "http://127.0.0.1:3000/"}, false},
		{"explicit access URL equal to relay URL", Config{HTTPAddress: "127.0.0.1:3001", AccessURL: "http://127.0.0.1:3001", DERPServerRelayURL: "http://127.0.0.1:3001"}, true},
		{"explicit load balancer, default port spelled out", Config{AccessURL: "https://coder.example.com", DERPServerRelayURL: "https://CODER.example.com:443/"}, true},
		{"explicit load balancer, own relay URL", Config{AccessURL: "https://coder.example.com", DERPServerRelayURL: "http://10.0.0.1:8080"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.DERPServerEnable = true
			_, err := tc.cfg.withDefaults(zap.NewNop())
			var cfgErr *ConfigError
			switch {
			case tc.refused && (!errors.As(err, &cfgErr) || cfgErr.Flag != "derp-server-relay-url" || !strings.Contains(err.Error(), "equals the access URL")):
				t.Fatalf("want the equal-URL refusal naming --derp-server-relay-url, got %v", err)
			case !tc.refused && err != nil:
				t.Fatalf("refused: %v", err)
			}
		})
	}
}

// Without --access-url and --derp-server-relay-url the relay URL is the
// listen URL (like the access URL), so replicas side by side on one
// machine mesh both ways; behind a load balancer (an explicit access URL),
// with the DERP server off, or with port 0 there is no default.
func TestRelayURLDefaultsToTheListenURLOnlyWithoutAnAccessURL(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		cfg  Config
		want string
	}{
		{"nothing given", Config{HTTPAddress: "127.0.0.1:3001", DERPServerEnable: true}, "http://127.0.0.1:3001"},
		{"default address", Config{DERPServerEnable: true}, "http://127.0.0.1:3000"},
		{"all interfaces", Config{HTTPAddress: "*:3000", DERPServerEnable: true}, "http://127.0.0.1:3000"},
		{"explicit relay URL", Config{HTTPAddress: "127.0.0.1:3001", DERPServerEnable: true, DERPServerRelayURL: "http://10.0.0.1:3001"}, "http://10.0.0.1:3001"},
		{"access URL given", Config{HTTPAddress: "127.0.0.1:3001", DERPServerEnable: true, AccessURL: "https://coder.example.com"}, ""},
		{"DERP server off", Config{HTTPAddress: "127.0.0.1:3001"}, ""},
		{"port 0", Config{HTTPAddress: "127.0.0.1:0", DERPServerEnable: true}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.cfg.withDefaults(zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			if c.DERPServerRelayURL != tc.want {
				t.Fatalf("relay URL %q, want %q", c.DERPServerRelayURL, tc.want)
			}
		})
	}
}
