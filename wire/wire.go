// Package wire declares the names replicas and clients meet on over HTTP:
// the embedded relay's paths, the session-token header, and how a relay
// URL is written. It is the lowest package of the flow (it imports nothing
// of this module), so every layer can use it: cmd, coderd, replicasync,
// derpmesh and the test helpers. It owns no behaviour; it must never grow
// any. A name here is a wire contract with replicas of other releases:
// never change one (see coderd's TestWireContractsOfThePreviousReleaseHold).
package wire

import "strings"

// The embedded relay's paths, served by every replica with the DERP server
// enabled.
const (
	// DERPPath is the relay itself (DERP over HTTP upgrade or WebSocket):
	// clients and peer replicas' mesh clients connect here.
	DERPPath = "/derp"
	// LatencyCheckPath answers 200 with an empty body: replicasync times a
	// GET of it to measure a peer without a mesh link.
	LatencyCheckPath = DERPPath + "/latency-check"
	// ProbePath is tailscale's relay probe (derpserver.ProbeHandler).
	ProbePath = DERPPath + "/probe"
)

// SessionTokenHeader carries an API token, as an alternative to
// "Authorization: Bearer <token>".
const SessionTokenHeader = "Coder-Session-Token"

// NormalizeURL is the form a relay URL is compared and keyed by:
// surrounding space and a trailing slash removed, so "http://a:1" and
// "http://a:1/" name the same replica.
func NormalizeURL(relayURL string) string {
	return strings.TrimSuffix(strings.TrimSpace(relayURL), "/")
}

// JoinPath appends an absolute path (such as DERPPath) to a base URL that
// may end in a slash: JoinPath("http://a:1/", "/derp") is "http://a:1/derp".
func JoinPath(base, path string) string {
	return strings.TrimSuffix(base, "/") + path
}
