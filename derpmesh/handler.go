package derpmesh

import (
	"net/http"

	"tailscale.com/derp/derpserver"
)

// Handler serves the DERP relay s over HTTP upgrade and WebSocket (browser
// clients can only use the latter). Mount it at /derp with no middleware:
// it hijacks the connection, so anything that wraps the ResponseWriter
// without http.Hijacker (gzip, most loggers) breaks it. A plain GET
// without an Upgrade header gets 426.
//
// Mesh privileges are granted by s itself to clients presenting its mesh
// key; Handler adds no authentication.
//
// The companion endpoints are the caller's to mount: /derp/latency-check
// (answer 200; replicasync probes it) and /derp/probe
// (derpserver.ProbeHandler). derpserver.Handler also answers those two
// paths itself when a request for them reaches it unstripped, e.g. when
// Handler is mounted at the "/derp/" prefix.
func Handler(s *derpserver.Server) http.Handler {
	return derpserver.AddWebSocketSupport(s, derpserver.Handler(s))
}
