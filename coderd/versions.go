package coderd

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/replicasync"
)

// schemaCheckInterval is how often a running replica reads the schema
// version again, so a replica left on the previous release notices (and
// says) that the next release migrated under it.
const schemaCheckInterval = 15 * time.Second

// liveReplicas is every live replica as this one sees it (nil before it
// joined the cluster).
func (s *Server) liveReplicas() []replicasync.Replica {
	if !s.joined.Load() {
		return nil
	}
	return s.repl.replicas.All()
}

// versionGroup is one version and the live replicas that run it.
type versionGroup struct {
	Version  string
	Replicas []replicasync.Replica
}

// versionsOf groups replicas by version, sorted by version.
func versionsOf(rs []replicasync.Replica) []versionGroup {
	byVersion := map[string][]replicasync.Replica{}
	for _, r := range rs {
		byVersion[r.Version] = append(byVersion[r.Version], r)
	}
	out := make([]versionGroup, 0, len(byVersion))
	for v, group := range byVersion {
		out = append(out, versionGroup{Version: v, Replicas: group})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out
}

// mixedVersionsWarning names each version and its replicas while more than
// one version is live (a rolling upgrade under way, or one that stopped
// half-way); empty otherwise.
func mixedVersionsWarning(rs []replicasync.Replica) string {
	groups := versionsOf(rs)
	if len(groups) < 2 {
		return ""
	}
	parts := make([]string, len(groups))
	for i, g := range groups {
		names := make([]string, len(g.Replicas))
		for j, r := range g.Replicas {
			names[j] = replicaName(r)
		}
		parts[i] = fmt.Sprintf("%s on %s", versionName(g.Version), strings.Join(names, ", "))
	}
	return fmt.Sprintf("%d versions are live (a rolling upgrade in progress?): %s; finish the upgrade so that every replica runs one version",
		len(groups), strings.Join(parts, "; "))
}

// replicaName is how warnings name a replica: its hostname, and its relay
// URL (or id) to tell apart replicas on one host.
func replicaName(r replicasync.Replica) string {
	if r.RelayAddress != "" {
		return fmt.Sprintf("%q (%s)", r.Hostname, r.RelayAddress)
	}
	return fmt.Sprintf("%q (id %s)", r.Hostname, r.ID)
}

func versionName(v string) string {
	if v == "" {
		return "(no version)"
	}
	return v
}

// versionCounts renders the live versions for a log line: "v1: 2, v2: 1".
func versionCounts(groups []versionGroup) string {
	parts := make([]string, len(groups))
	for i, g := range groups {
		parts[i] = fmt.Sprintf("%s: %d", versionName(g.Version), len(g.Replicas))
	}
	return strings.Join(parts, ", ")
}

// watchVersions logs when replicas of more than one version become live,
// and when the last replica of another version leaves (the metric and the
// health warning are computed on demand).
func (s *Server) watchVersions(r *replication) {
	defer r.watchDone.Done()
	// Once per heartbeat: membership changes with beats and announcements,
	// and a wakeup a second per replica is a cost the whole fleet pays.
	t := s.cfg.Clock.NewTicker(s.cfg.ReplicaHeartbeatInterval, "watchVersions")
	defer t.Stop()
	mixed := false
	last := ""
	for {
		select {
		case <-r.stopWatch:
			return
		case <-t.C:
		}
		groups := versionsOf(s.liveReplicas())
		counts := versionCounts(groups)
		switch {
		case len(groups) > 1 && counts != last:
			s.log.Warn("replicas of more than one version are live (a rolling upgrade in progress?)", zap.String("versions", counts))
			mixed = true
		case len(groups) == 1 && mixed:
			s.log.Info("every live replica runs one version again", zap.String("version", versionName(groups[0].Version)))
			mixed = false
		}
		last = counts
	}
}

// watchSchema reads the newest schema version again every
// schemaCheckInterval (one small query): the next release may migrate
// while this replica runs. Only a change costs a full status read. It
// also reads the schema floor: a finalize that ran while this replica was
// paused or cut off (it did not count as live then) may have contracted
// the schema past what this release knows; the replica then stops (Fatal)
// rather than serve on a schema it may no longer work with.
func (s *Server) watchSchema(r *replication) {
	defer r.watchDone.Done()
	t := s.cfg.Clock.NewTicker(schemaCheckInterval, "watchSchema")
	defer t.Stop()
	for {
		select {
		case <-r.stopWatch:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
		var tooOld *database.TooOldError
		newest, err := s.db.WatchSchema(ctx, s.cfg.Version, s.schema.Load().Known)
		if errors.As(err, &tooOld) {
			cancel()
			s.fail(err)
			return
		}
		if err == nil && newest != s.schema.Load().Found {
			var st database.SchemaStatus
			if st, err = s.db.SchemaStatus(ctx, database.MigrateOptions{}); err == nil {
				s.setSchema(st)
			}
		}
		cancel()
		if err != nil {
			s.log.Debug("read the schema version", zap.Error(err))
		}
	}
}
