// One peer: its relay URL and id, its state as Status shows it, and the
// confirmed connection that PingPeer and the keepalive use.

package derpmesh

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"tailscale.com/derp/derphttp"
	"tailscale.com/types/key"

	"github.com/coder-ha/coder/wire"
)

// peer owns the mesh connection to one relay URL. Its run goroutine is the
// only one that dials, and it is stopped by cancel and awaited on done.
type peer struct {
	m       *Mesh
	url     string // normalized relay URL, the Mesh's key
	derpURL string // url + "/derp"; "" when url is invalid
	bad     error  // why url is invalid
	log     *zap.Logger

	ctx    context.Context // canceled when removed from the set or on Close
	cancel context.CancelFunc
	done   chan struct{}
	wake   chan struct{} // cap 1; Reconnect wakes a pause or a park

	// heard is when anything last arrived from the peer on the current
	// connection (unix nanoseconds): a frame, or a pong to PingPeer. The
	// keepalive pings only a connection silent for its interval.
	heard atomic.Int64

	mu            sync.Mutex
	id            string           // the peer replica's id, "" until told (SetPeers)
	client        *derphttp.Client // the confirmed connection, nil when none
	sessionCtx    context.Context  // the confirmed connection's session
	dead          chan error       // cap 1; the keepalive found client dead
	pinging       bool             // a keepalive ping of client is under way
	serverKey     key.NodePublic   // the peer relay's key while client is set
	state         string
	err           string
	since         time.Time
	redialNow     bool               // Reconnect was called; skip the pause
	cancelSession context.CancelFunc // cancels the dial or connection in progress
}

func (m *Mesh) newPeer(u, id string) *peer {
	ctx, cancel := context.WithCancel(m.ctx)
	p := &peer{
		m:      m,
		url:    u,
		log:    m.log.With(zap.String("relay_url", u)),
		ctx:    ctx,
		cancel: cancel,
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		id:     id,
		state:  StateConnecting,
		since:  m.clock.Now(),
	}
	p.derpURL, p.bad = derpURL(u)
	return p
}

// derpURL turns a relay URL into the DERP endpoint to dial.
func derpURL(relay string) (string, error) {
	u, err := url.Parse(relay)
	if err != nil {
		return "", fmt.Errorf("invalid relay URL: %v", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("invalid relay URL %q: the scheme must be http or https", relay)
	}
	if u.Host == "" {
		return "", fmt.Errorf("invalid relay URL %q: no host", relay)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("invalid relay URL %q: only scheme, host, port and path are allowed", relay)
	}
	if !strings.HasSuffix(u.Path, wire.DERPPath) {
		u = u.JoinPath(wire.DERPPath) // as JoinPath("derp"): a leading slash of a later element is dropped
	}
	u.RawQuery = meshQuery // see Handler
	return u.String(), nil
}

func (p *peer) status() PeerStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return PeerStatus{URL: p.url, State: p.state, Error: p.err, Since: p.since, ServerKey: p.serverKey}
}

func (p *peer) setState(state, errMsg string) {
	p.mu.Lock()
	changed := p.state != state || p.err != errMsg
	if p.state != state {
		p.since = p.m.clock.Now()
	}
	p.state, p.err = state, errMsg
	p.mu.Unlock()
	if changed {
		p.m.noteChange()
	}
}

// label is the peer's coderd_derpmesh_forward_dropped_total label: its
// replica id, or its relay URL until the id is known.
func (p *peer) label() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.id != "" {
		return p.id
	}
	return p.url
}

// setID records the peer's replica id and reports whether it changed from
// a known one (a new process behind the same URL).
func (p *peer) setID(id string) (changed bool, old string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if id == "" || id == p.id {
		return false, p.id
	}
	old, p.id = p.id, id
	return old != "", old
}

// confirmedClient is the connection PingPeer uses, nil when there is none.
func (p *peer) confirmedClient() *derphttp.Client {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.client
}

// setClient records the session's confirmed connection (nil: none), for
// PingPeer, the keepalive (which reports a dead one on dead) and
// two-sided readiness (the peer relay's server key).
func (p *peer) setClient(ctx context.Context, c *derphttp.Client, dead chan error) {
	var k key.NodePublic
	if c != nil {
		k = c.ServerPublicKey()
	}
	p.mu.Lock()
	p.client, p.sessionCtx, p.dead, p.pinging, p.serverKey = c, ctx, dead, false, k
	p.mu.Unlock()
}

func (p *peer) reconnect() {
	p.mu.Lock()
	p.redialNow = true
	cancel := p.cancelSession
	p.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
}
