package replicasync

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/database/pubsub"
)

// Channel is the pubsub channel replicas announce themselves on. Payloads
// are replica ids only (NOTIFY's limit is 8000 bytes).
const Channel = "replica"

// Pubsub is what the Manager needs of LISTEN/NOTIFY.
type Pubsub interface {
	Subscribe(channel string, l pubsub.Listener) (cancel func(), err error)
	Publish(ctx context.Context, channel string, payload []byte) error
}

// Peer is a live regional peer the mesh should connect to.
type Peer struct {
	ID           uuid.UUID
	RelayAddress string
}

// Manager is this process's membership in the cluster. New registers and
// starts it; Close leaves a tombstone and stops it.
type Manager struct {
	db      *database.DB
	ps      Pubsub
	opts    Options
	log     *zap.Logger
	metrics *metrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	syncNow  chan struct{} // re-read peers (a notification arrived)
	writeNow chan struct{} // write the row and notify (something worth telling changed)
	probeNow chan struct{} // probe every peer

	// mu guards everything below. It is never held across I/O or a
	// callback.
	mu          sync.Mutex
	self        database.Replica
	peers       map[uuid.UUID]database.Replica // live, self excluded, every region
	probes      map[uuid.UUID]*probeState      // regional peers only
	dbSamples   []time.Duration
	dbWarned    bool
	ownError    string
	lastPeers   []Peer // what the callback was last told
	callback    func([]Peer)
	callbackDue bool // the callback has not yet been told the current set
	beatFailing bool
	// keepPeersUntil: right after a database outage, peers that have not
	// re-beaten yet look stale; until then the known peers are kept, so the
	// mesh is not torn down while everyone catches up.
	keepPeersUntil time.Time

	// pending are replicas announced since the last sync; pendingAll asks
	// for a full re-read (messages may have been lost, or a burst).
	pendingMu  sync.Mutex
	pending    map[uuid.UUID]struct{}
	pendingAll bool

	cancelSub func()
	closeOnce sync.Once
}

// probeState is what this replica knows of one peer's latency.
type probeState struct {
	samples  []time.Duration
	err      string
	warned   bool
	inFlight bool
	again    bool // asked for while in flight: probe once more after
}

func (p *probeState) latency() time.Duration { return median(p.samples) }

// New registers the replica, announces it, reads its peers and starts
// heartbeating. It fails if the first registration fails.
func New(ctx context.Context, db *database.DB, ps Pubsub, opts Options) (*Manager, error) {
	opts = opts.withDefaults()
	m := &Manager{
		db:       db,
		ps:       ps,
		opts:     opts,
		log:      opts.Logger,
		metrics:  newMetrics(opts.Registerer),
		syncNow:  make(chan struct{}, 1),
		writeNow: make(chan struct{}, 1),
		probeNow: make(chan struct{}, 1),
		peers:    map[uuid.UUID]database.Replica{},
		probes:   map[uuid.UUID]*probeState{},
		pending:  map[uuid.UUID]struct{}{},
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	cancelSub, err := ps.Subscribe(Channel, m.onNotification)
	if err != nil {
		m.cancel()
		return nil, fmt.Errorf("subscribe to replica notifications: %w", err)
	}
	m.cancelSub = cancelSub
	if err := m.heartbeatWithin(ctx, 30*time.Second); err != nil {
		cancelSub()
		m.cancel()
		return nil, fmt.Errorf("register replica: %w", err)
	}
	m.publish(ctx)
	m.wg.Add(2)
	go m.loop()
	go m.probeLoop()
	m.trigger(m.probeNow)
	return m, nil
}

// SetCallback sets the function told about the live regional peers (relay
// URL set, with ids) whenever it changes: a join, a leave, or a peer that
// came back under the same URL with a new id. It is called soon after
// SetCallback with the current set, then on change only (never once per
// beat), always from the Manager's loop goroutine: never concurrently and
// never with a lock held. It must not block for long.
func (m *Manager) SetCallback(f func([]Peer)) {
	m.mu.Lock()
	m.callback = f
	m.lastPeers = nil
	m.callbackDue = true
	m.mu.Unlock()
	m.trigger(m.syncNow)
}

// Reprobe asks for an immediate probe of the peer with this relay URL (the
// mesh calls it when its connection to the peer breaks). A peer that
// refuses connections is marked unreachable, written and announced within a
// second instead of after 3 missed beats.
func (m *Manager) Reprobe(relayURL string) {
	m.mu.Lock()
	var target *database.Replica
	for _, p := range m.peers {
		if p.RelayAddress == relayURL && p.RegionID == m.opts.RegionID {
			p := p
			target = &p
			break
		}
	}
	m.mu.Unlock()
	if target != nil {
		m.startProbe(*target)
	}
}

// SetError attaches an error to this replica's row (the mesh reports peers
// it cannot mesh with). Empty clears it. A change is written and announced
// at once.
func (m *Manager) SetError(msg string) {
	m.mu.Lock()
	changed := m.ownError != msg
	m.ownError = msg
	m.mu.Unlock()
	if changed {
		m.trigger(m.writeNow)
	}
}

// Self is this replica's row as last written.
func (m *Manager) Self() database.Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.self
}

// All is every live replica, self included, oldest first.
func (m *Manager) All() []database.Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]database.Replica, 0, len(m.peers)+1)
	out = append(out, m.self)
	for _, p := range m.peers {
		out = append(out, p)
	}
	sortReplicas(out)
	return out
}

// Regional is every live peer in this replica's region, self excluded.
func (m *Manager) Regional() []database.Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []database.Replica
	for _, p := range m.peers {
		if p.RegionID == m.opts.RegionID {
			out = append(out, p)
		}
	}
	sortReplicas(out)
	return out
}

// Warnings are the latency warnings in force, each naming the peer (by
// hostname and relay URL) or the database.
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warningsLocked()
}

// PeerReports is what this replica measured of each regional peer.
func (m *Manager) PeerReports() []database.PeerReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerReportsLocked()
}

// DatabaseLatency is the median of recent database round trips.
func (m *Manager) DatabaseLatency() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return median(m.dbSamples)
}

// HeartbeatFailing reports whether the last heartbeat failed to reach the
// database.
func (m *Manager) HeartbeatFailing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.beatFailing
}

// Close stops heartbeating, marks the row stopped and announces it, so
// peers drop this replica at once. It is safe to call more than once.
func (m *Manager) Close() error {
	var err error
	m.closeOnce.Do(func() {
		m.stop()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err = m.db.MarkReplicaStopped(ctx, m.opts.ID); err == nil {
			m.publish(ctx)
		}
	})
	return err
}

func (m *Manager) stop() {
	// Under mu, so startProbe's check-then-wg.Add cannot straddle it.
	m.mu.Lock()
	m.cancel()
	m.mu.Unlock()
	m.cancelSub()
	m.wg.Wait()
}

func (m *Manager) trigger(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// onNotification runs on the pubsub's goroutine: it only parses and flags.
func (m *Manager) onNotification(_ context.Context, payload []byte, err error) {
	if err != nil {
		m.pendingMu.Lock()
		m.pendingAll = true // messages may be lost: re-read everything
		m.pendingMu.Unlock()
		m.trigger(m.syncNow)
		return
	}
	id, ok := ParseNotification(payload)
	if !ok {
		m.metrics.malformed.Inc()
		m.log.Debug("ignoring malformed replica notification", zap.Int("bytes", len(payload)))
		return
	}
	if id == m.opts.ID {
		return
	}
	m.pendingMu.Lock()
	m.pending[id] = struct{}{}
	m.pendingMu.Unlock()
	m.trigger(m.syncNow)
}

// maxTargetedReads: more announcements than this since the last sync are
// cheaper to answer with one full read than with one read each.
const maxTargetedReads = 8

// sync answers the announcements since the last sync: one single-row read
// per announced replica (so N replicas joining cost each peer N small
// reads, not N full-table reads), or one full read after a gap.
func (m *Manager) sync(ctx context.Context) {
	m.pendingMu.Lock()
	ids, all := m.pending, m.pendingAll || len(m.pending) > maxTargetedReads
	m.pending, m.pendingAll = map[uuid.UUID]struct{}{}, false
	m.pendingMu.Unlock()
	if all || len(ids) == 0 {
		_ = m.readPeers(ctx)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	m.mu.Lock()
	next := make(map[uuid.UUID]database.Replica, len(m.peers)+len(ids))
	for id, p := range m.peers {
		next[id] = p
	}
	m.mu.Unlock()
	for id := range ids {
		r, live, err := m.db.GetReplicaIfLive(ctx, id, m.opts.StaleAfter)
		if err != nil {
			_ = m.readPeers(ctx) // fall back to the full read
			return
		}
		if live {
			next[id] = r
		} else {
			delete(next, id)
		}
	}
	m.applyPeers(next)
}

// ParseNotification reads a replica notification's payload: a replica id.
func ParseNotification(payload []byte) (uuid.UUID, bool) {
	if len(payload) != 36 {
		return uuid.Nil, false
	}
	id, err := uuid.ParseBytes(payload)
	if err != nil || id == uuid.Nil {
		return uuid.Nil, false
	}
	return id, true
}

func (m *Manager) publish(ctx context.Context) {
	if err := m.ps.Publish(ctx, Channel, []byte(m.opts.ID.String())); err != nil {
		m.log.Debug("announce replica", zap.Error(err))
	}
}

// loop owns the heartbeat, notification-driven syncs and cleanup.
func (m *Manager) loop() {
	defer m.wg.Done()
	beat := time.NewTicker(m.opts.HeartbeatInterval)
	defer beat.Stop()
	// While heartbeats fail (Postgres down), retry every second at most, so
	// the replica is back in sync soon after the database returns.
	retry := time.NewTicker(min(time.Second, m.opts.HeartbeatInterval))
	defer retry.Stop()
	cleanup := time.NewTicker(m.opts.CleanupInterval)
	defer cleanup.Stop()
	m.cleanup()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-beat.C:
			if m.heartbeat(m.ctx) == nil {
				m.trigger(m.probeNow)
			}
		case <-retry.C:
			if m.HeartbeatFailing() && m.heartbeat(m.ctx) == nil {
				m.trigger(m.probeNow)
			}
		case <-m.writeNow:
			if m.heartbeat(m.ctx) == nil {
				m.publish(m.ctx)
			}
		case <-m.syncNow:
			m.sync(m.ctx)
		case <-cleanup.C:
			m.cleanup()
		}
	}
}

// heartbeat writes the row (reviving it if it was deleted or marked
// stopped) and re-reads the peers: two queries. The upsert's round trip is
// the database latency sample.
func (m *Manager) heartbeat(ctx context.Context) error {
	return m.heartbeatWithin(ctx, max(m.opts.HeartbeatInterval, 5*time.Second))
}

// heartbeatWithin is heartbeat with a deadline: registration, at a mass
// start when the database is busiest, gets more patience than a beat.
func (m *Manager) heartbeatWithin(ctx context.Context, timeout time.Duration) error {
	m.mu.Lock()
	state := database.ReplicaState{
		ID:              m.opts.ID,
		Hostname:        m.opts.Hostname,
		RegionID:        m.opts.RegionID,
		RelayAddress:    m.opts.RelayAddress,
		Version:         m.opts.Version,
		DatabaseLatency: median(m.dbSamples),
		Error:           m.ownError,
		Peers:           m.peerReportsLocked(),
		Warnings:        m.warningsLocked(),
	}
	m.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := m.opts.Clock.Now()
	self, err := m.db.UpsertReplica(ctx, state)
	rtt := m.opts.Clock.Now().Sub(start)
	if err != nil {
		m.noteBeatFailure(err)
		return err
	}
	m.mu.Lock()
	m.self = self
	recovered := m.beatFailing
	m.beatFailing = false
	if recovered {
		m.keepPeersUntil = time.Now().Add(m.opts.StaleAfter)
	}
	m.dbSamples = appendSample(m.dbSamples, rtt, m.opts.Samples)
	dbLatency := median(m.dbSamples)
	m.mu.Unlock()
	if recovered {
		m.log.Info("heartbeat recovered: database reachable again")
		m.publish(ctx) // peers may have missed us; tell them to re-read
	}
	m.metrics.databaseLatency.Set(dbLatency.Seconds())
	if samples := m.dbSampleCount(); samples >= min(minSamples, m.opts.Samples) {
		m.checkDatabaseLatency(dbLatency)
	}
	return m.readPeers(ctx)
}

func (m *Manager) noteBeatFailure(err error) {
	m.metrics.heartbeatFailures.Inc()
	m.mu.Lock()
	first := !m.beatFailing
	m.beatFailing = true
	m.mu.Unlock()
	if first && m.ctx.Err() == nil {
		m.log.Warn("heartbeat failed: keeping the last known peers until the database is back", zap.Error(err))
	}
}

// readPeers replaces the peer set with the live rows and tells the owner
// if the regional relay set changed.
func (m *Manager) readPeers(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rows, err := m.db.LiveReplicas(ctx, m.opts.StaleAfter)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("read peers", zap.Error(err))
		}
		return err
	}
	peers := make(map[uuid.UUID]database.Replica, len(rows))
	for _, r := range rows {
		if r.ID != m.opts.ID {
			peers[r.ID] = r
		}
	}
	m.applyPeers(peers)
	return nil
}

// applyPeers makes peers the live peer set: logs joins and leaves, starts
// probing newcomers and tells the owner if the regional relay set changed.
func (m *Manager) applyPeers(peers map[uuid.UUID]database.Replica) {
	m.mu.Lock()
	if time.Now().Before(m.keepPeersUntil) {
		for id, old := range m.peers {
			if _, ok := peers[id]; !ok {
				peers[id] = old
			}
		}
	}
	var joined []database.Replica
	for id, p := range peers {
		if _, known := m.peers[id]; !known && p.RegionID == m.opts.RegionID {
			joined = append(joined, p)
		}
	}
	for id, old := range m.peers {
		if _, still := peers[id]; !still {
			delete(m.probes, id)
			m.metrics.peerLatency.DeleteLabelValues(id.String(), old.Hostname)
			m.log.Info("replica left", zap.String("peer_hostname", old.Hostname), zap.Stringer("peer_id", id), zap.String("relay_url", old.RelayAddress))
		}
	}
	m.peers = peers
	m.metrics.replicas.Set(float64(len(peers) + 1))
	current := m.regionalPeersLocked()
	changed := !samePeers(current, m.lastPeers) || m.callbackDue
	m.callbackDue = false
	if changed {
		m.lastPeers = current
	}
	callback := m.callback
	m.mu.Unlock()

	for _, p := range joined {
		m.log.Info("replica joined", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
		m.startProbe(p)
	}
	if changed && callback != nil {
		callback(current)
	}
}

func (m *Manager) cleanup() {
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	n, err := m.db.DeleteDeadReplicas(ctx, m.opts.Retention)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("delete dead replicas", zap.Error(err))
		}
		return
	}
	if n > 0 {
		m.log.Info("deleted rows of long-dead replicas", zap.Int64("rows", n), zap.Duration("retention", m.opts.Retention))
	}
}

// regionalPeersLocked is the sorted set the mesh should connect to.
func (m *Manager) regionalPeersLocked() []Peer {
	var out []Peer
	for _, p := range m.peers {
		if p.RegionID == m.opts.RegionID && p.RelayAddress != "" {
			out = append(out, Peer{ID: p.ID, RelayAddress: p.RelayAddress})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].RelayAddress != out[j].RelayAddress {
			return out[i].RelayAddress < out[j].RelayAddress
		}
		return out[i].ID.String() < out[j].ID.String()
	})
	return out
}

func samePeers(a, b []Peer) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func (m *Manager) peerReportsLocked() []database.PeerReport {
	out := []database.PeerReport{}
	for id, p := range m.peers {
		if p.RegionID != m.opts.RegionID {
			continue
		}
		st := m.probes[id]
		r := database.PeerReport{ID: id}
		switch {
		case p.RelayAddress == "":
			r.Error = "peer has no relay URL"
		case st == nil || (len(st.samples) == 0 && st.err == ""):
			r.Error = ""
		default:
			r.LatencyMS = float64(st.latency().Microseconds()) / 1000
			r.Error = st.err
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out
}

func (m *Manager) warningsLocked() []string {
	out := []string{}
	threshold := m.opts.LatencyThreshold
	if m.dbWarned {
		out = append(out, fmt.Sprintf("the database is %s away; every replica must be within %s of Postgres", round(median(m.dbSamples)), threshold))
	}
	var peerWarnings []string
	for id, st := range m.probes {
		if !st.warned {
			continue
		}
		p := m.peers[id]
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (%s) is %s away; every replica must be within %s of each other",
			p.Hostname, p.RelayAddress, round(st.latency()), threshold))
	}
	sort.Strings(peerWarnings)
	return append(out, peerWarnings...)
}

func (m *Manager) dbSampleCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.dbSamples)
}

func (m *Manager) checkDatabaseLatency(latency time.Duration) {
	m.mu.Lock()
	above := latency > m.opts.LatencyThreshold
	changed := above != m.dbWarned
	m.dbWarned = above
	m.mu.Unlock()
	if !changed {
		return
	}
	if above {
		m.log.Warn("database latency above threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
	} else {
		m.log.Info("database latency back under threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
	}
	m.trigger(m.writeNow)
}

func sortReplicas(rs []database.Replica) {
	sort.Slice(rs, func(i, j int) bool {
		if !rs[i].CreatedAt.Equal(rs[j].CreatedAt) {
			return rs[i].CreatedAt.Before(rs[j].CreatedAt)
		}
		return rs[i].ID.String() < rs[j].ID.String()
	})
}

func appendSample(s []time.Duration, d time.Duration, keep int) []time.Duration {
	s = append(s, d)
	if len(s) > keep {
		s = s[len(s)-keep:]
	}
	return s
}

func median(s []time.Duration) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := append([]time.Duration(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[len(c)/2]
}

func round(d time.Duration) time.Duration {
	if d > time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(100 * time.Microsecond)
}

// describeProbeError turns a probe failure into a short, stable message.
func describeProbeError(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "connection refused"):
		return "connection refused"
	case errors.Is(err, context.DeadlineExceeded) || strings.Contains(msg, "Client.Timeout") || strings.Contains(msg, "deadline exceeded"):
		return "timed out"
	}
	return msg
}
