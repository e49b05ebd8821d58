package coderd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"
	"tailscale.com/metrics"

	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/derpmesh"
	"github.com/coder-ha/coder/replicasync"
)

// replication is the running cluster membership: pubsub, replica sync and
// (with the DERP server enabled) the relay mesh.
type replication struct {
	pubsub   *pubsub.Pubsub
	replicas *replicasync.Manager
	mesh     *derpmesh.Mesh // nil when the DERP server is disabled
	// meshSynced is set once the mesh has been given the peer set, so an
	// empty mesh before the first sync does not count as "meshed".
	meshSynced atomic.Bool

	// derpVars reads the relay's own counters (incoming mesh watchers).
	derpVars *metrics.Set

	// stopWatch and ctx end the watch goroutines (mesh errors, versions,
	// schema, readiness), which watchDone counts.
	stopWatch chan struct{}
	ctx       context.Context
	cancel    context.CancelFunc
	watchDone sync.WaitGroup
	closeOnce sync.Once
}

// meshPinger measures peer latency over the mesh once it is set (until
// then every peer is "without a link": probed over HTTP).
type meshPinger struct{ mesh atomic.Pointer[derpmesh.Mesh] }

func (p *meshPinger) PingPeer(ctx context.Context, relayURL string) (time.Duration, bool, error) {
	if m := p.mesh.Load(); m != nil {
		return m.PingPeer(ctx, relayURL)
	}
	return 0, false, nil
}

// checkStartupRules enforces the rule that needs the database: with the
// DERP server enabled, a replica without a relay URL may not join a region
// where other replicas live, because they could not mesh with it. It only
// reads.
func (s *Server) checkStartupRules(ctx context.Context) error {
	if !s.cfg.DERPServerEnable || s.cfg.DERPServerRelayURL != "" {
		return nil
	}
	var exists bool
	if err := s.db.Pool().QueryRow(ctx, "SELECT to_regclass('replicas') IS NOT NULL").Scan(&exists); err != nil {
		return fmt.Errorf("check for peers: %w", err)
	}
	if !exists {
		return nil
	}
	live, err := s.db.LiveReplicas(ctx, time.Duration(StaleAfterBeats)*s.cfg.ReplicaHeartbeatInterval)
	if err != nil {
		return err
	}
	hostname, _ := os.Hostname()
	var regional []string
	for _, r := range live {
		if int(r.RegionID) != s.cfg.DERPServerRegionID {
			continue
		}
		if r.Hostname == hostname && r.RelayAddress == "" {
			// A recent row from this host without a relay URL is, in all
			// likelihood, this server's previous run (killed before it
			// could mark itself stopped): not a peer to mesh with.
			s.log.Info("ignoring a recent replica row from this host without a relay URL (a previous run of this server?)",
				zap.Stringer("replica_id", r.ID), zap.Time("last_heartbeat", r.UpdatedAt))
			continue
		}
		regional = append(regional, r.Hostname)
	}
	if len(regional) > 0 {
		return &ConfigError{"derp-server-relay-url", fmt.Sprintf(
			"is required: %d other replica(s) are live in region %d (%s) and must reach this replica's relay directly; set it to a URL that reaches this replica, e.g. http://<this host's IP>:<port>",
			len(regional), s.cfg.DERPServerRegionID, strings.Join(regional, ", "))}
	}
	return nil
}

// meshTLSConfig trusts the system roots plus --derp-server-mesh-ca-file for
// peers' https relay URLs.
func (s *Server) meshTLSConfig() (*tls.Config, error) {
	if s.cfg.DERPMeshCAFile == "" {
		return nil, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	pem, err := os.ReadFile(s.cfg.DERPMeshCAFile)
	if err != nil {
		return nil, &ConfigError{"derp-server-mesh-ca-file", err.Error()}
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, &ConfigError{"derp-server-mesh-ca-file", "no PEM certificate found in " + s.cfg.DERPMeshCAFile}
	}
	return &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// startReplication joins the cluster: registers, announces, and meshes the
// relay with the live regional peers.
func (s *Server) startReplication(ctx context.Context, meshKey string) error {
	tlsCfg, err := s.meshTLSConfig()
	if err != nil {
		return err
	}
	r := &replication{stopWatch: make(chan struct{})}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	s.repl = r
	r.pubsub, err = s.openPubsub(ctx)
	if err != nil {
		return err
	}
	var ps replicasync.Pubsub // nil: poll mode
	if r.pubsub != nil {
		ps = r.pubsub
	}
	// With the relay on, peer latency is measured over the mesh links, and
	// the manager knows it from the start (it waits for a newcomer's link
	// instead of probing it over HTTP first); the mesh is built next.
	var pinger *meshPinger
	var linkPinger replicasync.LinkPinger
	if s.derp != nil {
		pinger = &meshPinger{}
		linkPinger = pinger
	}
	r.replicas, err = replicasync.New(ctx, replicasync.NewPostgresStore(s.db), ps, replicasync.Options{
		Pinger:            linkPinger,
		ID:                s.replicaID,
		RegionID:          int32(s.cfg.DERPServerRegionID),
		RelayAddress:      s.cfg.DERPServerRelayURL,
		Version:           s.cfg.Version,
		HeartbeatInterval: s.cfg.ReplicaHeartbeatInterval,
		LatencyThreshold:  s.cfg.ReplicaLatencyThreshold,
		TLSConfig:         tlsCfg,
		Logger:            s.log.Named("replicasync"),
		Registerer:        s.registry,
		Clock:             replicasync.OffsetClock(s.cfg.Clock, s.cfg.DebugClockOffset),
	})
	if err != nil {
		return err
	}
	if s.derp == nil {
		return nil
	}
	r.mesh, err = derpmesh.New(derpmesh.Options{
		Server:          s.derp,
		MeshKey:         meshKey,
		TLSConfig:       tlsCfg,
		Logger:          s.log.Named("derpmesh"),
		OnPeerBroken:    r.replicas.Reprobe,
		OnPeerConnected: r.replicas.Reprobe,
		Registerer:      s.registry,
		// The server's clock, unshifted: the mesh compares no times with
		// other replicas, and watchMeshErrors ages PeerStatus.Since on it.
		Clock: s.cfg.Clock,
	})
	if err != nil {
		return err
	}
	s.registry.MustRegister(derpmesh.NewServerCollector(s.derp))
	r.derpVars, _ = s.derp.ExpVar(false).(*metrics.Set)

	// The mesh measures peer latency over its links; without a link the
	// manager probes over HTTP.
	pinger.mesh.Store(r.mesh)
	r.replicas.SetCallback(func(change replicasync.PeerChange) {
		peers := make([]derpmesh.Peer, 0, len(change.Peers))
		for _, p := range change.Peers {
			peers = append(peers, derpmesh.Peer{ID: p.ID.String(), URL: p.RelayAddress})
		}
		for _, url := range change.Replaced {
			s.log.Info("peer replaced behind the same relay URL; reconnecting", zap.String("relay_url", url))
		}
		// A new id behind a known URL (a restarted process) is redialed at
		// once by SetPeers; the ids also label the forwarder's drop counter.
		r.mesh.SetPeers(peers)
		r.meshSynced.Store(true)
	})
	r.watchDone.Add(1)
	go s.watchMeshErrors(r)
	return nil
}

// openPubsub opens the LISTEN connection per --postgres-pubsub, or returns
// nil for poll mode. In auto mode it checks that a notification sent
// through the pool arrives within 2 s (through PgBouncer in transaction
// pooling it never does) and falls back to polling if not.
func (s *Server) openPubsub(ctx context.Context) (*pubsub.Pubsub, error) {
	mode := s.cfg.PostgresPubsub
	if mode == PubsubPoll {
		s.log.Info("replica sync mode chosen", zap.String("mode", "poll"), zap.String("reason", "--postgres-pubsub=poll"))
		return nil, nil
	}
	ps, err := pubsub.New(ctx, s.db, pubsub.Options{Logger: s.log.Named("pubsub"), Registerer: s.registry, Clock: s.cfg.Clock})
	if err != nil {
		if mode == PubsubAuto {
			s.log.Warn("replica sync mode chosen", zap.String("mode", "poll"), zap.String("reason", "LISTEN failed"), zap.Error(err))
			return nil, nil
		}
		return nil, err
	}
	if mode == PubsubListen {
		s.log.Info("replica sync mode chosen", zap.String("mode", "listen"), zap.String("reason", "--postgres-pubsub=listen"))
		return ps, nil
	}
	if err := s.selfTestPubsub(ctx, ps, 2*time.Second); err != nil {
		_ = ps.Close()
		s.log.Warn("replica sync mode chosen", zap.String("mode", "poll"),
			zap.String("reason", "a notification sent through the pool did not arrive on the LISTEN connection (PgBouncer in transaction pooling?)"), zap.Error(err))
		return nil, nil
	}
	s.log.Info("replica sync mode chosen", zap.String("mode", "listen"), zap.String("reason", "LISTEN/NOTIFY self-test passed"))
	return ps, nil
}

// selfTestPubsub publishes a random payload on a probe channel and waits
// for it to come back on the LISTEN connection. It publishes again every
// 200 ms: the LISTEN may become active only after Subscribe returns.
func (s *Server) selfTestPubsub(ctx context.Context, ps *pubsub.Pubsub, timeout time.Duration) error {
	channel := "coder_pubsub_selftest"
	want := uuid.NewString()
	got := make(chan struct{}, 1)
	cancel, err := ps.Subscribe(channel, func(_ context.Context, payload []byte, err error) {
		if err == nil && string(payload) == want {
			select {
			case got <- struct{}{}:
			default:
			}
		}
	})
	if err != nil {
		return fmt.Errorf("listen on the self-test channel: %w", err)
	}
	defer cancel()
	// Real time: the deadline also bounds each Publish round trip.
	ctx, done := context.WithTimeout(ctx, timeout)
	defer done()
	again := s.cfg.Clock.NewTicker(200*time.Millisecond, "pubsub", "selftest")
	defer again.Stop()
	for {
		if err := ps.Publish(ctx, channel, []byte(want)); err != nil && ctx.Err() == nil {
			return fmt.Errorf("notify on the self-test channel: %w", err)
		}
		select {
		case <-got:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("no notification within %s", timeout)
		case <-again.C:
		}
	}
}

// meshErrorGrace: a peer still dialing for its first second is not a
// problem yet.
const meshErrorGrace = time.Second

// watchMeshErrors copies persistent mesh failures into this replica's row
// (so every replica's API shows them), and clears them when they heal. It
// wakes when the mesh reports a change (and once more when a failing peer's
// grace second ends), never on a timer in steady state: at N=100 a 500 ms
// poll of N-1 peers' status was a few percent of the idle fleet's CPU.
func (s *Server) watchMeshErrors(r *replication) {
	defer r.watchDone.Done()
	// The mesh stamps PeerStatus.Since on the same clock (Config.Clock).
	clock := s.cfg.Clock
	recheck := clock.NewTimer(time.Hour, "watchMeshErrors", "grace")
	recheck.Stop()
	defer recheck.Stop()
	for {
		var problems []string
		wait := time.Duration(-1) // until the next grace second ends
		for _, st := range r.mesh.Status() {
			if st.State == derpmesh.StateConnected || st.Error == "" {
				continue
			}
			if age := clock.Since(st.Since); age <= meshErrorGrace {
				if left := meshErrorGrace - age + 10*time.Millisecond; wait < 0 || left < wait {
					wait = left
				}
				continue
			}
			problems = append(problems, fmt.Sprintf("cannot mesh with %s: %s", st.URL, st.Error))
		}
		sort.Strings(problems)
		r.replicas.SetError(strings.Join(problems, "; "))
		if wait >= 0 {
			recheck.Reset(wait)
		}
		select {
		case <-r.stopWatch:
			return
		case <-r.mesh.Changed():
		case <-recheck.C:
		}
	}
}

// msgLeaveFailed is logged when Leave fails: peers then time the replica
// out (see StaleAfterBeats).
var msgLeaveFailed = fmt.Sprintf("could not mark this replica stopped; peers will drop it after %d heartbeats", StaleAfterBeats)

// stopReplication leaves the cluster: marks the row stopped and announces
// it, so peers drop this replica at once. Shutdown calls it only after the
// grace period and after the listeners closed, so peers keep forwarding to
// this replica's clients for as long as it holds any.
func (s *Server) stopReplication() {
	if s.repl == nil || s.repl.replicas == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.repl.replicas.Leave(ctx); err != nil {
		s.log.Warn(msgLeaveFailed, zap.Error(err))
	}
}

// closeReplication stops everything startReplication started (and the
// watch goroutines New started). It is safe to call more than once.
func (s *Server) closeReplication() {
	r := s.repl
	if r == nil {
		return
	}
	r.closeOnce.Do(func() {
		close(r.stopWatch)
		r.cancel()
		r.watchDone.Wait()
		if r.mesh != nil {
			_ = r.mesh.Close()
		}
		if r.replicas != nil {
			_ = r.replicas.Close()
		}
		if r.pubsub != nil {
			_ = r.pubsub.Close()
		}
	})
}
