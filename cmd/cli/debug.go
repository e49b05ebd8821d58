package cli

import "github.com/spf13/cobra"

func newDebugCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "debug",
		Short: "Diagnose a running cluster",
	}
	return cmd
}
