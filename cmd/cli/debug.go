package cli

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/wire"
)

func newDebugCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "debug",
		Short: "Diagnose a running cluster",
	}
	cmd.AddCommand(newDebugMeshCmd())
	return cmd
}

// MeshPair is one measured direction between two replicas' relays.
type MeshPair struct {
	From    uuid.UUID `json:"from"`
	To      uuid.UUID `json:"to"`
	RTTMS   float64   `json:"rtt_ms"`
	Error   string    `json:"error"`
	FromURL string    `json:"from_relay_url"`
	ToURL   string    `json:"to_relay_url"`
}

func newDebugMeshCmd() *cobra.Command {
	var (
		c       clientFlags
		timeout time.Duration
	)
	cmd := &cobra.Command{
		Use:   "mesh",
		Short: "Send packets between every pair of replicas through the DERP mesh and print the round trips",
		Long: `Finds the replicas through the API, connects a DERP client to each replica's relay URL,
sends a packet from every replica's client to every other replica's client (it crosses
the mesh) and back, and prints the round trip per pair. Exits non-zero if any pair fails.
The relay URLs must be reachable from where you run it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := c.validate(); err != nil {
				return err
			}
			var replicas []coderd.Replica
			if err := c.get(cmd.Context(), "/api/v2/replicas", &replicas); err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			pairs, err := measureMesh(cmd.Context(), replicas, timeout)
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			if c.output == "json" {
				if err := printJSON(cmd.OutOrStdout(), pairs); err != nil {
					return err
				}
			} else {
				printMesh(cmd.OutOrStdout(), replicas, pairs)
			}
			failed := 0
			for _, p := range pairs {
				if p.Error != "" {
					failed++
				}
			}
			if failed > 0 {
				return &exitError{code: 1, msg: fmt.Sprintf("%d of %d pairs failed", failed, len(pairs))}
			}
			return nil
		},
	}
	c.register(cmd)
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "How long to wait for each pair's round trip")
	return cmd
}

// meshProbe is one DERP client connected to one replica's relay. It echoes
// every ping it receives and delivers pongs to whoever waits for them.
type meshProbe struct {
	replica coderd.Replica
	client  *derphttp.Client
	key     key.NodePublic

	mu      sync.Mutex
	waiting map[uint64]chan struct{}
}

const (
	msgPing = 1
	msgPong = 2
)

func (p *meshProbe) recvLoop() {
	for {
		m, err := p.client.Recv()
		if err != nil {
			return
		}
		pkt, ok := m.(derp.ReceivedPacket)
		if !ok || len(pkt.Data) != 9 {
			continue
		}
		nonce := binary.BigEndian.Uint64(pkt.Data[1:])
		switch pkt.Data[0] {
		case msgPing:
			reply := append([]byte{msgPong}, pkt.Data[1:]...)
			_ = p.client.Send(pkt.Source, reply)
		case msgPong:
			p.mu.Lock()
			if ch, ok := p.waiting[nonce]; ok {
				close(ch)
				delete(p.waiting, nonce)
			}
			p.mu.Unlock()
		}
	}
}

func measureMesh(ctx context.Context, replicas []coderd.Replica, timeout time.Duration) ([]MeshPair, error) {
	var probes []*meshProbe
	defer func() {
		for _, p := range probes {
			_ = p.client.Close()
		}
	}()
	var pairs []MeshPair
	var broken = map[uuid.UUID]string{}
	for _, r := range replicas {
		if r.RelayAddress == "" {
			broken[r.ID] = "replica has no relay URL"
			continue
		}
		priv := key.NewNode()
		client, err := derphttp.NewClient(priv, wire.JoinPath(r.RelayAddress, wire.DERPPath), logger.Discard, netmon.NewStatic())
		if err != nil {
			broken[r.ID] = err.Error()
			continue
		}
		connectCtx, cancel := context.WithTimeout(ctx, timeout)
		err = client.Connect(connectCtx)
		cancel()
		if err != nil {
			broken[r.ID] = fmt.Sprintf("connect to relay: %v", err)
			_ = client.Close()
			continue
		}
		p := &meshProbe{replica: r, client: client, key: priv.Public(), waiting: map[uint64]chan struct{}{}}
		probes = append(probes, p)
		go p.recvLoop()
	}
	if len(replicas) < 2 {
		return nil, fmt.Errorf("%d replica(s) found: nothing to mesh", len(replicas))
	}
	var nonce uint64
	for _, from := range replicas {
		for _, to := range replicas {
			if from.ID == to.ID {
				continue
			}
			pair := MeshPair{From: from.ID, To: to.ID, FromURL: from.RelayAddress, ToURL: to.RelayAddress}
			src, dst := findProbe(probes, from.ID), findProbe(probes, to.ID)
			switch {
			case src == nil:
				pair.Error = broken[from.ID]
			case dst == nil:
				pair.Error = broken[to.ID]
			default:
				nonce++
				rtt, err := roundTrip(ctx, src, dst, nonce, timeout)
				if err != nil {
					pair.Error = err.Error()
				} else {
					pair.RTTMS = float64(rtt.Microseconds()) / 1000
				}
			}
			pairs = append(pairs, pair)
		}
	}
	return pairs, nil
}

func findProbe(probes []*meshProbe, id uuid.UUID) *meshProbe {
	for _, p := range probes {
		if p.replica.ID == id {
			return p
		}
	}
	return nil
}

// roundTrip sends a ping from src's client to dst's client (crossing the
// mesh between their relays) until the pong comes back. Resends cover the
// moment right after connecting, when the relays may not yet know of each
// other's new clients.
func roundTrip(ctx context.Context, src, dst *meshProbe, nonce uint64, timeout time.Duration) (time.Duration, error) {
	ch := make(chan struct{})
	src.mu.Lock()
	src.waiting[nonce] = ch
	src.mu.Unlock()
	defer func() {
		src.mu.Lock()
		delete(src.waiting, nonce)
		src.mu.Unlock()
	}()
	msg := make([]byte, 9)
	msg[0] = msgPing
	binary.BigEndian.PutUint64(msg[1:], nonce)
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		start := time.Now()
		if err := src.client.Send(dst.key, msg); err != nil {
			return 0, fmt.Errorf("send: %w", err)
		}
		select {
		case <-ch:
			return time.Since(start), nil
		case <-time.After(250 * time.Millisecond):
		case <-deadline.C:
			return 0, fmt.Errorf("no answer within %s", timeout)
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

func printMesh(w io.Writer, replicas []coderd.Replica, pairs []MeshPair) {
	labels := replicaLabels(replicas)
	byPair := map[[2]uuid.UUID]MeshPair{}
	for _, p := range pairs {
		byPair[[2]uuid.UUID{p.From, p.To}] = p
	}
	fmt.Fprintln(w, "DERP MESH ROUND TRIP (client on row → client on column → back)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header := []string{"FROM \\ TO"}
	for _, r := range replicas {
		header = append(header, labels[r.ID])
	}
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, from := range replicas {
		row := []string{labels[from.ID]}
		for _, to := range replicas {
			p, ok := byPair[[2]uuid.UUID{from.ID, to.ID}]
			switch {
			case from.ID == to.ID:
				row = append(row, "-")
			case !ok || p.Error != "":
				row = append(row, "FAIL")
			default:
				row = append(row, fmt.Sprintf("%.1fms", p.RTTMS))
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	_ = tw.Flush()
	var failures []string
	for _, p := range pairs {
		if p.Error != "" {
			failures = append(failures, fmt.Sprintf("! %s → %s: %s", labelOf(labels, p.From), labelOf(labels, p.To), p.Error))
		}
	}
	sort.Strings(failures)
	if len(failures) > 0 {
		fmt.Fprintln(w, "\nFAILURES")
		for _, f := range failures {
			fmt.Fprintln(w, f)
		}
	} else {
		fmt.Fprintf(w, "\nall %d pairs reached each other through the mesh\n", len(pairs))
	}
}
