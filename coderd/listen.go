package coderd

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// listen binds the HTTP (and TLS, and metrics) listeners and serves, first
// the starting routes (/healthz 200, /readyz 503, everything else 503),
// then, once New sets them, the full routes. /readyz answers 503 until the
// replica is registered and meshed both ways.
func (s *Server) listen() error {
	if s.cfg.DERPServerSTUNAddress != "" {
		// Before the API serves, so the DERP map it serves names the port.
		st, err := listenSTUN(s.cfg.DERPServerSTUNAddress, s.log, s.registry)
		if err != nil {
			return err
		}
		s.stun = st
		setSTUNPort(s.derpMap, s.cfg.DERPServerRegionID, st.Port())
	}
	s.handler.set(startingRoutes())
	handler := &s.handler
	addr := ListenAddress(s.cfg.HTTPAddress)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return &ConfigError{"http-address", fmt.Sprintf("listen on %s: %v", s.cfg.HTTPAddress, err)}
	}
	s.httpAddr = l.Addr().String()
	if s.guard != nil {
		l = s.guard.Listener(l) // bounds unfinished connections
	}
	s.serve(l, handler)

	if s.cfg.TLSEnable {
		certs, err := newCertReloader(s.cfg.TLSCertFile, s.cfg.TLSKeyFile, tlsReloadInterval, s.cfg.Clock, s.log.Named("tls"))
		if err != nil {
			return &ConfigError{"tls-cert-file", fmt.Sprintf("load key pair: %v", err)}
		}
		tl, err := net.Listen("tcp", ListenAddress(s.cfg.TLSAddress))
		if err != nil {
			return &ConfigError{"tls-address", fmt.Sprintf("listen on %s: %v", s.cfg.TLSAddress, err)}
		}
		if s.guard != nil {
			tl = s.guard.Listener(tl) // below TLS: a stalled TLS handshake is unfinished too
		}
		s.serve(tls.NewListener(tl, &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12}), handler)
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

// HTTP server timeouts for ordinary (non-upgraded) requests. They bound
// what a slow or idle client can hold: a connection that never finishes its
// headers, a body trickled in, a response never read. net/http clears the
// deadlines of a connection the relay hijacks, so long-lived DERP
// connections (plain or WebSocket) are not cut by them.
const (
	httpReadHeaderTimeout = 10 * time.Second
	httpReadTimeout       = 30 * time.Second
	httpWriteTimeout      = 60 * time.Second
	httpIdleTimeout       = 120 * time.Second
)

// tlsReloadInterval is how often, at most, the TLS certificate files are
// checked for a change (on a handshake).
const tlsReloadInterval = 10 * time.Second

func (s *Server) serve(l net.Listener, h http.Handler) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: httpReadHeaderTimeout,
		ReadTimeout:       s.cfg.HTTPReadTimeout,
		WriteTimeout:      s.cfg.HTTPWriteTimeout,
		IdleTimeout:       httpIdleTimeout,
		ErrorLog:          zap.NewStdLog(s.log.Named("http")),
	}
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
