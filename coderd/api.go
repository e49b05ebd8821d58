package coderd

import (
	"net/http"
)

// routes builds the HTTP handler: health endpoints, the API and the relay.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("OK"))
	})
	mux.HandleFunc("GET /readyz", s.handleReadyz)
	mux.HandleFunc("GET /api/v2/buildinfo", s.handleBuildInfo)
	mux.HandleFunc("GET /api/v2/derp-map", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.derpMap)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "Route not found.", r.Method+" "+r.URL.Path)
	})
	return mux
}

func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	switch {
	case s.draining.Load():
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte("draining"))
	case !s.ready.Load():
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte("starting"))
	default:
		_, _ = w.Write([]byte("OK"))
	}
}

func (s *Server) handleBuildInfo(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, BuildInfo{Version: s.cfg.Version, DeploymentID: s.deploymentID, ReplicaID: s.replicaID})
}
