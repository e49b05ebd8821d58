package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database"
	"github.com/coder-ha/coder/migrations"
)

// newMigrateCmd is `coder server migrate [--finalize]`.
func newMigrateCmd(cfg *coderd.Config, verbose, logJSON *bool) *cobra.Command {
	var finalize bool
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Apply this release's expand migrations; with --finalize also its contract steps",
		Long: `Apply the expand migrations this release carries (a replica also does that when it
starts) and print the schema's state: the version in the database, what this release
knows, and the contract steps still pending.

With --finalize, also run this release's contract steps (the ones that drop, rename
or tighten). They run only here, never when a replica starts, and only while no live
replica runs a release older than they require: otherwise the command refuses,
naming those replicas. Afterwards, binaries of older releases refuse to start.
Run it once the rolling upgrade is done and you no longer intend to roll back.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			log := newLogger(cmd.ErrOrStderr(), *verbose, *logJSON)
			defer func() { _ = log.Sync() }()
			db, closeDB, err := openDatabaseForCommand(ctx, cfg)
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			defer closeDB()
			opts := database.MigrateOptions{Logger: log.Named("migrate"), Release: Version}
			out := cmd.OutOrStdout()
			if !finalize {
				st, err := db.MigrateWith(ctx, opts)
				if err != nil {
					return &exitError{code: 1, msg: err.Error()}
				}
				printSchema(out, st, true)
				return nil
			}
			res, err := db.Finalize(ctx, database.FinalizeOptions{MigrateOptions: opts})
			var refused *database.OldReplicasError
			switch {
			case errors.As(err, &refused):
				return &exitError{code: 3, msg: err.Error()}
			case err != nil:
				return &exitError{code: 1, msg: err.Error()}
			}
			printSchema(out, res.Status, false)
			if len(res.Applied) == 0 {
				fmt.Fprintln(out, "finalize: no contract step pending; nothing to do")
				return nil
			}
			fmt.Fprintf(out, "finalized: applied %s\n", strings.Join(res.Applied, ", "))
			fmt.Fprintf(out, "releases that do not know schema version %d now refuse to start; the oldest that may run is %s\n", res.MinSchema, orUnknown(res.MinRelease))
			return nil
		},
	}
	cmd.Flags().BoolVar(&finalize, "finalize", false, "Also run the contract steps, once no live replica runs an older release (deliberately no environment variable: a finalize is a one-off decision, not a setting)")
	return cmd
}

// printSchema tells the operator where the schema stands (and, with
// pending, which contract steps wait for a finalize).
func printSchema(w io.Writer, st database.SchemaStatus, pending bool) {
	fmt.Fprintf(w, "schema: version %d in the database; this release (%s) knows up to %d\n", st.Found, Version, st.Known)
	if st.Newer() {
		fmt.Fprintf(w, "warning: %s\n", st.SkewWarning(Version))
	}
	if st.MinSchema > 0 {
		fmt.Fprintf(w, "finalized: releases must know schema version %d (oldest that may run: %s)\n", st.MinSchema, orUnknown(st.MinRelease))
	}
	if !pending {
		return
	}
	if len(st.PendingContract) == 0 {
		fmt.Fprintln(w, "contract steps pending: none")
		return
	}
	names := make([]string, len(st.PendingContract))
	for i, f := range st.PendingContract {
		names[i] = f.Name
	}
	fmt.Fprintf(w, "contract steps pending: %s (run `coder server migrate --finalize` once no live replica runs a release that does not know schema version %d)\n",
		strings.Join(names, ", "), maxVersion(st.PendingContract))
}

func maxVersion(files []migrations.File) int64 {
	var v int64
	for _, f := range files {
		v = max(v, f.Version)
	}
	return v
}

func orUnknown(s string) string {
	if s == "" {
		return "(not recorded)"
	}
	return s
}
