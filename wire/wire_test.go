package wire

import "testing"

// The names are a contract with replicas and clients of other releases:
// a peer of the previous release probes /derp/latency-check and meshes at
// /derp, and clients send Coder-Session-Token. They never change.
func TestWireNamesAreTheContract(t *testing.T) {
	t.Parallel()
	for got, want := range map[string]string{
		DERPPath:           "/derp",
		LatencyCheckPath:   "/derp/latency-check",
		ProbePath:          "/derp/probe",
		SessionTokenHeader: "Coder-Session-Token",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

// A relay URL with or without a trailing slash names one replica, and
// joining a path never doubles the slash.
func TestRelayURLsWithAndWithoutTrailingSlashAreOneReplica(t *testing.T) {
	t.Parallel()
	if a, b := NormalizeURL("http://10.0.0.1:80"), NormalizeURL(" http://10.0.0.1:80/ "); a != b || a != "http://10.0.0.1:80" {
		t.Errorf("normalized %q and %q", a, b)
	}
	for _, base := range []string{"http://a:1", "http://a:1/"} {
		if got := JoinPath(base, DERPPath); got != "http://a:1/derp" {
			t.Errorf("JoinPath(%q, %q) = %q", base, DERPPath, got)
		}
	}
}
