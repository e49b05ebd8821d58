// This file holds the Warning value: its kinds, the one rendering to text
// (String) and its exact inverse (ParseWarning).

package replicasync

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/wire"
)

// WarningKind is what a Warning is about.
type WarningKind int

// The kinds of Warning, each with its own text (see Warning.String).
const (
	// WarnDatabaseSlow: the database's median round trip (Latency) is
	// above the threshold (Threshold).
	WarnDatabaseSlow WarningKind = iota + 1
	// WarnClockSkew: this machine's clock is Skew (an absolute value) off
	// the database's.
	WarnClockSkew
	// WarnCutOff: the database has not accepted this replica's heartbeat
	// for FailingFor, longer than the stale window (StaleAfter).
	WarnCutOff
	// WarnSelfNoRelay: this replica (Hostname, ID) has no relay URL while
	// Peers live replicas of its region (RegionID) have one.
	WarnSelfNoRelay
	// WarnPeerNoRelay: the live regional peer (Hostname, ID) has no relay
	// URL while this replica has one.
	WarnPeerNoRelay
	// WarnSharedRelayURL: the live regional peer (Hostname, ID) uses this
	// replica's relay URL (RelayURL).
	WarnSharedRelayURL
	// WarnPeerSlow: the regional peer (Hostname, RelayURL) is Latency
	// away, above the threshold (Threshold).
	WarnPeerSlow
)

// Warning is one warning of a replica: a kind and the fields its text
// names. String renders it; the rendered text is what the replicas table
// stores and the API returns, a contract with replicas and clients of
// other releases, so it never changes. ParseWarning reads it back.
//
// Durations hold the value as shown (rounded), so that a Warning read
// back from its text equals the one rendered.
type Warning struct {
	Kind WarningKind
	// Hostname and ID name the replica the warning is about (this one
	// for WarnSelfNoRelay; the peer for the peer kinds; ID is not shown
	// by WarnPeerSlow).
	Hostname string
	ID       uuid.UUID
	// RelayURL is the peer's (WarnPeerSlow) or this replica's, shared by
	// the peer (WarnSharedRelayURL).
	RelayURL string
	// Latency and Threshold: the measured median and the limit
	// (WarnDatabaseSlow, WarnPeerSlow).
	Latency, Threshold time.Duration
	// Skew is how far this machine's clock is off (WarnClockSkew).
	Skew time.Duration
	// FailingFor and StaleAfter: how long the heartbeat has failed, and
	// the stale window (WarnCutOff).
	FailingFor, StaleAfter time.Duration
	// Peers and RegionID: the regional peers with a relay URL, and the
	// region (WarnSelfNoRelay).
	Peers    int
	RegionID int32
}

// String renders the warning as the replicas table stores it and the API
// returns it.
func (w Warning) String() string {
	switch w.Kind {
	case WarnDatabaseSlow:
		return fmt.Sprintf("the database is %s away; every replica must be within %s of Postgres", w.Latency, w.Threshold)
	case WarnClockSkew:
		return fmt.Sprintf("this machine's clock is %s off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much", w.Skew)
	case WarnCutOff:
		return fmt.Sprintf("the database has not accepted this replica's heartbeat for %s (stale window %s): if other replicas reach it, they consider this replica gone",
			w.FailingFor, w.StaleAfter)
	case WarnSelfNoRelay:
		return fmt.Sprintf("this replica (%q, id %s) has no relay URL: the %d other replica(s) of region %d cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url",
			w.Hostname, w.ID, w.Peers, w.RegionID)
	case WarnPeerNoRelay:
		return fmt.Sprintf("replica %q (id %s) has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
			w.Hostname, w.ID)
	case WarnSharedRelayURL:
		return fmt.Sprintf("replica %q (id %s) uses this replica's relay URL %s: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)",
			w.Hostname, w.ID, w.RelayURL)
	case WarnPeerSlow:
		return fmt.Sprintf("replica %q (%s) is %s away; every replica must be within %s of each other",
			w.Hostname, w.RelayURL, w.Latency, w.Threshold)
	}
	return fmt.Sprintf("warning of unknown kind %d", int(w.Kind))
}

// WarnsSlow reports whether any of warnings (a replica's, as text: its
// row or the API) says the peer behind relayURL is above the latency
// threshold. It is the one rule that marks a latency cell: coder replicas
// and the health page's tests follow it. Other kinds naming the URL, and
// URLs that merely start with relayURL, do not count.
func WarnsSlow(warnings []string, relayURL string) bool {
	if relayURL == "" {
		return false
	}
	for _, text := range warnings {
		w, ok := ParseWarning(text)
		if ok && w.Kind == WarnPeerSlow && wire.NormalizeURL(w.RelayURL) == wire.NormalizeURL(relayURL) {
			return true
		}
	}
	return false
}

// ParseWarning reads a warning's text (as String renders it, e.g. from
// another replica's row in the API's JSON) back into its value. It is the
// exact inverse of String: ok only when rendering the result gives text
// back byte for byte; text of no known kind (or of another release's
// wording) is not ok.
func ParseWarning(text string) (Warning, bool) {
	for _, parse := range warningParsers {
		if w, ok := parse(&warningScanner{rest: text}); ok && w.String() == text {
			return w, true
		}
	}
	return Warning{}, false
}

// warningParsers read each kind's text in String's order of fields.
var warningParsers = []func(s *warningScanner) (Warning, bool){
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnDatabaseSlow}
		s.literal("the database is ")
		w.Latency = s.durationUntil(" away; every replica must be within ")
		w.Threshold = s.durationUntil(" of Postgres")
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnClockSkew}
		s.literal("this machine's clock is ")
		w.Skew = s.durationUntil(" off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much")
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnCutOff}
		s.literal("the database has not accepted this replica's heartbeat for ")
		w.FailingFor = s.durationUntil(" (stale window ")
		w.StaleAfter = s.durationUntil("): if other replicas reach it, they consider this replica gone")
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnSelfNoRelay}
		s.literal("this replica (")
		w.Hostname = s.quoted()
		s.literal(", id ")
		w.ID = s.idUntil(") has no relay URL: the ")
		w.Peers = int(s.intUntil(" other replica(s) of region "))
		w.RegionID = int32(s.intUntil(" cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url"))
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnPeerNoRelay}
		s.literal("replica ")
		w.Hostname = s.quoted()
		s.literal(" (id ")
		w.ID = s.idUntil(") has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url")
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnSharedRelayURL}
		s.literal("replica ")
		w.Hostname = s.quoted()
		s.literal(" (id ")
		w.ID = s.idUntil(") uses this replica's relay URL ")
		w.RelayURL = s.until(": the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)")
		return w, s.done()
	},
	func(s *warningScanner) (Warning, bool) {
		w := Warning{Kind: WarnPeerSlow}
		s.literal("replica ")
		w.Hostname = s.quoted()
		s.literal(" (")
		// The relay URL runs to the last ") is ": the latency after it
		// never contains one.
		w.RelayURL = s.untilLast(") is ")
		w.Latency = s.durationUntil(" away; every replica must be within ")
		w.Threshold = s.durationUntil(" of each other")
		return w, s.done()
	},
}

// warningScanner reads a warning's text from the left. The first step
// that does not match sets failed; later steps then do nothing.
type warningScanner struct {
	rest   string
	failed bool
}

func (s *warningScanner) literal(lit string) {
	if s.failed || !strings.HasPrefix(s.rest, lit) {
		s.failed = true
		return
	}
	s.rest = s.rest[len(lit):]
}

// until returns the text up to the first lit (which must be there) and
// consumes both; the last field of a kind ends the text, so lit is then
// its end.
func (s *warningScanner) until(lit string) string {
	i := strings.Index(s.rest, lit)
	if s.failed || i < 0 {
		s.failed = true
		return ""
	}
	v := s.rest[:i]
	s.rest = s.rest[i+len(lit):]
	return v
}

func (s *warningScanner) untilLast(lit string) string {
	i := strings.LastIndex(s.rest, lit)
	if s.failed || i < 0 {
		s.failed = true
		return ""
	}
	v := s.rest[:i]
	s.rest = s.rest[i+len(lit):]
	return v
}

// quoted reads a Go-quoted string (%q).
func (s *warningScanner) quoted() string {
	if s.failed {
		return ""
	}
	q, err := strconv.QuotedPrefix(s.rest)
	if err != nil {
		s.failed = true
		return ""
	}
	v, err := strconv.Unquote(q)
	if err != nil {
		s.failed = true
		return ""
	}
	s.rest = s.rest[len(q):]
	return v
}

func (s *warningScanner) durationUntil(lit string) time.Duration {
	v := s.until(lit)
	if s.failed {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		s.failed = true
	}
	return d
}

func (s *warningScanner) idUntil(lit string) uuid.UUID {
	v := s.until(lit)
	if s.failed {
		return uuid.Nil
	}
	id, err := uuid.Parse(v)
	if err != nil {
		s.failed = true
	}
	return id
}

func (s *warningScanner) intUntil(lit string) int64 {
	v := s.until(lit)
	if s.failed {
		return 0
	}
	n, err := strconv.ParseInt(v, 10, 32)
	if err != nil {
		s.failed = true
	}
	return n
}

// done reports whether every step matched and the whole text was read.
func (s *warningScanner) done() bool { return !s.failed && s.rest == "" }
