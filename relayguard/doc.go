// Package relayguard decides who may use the embedded DERP relay: admission
// through an operator's webhook (tailscale's DERPAdmitClientRequest format,
// the one headscale serves at /verify), a cap on concurrent client
// connections, and an accept rate limit.
//
// It plugs into the relay through the hooks the DERP library provides and
// never touches the DERP protocol itself: the library asks its verify URL
// about every client that does not present the mesh key, and the Guard
// serves that URL on a private loopback address. So mesh connections from
// peer replicas are admitted by the mesh key alone: they never reach the
// webhook, never count against the cap and are never rate limited.
//
// It must never drop a connected client: admission is checked once per
// connection, when it is accepted; a webhook outage affects new
// connections only.
package relayguard
