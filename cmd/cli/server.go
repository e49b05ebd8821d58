package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/postgres"
)

func newServerCmd() *cobra.Command {
	var (
		cfg     coderd.Config
		verbose bool
		logJSON bool
	)
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a replica of the server",
		Long: `Run a replica of the server. Start the same command on several machines against one
Postgres (--postgres-url) and they form a cluster: each registers itself, finds its
peers, and meshes its embedded DERP relay with theirs. Without --postgres-url a
built-in Postgres is started in --cache-dir.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Version = Version
			return runServer(cmd, cfg, verbose, logJSON)
		},
	}
	// Every default comes from the package that owns it, through
	// coderd.DefaultConfig.
	def := coderd.DefaultConfig()
	f := cmd.Flags()
	pf := cmd.PersistentFlags()
	f.StringVar(&cfg.HTTPAddress, "http-address", def.HTTPAddress, "Listen address; *:80 and :80 mean all interfaces")
	bindEnv(f, "http-address", "CODER_HTTP_ADDRESS", "CODER_ADDRESS")
	f.StringVar(&cfg.AccessURL, "access-url", "", "The public URL, normally the load balancer (default http:// + the listen address)")
	bindEnv(f, "access-url", "CODER_ACCESS_URL")
	pf.StringVar(&cfg.PostgresURL, "postgres-url", "", "The shared Postgres every replica meets in; empty starts the built-in Postgres")
	bindEnv(pf, "postgres-url", "CODER_PG_CONNECTION_URL")
	pf.StringVar(&cfg.PostgresURLFile, "postgres-url-file", "", "A file holding the Postgres URL, read again whenever a connection is opened (a rotated Secret applies without a restart); not with --postgres-url")
	bindEnv(pf, "postgres-url-file", "CODER_PG_CONNECTION_URL_FILE")
	f.StringVar(&cfg.PostgresPubsub, "postgres-pubsub", def.PostgresPubsub, "How replicas hear of each other: listen (LISTEN/NOTIFY), poll (read the replicas table every second; for PgBouncer transaction pooling) or auto")
	bindEnv(f, "postgres-pubsub", "CODER_POSTGRES_PUBSUB")
	pf.StringVar(&cfg.CacheDir, "cache-dir", def.CacheDir, "Where the built-in Postgres keeps its data")
	bindEnv(pf, "cache-dir", "CODER_CACHE_DIRECTORY")
	f.BoolVar(&cfg.DERPServerEnable, "derp-server-enable", def.DERPServerEnable, "Run the embedded DERP relay at /derp")
	bindEnv(f, "derp-server-enable", "CODER_DERP_SERVER_ENABLE")
	f.StringVar(&cfg.DERPServerRelayURL, "derp-server-relay-url", "", "How peer replicas reach THIS replica directly, e.g. http://10.0.0.1:80")
	bindEnv(f, "derp-server-relay-url", "CODER_DERP_SERVER_RELAY_URL")
	f.IntVar(&cfg.DERPServerRegionID, "derp-server-region-id", def.DERPServerRegionID, "Region of the embedded relay; replicas mesh only within a region")
	bindEnv(f, "derp-server-region-id", "CODER_DERP_SERVER_REGION_ID")
	f.StringVar(&cfg.DERPServerRegionCode, "derp-server-region-code", def.DERPServerRegionCode, "Region code in the DERP map")
	bindEnv(f, "derp-server-region-code", "CODER_DERP_SERVER_REGION_CODE")
	f.StringVar(&cfg.DERPServerRegionName, "derp-server-region-name", def.DERPServerRegionName, "Region name in the DERP map")
	bindEnv(f, "derp-server-region-name", "CODER_DERP_SERVER_REGION_NAME")
	f.StringVar(&cfg.DERPServerVerifyClientURL, "derp-server-verify-client-url", "", "Admission webhook (tailscale's DERPAdmitClientRequest format, e.g. headscale's /verify); when set only admitted clients may use the relay")
	bindEnv(f, "derp-server-verify-client-url", "CODER_DERP_SERVER_VERIFY_CLIENT_URL")
	f.BoolVar(&cfg.DERPServerVerifyClientURLFailOpen, "derp-server-verify-client-url-fail-open", false, "Admit new clients while the admission webhook cannot be reached (a relay that fails open is an open relay)")
	bindEnv(f, "derp-server-verify-client-url-fail-open", "CODER_DERP_SERVER_VERIFY_CLIENT_URL_FAIL_OPEN")
	f.DurationVar(&cfg.DERPServerVerifyClientInterval, "derp-server-verify-client-interval", def.DERPServerVerifyClientInterval, "Verify connected DERP clients with the webhook again at this interval (spread over it) and disconnect those it now refuses; 0: never")
	bindEnv(f, "derp-server-verify-client-interval", "CODER_DERP_SERVER_VERIFY_CLIENT_INTERVAL")
	f.IntVar(&cfg.DERPServerMaxConnections, "derp-server-max-connections", def.DERPServerMaxConnections, "DERP client connections one replica holds at once (mesh connections never count); -1: no cap")
	bindEnv(f, "derp-server-max-connections", "CODER_DERP_SERVER_MAX_CONNECTIONS")
	f.Float64Var(&cfg.DERPServerAcceptRate, "derp-server-accept-rate", def.DERPServerAcceptRate, "New DERP client connections accepted per second per replica (burst: twice that); -1: no limit")
	bindEnv(f, "derp-server-accept-rate", "CODER_DERP_SERVER_ACCEPT_RATE")
	f.Float64Var(&cfg.DERPServerAcceptRatePerIP, "derp-server-accept-rate-per-ip", 0, "New DERP client connections accepted per second per client IP (burst: twice that); 0: off")
	bindEnv(f, "derp-server-accept-rate-per-ip", "CODER_DERP_SERVER_ACCEPT_RATE_PER_IP")
	f.StringVar(&cfg.DERPServerSTUNAddress, "derp-server-stun-address", "", "UDP host:port for a STUN server beside the relay, advertised in the DERP map (empty: off)")
	bindEnv(f, "derp-server-stun-address", "CODER_DERP_SERVER_STUN_ADDRESS")
	f.StringVar(&cfg.DERPConfigPath, "derp-config-path", "", "A DERP map JSON file of custom relays")
	bindEnv(f, "derp-config-path", "CODER_DERP_CONFIG_PATH")
	f.StringVar(&cfg.DERPMeshCAFile, "derp-server-mesh-ca-file", "", "PEM CA bundle trusted for peers' https relay URLs, besides the system roots")
	bindEnv(f, "derp-server-mesh-ca-file", "CODER_DERP_SERVER_MESH_CA_FILE")
	f.DurationVar(&cfg.ReplicaHeartbeatInterval, "replica-heartbeat-interval", def.ReplicaHeartbeatInterval, fmt.Sprintf("Heartbeat interval; a replica not heard from in %d intervals is dead", coderd.StaleAfterBeats))
	bindEnv(f, "replica-heartbeat-interval", "CODER_REPLICA_HEARTBEAT_INTERVAL")
	f.DurationVar(&cfg.ReplicaLatencyThreshold, "replica-latency-threshold", def.ReplicaLatencyThreshold, "Warn when a peer or the database is slower than this")
	bindEnv(f, "replica-latency-threshold", "CODER_REPLICA_LATENCY_THRESHOLD")
	f.DurationVar(&cfg.ShutdownGracePeriod, "shutdown-grace-period", 0, "After SIGTERM, fail /readyz this long before closing listeners")
	bindEnv(f, "shutdown-grace-period", "CODER_SHUTDOWN_GRACE_PERIOD")
	f.BoolVar(&cfg.PrometheusEnable, "prometheus-enable", false, "Serve /metrics on --prometheus-address")
	bindEnv(f, "prometheus-enable", "CODER_PROMETHEUS_ENABLE")
	f.StringVar(&cfg.PrometheusAddress, "prometheus-address", def.PrometheusAddress, "Where /metrics listens")
	bindEnv(f, "prometheus-address", "CODER_PROMETHEUS_ADDRESS")
	f.BoolVar(&cfg.TLSEnable, "tls-enable", false, "Serve HTTPS on --tls-address")
	bindEnv(f, "tls-enable", "CODER_TLS_ENABLE")
	f.StringVar(&cfg.TLSAddress, "tls-address", def.TLSAddress, "HTTPS listen address")
	bindEnv(f, "tls-address", "CODER_TLS_ADDRESS")
	f.StringVar(&cfg.TLSCertFile, "tls-cert-file", "", "PEM certificate for HTTPS")
	bindEnv(f, "tls-cert-file", "CODER_TLS_CERT_FILE")
	f.StringVar(&cfg.TLSKeyFile, "tls-key-file", "", "PEM private key for HTTPS")
	bindEnv(f, "tls-key-file", "CODER_TLS_KEY_FILE")
	f.DurationVar(&cfg.DebugClockOffset, "debug-clock-offset", 0, "Shift this process's local clock (fault testing: liveness uses the database clock)")
	bindEnv(f, "debug-clock-offset", "CODER_DEBUG_CLOCK_OFFSET")
	_ = f.MarkHidden("debug-clock-offset")
	f.StringVar(&cfg.DebugPprofAddress, "debug-pprof-address", "", "Serve net/http/pprof on this address (profiling)")
	bindEnv(f, "debug-pprof-address", "CODER_DEBUG_PPROF_ADDRESS")
	_ = f.MarkHidden("debug-pprof-address")
	pf.BoolVar(&verbose, "verbose", false, "Log at debug level")
	bindEnv(pf, "verbose", "CODER_VERBOSE")
	pf.BoolVar(&logJSON, "log-json", false, "Log JSON lines instead of human-readable console lines")
	bindEnv(pf, "log-json", "CODER_LOGGING_JSON")

	cmd.AddCommand(newCreateTokenCmd(&cfg, &verbose, &logJSON), newRevokeTokenCmd(&cfg), newBuiltinURLCmd(&cfg), newMigrateCmd(&cfg, &verbose, &logJSON))
	return cmd
}

func runServer(cmd *cobra.Command, cfg coderd.Config, verbose, logJSON bool) error {
	log := newLogger(cmd.ErrOrStderr(), verbose, logJSON)
	defer func() { _ = log.Sync() }()

	// The signal watchers below end with ctx or shutdownCtx, cancelled
	// by the deferred calls, which run before this wait.
	var watchers sync.WaitGroup
	defer watchers.Wait()
	ctx, cancel := context.WithCancel(cmd.Context())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	watchers.Add(1)
	go func() {
		defer watchers.Done()
		select {
		case <-sigs:
			cancel() // a signal during start-up aborts it
		case <-ctx.Done():
		}
	}()

	srv, err := coderd.New(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			return &exitError{code: 1, msg: "interrupted during start-up"}
		}
		var cfgErr *coderd.ConfigError
		if errors.As(err, &cfgErr) {
			return &exitError{code: 2, msg: cfgErr.Error()}
		}
		return &exitError{code: 1, msg: err.Error()}
	}
	// Start-up is done: from here a signal drains instead of aborting.
	cancel()

	var fatal error
	select {
	case sig := <-sigs:
		log.Info("received signal, shutting down: send it again to skip the grace period", zapSignal(sig))
	case fatal = <-srv.Fatal():
		log.Info("shutting down: this replica cannot keep running (the error above); send a signal to skip the grace period")
	}
	shutdownCtx, skipGrace := context.WithCancel(context.Background())
	defer skipGrace()
	watchers.Add(1)
	go func() {
		defer watchers.Done()
		select {
		case <-sigs:
			skipGrace()
		case <-shutdownCtx.Done():
		}
	}()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return &exitError{code: 1, msg: fmt.Sprintf("shutdown: %v", err)}
	}
	if fatal != nil {
		return &exitError{code: 1, msg: fatal.Error()}
	}
	return nil
}

// openDatabaseForCommand connects to --postgres-url (or --postgres-url-file),
// or to the built-in Postgres: the running server's if there is one, else
// a temporary start.
func openDatabaseForCommand(ctx context.Context, cfg *coderd.Config) (*database.DB, func(), error) {
	src, err := cfg.PostgresSource()
	if err != nil {
		var cfgErr *coderd.ConfigError
		if errors.As(err, &cfgErr) {
			return nil, nil, &exitError{code: 2, msg: cfgErr.Error()}
		}
		return nil, nil, err
	}
	dir := filepath.Join(cfg.CacheDir, "postgres")
	stop := func() {}
	if src == nil {
		if u, err := postgres.ReadURL(dir, "", ""); err == nil {
			quick, cancel := context.WithTimeout(ctx, 2*time.Second)
			db, err := database.Connect(quick, u, database.ConnectOptions{Timeout: 2 * time.Second})
			cancel()
			if err == nil {
				return db, db.Close, nil
			}
		}
		c, err := postgres.Run(ctx, postgres.Options{Dir: dir})
		if err != nil {
			return nil, nil, fmt.Errorf("built-in postgres: %w", err)
		}
		src = database.StaticURL(c.URL())
		stop = func() { _ = c.Close() }
	}
	db, err := database.ConnectSource(ctx, src, database.ConnectOptions{})
	if err != nil {
		stop()
		return nil, nil, err
	}
	return db, func() { db.Close(); stop() }, nil
}

func newCreateTokenCmd(cfg *coderd.Config, verbose, logJSON *bool) *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "create-token",
		Short: "Create an API token and print it on stdout (only its hash is stored)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			db, closeDB, err := openDatabaseForCommand(ctx, cfg)
			var exit *exitError
			if errors.As(err, &exit) {
				return exit
			}
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			defer closeDB()
			// The release is recorded with the schema, as `server` and
			// `server migrate` do: an older replica then names which
			// release its newer schema came from.
			if _, err := db.MigrateWith(ctx, database.MigrateOptions{Release: Version}); err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			token, err := db.CreateAPIKey(ctx, name)
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			fmt.Fprintln(cmd.OutOrStdout(), token)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "A label for the token")
	return cmd
}

func newBuiltinURLCmd(cfg *coderd.Config) *cobra.Command {
	return &cobra.Command{
		Use:   "postgres-builtin-url",
		Short: "Print the built-in Postgres URL, so another replica on this machine can join it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			u, err := postgres.ReadURL(filepath.Join(cfg.CacheDir, "postgres"), "", "")
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			fmt.Fprintln(cmd.OutOrStdout(), u)
			return nil
		},
	}
}
