package coderd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/postgres"
	"github.com/coder-ha/coder/relayguard"
)

// Server is one running replica. New brings it up; Shutdown drains it and
// stops everything New started, in reverse order.
type Server struct {
	cfg Config
	log *zap.Logger

	builtin      *postgres.Cluster // nil with an external database
	db           *database.DB
	deploymentID string
	replicaID    uuid.UUID
	derp         *derpserver.Server // nil when the DERP server is disabled
	guard        *relayguard.Guard  // admission and limits for derp; nil with it
	derpMap      *tailcfg.DERPMap
	stun         *stunServer // nil unless --derp-server-stun-address
	registry     *prometheus.Registry
	tokens       *tokenValidator
	repl         *replication

	servers   []*http.Server
	listeners []net.Listener
	httpAddr  string
	serveWG   sync.WaitGroup

	// handler is what the listeners serve: the starting routes (/healthz
	// 200, /readyz 503) until New has everything the API needs.
	handler switchHandler
	// schema is the database schema as of start-up and the last periodic
	// check (watchSchema).
	schema atomic.Pointer[database.SchemaStatus]

	// joined is set once startReplication has built s.repl: the handlers,
	// served before that, read s.repl only after it.
	joined   atomic.Bool
	ready    atomic.Bool // latched once registered and meshed both ways
	draining atomic.Bool

	shutdownOnce sync.Once
	shutdownErr  error

	// fatal carries the one reason this replica must stop while it runs
	// (see Fatal); failOnce sends it.
	fatal    chan error
	failOnce sync.Once
}

// New validates cfg, connects to (or starts) Postgres, migrates, and starts
// serving. A start-up rule violation is returned as a *ConfigError before
// anything is written; a release too old for the database (a finalized
// contract step) as a *database.TooOldError, before anything is written
// too. The listeners are bound before the migrations run: /healthz answers
// 200 (a startup or liveness probe must not restart a replica that waits
// for a table lock) and /readyz 503 until the replica is ready. On error
// everything started so far is stopped.
func New(ctx context.Context, cfg Config, log *zap.Logger) (_ *Server, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	cfg, err = cfg.withDefaults(log)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, replicaID: uuid.New(), registry: newRegistry(), fatal: make(chan error, 1)}
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()
	s.registry.MustRegister(newBuildInfoCollector(cfg.Version), newVersionsCollector(s.liveReplicas))

	s.derpMap, err = buildDERPMap(cfg)
	if err != nil {
		return nil, err
	}
	if err := s.openDatabase(ctx); err != nil {
		return nil, err
	}
	if err := s.checkStartupRules(ctx); err != nil {
		return nil, err
	}
	if cfg.DERPServerEnable {
		// The relay and its guard exist before the listeners are bound, so
		// the guard bounds unfinished connections from the first accept;
		// the mesh key is set once the schema is migrated.
		s.derp = derpserver.New(key.NewNode(), derpLogf(log))
		s.guard, err = relayguard.New(s.derp, relayguard.Options{
			Clock:           cfg.Clock,
			VerifyURL:       cfg.DERPServerVerifyClientURL,
			FailOpen:        cfg.DERPServerVerifyClientURLFailOpen,
			VerifyInterval:  cfg.DERPServerVerifyClientInterval,
			MaxConnections:  cfg.DERPServerMaxConnections,
			AcceptRate:      rate.Limit(cfg.DERPServerAcceptRate),
			AcceptRatePerIP: rate.Limit(cfg.DERPServerAcceptRatePerIP),
			Logger:          log.Named("relayguard"),
			Registerer:      s.registry,
		})
		if err != nil {
			return nil, err
		}
		if cfg.DERPServerVerifyClientURL != "" {
			log.Info("derp clients are admitted by the webhook",
				zap.Bool("fail_open", cfg.DERPServerVerifyClientURLFailOpen))
		} else if host, _, _ := net.SplitHostPort(ListenAddress(cfg.HTTPAddress)); host == "" || !net.ParseIP(host).IsLoopback() {
			log.Warn("no --derp-server-verify-client-url: anyone who reaches /derp may relay through this replica")
		}
	}
	if err := s.listen(); err != nil {
		return nil, err
	}
	if err := s.migrate(ctx); err != nil {
		return nil, err
	}
	if s.deploymentID, err = s.db.DeploymentID(ctx); err != nil {
		return nil, err
	}
	s.registry.MustRegister(newPoolCollector(s.db.Pool()))
	s.tokens = newTokenValidator(s.db, tokenValidatorOptions{Logger: log.Named("auth"), Clock: cfg.Clock})

	var meshKey string
	if cfg.DERPServerEnable {
		// Served only once the routes switch below (after the mesh key is
		// set): the relay is not routed while the replica starts.
		meshKey, err = s.db.DERPMeshKey(ctx)
		if err != nil {
			return nil, err
		}
		if err := s.derp.SetMeshKey(meshKey); err != nil {
			return nil, fmt.Errorf("set derp mesh key: %w", err)
		}
	}
	s.handler.set(s.routes())
	if err := s.startReplication(ctx, meshKey); err != nil {
		return nil, err
	}
	if err := s.tokens.followRevocations(s.repl.pubsub); err != nil {
		return nil, err
	}
	s.joined.Store(true)
	// Registered: a finalize that read the live replicas before this row
	// existed has raised the schema floor by now (see
	// database.CheckSchemaFloor).
	if err := s.checkSchemaFloorAtStart(ctx); err != nil {
		return nil, err
	}
	s.repl.watchDone.Add(3)
	go s.watchSchema(s.repl)
	go s.watchVersions(s.repl)
	go s.watchReady(s.repl)
	log.Info("server started",
		zap.String("access_url", cfg.AccessURL),
		zap.String("http_address", s.httpAddr),
		zap.String("relay_url", cfg.DERPServerRelayURL),
		zap.Stringer("replica_id", s.replicaID),
		zap.String("deployment_id", s.deploymentID))
	return s, nil
}

// migrate brings the schema up to what this release knows (see
// database.MigrateWith: no lock when nothing is pending, short lock
// attempts otherwise) and warns when the schema is newer than it knows.
func (s *Server) migrate(ctx context.Context) error {
	st, err := s.db.MigrateWith(ctx, database.MigrateOptions{Logger: s.log.Named("migrate"), Release: s.cfg.Version, Clock: s.cfg.Clock})
	if err != nil {
		return err
	}
	s.setSchema(st)
	return nil
}

// setSchema keeps st for the health report and logs a change of skew:
// WARN when the schema is newer than this release knows, INFO when it is
// not any more.
func (s *Server) setSchema(st database.SchemaStatus) {
	prev := s.schema.Swap(&st)
	was := prev != nil && prev.Newer()
	switch {
	case st.Newer() && (!was || prev.Found != st.Found):
		s.log.Warn("database schema is newer than this release knows: running on it (one release of skew); upgrade this replica",
			zap.Int64("schema_found", st.Found), zap.String("schema_found_release", st.FoundRelease),
			zap.Int64("schema_known", st.Known), zap.String("release", s.cfg.Version))
	case !st.Newer() && was:
		s.log.Info("database schema is one this release knows again", zap.Int64("schema", st.Found))
	}
}

// openDatabase connects to the configured Postgres (--postgres-url, or
// --postgres-url-file, read again for every connection opened), or starts
// the built-in one when neither was given.
func (s *Server) openDatabase(ctx context.Context) error {
	src, err := s.cfg.PostgresSource()
	if err != nil {
		return err
	}
	if src == nil {
		dir := filepath.Join(s.cfg.CacheDir, "postgres")
		s.log.Info("no --postgres-url given: starting the built-in postgres", zap.String("dir", dir))
		start := s.cfg.Clock.Now()
		c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Logger: s.log.Named("postgres")})
		if err != nil {
			return fmt.Errorf("built-in postgres: %w", err)
		}
		s.builtin = c
		src = database.StaticURL(c.URL())
		s.log.Info("built-in postgres is ready", zap.Int("port", c.Port()), zap.Duration("took", s.cfg.Clock.Since(start).Round(time.Millisecond)))
	} else if src.Path() != "" {
		s.log.Info("reading the postgres URL from a file whenever a connection is opened", zap.String("file", src.Path()),
			zap.String("database", src.Describe()))
	}
	db, err := database.ConnectSource(ctx, src, database.ConnectOptions{Logger: s.log, Clock: s.cfg.Clock})
	if err != nil {
		return err
	}
	s.db = db
	return nil
}

// Fatal delivers the reason this replica must stop, should one arise
// while it runs: a finalize raised the schema floor past this release (a
// replica that was paused or cut off from the database for longer than a
// finalize counts replicas as live, then came back to a contracted
// schema). It is the error a start would have refused with. The caller
// shuts the server down and exits non-zero. At most one error is sent.
func (s *Server) Fatal() <-chan error { return s.fatal }

// fail reports err on Fatal (once) and logs it.
func (s *Server) fail(err error) {
	s.failOnce.Do(func() {
		s.log.Error("this replica must stop", zap.Error(err))
		s.fatal <- err
	})
}

// HTTPAddress is the address the API listens on (useful with port 0).
func (s *Server) HTTPAddress() string { return s.httpAddr }

// ReplicaID is this process's replica id.
func (s *Server) ReplicaID() uuid.UUID { return s.replicaID }

// Registry is the server's Prometheus registry.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Shutdown drains the replica, in the order that never cuts a relayed
// connection early:
//
//  1. /readyz answers 503 at once, so the load balancer moves new clients
//     away;
//  2. for the grace period (or until ctx is done: a second signal) the
//     replica stays a full member: its row stays live, peers keep
//     forwarding to it, and it keeps relaying both ways;
//  3. the listeners close and the DERP server drops its client connections
//     (clients reconnect, through the load balancer, to other replicas);
//  4. only then it marks itself stopped and notifies its peers, and closes
//     the mesh, pubsub and the database.
//
// It is safe to call more than once; later calls return the first result.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutdownOnce.Do(func() {
		s.draining.Store(true)
		g := s.cfg.ShutdownGracePeriod
		s.log.Info("draining: /readyz now answers 503; still relaying and meshed for the grace period", zap.Duration("grace_period", g))
		if g > 0 {
			t := s.cfg.Clock.NewTimer(g, "shutdown", "grace")
			select {
			case <-t.C:
			case <-ctx.Done():
				s.log.Info("grace period cut short")
			}
			t.Stop()
		}
		s.log.Info("closing listeners: relay clients reconnect to other replicas")
		s.closeListeners()
		s.log.Info("leaving the cluster: marking this replica stopped")
		s.stopReplication()
		s.shutdownErr = s.closeRest()
		s.log.Info("server stopped")
	})
	return s.shutdownErr
}

// closeAll stops everything New started, newest first.
func (s *Server) closeAll() error {
	s.closeListeners()
	return s.closeRest()
}

// closeListeners stops accepting, finishes in-flight HTTP requests (up to
// 5s) and closes the DERP server's connections, clients and peers' mesh
// links alike.
func (s *Server) closeListeners() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, srv := range s.servers {
		if err := srv.Shutdown(ctx); err != nil {
			_ = srv.Close()
		}
	}
	if s.derp != nil {
		// Hijacked relay connections are not tracked by http.Server.
		_ = s.derp.Close()
	}
	if s.guard != nil {
		_ = s.guard.Close()
	}
	s.serveWG.Wait()
	if s.stun != nil {
		_ = s.stun.Close()
	}
}

// closeRest stops replication (a no-op for parts already stopped), then
// the database.
func (s *Server) closeRest() error {
	var errs []error
	if s.tokens != nil {
		s.tokens.Close()
	}
	s.closeReplication()
	if s.db != nil {
		s.db.Close()
	}
	if s.builtin != nil {
		if err := s.builtin.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// derpLogf adapts the DERP library's printf logging to zap at debug level:
// it is chatty and mostly per-connection.
func derpLogf(log *zap.Logger) func(format string, args ...any) {
	l := log.Named("derp").Sugar()
	return func(format string, args ...any) { l.Debugf(format, args...) }
}

// floorCheckPatience is how long a starting replica keeps trying to read
// the schema floor through database errors (as registration does) before
// its start fails.
const floorCheckPatience = 30 * time.Second

// checkSchemaFloorAtStart is CheckSchemaFloor once registered, tried again
// through errors that are not a verdict (a connection refused or timed
// out: at a mass start Postgres answers slowly) for floorCheckPatience. A
// *database.TooOldError is returned at once.
func (s *Server) checkSchemaFloorAtStart(ctx context.Context) error {
	deadline := s.cfg.Clock.Now().Add(floorCheckPatience)
	pause := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := s.db.CheckSchemaFloor(actx, s.cfg.Version, s.schema.Load().Known)
		cancel()
		var tooOld *database.TooOldError
		if err == nil || errors.As(err, &tooOld) || ctx.Err() != nil || s.cfg.Clock.Now().Add(pause).After(deadline) {
			return err
		}
		if attempt == 1 {
			s.log.Warn("cannot read the schema floor yet; trying again", zap.Error(err))
		}
		t := s.cfg.Clock.NewTimer(pause, "schemaFloor", "retry")
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		pause = min(2*pause, 2*time.Second)
	}
}
