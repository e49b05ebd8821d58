// Package cli is the coder command line: flag and environment parsing,
// logging setup and exit codes. It turns flags into coderd.Config and
// leaves the work to coderd; it prints one-line errors, never stack traces.
package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Version is the build's version, set with -ldflags "-X ...cli.Version=…".
var Version = "dev"

// envAnnotation marks a flag with the environment variables that set it.
const envAnnotation = "coder_env"

// Main runs the command line and returns the process's exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		var exit *exitError
		if errors.As(err, &exit) {
			if exit.msg != "" {
				fmt.Fprintln(stderr, "error:", exit.msg)
			}
			return exit.code
		}
		fmt.Fprintln(stderr, "error:", err)
		return 1
	}
	return 0
}

// exitError carries an exit code through cobra.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "coder",
		Short:         "A highly available control-plane server: run it N times against one Postgres",
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if err := applyEnv(cmd); err != nil {
				return err
			}
			// Once, at start, in the format the command logs in.
			jsonLogs := false
			if f := cmd.Flags().Lookup("log-json"); f != nil {
				jsonLogs = f.Value.String() == "true"
			}
			if w := checkEnv(cmd, os.Environ()); len(w) > 0 {
				warnEnv(newLogger(cmd.ErrOrStderr(), false, jsonLogs), cmd, w)
			}
			return nil
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.AddCommand(
		newServerCmd(),
		newVersionCmd(),
		newReplicasCmd(),
		newDebugCmd(),
	)
	return root
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, args []string) {
			fmt.Fprintln(cmd.OutOrStdout(), "coder", Version)
		},
	}
}

// bindEnv records that the flag can also be set by the environment
// variables envs (the first one found wins; the flag wins over all) and
// says so in the help text.
func bindEnv(fs *pflag.FlagSet, name string, envs ...string) {
	f := fs.Lookup(name)
	if f == nil {
		panic("bindEnv: no flag " + name)
	}
	if f.Annotations == nil {
		f.Annotations = map[string][]string{}
	}
	f.Annotations[envAnnotation] = envs
	f.Usage += fmt.Sprintf(" (env: %s)", strings.Join(envs, ", "))
}

// applyEnv sets every flag the command line did not set from its
// environment variables.
func applyEnv(cmd *cobra.Command) error {
	var firstErr error
	visit := func(f *pflag.Flag) {
		if firstErr != nil || f.Changed {
			return
		}
		for _, env := range f.Annotations[envAnnotation] {
			v, ok := os.LookupEnv(env)
			if !ok {
				continue
			}
			if err := f.Value.Set(v); err != nil {
				firstErr = &exitError{code: 2, msg: fmt.Sprintf("%s=%q is not a valid value for --%s: %v", env, v, f.Name, err)}
			}
			f.Changed = true
			return
		}
	}
	cmd.Flags().VisitAll(visit)
	cmd.InheritedFlags().VisitAll(visit)
	return firstErr
}

// newLogger builds the process logger: human-readable console lines on
// stderr by default, JSON lines with --log-json, debug level with --verbose.
func newLogger(w io.Writer, verbose, jsonLogs bool) *zap.Logger {
	level := zap.InfoLevel
	if verbose {
		level = zap.DebugLevel
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	encCfg.EncodeDuration = zapcore.StringDurationEncoder
	var enc zapcore.Encoder
	if jsonLogs {
		enc = zapcore.NewJSONEncoder(encCfg)
	} else {
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.AddSync(w), level))
}
