// Package relayguard decides who may use the embedded DERP relay: admission
// through an operator's webhook (tailscale's DERPAdmitClientRequest format,
// the one headscale serves at /verify) at connect and again on a schedule
// while connected, a cap on concurrent client connections, an accept rate
// limit, and a bound on connections that have not finished their
// handshake.
//
// It plugs into the relay through the hooks the DERP library provides and
// never touches the DERP protocol itself: the library asks its verify URL
// about every client that does not present the mesh key, and the Guard
// serves that URL on a private loopback address. So mesh connections from
// peer replicas are admitted by the mesh key alone: they never reach the
// webhook, never count against the cap, are never rate limited and never
// verified again.
//
// It drops a connected client only when the webhook, asked again, refuses
// it; a webhook outage affects new connections only. It never drops a mesh
// connection.
package relayguard
