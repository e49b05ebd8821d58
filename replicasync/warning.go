// This file holds the Warning value: its kinds, the one rendering to text
// (String) and its exact inverse (ParseWarning).

package replicasync

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
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

// warningForms is each kind's wording, written once: String fills its
// verbs with the fields listed, in order, and ParseWarning reads them
// back. The wording is a contract with other releases (it is stored in
// the replicas table): it never changes.
var warningForms = map[WarningKind]warningForm{
	WarnDatabaseSlow: {"the database is %s away; every replica must be within %s of Postgres",
		[]warningField{fieldLatency, fieldThreshold}},
	WarnClockSkew: {"this machine's clock is %s off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much",
		[]warningField{fieldSkew}},
	WarnCutOff: {"the database has not accepted this replica's heartbeat for %s (stale window %s): if other replicas reach it, they consider this replica gone",
		[]warningField{fieldFailingFor, fieldStaleAfter}},
	WarnSelfNoRelay: {"this replica (%q, id %s) has no relay URL: the %d other replica(s) of region %d cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url",
		[]warningField{fieldHostname, fieldID, fieldPeers, fieldRegionID}},
	WarnPeerNoRelay: {"replica %q (id %s) has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url",
		[]warningField{fieldHostname, fieldID}},
	WarnSharedRelayURL: {"replica %q (id %s) uses this replica's relay URL %s: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)",
		[]warningField{fieldHostname, fieldID, fieldRelayURL}},
	WarnPeerSlow: {"replica %q (%s) is %s away; every replica must be within %s of each other",
		[]warningField{fieldHostname, fieldRelayURL, fieldLatency, fieldThreshold}},
}

// warningForm is one kind's wording: a format with one verb (%s, %q or
// %d) per field.
type warningForm struct {
	format string
	fields []warningField
}

// warningField is a field of Warning that a form shows.
type warningField int

const (
	fieldHostname warningField = iota
	fieldID
	fieldRelayURL
	fieldLatency
	fieldThreshold
	fieldSkew
	fieldFailingFor
	fieldStaleAfter
	fieldPeers
	fieldRegionID
)

// String renders the warning as the replicas table stores it and the API
// returns it.
func (w Warning) String() string {
	form, ok := warningForms[w.Kind]
	if !ok {
		return fmt.Sprintf("warning of unknown kind %d", int(w.Kind))
	}
	args := make([]any, len(form.fields))
	for i, f := range form.fields {
		args[i] = w.get(f)
	}
	return fmt.Sprintf(form.format, args...)
}

func (w Warning) get(f warningField) any {
	switch f {
	case fieldHostname:
		return w.Hostname
	case fieldID:
		return w.ID
	case fieldRelayURL:
		return w.RelayURL
	case fieldLatency:
		return w.Latency
	case fieldThreshold:
		return w.Threshold
	case fieldSkew:
		return w.Skew
	case fieldFailingFor:
		return w.FailingFor
	case fieldStaleAfter:
		return w.StaleAfter
	case fieldPeers:
		return w.Peers
	default: // fieldRegionID
		return w.RegionID
	}
}

// set stores v, a field's text as its form shows it (unquoted already for
// %q), and reports whether it reads as that field.
func (w *Warning) set(f warningField, v string) bool {
	var err error
	switch f {
	case fieldHostname:
		w.Hostname = v
	case fieldID:
		w.ID, err = uuid.Parse(v)
	case fieldRelayURL:
		w.RelayURL = v
	case fieldLatency:
		w.Latency, err = time.ParseDuration(v)
	case fieldThreshold:
		w.Threshold, err = time.ParseDuration(v)
	case fieldSkew:
		w.Skew, err = time.ParseDuration(v)
	case fieldFailingFor:
		w.FailingFor, err = time.ParseDuration(v)
	case fieldStaleAfter:
		w.StaleAfter, err = time.ParseDuration(v)
	case fieldPeers:
		var n int64
		n, err = strconv.ParseInt(v, 10, 32)
		w.Peers = int(n)
	case fieldRegionID:
		var n int64
		n, err = strconv.ParseInt(v, 10, 32)
		w.RegionID = int32(n)
	}
	return err == nil
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
		if ok && w.Kind == WarnPeerSlow && sameURL(w.RelayURL, relayURL) {
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
	for kind := WarnDatabaseSlow; kind <= WarnPeerSlow; kind++ {
		if w, ok := warningForms[kind].parse(kind, text); ok && w.String() == text {
			return w, true
		}
	}
	return Warning{}, false
}

// parse reads text as this form, left to right: the literal before each
// verb, then the field. A %q field is read as a Go-quoted string; any
// other runs to the literal after it (to its last occurrence for a relay
// URL, which may itself contain that literal; a latency never does).
func (f warningForm) parse(kind WarningKind, text string) (Warning, bool) {
	w := Warning{Kind: kind}
	rest := f.format
	for _, field := range f.fields {
		i := strings.IndexByte(rest, '%')
		lit, verb := rest[:i], rest[i+1]
		rest = rest[i+2:]
		if !strings.HasPrefix(text, lit) {
			return Warning{}, false
		}
		text = text[len(lit):]
		var v string
		if verb == 'q' {
			q, err := strconv.QuotedPrefix(text)
			if err != nil {
				return Warning{}, false
			}
			v, _ = strconv.Unquote(q) // QuotedPrefix found a valid literal
			text = text[len(q):]
		} else {
			next := rest
			if j := strings.IndexByte(rest, '%'); j >= 0 {
				next = rest[:j]
			}
			end := strings.Index(text, next)
			if field == fieldRelayURL {
				end = strings.LastIndex(text, next)
			}
			if end < 0 {
				return Warning{}, false
			}
			v, text = text[:end], text[end:]
		}
		if !w.set(field, v) {
			return Warning{}, false
		}
	}
	return w, text == rest
}
