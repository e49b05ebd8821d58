package replicasync_test

import (
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/replicasync"
)

var (
	warnID    = uuid.MustParse("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b")
	everyKind = []struct {
		w    replicasync.Warning
		text string // the stored text: a contract with other releases
	}{
		{
			replicasync.Warning{Kind: replicasync.WarnDatabaseSlow, Latency: 12300 * time.Microsecond, Threshold: 10 * time.Millisecond},
			"the database is 12.3ms away; every replica must be within 10ms of Postgres",
		},
		{
			replicasync.Warning{Kind: replicasync.WarnClockSkew, Skew: 2500 * time.Millisecond},
			"this machine's clock is 2.5s off the database clock; membership uses the database clock, but timestamps in this replica's logs are off by as much",
		},
		{
			replicasync.Warning{Kind: replicasync.WarnCutOff, FailingFor: 21 * time.Second, StaleAfter: 15 * time.Second},
			"the database has not accepted this replica's heartbeat for 21s (stale window 15s): if other replicas reach it, they consider this replica gone",
		},
		{
			replicasync.Warning{Kind: replicasync.WarnSelfNoRelay, Hostname: "a", ID: warnID, Peers: 2, RegionID: 999},
			`this replica ("a", id 6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b) has no relay URL: the 2 other replica(s) of region 999 cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url`,
		},
		{
			replicasync.Warning{Kind: replicasync.WarnPeerNoRelay, Hostname: "b", ID: warnID},
			`replica "b" (id 6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b) has no relay URL: this replica cannot mesh with it, so clients here cannot reach clients on it; give it --derp-server-relay-url`,
		},
		{
			replicasync.Warning{Kind: replicasync.WarnSharedRelayURL, Hostname: "c", ID: warnID, RelayURL: "http://127.0.0.1:3000"},
			`replica "c" (id 6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b) uses this replica's relay URL http://127.0.0.1:3000: the two cannot mesh, so clients on one cannot reach clients on the other; give each replica its own --derp-server-relay-url (without an access URL, a replica listening on all interfaces defaults to http://127.0.0.1:<port>, which reaches only its own machine)`,
		},
		{
			replicasync.Warning{Kind: replicasync.WarnPeerSlow, Hostname: "b", RelayURL: "http://b:1", Latency: 30 * time.Millisecond, Threshold: 10 * time.Millisecond},
			`replica "b" (http://b:1) is 30ms away; every replica must be within 10ms of each other`,
		},
	}
)

// A warning is stored and served as text that replicas and clients of
// other releases read: every kind renders to exactly the text it always
// had, and reads back (ParseWarning) into the same value.
func TestEveryWarningKindRendersItsStoredTextAndReadsBack(t *testing.T) {
	t.Parallel()
	kinds := map[replicasync.WarningKind]bool{}
	for _, tc := range everyKind {
		kinds[tc.w.Kind] = true
		if got := tc.w.String(); got != tc.text {
			t.Errorf("kind %d renders\n %s\nwant\n %s", tc.w.Kind, got, tc.text)
		}
		got, ok := replicasync.ParseWarning(tc.text)
		if !ok || got != tc.w {
			t.Errorf("ParseWarning(%q) = %+v, %v; want %+v", tc.text, got, ok, tc.w)
		}
	}
	for k := replicasync.WarnDatabaseSlow; k <= replicasync.WarnPeerSlow; k++ {
		if !kinds[k] {
			t.Errorf("kind %d has no case", k)
		}
	}
}

// Awkward field values survive the round trip: hostnames with quotes,
// spaces and non-ASCII, relay URLs with a path, a trailing slash or
// brackets, sub-millisecond and multi-second latencies.
func TestWarningsWithAwkwardFieldsReadBack(t *testing.T) {
	t.Parallel()
	for _, w := range []replicasync.Warning{
		{Kind: replicasync.WarnPeerSlow, Hostname: `db "primary" (eu)`, RelayURL: "https://[::1]:8443/relay/", Latency: 450 * time.Microsecond, Threshold: 100 * time.Microsecond},
		{Kind: replicasync.WarnPeerSlow, Hostname: "höst) is 1s away", RelayURL: "http://x:1/a) is b", Latency: 1234 * time.Millisecond, Threshold: time.Second},
		{Kind: replicasync.WarnPeerSlow, Hostname: "", RelayURL: "http://b:1", Latency: 0, Threshold: 10 * time.Millisecond},
		{Kind: replicasync.WarnSharedRelayURL, Hostname: "a b", ID: warnID, RelayURL: "http://127.0.0.1:3000/"},
		{Kind: replicasync.WarnSelfNoRelay, Hostname: "\t", ID: warnID, Peers: 99, RegionID: 2147483647},
		{Kind: replicasync.WarnCutOff, FailingFor: 2*time.Hour + 3*time.Second, StaleAfter: 1500 * time.Millisecond},
		{Kind: replicasync.WarnDatabaseSlow, Latency: 2*time.Second + 5*time.Millisecond, Threshold: time.Minute},
	} {
		text := w.String()
		got, ok := replicasync.ParseWarning(text)
		if !ok || got != w {
			t.Errorf("ParseWarning(%q) = %+v, %v; want %+v", text, got, ok, w)
		}
	}
}

// Text that is not a warning of this release (truncated, extended, of
// another wording, garbage) is not read as one.
func TestTextThatIsNoWarningDoesNotParse(t *testing.T) {
	t.Parallel()
	for _, text := range []string{
		"",
		"the database is 12ms away",
		"the database is 12ms away; every replica must be within 10ms of Postgres!",
		`replica "b" (http://b:1) is 30ms away; every replica must be within 10ms of each other `,
		`replica "b" (http://b:1) is slow; every replica must be within 10ms of each other`,
		`replica b (http://b:1) is 30ms away; every replica must be within 10ms of each other`,
		`replica "b (http://b:1) is 30ms away; every replica must be within 10ms of each other`,
		`this replica ("a", id not-a-uuid) has no relay URL: the 2 other replica(s) of region 999 cannot mesh with it, so clients on them cannot reach clients on it; set --derp-server-relay-url`,
		"heartbeats are failing: the database is unreachable (the relay keeps serving with the last known peers)",
	} {
		if w, ok := replicasync.ParseWarning(text); ok {
			t.Errorf("ParseWarning(%q) = %+v, want not ok", text, w)
		}
	}
}
