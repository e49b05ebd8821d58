package coderd

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/coder/quartz"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/relayguard"
	"github.com/coder-ha/coder/replicasync"
)

// Config is everything `coder server` is told by flags and environment.
// Zero values are replaced by the documented defaults in withDefaults,
// which takes them from DefaultConfig.
type Config struct {
	// HTTPAddress is where the API and the relay listen. "*:80" and ":80"
	// mean every interface. Default 127.0.0.1:3000.
	HTTPAddress string
	// AccessURL is the public URL, normally the load balancer. Default
	// http:// + HTTPAddress. Only an access URL given explicitly is taken
	// to be a load balancer: the implicit default names this replica
	// itself, so a relay URL may equal it (one machine, several replicas).
	AccessURL string
	// PostgresURL is the shared database. Empty (and no PostgresURLFile):
	// run the built-in Postgres in CacheDir.
	PostgresURL string
	// PostgresURLFile is a file holding PostgresURL, read again whenever a
	// connection is opened (pool, LISTEN, migrations), so a rotated
	// Kubernetes Secret takes effect without a restart. Setting both is
	// an error.
	PostgresURLFile string
	// CacheDir keeps the built-in Postgres. Default $XDG_CACHE_HOME/coder.
	CacheDir string
	// PostgresPubsub is how replicas hear of each other: "listen"
	// (LISTEN/NOTIFY), "poll" (re-read the replicas table every second;
	// works behind PgBouncer in transaction pooling) or "auto" (listen,
	// unless a self-test at start shows notifications do not arrive).
	// Default auto.
	PostgresPubsub string

	// DERPServerEnable runs the embedded relay at /derp and meshes it.
	DERPServerEnable bool
	// DERPServerRelayURL is how peer replicas reach this replica directly.
	// Default: the listen URL (http:// + HTTPAddress, as the implicit
	// access URL) when no AccessURL is given either, so replicas started
	// side by side on one machine mesh both ways; empty otherwise (behind
	// a load balancer the listen address says nothing about how peers
	// reach this replica). No default with port 0 or the DERP server off.
	DERPServerRelayURL string
	// DERPServerRegionID: replicas mesh only within a region. Default 999.
	DERPServerRegionID int
	// DERPServerRegionCode and Name label the region in the DERP map.
	DERPServerRegionCode string
	DERPServerRegionName string
	// DERPConfigPath is a DERP map JSON file of custom relays.
	DERPConfigPath string
	// DERPServerVerifyClientURL is an admission webhook in tailscale's
	// format (headscale serves one at /verify). Empty: every client may use
	// the relay. Mesh connections are admitted by the mesh key, never here.
	DERPServerVerifyClientURL string
	// DERPServerVerifyClientURLFailOpen admits new clients while the
	// webhook cannot be reached. Default false (fail closed).
	DERPServerVerifyClientURLFailOpen bool
	// DERPServerVerifyClientInterval: with a webhook, connected clients are
	// verified again at this interval (spread over it) and disconnected
	// when it now refuses them. 0: never (as the flag's 0; the flag's
	// default is relayguard.DefaultVerifyInterval, 1m).
	DERPServerVerifyClientInterval time.Duration
	// DERPServerMaxConnections caps DERP client connections per replica
	// (mesh connections never count). 0: relayguard.DefaultMaxConnections;
	// negative: no cap.
	DERPServerMaxConnections int
	// DERPServerAcceptRate is new DERP client connections accepted per
	// second per replica. 0: relayguard.DefaultAcceptRate; negative: no
	// limit.
	DERPServerAcceptRate float64
	// DERPServerAcceptRatePerIP is the same per client IP address. 0: off
	// (behind a load balancer that hides client addresses every client
	// shares one).
	DERPServerAcceptRatePerIP float64
	// DERPServerSTUNAddress is a UDP host:port for a STUN server beside the
	// relay (tailscale clients find their public address and direct paths
	// with it); the DERP map advertises its port. Empty: no STUN server,
	// and the map says STUNPort -1. Ignored with a warning when the DERP
	// server is disabled.
	DERPServerSTUNAddress string
	// DERPMeshCAFile is a PEM bundle trusted for https relay URLs of peers,
	// in addition to the system roots.
	DERPMeshCAFile string

	// ReplicaHeartbeatInterval: a replica not heard from in 3 intervals is
	// dead. Default 5s.
	ReplicaHeartbeatInterval time.Duration
	// ReplicaLatencyThreshold: warn when a peer or the database is slower.
	// Default 10ms.
	ReplicaLatencyThreshold time.Duration
	// ShutdownGracePeriod: after SIGTERM, fail /readyz this long before
	// closing listeners. Default 0.
	ShutdownGracePeriod time.Duration

	PrometheusEnable  bool
	PrometheusAddress string // default 127.0.0.1:2112

	TLSEnable   bool
	TLSAddress  string // default 127.0.0.1:3443
	TLSCertFile string
	TLSKeyFile  string

	// HTTPReadTimeout and HTTPWriteTimeout bound reading a whole request and
	// writing its answer on the HTTP and TLS listeners (not on connections
	// the relay upgrades). Zero: 30s and 60s. Not flags: tests shorten them.
	HTTPReadTimeout  time.Duration
	HTTPWriteTimeout time.Duration

	// Version is reported in buildinfo and the replica row.
	Version string

	// DebugClockOffset shifts this process's local clock as replica sync
	// sees it (hidden flag, for fault tests): liveness must not depend on it.
	DebugClockOffset time.Duration

	// DebugPprofAddress, when set, serves net/http/pprof there (hidden
	// flag, for profiling a loaded fleet). Loopback only, like the metrics
	// address: profiles reveal internals.
	DebugPprofAddress string

	// Clock is the one clock of every local time decision the server and
	// the parts it starts make: readiness, the version and schema watches,
	// the shutdown grace period, the token caches, the TLS reload pace,
	// the relay guard, the relay mesh, the database connection and
	// migrations, the pubsub, and replica sync (only replica sync's is
	// shifted by DebugClockOffset). Never liveness, which is the
	// database's now(). Not a flag: tests step a quartz.Mock. Default: the
	// real clock. What stays on real time, and why: docs/architecture.md.
	Clock quartz.Clock
}

// The values of --postgres-pubsub.
const (
	PubsubAuto   = "auto"
	PubsubListen = "listen"
	PubsubPoll   = "poll"
)

// ConfigError is a start-up rule violation: one line, naming the flag.
type ConfigError struct {
	Flag string
	Msg  string
}

func (e *ConfigError) Error() string { return fmt.Sprintf("--%s: %s", e.Flag, e.Msg) }

// DefaultCacheDir is $XDG_CACHE_HOME/coder, falling back to ~/.cache/coder.
func DefaultCacheDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "coder")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "coder")
	}
	return filepath.Join(os.TempDir(), "coder-cache")
}

// ListenAddress turns the operator's address into one net.Listen takes:
// "*:80" → ":80".
func ListenAddress(addr string) string {
	if strings.HasPrefix(addr, "*:") {
		return addr[1:]
	}
	return addr
}

// DefaultConfig is every default of `coder server` in one place: the
// flags' defaults (cmd/cli takes them from here) and what withDefaults
// gives a zero field. Defaults of behaviour another package owns are read
// from that package, never written again here: the heartbeat, the
// latency threshold and the region from replicasync.DefaultOptions, the
// relay's limits from relayguard.
//
// Two flag defaults are not what a zero field means, because zero is a
// value the operator may choose: DERPServerEnable (the flag defaults to
// true; a zero Config runs no relay) and DERPServerVerifyClientInterval
// (the flag defaults to relayguard.DefaultVerifyInterval; 0 means never).
func DefaultConfig() Config {
	rs := replicasync.DefaultOptions()
	return Config{
		HTTPAddress:                    "127.0.0.1:3000",
		CacheDir:                       DefaultCacheDir(),
		PostgresPubsub:                 PubsubAuto,
		DERPServerEnable:               true,
		DERPServerRegionID:             int(rs.RegionID), // 999
		DERPServerRegionCode:           "coder",
		DERPServerRegionName:           "Coder Embedded Relay",
		DERPServerVerifyClientInterval: relayguard.DefaultVerifyInterval, // 1m
		DERPServerMaxConnections:       relayguard.DefaultMaxConnections, // 2000
		DERPServerAcceptRate:           relayguard.DefaultAcceptRate,     // 500/s
		ReplicaHeartbeatInterval:       rs.HeartbeatInterval,             // 5s
		ReplicaLatencyThreshold:        rs.LatencyThreshold,              // 10ms
		PrometheusAddress:              "127.0.0.1:2112",
		TLSAddress:                     "127.0.0.1:3443",
		HTTPReadTimeout:                httpReadTimeout,  // 30s
		HTTPWriteTimeout:               httpWriteTimeout, // 60s
		Version:                        "dev",
		Clock:                          quartz.NewReal(),
	}
}

// StaleAfterBeats is how many heartbeat intervals a replica may go unheard
// before its peers consider it dead: replicasync's rule
// (replicasync.StaleAfterBeats), named here for the help text, the
// start-up rule and the log line. coderd never sets StaleAfter, so the
// rule holds at every --replica-heartbeat-interval.
const StaleAfterBeats = replicasync.StaleAfterBeats

// withDefaults fills in defaults and checks the start-up rules that need no
// database. It returns the first violation as a *ConfigError.
func (c Config) withDefaults(log *zap.Logger) (Config, error) {
	d := DefaultConfig()
	if c.HTTPAddress == "" {
		c.HTTPAddress = d.HTTPAddress
	}
	switch c.PostgresPubsub {
	case "":
		c.PostgresPubsub = d.PostgresPubsub
	case PubsubAuto, PubsubListen, PubsubPoll:
	default:
		return c, &ConfigError{"postgres-pubsub", fmt.Sprintf("must be auto, listen or poll, got %q", c.PostgresPubsub)}
	}
	if _, _, err := net.SplitHostPort(ListenAddress(c.HTTPAddress)); err != nil {
		return c, &ConfigError{"http-address", fmt.Sprintf("%q is not host:port", c.HTTPAddress)}
	}
	if c.PostgresURL != "" && c.PostgresURLFile != "" {
		return c, &ConfigError{"postgres-url-file", "cannot be used together with --postgres-url (CODER_PG_CONNECTION_URL): set one of them"}
	}
	accessExplicit := c.AccessURL != ""
	listenURL := ""
	if host, port, _ := net.SplitHostPort(ListenAddress(c.HTTPAddress)); port != "0" {
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "127.0.0.1"
		}
		listenURL = "http://" + net.JoinHostPort(host, port)
	}
	if !accessExplicit {
		c.AccessURL = listenURL
		if c.AccessURL == "" { // port 0: known only once listening
			c.AccessURL = "http://" + ListenAddress(c.HTTPAddress)
		}
		if c.DERPServerEnable && c.DERPServerRelayURL == "" && listenURL != "" {
			// Without a load balancer in front the listen URL is how
			// peers reach this replica: the same default as the access
			// URL, so that a replica started beside `make run` meshes
			// with it both ways.
			// ("server started" logs it.)
			c.DERPServerRelayURL = listenURL
		}
	}
	access, err := url.Parse(c.AccessURL)
	if err != nil || !access.IsAbs() || (access.Scheme != "http" && access.Scheme != "https") || access.Host == "" {
		return c, &ConfigError{"access-url", fmt.Sprintf("must be an absolute http or https URL, got %q", c.AccessURL)}
	}
	if c.CacheDir == "" {
		c.CacheDir = d.CacheDir
	}
	if c.DERPServerRegionID == 0 {
		c.DERPServerRegionID = d.DERPServerRegionID
	}
	if c.DERPServerRegionCode == "" {
		c.DERPServerRegionCode = d.DERPServerRegionCode
	}
	if c.DERPServerRegionName == "" {
		c.DERPServerRegionName = d.DERPServerRegionName
	}
	if c.ReplicaHeartbeatInterval <= 0 {
		c.ReplicaHeartbeatInterval = d.ReplicaHeartbeatInterval
	}
	if c.ReplicaLatencyThreshold <= 0 {
		c.ReplicaLatencyThreshold = d.ReplicaLatencyThreshold
	}
	if c.ShutdownGracePeriod < 0 {
		return c, &ConfigError{"shutdown-grace-period", "must not be negative"}
	}
	if c.PrometheusAddress == "" {
		c.PrometheusAddress = d.PrometheusAddress
	}
	if c.TLSAddress == "" {
		c.TLSAddress = d.TLSAddress
	}
	if c.TLSEnable && (c.TLSCertFile == "" || c.TLSKeyFile == "") {
		return c, &ConfigError{"tls-cert-file", "--tls-enable needs --tls-cert-file and --tls-key-file"}
	}
	if c.DERPServerVerifyClientURL != "" {
		u, err := url.Parse(c.DERPServerVerifyClientURL)
		if err != nil || !u.IsAbs() || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return c, &ConfigError{"derp-server-verify-client-url", "must be an absolute http or https URL such as https://headscale.example.com/verify"}
		}
	}
	if c.DERPServerVerifyClientInterval < 0 {
		return c, &ConfigError{"derp-server-verify-client-interval", "must not be negative (0: never verify connected clients again)"}
	}
	if c.HTTPReadTimeout <= 0 {
		c.HTTPReadTimeout = d.HTTPReadTimeout
	}
	if c.HTTPWriteTimeout <= 0 {
		c.HTTPWriteTimeout = d.HTTPWriteTimeout
	}
	if c.Version == "" {
		c.Version = d.Version
	}
	if c.Clock == nil {
		c.Clock = d.Clock
	}

	if c.DERPServerSTUNAddress != "" {
		if !c.DERPServerEnable {
			log.Warn("ignoring the stun address because the DERP server is disabled",
				zap.String("stun_address", c.DERPServerSTUNAddress))
			c.DERPServerSTUNAddress = ""
		} else if _, _, err := net.SplitHostPort(ListenAddress(c.DERPServerSTUNAddress)); err != nil {
			return c, &ConfigError{"derp-server-stun-address", fmt.Sprintf("%q is not host:port, e.g. 0.0.0.0:3478", c.DERPServerSTUNAddress)}
		}
	}
	if c.DERPServerRelayURL != "" {
		if !c.DERPServerEnable {
			log.Warn("ignoring the relay URL because the DERP server is disabled; replicas sync through postgres only",
				zap.String("relay_url", c.DERPServerRelayURL))
			c.DERPServerRelayURL = ""
		} else {
			relay, err := url.Parse(c.DERPServerRelayURL)
			if err != nil || !relay.IsAbs() || (relay.Scheme != "http" && relay.Scheme != "https") || relay.Host == "" {
				return c, &ConfigError{"derp-server-relay-url", fmt.Sprintf("must be an absolute http or https URL such as http://10.0.0.1:80, got %q", c.DERPServerRelayURL)}
			}
			// The rule protects against pointing peers at the load balancer;
			// an access URL derived from the listen address is no load
			// balancer, it is this replica.
			if accessExplicit && sameURL(relay, access) {
				return c, &ConfigError{"derp-server-relay-url", fmt.Sprintf("%q equals the access URL; the access URL is the load balancer, the relay URL must reach this replica directly", c.DERPServerRelayURL)}
			}
			c.DERPServerRelayURL = strings.TrimSuffix(relay.String(), "/")
		}
	}
	return c, nil
}

// PostgresSource is where the Postgres URL comes from: the --postgres-url
// given, or --postgres-url-file (read once now, so a missing or unreadable
// file is reported at start, naming the path, never the contents). It is
// nil when neither is set (the built-in Postgres). Both set is an error.
func (c Config) PostgresSource() (*database.URLSource, error) {
	switch {
	case c.PostgresURL != "" && c.PostgresURLFile != "":
		return nil, &ConfigError{"postgres-url-file", "cannot be used together with --postgres-url (CODER_PG_CONNECTION_URL): set one of them"}
	case c.PostgresURLFile != "":
		src, err := database.URLFile(c.PostgresURLFile)
		if err != nil {
			return nil, &ConfigError{"postgres-url-file", err.Error()}
		}
		return src, nil
	case c.PostgresURL != "":
		return database.StaticURL(c.PostgresURL), nil
	}
	return nil, nil
}

// sameURL compares scheme, host (with default ports) and path.
func sameURL(a, b *url.URL) bool {
	norm := func(u *url.URL) string {
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
		}
		return strings.ToLower(u.Scheme) + "://" + strings.ToLower(host) + ":" + port + strings.TrimSuffix(u.Path, "/")
	}
	return norm(a) == norm(b)
}
