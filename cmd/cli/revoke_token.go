package cli

import (
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database"
)

// newRevokeTokenCmd is `coder server revoke-token`: it deletes API keys
// and announces the revocation, so every replica refuses the token at once
// (see database.RevokeAPIKey).
func newRevokeTokenCmd(cfg *coderd.Config) *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "revoke-token [TOKEN | ID]",
		Short: "Revoke an API token (or every token created with --name); every replica refuses it at once",
		Long: `Revoke an API token: give the token itself, or its id (the part before the "-"),
or --name to revoke every token created with that name. Replicas listening on
Postgres refuse it as soon as the revocation commits; replicas in poll mode
within about a second. Takes --postgres-url like server.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if (len(args) == 1) == (name != "") {
				return &exitError{code: 2, msg: "give either a token (or its id) or --name"}
			}
			var id string
			if len(args) == 1 {
				var ok bool
				if id, ok = database.APIKeyID(args[0]); !ok {
					// Never echo the argument: it may be a secret.
					return &exitError{code: 2, msg: "not a token or a token id (a token is <10-character id>-<secret>)"}
				}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			db, closeDB, err := openDatabaseForCommand(ctx, cfg)
			if err != nil {
				return &exitError{code: 1, msg: err.Error()}
			}
			defer closeDB()
			var ids []string
			if id != "" {
				found, err := db.RevokeAPIKey(ctx, id)
				if err != nil {
					return &exitError{code: 1, msg: err.Error()}
				}
				if !found {
					return &exitError{code: 1, msg: fmt.Sprintf("no token with id %s", id)}
				}
				ids = []string{id}
			} else {
				if ids, err = db.RevokeAPIKeysNamed(ctx, name); err != nil {
					return &exitError{code: 1, msg: err.Error()}
				}
				if len(ids) == 0 {
					return &exitError{code: 1, msg: fmt.Sprintf("no token named %q", name)}
				}
			}
			for _, id := range ids {
				fmt.Fprintf(cmd.OutOrStdout(), "revoked token %s\n", id)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "Revoke every token created with this --name")
	return cmd
}
