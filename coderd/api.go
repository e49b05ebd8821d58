package coderd

import (
	"net/http"
	"sort"
	"strings"
	"sync/atomic"

	"tailscale.com/derp/derpserver"

	"github.com/coder-ha/coder/coderd/healthpage"
	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/wire"
)

// switchHandler serves whichever handler was set last: the listeners are
// bound (and /healthz answers) before the API's parts exist.
type switchHandler struct{ h atomic.Pointer[http.Handler] }

func (s *switchHandler) set(h http.Handler) { s.h.Store(&h) }

func (s *switchHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	(*s.h.Load()).ServeHTTP(w, r)
}

// startingRoutes answer while the replica starts (it may be migrating the
// database, waiting for a lock): alive, not ready, nothing else yet.
func startingRoutes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("OK"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte("starting"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusServiceUnavailable, "The replica is still starting.", "")
	})
	return mux
}

// routes builds the HTTP handler: health endpoints, the API and the relay.
// Only the relay guard wraps /derp (it passes the server's own
// ResponseWriter through): the relay hijacks the connection, which needs
// http.Hijacker.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("OK"))
	})
	mux.HandleFunc("GET /readyz", s.handleReadyz)
	mux.HandleFunc("GET /api/v2/buildinfo", s.handleBuildInfo)
	mux.Handle("GET /health", healthpage.Handler())
	mux.HandleFunc("GET /api/v2/derp-map", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.derpMap)
	})
	mux.Handle("GET /api/v2/replicas", s.tokens.requireToken(http.HandlerFunc(s.handleReplicas)))
	mux.Handle("GET /api/v2/debug/health", s.tokens.requireToken(http.HandlerFunc(s.handleHealth)))
	if s.derp != nil {
		mux.Handle(wire.DERPPath, s.guard.Handler(derpmesh.Handler(s.derp)))
		mux.HandleFunc(wire.LatencyCheckPath, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
		mux.HandleFunc(wire.ProbePath, derpserver.ProbeHandler)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, wire.DERPPath) {
			writeError(w, http.StatusNotFound, "The embedded DERP relay is disabled on this replica.", "--derp-server-enable=false")
			return
		}
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
	case s.isolated():
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = w.Write([]byte("cut off from the database; peers have dropped this replica"))
	default:
		_, _ = w.Write([]byte("OK"))
	}
}

func (s *Server) handleBuildInfo(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, BuildInfo{Version: s.cfg.Version, DeploymentID: s.deploymentID, ReplicaID: s.replicaID})
}

// handleReplicas lists every live replica from this replica's view, which
// is kept current by notifications, with the latency matrix each replica
// stored (read on request, at most once a second: not on every beat); it
// answers through a Postgres outage, with the matrix last read.
func (s *Server) handleReplicas(w http.ResponseWriter, r *http.Request) {
	if !s.joined.Load() {
		writeError(w, http.StatusServiceUnavailable, "The replica is still starting.", "")
		return
	}
	rows := s.repl.replicas.Replicas(r.Context())
	out := make([]Replica, 0, len(rows))
	for _, row := range rows {
		out = append(out, ReplicaFromRow(row))
	}
	writeJSONList(w, http.StatusOK, out)
}

// handleHealth reports the database, the replicas and the mesh as this
// replica sees them. Each warning names what it is about.
func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) {
	if !s.joined.Load() {
		writeError(w, http.StatusServiceUnavailable, "The replica is still starting.", "")
		return
	}
	rs := s.repl.replicas
	var warnings []healthWarning
	if rs.HeartbeatFailing() {
		warnings = append(warnings, healthWarning{kind: warnHeartbeatFailing})
	}
	if s.repl.pubsub != nil && !s.repl.pubsub.Connected() {
		warnings = append(warnings, healthWarning{kind: warnListenDown})
	}
	if w, ok := schemaWarning(s.schema.Load(), s.cfg.Version); ok {
		warnings = append(warnings, w)
	}
	if w := mixedVersionsWarning(rs.All()); w != "" {
		warnings = append(warnings, healthWarning{kind: warnMixedVersions, text: w})
	}
	for _, w := range rs.WarningValues() {
		warnings = append(warnings, healthWarning{kind: warnReplicaSync, sync: w})
	}

	hostByURL := map[string]string{}
	hostByID := map[string]string{}
	urlByID := map[string]string{}
	for _, p := range rs.Regional() {
		hostByURL[p.RelayAddress] = p.Hostname
		hostByID[p.ID.String()] = p.Hostname
		urlByID[p.ID.String()] = p.RelayAddress
	}
	for _, p := range rs.PeerReports() {
		if p.Error != "" {
			warnings = append(warnings, healthWarning{kind: warnPeerUnreachable,
				host: hostByID[p.ID.String()], url: urlByID[p.ID.String()], text: p.Error})
		}
	}
	if s.repl.mesh != nil {
		for _, st := range s.repl.mesh.Status() {
			if st.State != derpmesh.StateConnected {
				msg := st.Error
				if msg == "" {
					msg = "connecting"
				}
				warnings = append(warnings, healthWarning{kind: warnMeshDown, host: hostByURL[st.URL], url: st.URL, text: msg})
			}
		}
	}
	writeJSON(w, http.StatusOK, healthReportOf(warnings))
}

// healthReportOf renders warnings into the report: each in its section,
// in the order given (the replicas section sorted), a section unhealthy
// when one of its warnings says so.
func healthReportOf(warnings []healthWarning) HealthReport {
	report := HealthReport{
		Database: HealthSection{Healthy: true, Warnings: []string{}},
		Replicas: HealthSection{Healthy: true, Warnings: []string{}},
		DERPMesh: HealthSection{Healthy: true, Warnings: []string{}},
	}
	sections := map[healthPart]*HealthSection{
		partDatabase: &report.Database,
		partReplicas: &report.Replicas,
		partDERPMesh: &report.DERPMesh,
	}
	for _, w := range warnings {
		sec := sections[w.part()]
		sec.Warnings = append(sec.Warnings, w.String())
		if w.unhealthy() {
			sec.Healthy = false
		}
	}
	sort.Strings(report.Replicas.Warnings)
	report.Healthy = report.Database.Healthy && report.Replicas.Healthy && report.DERPMesh.Healthy
	return report
}

func dash(s string) string {
	if s == "" {
		return "no relay URL"
	}
	return s
}
