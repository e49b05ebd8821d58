// Package storetest holds the contract every replicasync.Store must pass
// (Run) and an in-memory Store with its own settable "database now()"
// (Memory), so the Manager's rules can be tested by stepping time instead
// of sleeping. Memory also implements replicasync.Pubsub, delivering
// announcements synchronously.
package storetest

import (
	"context"
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database/pubsub"
	"github.com/coder-ha/coder/replicasync"
)

// ErrDown is returned by every Memory call while the "database" is down.
var ErrDown = errors.New("storetest: database unreachable")

// Memory is an in-memory replicas table and pubsub. The zero value is not
// usable; call NewMemory.
type Memory struct {
	mu        sync.Mutex
	now       time.Time
	clock     func() time.Time // if set, now follows it
	rows      map[uuid.UUID]replicasync.Replica
	down      bool
	cutOff    map[uuid.UUID]bool // beats of these replicas fail (partial partition)
	listeners map[int]pubsub.Listener
	nextID    int
}

// NewMemory returns an empty store whose clock starts at start.
func NewMemory(start time.Time) *Memory {
	return &Memory{now: start, rows: map[uuid.UUID]replicasync.Replica{}, cutOff: map[uuid.UUID]bool{}, listeners: map[int]pubsub.Listener{}}
}

// NewMemoryWithClock returns an empty store whose "database now()" is
// clock() (a test's mock clock, or time.Now); Advance then does nothing.
func NewMemoryWithClock(clock func() time.Time) *Memory {
	s := NewMemory(clock())
	s.clock = clock
	return s
}

// Now is the store's "database now()".
func (s *Memory) Now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	return s.now
}

// tickLocked catches the store's clock up with its clock function.
func (s *Memory) tickLocked() {
	if s.clock != nil {
		s.now = s.clock()
	}
}

// Advance moves the store's clock forward.
func (s *Memory) Advance(d time.Duration) {
	s.mu.Lock()
	s.now = s.now.Add(d)
	s.mu.Unlock()
}

// SetDown makes every call fail with ErrDown (true) or work again
// (false). Coming back up tells every listener that messages may have
// been lost, as a reconnecting pubsub does.
func (s *Memory) SetDown(down bool) {
	s.mu.Lock()
	was := s.down
	s.down = down
	ls := s.listenersLocked()
	s.mu.Unlock()
	if was && !down {
		for _, l := range ls {
			l(context.Background(), nil, pubsub.ErrDroppedMessages)
		}
	}
}

// CutOff makes the beats of replica id fail (true) while everyone else's
// work: a partial partition.
func (s *Memory) CutOff(id uuid.UUID, cut bool) {
	s.mu.Lock()
	s.cutOff[id] = cut
	s.mu.Unlock()
}

// DeleteReplica removes a row, as an operator could.
func (s *Memory) DeleteReplica(id uuid.UUID) {
	s.mu.Lock()
	delete(s.rows, id)
	s.mu.Unlock()
}

// MarkStoppedByOther sets stopped_at on a row without the replica leaving
// (an operator, or a bug).
func (s *Memory) MarkStoppedByOther(id uuid.UUID) {
	s.mu.Lock()
	s.tickLocked()
	if r, ok := s.rows[id]; ok {
		now := s.now
		r.StoppedAt = &now
		s.rows[id] = r
	}
	s.mu.Unlock()
}

// Row returns a row as stored.
func (s *Memory) Row(id uuid.UUID) (replicasync.Replica, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.rows[id]
	return r, ok
}

func (s *Memory) live(r replicasync.Replica, staleAfter time.Duration) bool {
	return r.StoppedAt == nil && r.UpdatedAt.After(s.now.Add(-staleAfter))
}

// BeatReplica implements replicasync.Store.
func (s *Memory) BeatReplica(ctx context.Context, st replicasync.ReplicaState) (replicasync.Beat, error) {
	if err := ctx.Err(); err != nil {
		return replicasync.Beat{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	if s.down || s.cutOff[st.ID] {
		return replicasync.Beat{}, ErrDown
	}
	r, exists := s.rows[st.ID]
	revived := !exists
	if !exists {
		r = replicasync.Replica{ID: st.ID, CreatedAt: s.now, StartedAt: s.now}
	}
	if r.StoppedAt != nil && r.StoppedAt.Before(s.now) {
		r.StoppedAt = nil
		revived = true
	}
	r.UpdatedAt = s.now
	r.Hostname, r.RegionID, r.RelayAddress, r.Version = st.Hostname, st.RegionID, st.RelayAddress, st.Version
	r.DatabaseLatency, r.Error = st.DatabaseLatency, st.Error
	r.Peers = append([]replicasync.PeerReport{}, st.Peers...)
	r.Warnings = append([]string{}, st.Warnings...)
	r.Live = r.StoppedAt == nil
	s.rows[st.ID] = r
	return replicasync.Beat{Replica: r, Revived: revived}, nil
}

// RecentReplicas implements replicasync.Store.
func (s *Memory) RecentReplicas(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	if s.down {
		return nil, ErrDown
	}
	var out []replicasync.Replica
	for _, r := range s.rows {
		if !r.UpdatedAt.After(s.now.Add(-staleAfter)) {
			continue
		}
		r.Live = s.live(r, staleAfter)
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID.String() < out[j].ID.String()
	})
	return out, nil
}

// RecentMembers implements replicasync.Store: RecentReplicas with the
// latency matrix left out.
func (s *Memory) RecentMembers(ctx context.Context, staleAfter time.Duration) ([]replicasync.Replica, error) {
	rows, err := s.RecentReplicas(ctx, staleAfter)
	for i := range rows {
		rows[i].Peers = []replicasync.PeerReport{}
	}
	return rows, err
}

// GetReplicaIfLive implements replicasync.Store.
func (s *Memory) GetReplicaIfLive(ctx context.Context, id uuid.UUID, staleAfter time.Duration) (replicasync.Replica, bool, error) {
	if err := ctx.Err(); err != nil {
		return replicasync.Replica{}, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	if s.down {
		return replicasync.Replica{}, false, ErrDown
	}
	r, ok := s.rows[id]
	if !ok {
		return replicasync.Replica{}, false, nil
	}
	r.Live = s.live(r, staleAfter)
	r.Peers = []replicasync.PeerReport{}
	return r, r.Live, nil
}

// MarkReplicaStopped implements replicasync.Store.
func (s *Memory) MarkReplicaStopped(ctx context.Context, id uuid.UUID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	if s.down || s.cutOff[id] {
		return ErrDown
	}
	if r, ok := s.rows[id]; ok {
		now := s.now
		r.StoppedAt, r.UpdatedAt = &now, now
		s.rows[id] = r
	}
	return nil
}

// DeleteDeadReplicas implements replicasync.Store.
func (s *Memory) DeleteDeadReplicas(ctx context.Context, retention time.Duration) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tickLocked()
	if s.down {
		return 0, ErrDown
	}
	var n int64
	for id, r := range s.rows {
		if r.UpdatedAt.Before(s.now.Add(-retention)) {
			delete(s.rows, id)
			n++
		}
	}
	return n, nil
}

// Subscribe implements replicasync.Pubsub (one channel: every listener
// hears every payload).
func (s *Memory) Subscribe(_ string, l pubsub.Listener) (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id := s.nextID
	s.nextID++
	s.listeners[id] = l
	return func() {
		s.mu.Lock()
		delete(s.listeners, id)
		s.mu.Unlock()
	}, nil
}

// Publish implements replicasync.Pubsub: listeners are called before it
// returns.
func (s *Memory) Publish(ctx context.Context, _ string, payload []byte) error {
	s.mu.Lock()
	if s.down {
		s.mu.Unlock()
		return ErrDown
	}
	ls := s.listenersLocked()
	s.mu.Unlock()
	for _, l := range ls {
		l(ctx, payload, nil)
	}
	return nil
}

func (s *Memory) listenersLocked() []pubsub.Listener {
	out := make([]pubsub.Listener, 0, len(s.listeners))
	for _, l := range s.listeners {
		out = append(out, l)
	}
	return out
}

// NotifyReplicaChange implements replicasync.Notifier (poll-mode
// announcements through the store).
func (s *Memory) NotifyReplicaChange(ctx context.Context, channel string, id uuid.UUID) error {
	return s.Publish(ctx, channel, []byte(id.String()))
}
