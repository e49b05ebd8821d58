package cli

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/replicasync"
)

func newReplicasCmd() *cobra.Command {
	var c clientFlags
	cmd := &cobra.Command{
		Use:   "replicas",
		Short: "List live replicas, their relay URLs, latencies and warnings",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := c.validate(); err != nil {
				return err
			}
			var replicas []coderd.Replica
			if err := c.get(cmd.Context(), "/api/v2/replicas", &replicas); err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			if c.output == "json" {
				return printJSON(cmd.OutOrStdout(), replicas)
			}
			printReplicas(cmd.OutOrStdout(), replicas)
			return nil
		},
	}
	c.register(cmd)
	return cmd
}

// replicaLabel names a replica by hostname, adding a short id when two
// replicas share a hostname.
func replicaLabels(replicas []coderd.Replica) map[uuid.UUID]string {
	count := map[string]int{}
	for _, r := range replicas {
		count[r.Hostname]++
	}
	labels := map[uuid.UUID]string{}
	for _, r := range replicas {
		l := r.Hostname
		if count[r.Hostname] > 1 || l == "" {
			l += "/" + r.ID.String()[:8]
		}
		labels[r.ID] = l
	}
	return labels
}

func printReplicas(w io.Writer, replicas []coderd.Replica) {
	labels := replicaLabels(replicas)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "REPLICA\tID\tRELAY URL\tREGION\tVERSION\tDB LATENCY\tERROR")
	var warnings []string
	for _, r := range replicas {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", labels[r.ID], r.ID, dash(r.RelayAddress), r.RegionID, r.Version,
			fmt.Sprintf("%.1fms", r.DatabaseLatencyMS), dash(r.Error))
		warnings = append(warnings, r.Warnings...)
	}
	_ = tw.Flush()

	fmt.Fprintln(w)
	fmt.Fprintln(w, "LATENCY (row measured column; ! = above threshold or failing)")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	header := []string{"FROM \\ TO"}
	for _, r := range replicas {
		header = append(header, labels[r.ID])
	}
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, from := range replicas {
		measured := map[uuid.UUID]coderd.ReplicaPeer{}
		for _, p := range from.Peers {
			measured[p.ID] = p
		}
		row := []string{labels[from.ID]}
		for _, to := range replicas {
			p, ok := measured[to.ID]
			switch {
			case to.ID == from.ID:
				row = append(row, "-")
			case !ok:
				row = append(row, "?")
			case p.Error != "":
				row = append(row, "! error")
			default:
				cell := fmt.Sprintf("%.1fms", p.LatencyMS)
				if replicasync.WarnsSlow(from.Warnings, to.RelayAddress) {
					cell += " !"
				}
				row = append(row, cell)
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	_ = tw.Flush()

	errs := 0
	for _, r := range replicas {
		for _, p := range r.Peers {
			if p.Error != "" {
				if errs == 0 {
					fmt.Fprintln(w, "\nERRORS")
				}
				errs++
				fmt.Fprintf(w, "! %s → %s: %s\n", labels[r.ID], labelOf(labels, p.ID), p.Error)
			}
		}
	}
	if len(warnings) > 0 {
		fmt.Fprintln(w, "\nWARNINGS")
		for _, warning := range warnings {
			fmt.Fprintln(w, "!", warning)
		}
	}
}

func labelOf(labels map[uuid.UUID]string, id uuid.UUID) string {
	if l, ok := labels[id]; ok {
		return l
	}
	return id.String()[:8]
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
