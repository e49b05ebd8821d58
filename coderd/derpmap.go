package coderd

import (
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"

	"tailscale.com/tailcfg"
)

// buildDERPMap builds the map clients use to find relays: the embedded
// region (one node: the access URL, i.e. the load balancer in front of every
// replica) when the DERP server is enabled, plus the custom relays of
// cfg.DERPConfigPath. The embedded node says STUNPort -1 (no STUN); with
// --derp-server-stun-address, setSTUNPort fills in the bound port.
func buildDERPMap(cfg Config) (*tailcfg.DERPMap, error) {
	m := &tailcfg.DERPMap{Regions: map[int]*tailcfg.DERPRegion{}}
	if cfg.DERPConfigPath != "" {
		b, err := os.ReadFile(cfg.DERPConfigPath)
		if err != nil {
			return nil, &ConfigError{"derp-config-path", fmt.Sprintf("read: %v", err)}
		}
		var custom tailcfg.DERPMap
		if err := json.Unmarshal(b, &custom); err != nil {
			return nil, &ConfigError{"derp-config-path", fmt.Sprintf("%s is not a DERP map: %v", cfg.DERPConfigPath, err)}
		}
		for id, r := range custom.Regions {
			if r == nil {
				continue
			}
			if r.RegionID == 0 {
				r.RegionID = id
			}
			m.Regions[id] = r
		}
	}
	if !cfg.DERPServerEnable {
		return m, nil
	}
	if _, clash := m.Regions[cfg.DERPServerRegionID]; clash {
		return nil, &ConfigError{"derp-config-path", fmt.Sprintf("region %d is already the embedded relay's region (--derp-server-region-id)", cfg.DERPServerRegionID)}
	}
	access, err := url.Parse(cfg.AccessURL)
	if err != nil {
		return nil, &ConfigError{"access-url", err.Error()}
	}
	port := access.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[access.Scheme]
	}
	portNum, _ := strconv.Atoi(port)
	node := &tailcfg.DERPNode{
		Name:     fmt.Sprintf("%da", cfg.DERPServerRegionID),
		RegionID: cfg.DERPServerRegionID,
		HostName: access.Hostname(),
		DERPPort: portNum,
		STUNPort: -1,
	}
	// Upstream tailcfg has no "force HTTP" node flag: tailscale clients dial
	// region nodes over TLS (unless TS_DEBUG_USE_DERP_HTTP=1), so a plain
	// http access URL is for URL-based clients (derphttp.NewClient) and
	// tests; production access URLs are https.
	if ip := net.ParseIP(access.Hostname()); ip != nil {
		if ip.To4() != nil {
			node.IPv4 = ip.String()
		} else {
			node.IPv6 = ip.String()
		}
	}
	m.Regions[cfg.DERPServerRegionID] = &tailcfg.DERPRegion{
		RegionID:   cfg.DERPServerRegionID,
		RegionCode: cfg.DERPServerRegionCode,
		RegionName: cfg.DERPServerRegionName,
		Nodes:      []*tailcfg.DERPNode{node},
	}
	return m, nil
}

// setSTUNPort advertises a STUN server on the embedded region's node (same
// host as the access URL, UDP port port).
func setSTUNPort(m *tailcfg.DERPMap, regionID, port int) {
	if r := m.Regions[regionID]; r != nil {
		for _, n := range r.Nodes {
			n.STUNPort = port
		}
	}
}
