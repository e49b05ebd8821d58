package coderd

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"tailscale.com/net/stun"

	"github.com/coder-ha/coder/internal/wait"
)

// The STUN server answers a binding request with the sender's address,
// ignores other UDP traffic without stopping, counts both, and Close is
// idempotent and stops it.
func TestSTUNServerAnswersBindingRequestsAndIgnoresOtherPackets(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	s, err := listenSTUN("127.0.0.1:0", zap.NewNop(), reg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: s.Port()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("not a stun packet")); err != nil {
		t.Fatal(err)
	}
	txid := stun.NewTxID()
	buf := make([]byte, 1500)
	var n int
	for attempt := 0; ; attempt++ {
		if _, err := conn.Write(stun.Request(txid)); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if n, err = conn.Read(buf); err == nil {
			break
		}
		if attempt == 10 {
			t.Fatalf("no answer: %v", err)
		}
	}
	got, mapped, err := stun.ParseResponse(buf[:n])
	if err != nil || got != txid {
		t.Fatalf("bad response: %v", err)
	}
	if want := conn.LocalAddr().(*net.UDPAddr).AddrPort(); mapped != want {
		t.Fatalf("mapped %s, want %s", mapped, want)
	}
	// The counters move right after the reply is written.
	wait.For(t, 5*time.Second, "the not_stun and success counters to count", func() bool {
		return counterValue(t, s.requests.WithLabelValues("not_stun")) >= 1 &&
			counterValue(t, s.requests.WithLabelValues("success")) >= 1
	})
	_ = s.Close()
	_ = s.Close()
	// The port is free again.
	l, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: s.Port()})
	if err != nil {
		t.Fatalf("port still held after Close: %v", err)
	}
	_ = l.Close()
}

// A malformed STUN address is refused at start naming the flag; with the
// DERP server off it is ignored.
func TestSTUNAddressRules(t *testing.T) {
	t.Parallel()
	_, err := Config{DERPServerEnable: true, DERPServerSTUNAddress: "3478"}.withDefaults(zap.NewNop())
	if err == nil || !strings.HasPrefix(err.Error(), "--derp-server-stun-address:") {
		t.Fatalf("want a --derp-server-stun-address error, got %v", err)
	}
	c, err := Config{DERPServerEnable: false, DERPServerSTUNAddress: "0.0.0.0:3478"}.withDefaults(zap.NewNop())
	if err != nil || c.DERPServerSTUNAddress != "" {
		t.Fatalf("with the DERP server off the STUN address must be ignored: %v %q", err, c.DERPServerSTUNAddress)
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
