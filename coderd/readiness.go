package coderd

import (
	"expvar"
	"fmt"
	"time"

	"go.uber.org/zap"
	"tailscale.com/metrics"

	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/wire"
)

// isolated reports whether this replica alone is cut off from Postgres:
// its heartbeat has failed for longer than the stale window and no peer
// holds a mesh link to its relay any more (peers that reach the database
// have dropped it). In a full outage the peers keep their links, so this
// stays false and /readyz stays 200.
func (s *Server) isolated() bool {
	r := s.repl
	if r == nil || r.replicas == nil || r.derpVars == nil {
		return false
	}
	return r.replicas.Isolated(incomingMeshLinks(r.derpVars))
}

// incomingMeshLinks is how many peers' mesh clients watch this relay.
func incomingMeshLinks(vars *metrics.Set) int {
	f, ok := vars.Get("gauge_watchers").(expvar.Func)
	if !ok {
		return 0
	}
	n, _ := f.Value().(int)
	return n
}

// notReadyLogInterval is how often a replica that is not ready yet says
// what it waits for.
const notReadyLogInterval = 5 * time.Second

// readyCheckInterval is how often a replica that is not ready yet checks
// the mesh again.
const readyCheckInterval = 10 * time.Millisecond

// watchReady latches readiness once the replica is registered and meshed
// both ways with every live regional peer it knows of: its own mesh link
// to each peer is up (so it forwards its clients' packets to the peers'
// clients), and each peer holds a mesh link to it (so the peers forward
// their clients' packets to this replica's clients from the first client
// a load balancer sends here). A peer that
// learns of the join late (a lost notification) is waited for until its
// next heartbeat's read finds it. Once ready, it stays ready until it
// drains: a peer dying or a Postgres outage must not take every replica
// out of the load balancer at once (isolated is the one exception).
//
// It is one of the watch goroutines of r: it also returns when they are
// stopped (closeReplication waits for it).
func (s *Server) watchReady(r *replication) {
	defer r.watchDone.Done()
	clock := s.cfg.Clock
	t := clock.NewTicker(readyCheckInterval, "watchReady")
	defer t.Stop()
	start := clock.Now()
	lastLog := start
	for {
		select {
		case <-r.stopWatch:
			return
		case <-t.C:
		}
		if s.draining.Load() {
			return
		}
		w := s.readiness()
		if w.ready() {
			s.ready.Store(true)
			s.log.Info("replica is ready", zap.Duration("took", clock.Since(start).Round(time.Millisecond)))
			return
		}
		if clock.Since(lastLog) >= notReadyLogInterval {
			lastLog = clock.Now()
			s.log.Info("not ready yet: waiting for the mesh with peers, both ways",
				zap.Bool("registered", w.registered), zap.Bool("peers_known", w.synced),
				zap.Strings("meshing_with", w.outgoing), zap.Strings("waiting_for_links_from", w.incoming),
				zap.Duration("waited", clock.Since(start).Round(time.Second)))
		}
	}
}

// readinessState is what readiness still waits for.
type readinessState struct {
	registered bool     // joined the cluster (replica sync running)
	synced     bool     // the mesh was given the peer set at least once
	outgoing   []string // peers this replica's mesh link to is not up yet
	incoming   []string // peers whose mesh link to this replica is not up yet
}

func (w readinessState) ready() bool {
	return w.registered && w.synced && len(w.outgoing) == 0 && len(w.incoming) == 0
}

// readiness checks both directions of the mesh. A peer's mesh client
// connects with the peer relay's own key (derpmesh dials with the
// server's private key, in every release), which this replica's link to
// the peer learned: the peer holds a link here when a client with that key
// is connected to this relay.
func (s *Server) readiness() readinessState {
	r := s.repl
	var w readinessState
	if r == nil || r.replicas == nil {
		return w
	}
	w.registered = true
	if r.mesh == nil {
		w.synced = true
		return w
	}
	w.synced = r.meshSynced.Load()
	hostByURL := map[string]string{}
	for _, p := range r.replicas.Regional() {
		hostByURL[wire.NormalizeURL(p.RelayAddress)] = p.Hostname
	}
	name := func(url string) string {
		if h := hostByURL[url]; h != "" {
			return fmt.Sprintf("%s (%s)", h, url)
		}
		return url
	}
	for _, st := range r.mesh.Status() {
		switch {
		case st.State != derpmesh.StateConnected || st.ServerKey.IsZero():
			w.outgoing = append(w.outgoing, name(st.URL))
		case !s.derp.IsClientConnectedForTest(st.ServerKey):
			w.incoming = append(w.incoming, name(st.URL))
		}
	}
	return w
}
