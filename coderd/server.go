package coderd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"tailscale.com/derp/derpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/postgres"
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
	derpMap      *tailcfg.DERPMap
	registry     *prometheus.Registry
	tokens       *tokenValidator
	repl         *replication

	servers   []*http.Server
	listeners []net.Listener
	httpAddr  string
	serveWG   sync.WaitGroup

	ready    atomic.Bool // latched once registered and meshed
	draining atomic.Bool

	shutdownOnce sync.Once
	shutdownErr  error
}

// New validates cfg, connects to (or starts) Postgres, migrates, and starts
// serving. A start-up rule violation is returned as a *ConfigError before
// anything is written. On error everything started so far is stopped.
func New(ctx context.Context, cfg Config, log *zap.Logger) (_ *Server, err error) {
	if log == nil {
		log = zap.NewNop()
	}
	cfg, err = cfg.withDefaults(log)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, replicaID: uuid.New(), registry: newRegistry()}
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()

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
	if err := s.db.Migrate(ctx, log); err != nil {
		return nil, err
	}
	if s.deploymentID, err = s.db.DeploymentID(ctx); err != nil {
		return nil, err
	}
	s.registry.MustRegister(newPoolCollector(s.db.Pool()))
	s.tokens = newTokenValidator(s.db)

	var meshKey string
	if cfg.DERPServerEnable {
		meshKey, err = s.db.DERPMeshKey(ctx)
		if err != nil {
			return nil, err
		}
		s.derp = derpserver.New(key.NewNode(), derpLogf(log))
		if err := s.derp.SetMeshKey(meshKey); err != nil {
			return nil, fmt.Errorf("set derp mesh key: %w", err)
		}
	}
	if err := s.listen(); err != nil {
		return nil, err
	}
	if err := s.startReplication(ctx, meshKey); err != nil {
		return nil, err
	}
	go s.watchReady()
	log.Info("server started",
		zap.String("access_url", cfg.AccessURL),
		zap.String("http_address", s.httpAddr),
		zap.String("relay_url", cfg.DERPServerRelayURL),
		zap.Stringer("replica_id", s.replicaID),
		zap.String("deployment_id", s.deploymentID))
	return s, nil
}

// openDatabase connects to the configured Postgres, or starts the built-in
// one when no URL was given.
func (s *Server) openDatabase(ctx context.Context) error {
	url := s.cfg.PostgresURL
	if url == "" {
		dir := filepath.Join(s.cfg.CacheDir, "postgres")
		s.log.Info("no --postgres-url given: starting the built-in postgres", zap.String("dir", dir))
		start := time.Now()
		c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Logger: s.log.Named("postgres")})
		if err != nil {
			return fmt.Errorf("built-in postgres: %w", err)
		}
		s.builtin = c
		url = c.URL()
		s.log.Info("built-in postgres is ready", zap.Int("port", c.Port()), zap.Duration("took", time.Since(start).Round(time.Millisecond)))
	}
	db, err := database.Connect(ctx, url, database.ConnectOptions{Logger: s.log})
	if err != nil {
		return err
	}
	s.db = db
	return nil
}

// listen binds the HTTP (and TLS, and metrics) listeners and serves. The
// API answers /readyz with 503 until the replica is registered and meshed.
func (s *Server) listen() error {
	handler := s.routes()
	addr := ListenAddress(s.cfg.HTTPAddress)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return &ConfigError{"http-address", fmt.Sprintf("listen on %s: %v", s.cfg.HTTPAddress, err)}
	}
	s.httpAddr = l.Addr().String()
	s.serve(l, handler)

	if s.cfg.TLSEnable {
		cert, err := tls.LoadX509KeyPair(s.cfg.TLSCertFile, s.cfg.TLSKeyFile)
		if err != nil {
			return &ConfigError{"tls-cert-file", fmt.Sprintf("load key pair: %v", err)}
		}
		tl, err := net.Listen("tcp", ListenAddress(s.cfg.TLSAddress))
		if err != nil {
			return &ConfigError{"tls-address", fmt.Sprintf("listen on %s: %v", s.cfg.TLSAddress, err)}
		}
		s.serve(tls.NewListener(tl, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}), handler)
	}
	if s.cfg.PrometheusEnable {
		ml, err := net.Listen("tcp", ListenAddress(s.cfg.PrometheusAddress))
		if err != nil {
			return &ConfigError{"prometheus-address", fmt.Sprintf("listen on %s: %v", s.cfg.PrometheusAddress, err)}
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}))
		s.serve(ml, mux)
		s.log.Info("serving prometheus metrics", zap.String("address", ml.Addr().String()))
	}
	if s.cfg.DebugPprofAddress != "" {
		pl, err := net.Listen("tcp", ListenAddress(s.cfg.DebugPprofAddress))
		if err != nil {
			return &ConfigError{"debug-pprof-address", fmt.Sprintf("listen on %s: %v", s.cfg.DebugPprofAddress, err)}
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		s.serve(pl, mux)
		s.log.Info("serving pprof", zap.String("address", pl.Addr().String()))
	}
	return nil
}

func (s *Server) serve(l net.Listener, h http.Handler) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ErrorLog: zap.NewStdLog(s.log.Named("http"))}
	s.servers = append(s.servers, srv)
	s.listeners = append(s.listeners, l)
	s.serveWG.Add(1)
	go func() {
		defer s.serveWG.Done()
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", zap.Error(err))
		}
	}()
}

// HTTPAddress is the address the API listens on (useful with port 0).
func (s *Server) HTTPAddress() string { return s.httpAddr }

// ReplicaID is this process's replica id.
func (s *Server) ReplicaID() uuid.UUID { return s.replicaID }

// Registry is the server's Prometheus registry.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Shutdown drains the replica: /readyz answers 503, the replica marks
// itself stopped and tells its peers, then after the grace period the
// listeners close (DERP clients reconnect to other replicas) and everything
// stops. It is safe to call more than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutdownOnce.Do(func() {
		s.draining.Store(true)
		s.log.Info("draining: /readyz now answers 503", zap.Duration("grace_period", s.cfg.ShutdownGracePeriod))
		s.stopReplication()
		if g := s.cfg.ShutdownGracePeriod; g > 0 {
			select {
			case <-time.After(g):
			case <-ctx.Done():
			}
		}
		s.shutdownErr = s.closeAll()
		s.log.Info("server stopped")
	})
	return s.shutdownErr
}

// closeAll stops everything New started, newest first.
func (s *Server) closeAll() error {
	var errs []error
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
	s.serveWG.Wait()
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
