package replicasync

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"github.com/coder-ha/coder/database"
)

// Channel is the pubsub channel replicas announce themselves on. Payloads
// are replica ids only (NOTIFY's limit is 8000 bytes).
const Channel = "replica"

// errLeft is returned by a heartbeat asked for after Leave.
var errLeft = errors.New("replica has left the cluster")

// Manager is this process's membership in the cluster. New registers and
// starts it; Leave marks it stopped and tells the peers; Close stops its
// goroutines (leaving first if Leave was not called).
type Manager struct {
	store   Store
	ps      Pubsub // nil: poll mode
	opts    Options
	log     *zap.Logger
	metrics *metrics
	clock   quartz.Clock

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// httpProbes counts HTTP probes since the last round (see probeLoop).
	httpProbes atomic.Int64

	syncNow  chan struct{} // answer the announcements since the last sync
	writeNow chan struct{} // write the row soon (something worth showing changed)
	probeNow chan struct{} // start a probe round over the regional peers
	tellNow  chan struct{} // the callback may be due

	// beatMu serializes beats with Leave: once left is set no beat starts,
	// and Leave's stop is written after any beat under way.
	beatMu sync.Mutex
	left   bool

	leaveMu  sync.Mutex
	leftOK   bool  // the stop was written
	leaveErr error // the last Leave's error; nil before the first
	tried    bool  // Leave ran at least once

	// mu guards everything below. It is never held across I/O or a
	// callback.
	mu           sync.Mutex
	self         database.Replica
	peers        map[uuid.UUID]database.Replica // live, self excluded, every region
	probes       map[uuid.UUID]*probeState      // regional peers only
	db           latencyWindow
	grace        outageGrace
	cutOffWarned bool
	// selfNoRelayWarned: the "this replica has no relay URL" WARN line
	// was logged and its condition still holds.
	selfNoRelayWarned bool
	// sharedURLWarned: the live peers using this replica's relay URL that
	// a WARN line was logged about (see sharedURLLocked).
	sharedURLWarned map[uuid.UUID]bool
	skew            time.Duration // database clock minus this machine's, at the last beat
	skewWarned      bool
	ownError        string
	pinger          LinkPinger
	callback        func(PeerChange)
	current         []Peer // the mesh set as of the last read
	told            []Peer // what the callback was last told
	tellDue         bool   // the callback must be called even if the set is unchanged

	// pending are replicas announced since the last sync; pendingAll asks
	// for a full re-read (messages may have been lost, or a burst).
	pendingMu  sync.Mutex
	pending    map[uuid.UUID]struct{}
	pendingAll bool

	// heard is closed when this replica first hears its own announcement:
	// its subscription is live, so nothing announced later is missed.
	heard     chan struct{}
	heardOnce sync.Once

	// matrixMu guards the latency matrix read for Replicas: the peers'
	// rows as of the last full read (matrixAt), kept through an outage.
	matrixMu sync.Mutex
	matrix   map[uuid.UUID][]database.PeerReport
	matrixAt time.Time

	cancelSub func()
	closeOnce sync.Once
	closeErr  error
}

// New registers the replica, announces it, reads its peers and starts
// heartbeating; it returns once running. With a Pubsub, running includes
// listening: New waits (listenTimeout at most) until it hears its own
// announcement before reading its peers, so a peer that announces itself
// while the subscription is still being set up is not missed. It fails if
// the first registration fails. A nil ps means poll mode (see
// Options.PollInterval).
func New(ctx context.Context, store Store, ps Pubsub, opts Options) (*Manager, error) {
	opts = opts.withDefaults()
	m := &Manager{
		store:    store,
		ps:       ps,
		opts:     opts,
		log:      opts.Logger,
		metrics:  newMetrics(opts.Registerer),
		clock:    opts.Clock,
		syncNow:  make(chan struct{}, 1),
		writeNow: make(chan struct{}, 1),
		probeNow: make(chan struct{}, 1),
		tellNow:  make(chan struct{}, 1),
		peers:    map[uuid.UUID]database.Replica{},
		probes:   map[uuid.UUID]*probeState{},
		pending:  map[uuid.UUID]struct{}{},
		heard:    make(chan struct{}),
		pinger:   opts.Pinger,
		db:       latencyWindow{keep: opts.Samples, threshold: opts.LatencyThreshold},
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.cancelSub = func() {}
	if ps != nil {
		cancelSub, err := ps.Subscribe(Channel, m.onNotification)
		if err != nil {
			m.cancel()
			return nil, fmt.Errorf("subscribe to replica notifications: %w", err)
		}
		m.cancelSub = cancelSub
	}
	if err := m.register(ctx); err != nil {
		m.cancelSub()
		m.cancel()
		return nil, fmt.Errorf("register replica: %w", err)
	}
	m.announceUntilHeard(ctx)
	_ = m.readAll(ctx)
	// No probe round here: readAll probed every peer it found as a
	// newcomer; rounds start with the periodic beats.
	m.wg.Add(3)
	go m.loop()
	go m.probeLoop()
	go m.tellLoop()
	return m, nil
}

// SetCallback sets the function told about the live regional peers
// whenever the set changes: a join, a leave, or a new process behind a
// known relay URL (listed in Replaced). It is called soon after SetCallback
// with the current set, then on change only (never once per beat), from
// the Manager's own callback goroutine: never concurrently, never with a
// lock held, and never on the heartbeat path, so a slow callback delays
// only later callbacks (which coalesce: the latest set wins).
func (m *Manager) SetCallback(f func(PeerChange)) {
	m.mu.Lock()
	m.callback = f
	m.told = nil
	m.tellDue = true
	m.mu.Unlock()
	m.trigger(m.tellNow)
}

// SetPinger sets the LinkPinger used for peer latency (nil: HTTP probes
// only); it exists because the mesh is built after the Manager.
func (m *Manager) SetPinger(p LinkPinger) {
	m.mu.Lock()
	m.pinger = p
	m.mu.Unlock()
}

// Reprobe asks for an immediate probe of the peer with this relay URL (the
// mesh calls it when its connection to the peer breaks, and when one is
// established). A peer that refuses connections is marked unreachable
// within a second instead of after 3 missed beats, and written at once (or
// with the next beat if a change was already written this interval); a
// new link is measured as soon as it is up.
func (m *Manager) Reprobe(relayURL string) {
	m.mu.Lock()
	var target *database.Replica
	for _, p := range m.current {
		if sameURL(p.RelayAddress, relayURL) {
			r := m.peers[p.ID]
			target = &r
			break
		}
	}
	m.mu.Unlock()
	if target != nil {
		m.startProbe(*target)
	}
}

// SetError attaches an error to this replica's row (the mesh reports peers
// it cannot mesh with). Empty clears it. A change is written at once, or
// with the next beat if a change was already written this interval.
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

// All is every live replica, self included, oldest first. The peers'
// latency matrices (Peers) are not read on every beat, so they are empty
// here except for this replica's own; Replicas fills them in.
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

// matrixTTL is how long Replicas reuses a read of the latency matrix:
// clients polling the replica list share one read a second.
const matrixTTL = time.Second

// matrixTimeout bounds Replicas' read of the matrix; past it (or while the
// heartbeat fails) the last matrix read is shown.
const matrixTimeout = 2 * time.Second

// Replicas is All with every replica's latency matrix (Peers) as stored in
// its row: the membership is this replica's view, the matrices are read
// from the store on request (at most one read per matrixTTL) rather than
// on every beat, where they would cost every replica N² entries. While
// the store is unreachable it answers with the matrices last read. This
// replica's own row shows its current measurements, warnings and error.
func (m *Manager) Replicas(ctx context.Context) []database.Replica {
	rows := m.All()
	m.matrixMu.Lock()
	defer m.matrixMu.Unlock()
	if (m.matrix == nil || m.clock.Since(m.matrixAt) >= matrixTTL) && !m.HeartbeatFailing() {
		ctx, cancel := context.WithTimeout(ctx, matrixTimeout)
		full, err := m.store.RecentReplicas(ctx, m.opts.StaleAfter)
		cancel()
		if err != nil {
			m.log.Debug("read latency matrix", zap.Error(err))
		} else {
			m.matrix = make(map[uuid.UUID][]database.PeerReport, len(full))
			for _, r := range full {
				m.matrix[r.ID] = r.Peers
			}
			m.matrixAt = m.clock.Now()
		}
	}
	for i := range rows {
		if rows[i].ID == m.opts.ID {
			// What this replica would write now: a change that waits for
			// the next beat (see loop) shows here at once.
			m.mu.Lock()
			rows[i].Peers = m.peerReportsLocked()
			rows[i].Warnings = m.warningsLocked()
			rows[i].Error = m.ownError
			rows[i].DatabaseLatency = m.db.latency()
			m.mu.Unlock()
			continue
		}
		rows[i].Peers = []database.PeerReport{}
		if p, ok := m.matrix[rows[i].ID]; ok && p != nil {
			rows[i].Peers = p
		}
	}
	return rows
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

// Warnings are the warnings in force: latency (naming the peer by
// hostname and relay URL, or the database) and a heartbeat that has failed
// for longer than the stale window.
func (m *Manager) Warnings() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.warningsLocked()
}

// PeerReports is what this replica measured of each regional peer: the
// median latency, or the error of the last probe (never both).
func (m *Manager) PeerReports() []database.PeerReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.peerReportsLocked()
}

// DatabaseLatency is the median of recent database round trips.
func (m *Manager) DatabaseLatency() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.db.latency()
}

// HeartbeatFailing reports whether the last heartbeat failed to reach the
// database.
func (m *Manager) HeartbeatFailing() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.failing()
}

// ClockSkew is the database's clock minus this machine's, measured at the
// last heartbeat (within half a round trip). It is reported, never used to
// judge liveness.
func (m *Manager) ClockSkew() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.skew
}

// maxClockSkew: a machine clock further off the database's than this is
// worth a warning.
const maxClockSkew = time.Second

func skewTooLarge(d time.Duration) bool { return d.Abs() > maxClockSkew }

// CutOff reports whether this replica's own heartbeat has failed for
// longer than the stale window: peers that can still reach the database
// have dropped it. In a full database outage every replica is cut off;
// Isolated tells the two apart.
func (m *Manager) CutOff() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.cutOff(m.clock.Now(), m.opts.StaleAfter)
}

// Isolated is the readiness rule for a partial partition: this replica is
// cut off, it knows regional peers, and none of them still holds a mesh
// link to it (incomingMeshLinks, counted by the owner from its relay). In a
// full outage peers keep everyone (nobody's beat succeeds), so their links
// stay and Isolated is false; when only this replica is cut off, the peers
// drop it and close their links. A lone replica is never isolated.
func (m *Manager) Isolated(incomingMeshLinks int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.grace.cutOff(m.clock.Now(), m.opts.StaleAfter) && len(m.current) > 0 && incomingMeshLinks == 0
}

// Leave marks this replica stopped and announces it, so peers drop it at
// once (memberlist's Leave). No heartbeat starts after Leave, and one
// under way cannot undo it. The goroutines keep running (reads still
// answer) until Close. Calling it again after it succeeded does nothing.
func (m *Manager) Leave(ctx context.Context) error {
	m.leaveMu.Lock()
	defer m.leaveMu.Unlock()
	if m.leftOK {
		return nil
	}
	m.tried = true
	m.beatMu.Lock()
	m.left = true
	m.beatMu.Unlock()
	if err := m.store.MarkReplicaStopped(ctx, m.opts.ID); err != nil {
		m.leaveErr = fmt.Errorf("leave the cluster: %w", err)
		return m.leaveErr
	}
	m.leftOK = true
	m.publish(ctx)
	m.log.Info("left the cluster")
	return nil
}

// Close stops every goroutine and waits for them, leaving first (5 s at
// most) if Leave was never called. After a Leave that failed it does not
// try again: the caller already waited for the database once (a drain
// during an outage must not wait twice), and peers drop the replica when
// its row goes stale. The error is Leave's. It is safe to call more than
// once.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		m.stop()
		m.leaveMu.Lock()
		tried, err := m.tried, m.leaveErr
		if m.leftOK {
			err = nil
		}
		m.leaveMu.Unlock()
		if tried {
			m.closeErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.closeErr = m.Leave(ctx)
	})
	return m.closeErr
}

func (m *Manager) stop() {
	// Under mu, so startProbe's check-then-wg.Add cannot straddle it.
	m.mu.Lock()
	m.cancel()
	m.mu.Unlock()
	m.cancelSub()
	m.wg.Wait()
	m.opts.HTTPClient.CloseIdleConnections()
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
		m.heardOnce.Do(func() { close(m.heard) })
		return
	}
	m.pendingMu.Lock()
	m.pending[id] = struct{}{}
	m.pendingMu.Unlock()
	m.trigger(m.syncNow)
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

// registerPatience bounds registration: at a mass start the database is
// at its busiest, and a connection that breaks (a pooler or a server
// restarting) is worth another try rather than a failed start.
const registerPatience = 30 * time.Second

// register writes this replica's first row, trying again (every
// RetryInterval, jittered) after an error that may pass, for
// registerPatience in all; an error the server gives for the statement
// itself (permissions, a missing table) fails at once.
func (m *Manager) register(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, registerPatience)
	defer cancel()
	for {
		err := m.beat(ctx, registerPatience)
		if err == nil || !transient(err) || ctx.Err() != nil {
			return err
		}
		m.log.Info("registration failed; trying again", zap.Error(err))
		t := m.clock.NewTimer(jitter(m.opts.RetryInterval), "register")
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// transient reports whether a store error may pass on its own: a broken
// or refused connection, or one of the server's "not now" answers
// (starting up, read-only during a failover, too many connections, a
// lock or serialization conflict).
func transient(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return true
	}
	switch pgErr.Code {
	case "57P03", "25006", "53300", "55P03", "40001", "40P01":
		return true
	}
	return false
}

// listenTimeout bounds how long New waits to hear its own announcement.
const listenTimeout = 5 * time.Second

// announceUntilHeard announces this replica and, with a Pubsub, repeats the
// announcement (100ms apart, doubling to 1s) until it comes back: the
// Pubsub interface does not promise that a subscription is live when
// Subscribe returns (database/pubsub's was not until it learned to wait
// for its LISTEN), and announcements made before that are lost without
// notice. Once our own comes back, a full read covers
// everything announced before. Without an echo in listenTimeout it warns
// and carries on: the heartbeat's reads catch up.
func (m *Manager) announceUntilHeard(ctx context.Context) {
	m.publish(ctx)
	if m.ps == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, listenTimeout)
	defer cancel()
	again := m.clock.NewTimer(100*time.Millisecond, "announce")
	defer again.Stop()
	for backoff := 100 * time.Millisecond; ; {
		select {
		case <-m.heard:
			return
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) { // not a start that was called off
				m.log.Warn("own replica announcement not heard back: peers that start now may be seen only at the next heartbeat", zap.Duration("timeout", listenTimeout))
			}
			return
		case <-again.C:
			m.publish(ctx)
			backoff = min(2*backoff, time.Second)
			again.Reset(backoff, "announce")
		}
	}
}

func (m *Manager) publish(ctx context.Context) {
	var err error
	if m.ps != nil {
		err = m.ps.Publish(ctx, Channel, []byte(m.opts.ID.String()))
	} else if n, ok := m.store.(Notifier); ok {
		err = n.NotifyReplicaChange(ctx, Channel, m.opts.ID)
	}
	if err != nil {
		m.log.Debug("announce replica", zap.Error(err))
	}
}

// loop owns the heartbeat, its retries, notification-driven syncs, polls
// and cleanup.
func (m *Manager) loop() {
	defer m.wg.Done()
	beat := m.clock.NewTicker(m.opts.HeartbeatInterval, "beat")
	defer beat.Stop()
	// While heartbeats fail (Postgres down), retry about every
	// RetryInterval, so the replica is back in sync soon after the
	// database returns; jittered, so replicas do not return in lockstep.
	retry := m.clock.NewTimer(time.Hour, "retry")
	retry.Stop()
	defer retry.Stop()
	var poll <-chan time.Time
	if m.ps == nil {
		t := m.clock.NewTicker(m.opts.PollInterval, "poll")
		defer t.Stop()
		poll = t.C
	}
	cleanup := m.clock.NewTicker(m.opts.CleanupInterval, "cleanup")
	defer cleanup.Stop()
	m.cleanup()
	// A change worth showing (a peer's first latency, a probe error, a
	// warning, the mesh's error) is written at once if no change was
	// written in the last interval; otherwise it rides with the next
	// periodic beat, which writes the current state anyway. At a mass
	// start, or when a loaded machine makes probes flap, a write per
	// change would cost every replica a statement per peer per interval;
	// this way a replica sends at most three statements per interval
	// (beat, read, one change) besides answering announcements.
	var lastChange time.Time
	// heartbeat writes the row and re-reads the peers. Only a periodic
	// beat (or the retry that stands in for a failed one) starts a probe
	// round: a beat written because something changed (writeNow) comes at
	// any moment, often right after a probe, and restarting the round
	// there would probe the first peers twice and bunch probes together.
	heartbeat := func(periodic bool) {
		err := m.beat(m.ctx, max(m.opts.HeartbeatInterval, 5*time.Second))
		if err == nil {
			if periodic { // a write on change needs no read: peers are told by announcements
				_ = m.readAll(m.ctx)
				m.trigger(m.probeNow)
			}
			return
		}
		if !errors.Is(err, errLeft) && m.ctx.Err() == nil {
			retry.Reset(jitter(m.opts.RetryInterval), "retry")
		}
	}
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-beat.C:
			heartbeat(true)
		case <-retry.C:
			if m.HeartbeatFailing() {
				heartbeat(true)
			}
		case <-m.writeNow:
			if !lastChange.IsZero() && m.clock.Since(lastChange) < m.opts.HeartbeatInterval {
				continue // the next periodic beat writes it
			}
			lastChange = m.clock.Now()
			heartbeat(false)
		case <-m.syncNow:
			m.sync(m.ctx)
		case <-poll:
			_ = m.readAll(m.ctx)
		case <-cleanup.C:
			m.cleanup()
		}
	}
}

// beat writes the row (re-creating it if deleted, clearing a stop someone
// else set) and takes the round trip as a database latency sample. A
// revived row, or the first beat after an outage, is announced: peers may
// have dropped this replica.
func (m *Manager) beat(ctx context.Context, timeout time.Duration) error {
	m.beatMu.Lock()
	defer m.beatMu.Unlock()
	if m.left {
		return errLeft
	}
	m.mu.Lock()
	state := database.ReplicaState{
		ID:              m.opts.ID,
		Hostname:        m.opts.Hostname,
		RegionID:        m.opts.RegionID,
		RelayAddress:    m.opts.RelayAddress,
		Version:         m.opts.Version,
		DatabaseLatency: m.db.latency(),
		Error:           m.ownError,
		Peers:           m.peerReportsLocked(),
		Warnings:        m.warningsLocked(),
	}
	m.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := m.clock.Now()
	b, err := m.store.BeatReplica(ctx, state)
	rtt := m.clock.Since(start)
	if err != nil {
		m.noteBeatFailure(err)
		return err
	}
	m.mu.Lock()
	recovered := m.grace.beatSucceeded(m.clock.Now(), m.opts.StaleAfter)
	m.cutOffWarned = false
	registered := m.self.ID != uuid.Nil // not the first beat
	m.self = b.Replica
	// now() is the beat's transaction start: compare it with the middle of
	// the round trip on this machine's clock.
	m.skew = b.Replica.UpdatedAt.Sub(start.Add(rtt / 2))
	skew := m.skew
	skewChanged := skewTooLarge(skew) != m.skewWarned
	m.skewWarned = skewTooLarge(skew)
	change := m.db.observe(rtt)
	latency := m.db.latency()
	m.mu.Unlock()
	m.metrics.databaseLatency.Set(latency.Seconds())
	m.metrics.clockSkew.Set(skew.Seconds())
	if skewChanged {
		if skewTooLarge(skew) {
			m.log.Warn("local clock differs from the database clock", zap.Duration("database_minus_local", skew.Round(time.Millisecond)))
		} else {
			m.log.Info("local clock agrees with the database clock again", zap.Duration("database_minus_local", skew.Round(time.Millisecond)))
		}
		m.trigger(m.writeNow)
	}
	if recovered {
		m.log.Info("heartbeat recovered: database reachable again")
	}
	if b.Revived && registered {
		m.log.Info("replica row was deleted or marked stopped while this replica runs; re-registered and announced")
	}
	if recovered || (b.Revived && registered) {
		m.publish(ctx) // peers may have dropped us; tell them to re-read
	}
	// A stop that committed while this beat ran (b.Replica.StoppedAt set)
	// is cleared by the next beat, which then announces the revival.
	switch {
	case change.warnedNow && !change.warnedBefore:
		m.log.Warn("database latency above threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
		m.trigger(m.writeNow)
	case !change.warnedNow && change.warnedBefore:
		m.log.Info("database latency back under threshold", zap.Duration("latency", latency), zap.Duration("threshold", m.opts.LatencyThreshold))
		m.trigger(m.writeNow)
	}
	return nil
}

func (m *Manager) noteBeatFailure(err error) {
	m.metrics.heartbeatFailures.Inc()
	now := m.clock.Now()
	m.mu.Lock()
	first := m.grace.beatFailed(now)
	cutOff := m.grace.cutOff(now, m.opts.StaleAfter) && !m.cutOffWarned
	if cutOff {
		m.cutOffWarned = true
	}
	since := now.Sub(m.grace.failingSince)
	m.mu.Unlock()
	if m.ctx.Err() != nil {
		return
	}
	if first {
		m.log.Warn("heartbeat failed: keeping the last known peers until the database is back", zap.Error(err))
	}
	if cutOff {
		m.log.Warn("heartbeat failing for longer than the stale window: replicas that reach the database consider this one gone",
			zap.Duration("failing_for", since.Round(time.Millisecond)), zap.Duration("stale_after", m.opts.StaleAfter), zap.Error(err))
	}
}

// maxTargetedReads: more announcements than this since the last sync are
// cheaper to answer with one full read than with one read each.
const maxTargetedReads = 8

// sync answers the announcements since the last sync: one single-row read
// per announced replica (so N replicas joining cost each peer N small
// reads, not N full-table reads), or one full read after a gap.
func (m *Manager) sync(ctx context.Context) {
	m.pendingMu.Lock()
	pending, all := m.pending, m.pendingAll || len(m.pending) > maxTargetedReads
	m.pending, m.pendingAll = map[uuid.UUID]struct{}{}, false
	m.pendingMu.Unlock()
	if all || len(pending) == 0 {
		_ = m.readAll(ctx)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var rows []database.Replica
	ids := make([]uuid.UUID, 0, len(pending))
	for id := range pending {
		ids = append(ids, id)
		r, _, err := m.store.GetReplicaIfLive(ctx, id, m.opts.StaleAfter)
		if err != nil {
			_ = m.readAll(ctx) // fall back to the full read
			return
		}
		if r.ID != uuid.Nil { // the row exists; r.Live says whether it counts
			rows = append(rows, r)
		}
	}
	m.apply(rows, false, ids)
}

// readAll reads every recent row, without the latency matrices, and
// applies it.
func (m *Manager) readAll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rows, err := m.store.RecentMembers(ctx, m.opts.StaleAfter)
	if err != nil {
		if m.ctx.Err() == nil {
			m.log.Debug("read peers", zap.Error(err))
		}
		return err
	}
	m.apply(rows, true, nil)
	return nil
}

// apply makes a read the live peer set (by the outage grace rule): logs
// joins and leaves, starts probing newcomers and has the owner told if the
// mesh set changed.
func (m *Manager) apply(rows []database.Replica, full bool, ids []uuid.UUID) {
	m.mu.Lock()
	mayDrop := m.grace.mayDropStale(m.clock.Now())
	next := nextPeers(m.peers, rows, full, ids, m.opts.ID, mayDrop)
	var joined, left []database.Replica
	for id, p := range next {
		if _, known := m.peers[id]; !known {
			joined = append(joined, p)
		}
	}
	for id, old := range m.peers {
		if _, still := next[id]; !still {
			left = append(left, old)
			delete(m.probes, id)
		}
	}
	m.peers = next
	m.metrics.replicas.Set(float64(len(next) + 1))
	current := withoutURL(meshPeers(next, m.opts.RegionID), m.opts.RelayAddress)
	selfStarted := m.self.StartedAt
	changed := !samePeers(current, m.current)
	m.current = current
	// With a LinkPinger, a newcomer is measured over its mesh link: the
	// owner asks (Reprobe) once the link is up, and the next round takes
	// peers never measured first. Probing it now would go over HTTP
	// before the link exists: at a mass start, N-1 connections and
	// requests per replica for a sample the link gives a moment later.
	linked := m.pinger != nil
	// Peer-labelled series follow membership, under mu so that a probe
	// ending as its peer leaves cannot bring a series back: the probe
	// error counter of a regional peer exists (at 0) from when the peer is
	// first seen, and both go when it leaves.
	for _, p := range left {
		m.metrics.peerLatency.DeleteLabelValues(p.ID.String(), p.Hostname)
		m.metrics.probeErrors.DeleteLabelValues(p.ID.String(), p.Hostname)
	}
	for _, p := range joined {
		if p.RegionID == m.opts.RegionID {
			m.metrics.probeErrors.WithLabelValues(p.ID.String(), p.Hostname)
		}
	}
	selfNoRelay := m.selfWithoutRelayLocked()
	selfNoRelayChanged := (len(selfNoRelay) > 0) != m.selfNoRelayWarned
	m.selfNoRelayWarned = len(selfNoRelay) > 0
	var sharing []database.Replica // newly seen to share this replica's relay URL
	shared := m.sharedURLLocked()
	warned := make(map[uuid.UUID]bool, len(shared))
	for _, p := range shared {
		if !m.sharedURLWarned[p.ID] {
			sharing = append(sharing, p)
		}
		warned[p.ID] = true
	}
	m.sharedURLWarned = warned
	m.mu.Unlock()

	for _, p := range left {
		m.log.Info("replica left", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress), zap.Bool("stopped", p.StoppedAt != nil))
	}
	for _, p := range joined {
		m.log.Info("replica joined", zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
		if p.RegionID == m.opts.RegionID && p.RelayAddress == "" && m.opts.RelayAddress != "" {
			m.log.Warn("a live replica of this region has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
				zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.Int32("region_id", p.RegionID))
		}
		if p.RegionID == m.opts.RegionID && sameURL(p.RelayAddress, m.opts.RelayAddress) && !p.StartedAt.After(selfStarted) {
			// Not meshed with (see withoutURL). A row started before this
			// process is most likely its own previous run; if it beats
			// again, it is another replica (sharedURLLocked) and warned
			// about below.
			m.log.Info("ignoring an older live row with this replica's relay URL (a previous run killed before it could stop?)",
				zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
		}
		if !linked {
			m.startProbe(p)
		}
	}
	for _, p := range sharing {
		m.log.Warn("another live replica uses this replica's relay URL: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url",
			zap.String("peer_hostname", p.Hostname), zap.Stringer("peer_id", p.ID), zap.String("relay_url", p.RelayAddress))
	}
	if selfNoRelayChanged {
		if len(selfNoRelay) > 0 {
			m.log.Warn("this replica has no relay URL while live replicas of its region have one: they cannot mesh with it, so clients on them cannot reach clients here; set --derp-server-relay-url",
				zap.String("hostname", m.opts.Hostname), zap.Stringer("replica_id", m.opts.ID), zap.Strings("peers", selfNoRelay))
		} else {
			m.log.Info("no live replica of this region has a relay URL any more: nothing to mesh with", zap.String("hostname", m.opts.Hostname))
		}
	}
	if changed {
		m.trigger(m.tellNow)
	}
}

// tellLoop runs the callback, off the heartbeat path. Changes that arrive
// while it runs coalesce: the next call gets the latest set.
func (m *Manager) tellLoop() {
	defer m.wg.Done()
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.tellNow:
		}
		m.mu.Lock()
		f, current, told, due := m.callback, m.current, m.told, m.tellDue
		if f == nil || (!due && samePeers(current, told)) {
			m.mu.Unlock()
			continue
		}
		m.told, m.tellDue = current, false
		m.mu.Unlock()
		f(diffPeers(told, current))
	}
}

func (m *Manager) cleanup() {
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	n, err := m.store.DeleteDeadReplicas(ctx, m.opts.Retention)
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

func (m *Manager) peerReportsLocked() []database.PeerReport {
	out := []database.PeerReport{}
	for id, p := range m.peers {
		if p.RegionID != m.opts.RegionID {
			continue
		}
		r := database.PeerReport{ID: id}
		if st := m.probes[id]; st != nil {
			r = st.w.report(id)
		}
		if p.RelayAddress == "" {
			r.Error = "peer has no relay URL"
		} else if m.sharesURLLocked(p) {
			r.Error = "peer uses this replica's relay URL"
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID.String() < out[j].ID.String() })
	return out
}

func (m *Manager) warningsLocked() []string {
	out := []string{}
	threshold := m.opts.LatencyThreshold
	if m.db.warned {
		out = append(out, fmt.Sprintf("the database is %s away; every replica must be within %s of Postgres", round(m.db.latency()), threshold))
	}
	if m.skewWarned {
		out = append(out, fmt.Sprintf("this machine's clock is %s off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much", m.skew.Abs().Round(time.Millisecond)))
	}
	now := m.clock.Now()
	if m.grace.cutOff(now, m.opts.StaleAfter) {
		out = append(out, fmt.Sprintf("the database has not accepted this replica's heartbeat for %s (stale window %s): if other replicas reach it, they consider this replica gone",
			now.Sub(m.grace.failingSince).Round(time.Second), m.opts.StaleAfter))
	}
	var peerWarnings []string
	if peers := m.selfWithoutRelayLocked(); len(peers) > 0 {
		out = append(out, fmt.Sprintf("this replica (%q, id %s) has no relay URL: the %d other replica(s) of region %d cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url",
			m.opts.Hostname, m.opts.ID, len(peers), m.opts.RegionID))
	}
	if m.opts.RelayAddress != "" {
		for id, p := range m.peers {
			if p.RegionID == m.opts.RegionID && p.RelayAddress == "" {
				peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (id %s) has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
					p.Hostname, id))
			}
		}
	}
	for _, p := range m.sharedURLLocked() {
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (id %s) uses this replica's relay URL %s: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)",
			p.Hostname, p.ID, m.opts.RelayAddress))
	}
	for id, st := range m.probes {
		if !st.w.warned {
			continue
		}
		p := m.peers[id]
		peerWarnings = append(peerWarnings, fmt.Sprintf("replica %q (%s) is %s away; every replica must be within %s of each other",
			p.Hostname, p.RelayAddress, round(st.w.latency()), threshold))
	}
	sort.Strings(peerWarnings)
	return append(out, peerWarnings...)
}

// sharedURLLocked is the live regional peers that use this replica's relay
// URL and have heartbeated since it started, oldest first: other running
// replicas given the same URL (two machines listening on all interfaces
// without an access URL both default to http://127.0.0.1:<port>). A relay
// never meshes with a peer behind its own URL, so neither side can reach
// the other's clients. The row a previous run of this process left when
// it was killed shares the URL too, but never beats again after this
// replica started: it is not counted.
func (m *Manager) sharedURLLocked() []database.Replica {
	var out []database.Replica
	for _, p := range m.peers {
		if m.sharesURLLocked(p) {
			out = append(out, p)
		}
	}
	sortReplicas(out)
	return out
}

// sharesURLLocked reports whether p is a live regional peer behind this
// replica's relay URL that beat after this replica started.
func (m *Manager) sharesURLLocked(p database.Replica) bool {
	return m.opts.RelayAddress != "" && p.RegionID == m.opts.RegionID && sameURL(p.RelayAddress, m.opts.RelayAddress) &&
		!m.self.StartedAt.IsZero() && p.UpdatedAt.After(m.self.StartedAt)
}

// selfWithoutRelayLocked names the live regional peers that have a relay
// URL when this replica has none (they mesh one way only: toward them).
// Empty when this replica has a relay URL, or no peer has one (a region
// whose replicas all run without the DERP server).
func (m *Manager) selfWithoutRelayLocked() []string {
	if m.opts.RelayAddress != "" {
		return nil
	}
	var out []string
	for id, p := range m.peers {
		if p.RegionID == m.opts.RegionID && p.RelayAddress != "" {
			out = append(out, fmt.Sprintf("%s (%s)", p.Hostname, id))
		}
	}
	sort.Strings(out)
	return out
}

func sortReplicas(rs []database.Replica) {
	sort.Slice(rs, func(i, j int) bool {
		if !rs[i].CreatedAt.Equal(rs[j].CreatedAt) {
			return rs[i].CreatedAt.Before(rs[j].CreatedAt)
		}
		return rs[i].ID.String() < rs[j].ID.String()
	})
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
