package coderd

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"
)

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
	live, err := s.db.LiveReplicas(ctx, 3*s.cfg.ReplicaHeartbeatInterval)
	if err != nil {
		return err
	}
	for _, r := range live {
		if int(r.RegionID) == s.cfg.DERPServerRegionID {
			return &ConfigError{"derp-server-relay-url", fmt.Sprintf(
				"is required: %d other replica(s) are running in region %d (e.g. %q), and they must reach this replica's relay directly; set it to a URL that reaches this replica, such as http://<this host's IP>:<port>",
				len(live), s.cfg.DERPServerRegionID, r.Hostname)}
		}
	}
	return nil
}

func (s *Server) startReplication(ctx context.Context) error { return nil }

func (s *Server) stopReplication() {}

func (s *Server) closeReplication() {}

// watchReady latches readiness once the replica is registered and meshed
// with every live regional peer it knows of. Once ready, it stays ready
// until it drains: a peer dying or a Postgres outage must not take every
// replica out of the load balancer at once.
func (s *Server) watchReady() {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for range t.C {
		if s.draining.Load() {
			return
		}
		if s.meshReady() {
			s.ready.Store(true)
			s.log.Info("replica is ready")
			return
		}
	}
}

func (s *Server) meshReady() bool { return true }

var _ = zap.String
