// This file holds the Manager's lifecycle: the type, New, the owner's
// setters, Leave, Close and the loop that owns the heartbeat, the syncs,
// the polls and the cleanup.

package replicasync

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/quartz"
	"github.com/google/uuid"
	"go.uber.org/zap"
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
	self         Replica
	peers        map[uuid.UUID]Replica     // live, self excluded, every region
	probes       map[uuid.UUID]*probeState // regional peers only
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
	matrix   map[uuid.UUID][]PeerReport
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
		peers:    map[uuid.UUID]Replica{},
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
	var target *Replica
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
