package replicasync

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
)

// Peer is a live regional peer the owner's mesh should connect to.
type Peer struct {
	ID           uuid.UUID
	RelayAddress string
}

// Manager is this process's membership in the cluster. New registers and
// starts it; Close leaves a tombstone and stops it. Its methods are safe for
// concurrent use.
//
// Goroutines: the loop goroutine owns the heartbeat, the peer set and the
// owner's callback; the probe goroutine starts one probe goroutine per peer
// (at most one per peer at a time); the cleanup goroutine deletes dead
// rows. mu guards the shared state and is never held across I/O or a
// callback.
type Manager struct {
	db        *database.DB
	ps        Pubsub
	opts      Options
	ownClient bool // opts.HTTPClient was made here: Close closes its idle connections
	log       *zap.Logger
	metrics   *metrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	syncNow  chan struct{} // dirty flag: re-read peers (a notification arrived)
	writeNow chan struct{} // write the row and announce it (something peers should see changed)
	probeNow chan struct{} // probe every regional peer

	mu          sync.Mutex
	self        database.Replica
	peers       map[uuid.UUID]database.Replica // live, self excluded, every region; written by the loop only
	probes      map[uuid.UUID]*probeState      // live regional peers with a relay URL
	dbSamples   []time.Duration
	dbWarned    bool
	ownError    string
	beatFailing bool
	// keepPeersUntil: right after a database outage every peer looks stale
	// until it beats again. Until then, peers missing from the live set are
	// kept unless their row says they stopped, so an outage does not tear
	// the mesh down.
	keepPeersUntil time.Time
	callback       func([]Peer)
	told           []Peer // what the callback was last given
	callbackDue    bool   // SetCallback was called: tell the current set even if unchanged

	cancelSub func()
	closeOnce sync.Once
	closeErr  error
}

// New registers the replica (one upsert: a new row, or a revived one),
// subscribes to Channel, reads the live replicas, announces itself, and
// starts heartbeating, probing and cleaning up. It returns an error, and
// starts nothing, if it cannot subscribe or the registration fails. ctx
// bounds only this registration; Close stops the Manager.
func New(ctx context.Context, db *database.DB, ps Pubsub, opts Options) (*Manager, error) {
	opts, ownClient := opts.withDefaults()
	m := &Manager{
		db:        db,
		ps:        ps,
		opts:      opts,
		ownClient: ownClient,
		log:       opts.Logger,
		metrics:   newMetrics(opts.Registerer),
		syncNow:   make(chan struct{}, 1),
		writeNow:  make(chan struct{}, 1),
		probeNow:  make(chan struct{}, 1),
		peers:     map[uuid.UUID]database.Replica{},
		probes:    map[uuid.UUID]*probeState{},
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	// Subscribe first, so that no peer's announcement falls between our
	// read of the table and our LISTEN.
	cancelSub, err := ps.Subscribe(Channel, m.onNotification)
	if err != nil {
		m.cancel()
		return nil, fmt.Errorf("replicasync: subscribe to replica notifications: %w", err)
	}
	m.cancelSub = cancelSub
	if err := m.writeRow(ctx); err != nil {
		cancelSub()
		m.cancel()
		return nil, fmt.Errorf("replicasync: register replica %s in the database: %w", opts.ID, err)
	}
	if err := m.readPeers(ctx); err != nil {
		m.trigger(m.syncNow) // the loop retries at once
	}
	m.publish(ctx)
	m.log.Info("replica registered", zap.Stringer("replica_id", opts.ID), zap.String("hostname", opts.Hostname),
		zap.Int32("region_id", opts.RegionID), zap.String("relay_url", opts.RelayAddress), zap.Int("peers", len(m.All())-1))
	m.wg.Add(3)
	go m.loop()
	go m.probeLoop()
	go m.cleanupLoop()
	m.trigger(m.probeNow)
	return m, nil
}

// SetCallback sets f, the owner's view of the mesh: the live peers of this
// replica's region that have a relay URL, self excluded.
//
// Contract:
//   - f gets one Peer per relay URL, sorted by RelayAddress. When several
//     live rows share a URL (a replica restarted before its old row went
//     stale), the most recently created row wins, so a restarted peer
//     replaces its predecessor at once.
//   - f is called soon after SetCallback with the current set (possibly
//     empty), then only when the set changes: a peer joined, left (stopped,
//     went stale, or left the region), or a URL is now held by a different
//     id (a peer came back under the same URL: reconnect to it). A peer that
//     went away and came back is two changes. Quiet heartbeats never call f.
//   - f is called from the Manager's loop goroutine: never concurrently,
//     never with a lock held, never after Close returns. It may call the
//     Manager's methods; it should not block for long (the loop waits).
//   - The slice is f's to keep.
//
// Calling SetCallback again replaces f; the new f is told the current set.
// nil stops the calls.
func (m *Manager) SetCallback(f func([]Peer)) {
	m.mu.Lock()
	m.callback = f
	m.told = nil
	m.callbackDue = true
	m.mu.Unlock()
	m.trigger(m.syncNow)
}

// Reprobe asks for an immediate probe of the live regional peer whose relay
// URL (or id, as text) is target; unknown targets are ignored. The mesh
// calls it when its connection to a peer breaks: a peer that refuses
// connections is marked unreachable in this replica's row, and announced,
// within a second instead of after 3 missed beats. If a probe of the peer
// is under way, another one follows it.
func (m *Manager) Reprobe(target string) {
	var targets []database.Replica
	m.mu.Lock()
	for _, p := range m.peers {
		if p.RegionID == m.opts.RegionID && (p.RelayAddress == target || p.ID.String() == target) {
			targets = append(targets, p)
		}
	}
	m.mu.Unlock()
	for _, p := range targets {
		m.startProbe(p, true)
	}
}

// SetError attaches an error to this replica's row, for the owner's
// problems peers should show (the mesh's "cannot mesh with …"). Empty
// clears it. A change is written and announced at once; setting the same
// value again does nothing.
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

// All is every live replica, self included, oldest first. Through a
// database outage it is the last known set.
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

// Regional is every live peer in this replica's region, self excluded,
// oldest first (peers without a relay URL included).
func (m *Manager) Regional() []database.Replica {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.regionalLocked()
}

func (m *Manager) regionalLocked() []database.Replica {
	var out []database.Replica
	for _, p := range m.peers {
		if p.RegionID == m.opts.RegionID {
			out = append(out, p)
		}
	}
	sortReplicas(out)
	return out
}

// Warnings are the latency warnings in force: the database first (starting
// "the database"), then peers, each naming the peer's hostname and relay
// URL. Unreachable peers are not warnings here: see PeerReports.
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warningsLocked()
}

// PeerReports is what this replica measured of each live regional peer,
// sorted by id: as stored in its row.
func (m *Manager) PeerReports() []database.PeerReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerReportsLocked()
}

// PeerLatencies is the latency (median of recent probes) of each live
// regional peer that has been measured and is reachable.
func (m *Manager) PeerLatencies() map[uuid.UUID]time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[uuid.UUID]time.Duration, len(m.probes))
	for id, st := range m.probes {
		if st.err == "" && len(st.samples) > 0 {
			out[id] = st.latency()
		}
	}
	return out
}

// DatabaseLatency is the median of recent heartbeat round trips.
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

// Close stops the loops and waits for them, marks the row stopped (a
// tombstone) and announces it, so peers drop this replica at once. It
// returns the error of marking the row (peers then drop the replica when
// it goes stale). It is safe to call more than once; later calls return
// the first call's result.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		m.stop()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := m.db.MarkReplicaStopped(ctx, m.opts.ID); err != nil {
			m.closeErr = fmt.Errorf("replicasync: %w", err)
			return
		}
		m.publish(ctx)
		m.log.Info("replica stopped", zap.Stringer("replica_id", m.opts.ID))
	})
	return m.closeErr
}

// stop ends every goroutine without touching the row.
func (m *Manager) stop() {
	// Under mu, so startProbe's check-then-wg.Add cannot straddle it.
	m.mu.Lock()
	m.cancel()
	m.mu.Unlock()
	m.cancelSub()
	m.wg.Wait()
	if m.ownClient {
		m.opts.HTTPClient.CloseIdleConnections()
	}
}

// loop owns the heartbeat, the notification-driven re-reads and the
// owner's callback.
func (m *Manager) loop() {
	defer m.wg.Done()
	beat := newTicker(m.opts.Clock, m.opts.HeartbeatInterval)
	defer beat.Stop()
	// While heartbeats fail (Postgres down), retry every second at most, so
	// the replica is back in sync soon after the database returns.
	retry := newTicker(m.opts.Clock, min(time.Second, m.opts.HeartbeatInterval))
	defer retry.Stop()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-beat.C():
			if m.beat(false) {
				m.trigger(m.probeNow)
			}
		case <-retry.C():
			if m.HeartbeatFailing() && m.beat(false) {
				m.trigger(m.probeNow)
			}
		case <-m.writeNow:
			m.beat(true)
		case <-m.syncNow:
			_ = m.readPeers(m.ctx)
		}
		m.tellOwner()
	}
}

// beatTimeout bounds one query of a heartbeat.
func (m *Manager) beatTimeout() time.Duration {
	return min(max(m.opts.HeartbeatInterval, 2*time.Second), 10*time.Second)
}

// beat is one heartbeat: write the row (and announce it if asked), then
// re-read the peers. Two queries (three with the announcement). It reports
// whether the row was written.
func (m *Manager) beat(announce bool) bool {
	if err := m.writeRow(m.ctx); err != nil {
		m.noteBeatFailure(err)
		return false
	}
	if announce {
		m.publish(m.ctx)
	}
	_ = m.readPeers(m.ctx)
	return true
}

// writeRow upserts this replica's row with what it measured (reviving the
// row if it was deleted or marked stopped). The upsert's round trip is the
// database latency sample.
func (m *Manager) writeRow(ctx context.Context) error {
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

	ctx, cancel := context.WithTimeout(ctx, m.beatTimeout())
	defer cancel()
	start := m.opts.Clock.Now()
	self, err := m.db.UpsertReplica(ctx, state)
	rtt := since(m.opts.Clock, start)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.self = self
	recovered := m.beatFailing
	m.beatFailing = false
	if recovered {
		m.keepPeersUntil = m.opts.Clock.Now().Add(m.opts.StaleAfter)
	}
	m.dbSamples = appendSample(m.dbSamples, rtt, m.opts.Samples)
	latency := median(m.dbSamples)
	enough := len(m.dbSamples) >= min(minSamples, m.opts.Samples)
	m.mu.Unlock()

	m.metrics.databaseLatency.Set(latency.Seconds())
	if recovered {
		m.log.Info("heartbeat recovered: database reachable again")
		m.publish(ctx) // peers may have dropped us meanwhile: tell them to re-read
	}
	if enough {
		m.checkDatabaseLatency(latency)
	}
	return nil
}

// noteBeatFailure counts a failed heartbeat and logs the first of an
// outage. The peers stay as last read.
func (m *Manager) noteBeatFailure(err error) {
	if m.ctx.Err() != nil {
		return // closing
	}
	m.metrics.heartbeatFailures.Inc()
	m.mu.Lock()
	first := !m.beatFailing
	m.beatFailing = true
	m.mu.Unlock()
	if first {
		m.log.Warn("heartbeat failed: keeping the last known peers until the database is back", zap.Error(err))
	}
}

// readPeers replaces the peer set with the live rows. Only the loop
// goroutine (and New, before it starts) calls it, so m.peers has one
// writer. On error the peer set is left as it was.
func (m *Manager) readPeers(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, m.beatTimeout())
	defer cancel()
	rows, err := m.db.LiveReplicas(ctx, m.opts.StaleAfter)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("could not read peers; keeping the last known set", zap.Error(err))
		}
		return err
	}
	peers := make(map[uuid.UUID]database.Replica, len(rows))
	for _, r := range rows {
		if r.ID != m.opts.ID {
			peers[r.ID] = r
		}
	}
	m.keepAfterOutage(ctx, peers)

	m.mu.Lock()
	var joined, left []database.Replica
	for id, p := range peers {
		if _, known := m.peers[id]; !known {
			joined = append(joined, p)
		}
	}
	for id, old := range m.peers {
		if _, still := peers[id]; !still {
			left = append(left, old)
			delete(m.probes, id)
			m.metrics.peerLatency.DeleteLabelValues(id.String(), old.Hostname)
		}
	}
	m.peers = peers
	m.metrics.replicas.Set(float64(len(peers) + 1))
	m.mu.Unlock()

	for _, p := range left {
		m.log.Info("replica left", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
	}
	for _, p := range joined {
		m.log.Info("replica joined", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID),
			zap.String("relay_url", p.RelayAddress), zap.Int32("region_id", p.RegionID))
		m.startProbe(p, false)
	}
	return nil
}

// keepAfterOutage adds to peers, during the window after a database outage,
// the known peers that look stale only because they could not beat either:
// those whose rows still exist and are not marked stopped.
func (m *Manager) keepAfterOutage(ctx context.Context, peers map[uuid.UUID]database.Replica) {
	m.mu.Lock()
	if !m.opts.Clock.Now().Before(m.keepPeersUntil) {
		m.mu.Unlock()
		return
	}
	var missing []uuid.UUID
	for id := range m.peers {
		if _, ok := peers[id]; !ok {
			missing = append(missing, id)
		}
	}
	m.mu.Unlock()
	if len(missing) == 0 {
		return
	}
	keep, err := m.db.UnstoppedReplicaIDs(ctx, missing)
	if err != nil {
		keep = missing // when in doubt, keep: the window is short
	}
	m.mu.Lock()
	for _, id := range keep {
		if old, ok := m.peers[id]; ok {
			peers[id] = old
		}
	}
	m.mu.Unlock()
}

// tellOwner calls the callback if the mesh's peer set changed since it was
// last told (or it was just set). Loop goroutine only.
func (m *Manager) tellOwner() {
	m.mu.Lock()
	f := m.callback
	if f == nil {
		m.mu.Unlock()
		return
	}
	current := m.meshPeersLocked()
	due := m.callbackDue || !samePeers(current, m.told)
	if due {
		m.told = current
		m.callbackDue = false
	}
	m.mu.Unlock()
	if due {
		f(append([]Peer(nil), current...))
	}
}

// meshPeersLocked is the set the callback is given: one Peer per relay URL
// of a live regional peer, the newest row winning, sorted by URL.
func (m *Manager) meshPeersLocked() []Peer {
	byURL := map[string]database.Replica{}
	for _, p := range m.peers {
		if p.RegionID != m.opts.RegionID || p.RelayAddress == "" {
			continue
		}
		if cur, ok := byURL[p.RelayAddress]; ok && !newer(p, cur) {
			continue
		}
		byURL[p.RelayAddress] = p
	}
	out := make([]Peer, 0, len(byURL))
	for url, p := range byURL {
		out = append(out, Peer{ID: p.ID, RelayAddress: url})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].RelayAddress < out[j].RelayAddress })
	return out
}

// newer reports whether a's row was created after b's (ties broken by id,
// so the choice is the same on every replica).
func newer(a, b database.Replica) bool {
	if !a.CreatedAt.Equal(b.CreatedAt) {
		return a.CreatedAt.After(b.CreatedAt)
	}
	return a.ID.String() > b.ID.String()
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

// cleanupLoop deletes long-dead rows at start and every CleanupInterval.
// DeleteDeadReplicas lets one replica at a time do it.
func (m *Manager) cleanupLoop() {
	defer m.wg.Done()
	t := newTicker(m.opts.Clock, m.opts.CleanupInterval)
	defer t.Stop()
	for {
		m.cleanup()
		select {
		case <-m.ctx.Done():
			return
		case <-t.C():
		}
	}
}

func (m *Manager) cleanup() {
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	n, err := m.db.DeleteDeadReplicas(ctx, m.opts.Retention)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("could not delete dead replicas; will retry", zap.Error(err))
		}
		return
	}
	if n > 0 {
		m.log.Info("deleted rows of long-dead replicas", zap.Int64("rows", n), zap.Duration("retention", m.opts.Retention))
	}
}

func sortReplicas(rs []database.Replica) {
	sort.Slice(rs, func(i, j int) bool {
		if !rs[i].CreatedAt.Equal(rs[j].CreatedAt) {
			return rs[i].CreatedAt.Before(rs[j].CreatedAt)
		}
		return rs[i].ID.String() < rs[j].ID.String()
	})
}
