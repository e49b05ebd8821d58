package coderd

import (
	"fmt"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/replicasync"
)

// healthPart is the section of the health report a warning belongs to.
type healthPart int

const (
	partDatabase healthPart = iota
	partReplicas
	partDERPMesh
)

// warningKind is what a health warning is about. Each kind has one
// rendering (healthWarning.String) and one section (healthWarning.part).
type warningKind int

const (
	// warnHeartbeatFailing: this replica's heartbeats fail.
	warnHeartbeatFailing warningKind = iota
	// warnListenDown: the LISTEN connection is down.
	warnListenDown
	// warnSchemaNewer: the schema is newer than this release knows;
	// text is the rendered skew (database.SchemaStatus.SkewWarning).
	warnSchemaNewer
	// warnMixedVersions: more than one version is live; text is the
	// rendered list (mixedVersionsWarning).
	warnMixedVersions
	// warnReplicaSync: a warning of replicasync (sync holds it).
	warnReplicaSync
	// warnPeerUnreachable: a regional peer's last probe failed.
	warnPeerUnreachable
	// warnMeshDown: the mesh link to a peer is not connected.
	warnMeshDown
)

// healthWarning is one warning of GET /api/v2/debug/health as a value: a
// kind and its fields. It is rendered to text only when the report is
// written (the text is a wire contract: testdata/wire/health.golden).
type healthWarning struct {
	kind warningKind
	// host and url name the peer a warning is about (peer kinds).
	host, url string
	// text is the detail: the peer's error or mesh state, or the whole
	// text of a warning that arrives rendered.
	text string
	// sync is the replicasync warning (warnReplicaSync).
	sync replicasync.Warning
}

// part is the report section the warning is listed in.
func (w healthWarning) part() healthPart {
	switch w.kind {
	case warnHeartbeatFailing, warnListenDown, warnSchemaNewer:
		return partDatabase
	case warnReplicaSync:
		switch w.sync.Kind {
		case replicasync.WarnDatabaseSlow, replicasync.WarnCutOff:
			return partDatabase
		}
		return partReplicas
	case warnMeshDown:
		return partDERPMesh
	default:
		return partReplicas
	}
}

// unhealthy reports whether the warning makes its section unhealthy (the
// others are advice: skew, latency, mixed versions).
func (w healthWarning) unhealthy() bool {
	switch w.kind {
	case warnHeartbeatFailing, warnListenDown, warnPeerUnreachable, warnMeshDown:
		return true
	}
	return false
}

// String renders the warning as the health report shows it.
func (w healthWarning) String() string {
	switch w.kind {
	case warnHeartbeatFailing:
		return "heartbeats are failing: the database is unreachable (the relay keeps serving with the last known peers)"
	case warnListenDown:
		return "the LISTEN connection is down: peers are seen only at heartbeats until it reconnects"
	case warnPeerUnreachable:
		return fmt.Sprintf("replica %q (%s) is unreachable: %s", w.host, dash(w.url), w.text)
	case warnMeshDown:
		return fmt.Sprintf("cannot mesh with replica %q (%s): %s", w.host, w.url, w.text)
	case warnReplicaSync:
		return w.sync.String()
	default:
		return w.text
	}
}

// schemaWarning is the warning for a schema newer than release knows, or
// false when there is none.
func schemaWarning(st *database.SchemaStatus, release string) (healthWarning, bool) {
	if st == nil || !st.Newer() {
		return healthWarning{}, false
	}
	return healthWarning{kind: warnSchemaNewer, text: st.SkewWarning(release)}, true
}
