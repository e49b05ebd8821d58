package coderd

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"tailscale.com/net/stun"
)

// stunServer answers STUN binding requests on UDP beside the embedded
// relay, so tailscale clients that use this cluster as a DERP region can
// learn their public address and find direct paths. The message format is
// tailscale's net/stun; the loop is ours rather than net/stunserver's so
// that it reports to this server's Prometheus registry and zap logger (that
// package publishes to the global expvar and the standard logger).
//
// listenSTUN binds and starts serving; Close stops the loop and waits for
// it, and is safe to call more than once.
type stunServer struct {
	conn     *net.UDPConn
	log      *zap.Logger
	requests *prometheus.CounterVec

	done      chan struct{}
	closeOnce sync.Once
}

// The values of coderd_stun_requests_total's result label. Every one is
// exported at 0 from the start, so dashboards and rate() have a series
// before the first packet of each kind.
const (
	stunSuccess    = "success"     // a binding request answered
	stunNotSTUN    = "not_stun"    // a packet that is not a binding request, ignored
	stunWriteError = "write_error" // the answer could not be sent
)

var stunResults = []string{stunSuccess, stunNotSTUN, stunWriteError}

// listenSTUN binds addr (host:port; port 0 picks one) and serves until
// Close. The counter coderd_stun_requests_total{result} is registered in
// reg.
func listenSTUN(addr string, log *zap.Logger, reg prometheus.Registerer) (*stunServer, error) {
	ua, err := net.ResolveUDPAddr("udp", ListenAddress(addr))
	if err != nil {
		return nil, &ConfigError{"derp-server-stun-address", err.Error()}
	}
	conn, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, &ConfigError{"derp-server-stun-address", err.Error()}
	}
	s := &stunServer{
		conn: conn,
		log:  log.Named("stun"),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "coderd_stun_requests_total",
			Help: "STUN packets received, by result: success (answered), not_stun (ignored), write_error.",
		}, []string{"result"}),
		done: make(chan struct{}),
	}
	for _, r := range stunResults {
		s.requests.WithLabelValues(r)
	}
	if err := reg.Register(s.requests); err != nil {
		_ = conn.Close()
		return nil, err
	}
	go s.serve()
	s.log.Info("serving stun", zap.String("address", conn.LocalAddr().String()))
	return s, nil
}

// Port is the UDP port the server listens on.
func (s *stunServer) Port() int { return s.conn.LocalAddr().(*net.UDPAddr).Port }

func (s *stunServer) serve() {
	defer close(s.done)
	buf := make([]byte, 64<<10)
	for {
		n, from, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Transient (e.g. ICMP-driven) errors: keep serving, slowly.
			s.log.Debug("stun read failed", zap.Error(err))
			time.Sleep(10 * time.Millisecond)
			continue
		}
		pkt := buf[:n]
		if !stun.Is(pkt) {
			s.requests.WithLabelValues(stunNotSTUN).Inc()
			continue
		}
		txid, err := stun.ParseBindingRequest(pkt)
		if err != nil {
			s.requests.WithLabelValues(stunNotSTUN).Inc()
			continue
		}
		mapped := netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if _, err := s.conn.WriteToUDPAddrPort(stun.Response(txid, mapped), from); err != nil {
			s.requests.WithLabelValues(stunWriteError).Inc()
			continue
		}
		s.requests.WithLabelValues(stunSuccess).Inc()
	}
}

// Close stops serving and waits for the loop to end.
func (s *stunServer) Close() error {
	var err error
	s.closeOnce.Do(func() { err = s.conn.Close() })
	<-s.done
	return err
}
