package derpmesh

import (
	"bufio"
	"net"
	"net/http"

	"tailscale.com/derp/derpserver"
)

// meshQuery marks the DERP upgrade requests of this package's mesh
// clients ("/derp?mesh"). The relay serves them like any other client;
// the mark only spares them the library's per-connection TCP RTT sampling
// (see Handler).
const meshQuery = "mesh"

// Handler serves the DERP relay s over HTTP upgrade and WebSocket (browser
// clients can only use the latter). Mount it at /derp with no middleware:
// it hijacks the connection, so anything that wraps the ResponseWriter
// without http.Hijacker (gzip, most loggers) breaks it. A plain GET
// without an Upgrade header gets 426.
//
// Mesh privileges are granted by s itself to clients presenting its mesh
// key; Handler adds no authentication.
//
// Connections from peer replicas' meshes (marked "?mesh" by this package's
// mesh client) are not sampled for the library's TCP round-trip histogram
// (coderd_derp_tcp_rtt counts them as "non-tcp"): the library arms a 10 s
// timer per connection for it, and with N-1 mesh connections per replica
// that was a wakeup per peer every 10 s on every replica, the largest
// share of an idle large fleet's CPU. Client connections are sampled as
// before. The mark grants nothing.
//
// The companion endpoints are the caller's to mount: /derp/latency-check
// (answer 200; replicasync probes it) and /derp/probe
// (derpserver.ProbeHandler). derpserver.Handler also answers those two
// paths itself when a request for them reaches it unstripped, e.g. when
// Handler is mounted at the "/derp/" prefix.
func Handler(s *derpserver.Server) http.Handler {
	h := derpserver.AddWebSocketSupport(s, derpserver.Handler(s))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hj, ok := w.(http.Hijacker); ok && r.URL.Query().Has(meshQuery) {
			w = meshResponseWriter{ResponseWriter: w, hj: hj}
		}
		h.ServeHTTP(w, r)
	})
}

// meshResponseWriter hands the relay a connection that is not a
// *net.TCPConn, which the library takes as "not TCP": no RTT sampling.
type meshResponseWriter struct {
	http.ResponseWriter
	hj http.Hijacker
}

func (w meshResponseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := w.hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	return meshConn{c}, brw, nil
}

// meshConn is a mesh connection as the relay sees it.
type meshConn struct{ net.Conn }
