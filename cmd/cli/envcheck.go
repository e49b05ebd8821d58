package cli

import (
	"regexp"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
)

// The environment check: every CODER_* variable that is not a setting of
// the command being run gets one WARN line at start, naming the variable
// (never its value) and the closest known name, so a typo such as
// CODER_DERP_SERVER_VERIFY_CLIENTURL (which would leave the relay open)
// does not pass silently.
//
// "A setting of the command being run" is a variable bound to one of its
// flags, its own or inherited (CODER_VERBOSE for `coder server
// create-token`), aliases included (CODER_ADDRESS). A subcommand of
// `coder server` also accepts the server's own variables silently: it is
// run inside the server's environment (kubectl exec into the pod, the
// systemd unit's environment file) and ignores them by design. Client
// variables (CODER_URL, CODER_SESSION_TOKEN) are settings of the client
// commands only: `coder server` warns about them, naming the commands that
// read them.
//
// Commands without settings (`coder version`, help) check nothing: they
// read no variable, so none can be mistyped for them.
//
// Never warned about: variables reserved for test harnesses (CODER_TEST_*,
// read by test helpers, never by the binary) and the service-link
// variables Kubernetes injects for a Service named coder or coder-*
// (CODER_SERVICE_HOST, CODER_PORT_8080_TCP, …), which nobody sets by hand.

// envPrefix is the prefix of every variable the check looks at.
const envPrefix = "CODER_"

// kubernetesServiceLink matches the variables Kubernetes injects for a
// Service whose name starts with "coder" (enableServiceLinks).
var kubernetesServiceLink = regexp.MustCompile(`^CODER(_[A-Z0-9_]+)?_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)$`)

// ignoredEnv reports whether name is never warned about (see above).
func ignoredEnv(name string) bool {
	return strings.HasPrefix(name, "CODER_TEST_") || kubernetesServiceLink.MatchString(name)
}

// flagEnvs adds the variables bound to the flags of fs to set.
func flagEnvs(fs *pflag.FlagSet, set map[string]bool) {
	fs.VisitAll(func(f *pflag.Flag) {
		for _, env := range f.Annotations[envAnnotation] {
			set[env] = true
		}
	})
}

// commandSettings is the set of variables that are settings of cmd: those
// of its flags (own and inherited) and, for a subcommand, those of its
// ancestors below the root (see the comment at the top of this file).
func commandSettings(cmd *cobra.Command) map[string]bool {
	set := map[string]bool{}
	flagEnvs(cmd.LocalFlags(), set)
	flagEnvs(cmd.InheritedFlags(), set)
	for a := cmd.Parent(); a != nil && a.HasParent(); a = a.Parent() {
		flagEnvs(a.LocalFlags(), set)
	}
	return set
}

// allSettings maps every variable any command reads to the commands that
// read it.
func allSettings(root *cobra.Command) map[string][]string {
	out := map[string][]string{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Runnable() {
			set := map[string]bool{}
			flagEnvs(c.LocalFlags(), set)
			flagEnvs(c.InheritedFlags(), set)
			for env := range set {
				out[env] = append(out[env], c.CommandPath())
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	for env, cmds := range out {
		// "coder server" covers its subcommands.
		sort.Strings(cmds)
		kept := cmds[:0]
		for _, c := range cmds {
			if len(kept) == 0 || !strings.HasPrefix(c, kept[len(kept)-1]+" ") {
				kept = append(kept, c)
			}
		}
		out[env] = kept
	}
	return out
}

// envWarning is one variable the check warns about.
type envWarning struct {
	Name      string
	SettingOf []string // the commands it is a setting of, if any
	Closest   string   // the closest known name, if one is close enough
}

// checkEnv returns the warnings for environ (KEY=VALUE entries) when cmd
// runs, sorted by name. It never looks at a value beyond splitting it off.
func checkEnv(cmd *cobra.Command, environ []string) []envWarning {
	own := commandSettings(cmd)
	if len(own) == 0 {
		return nil // a command without settings (version, help) reads none
	}
	all := allSettings(cmd.Root())
	names := make([]string, 0, len(all))
	for n := range all {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []envWarning
	seen := map[string]bool{}
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, envPrefix) || own[name] || ignoredEnv(name) || seen[name] {
			continue
		}
		seen[name] = true
		w := envWarning{Name: name, SettingOf: all[name]}
		if len(w.SettingOf) == 0 {
			w.Closest = closestName(name, names)
		}
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// warnEnv logs one WARN line per warning.
func warnEnv(log *zap.Logger, cmd *cobra.Command, warnings []envWarning) {
	for _, w := range warnings {
		fields := []zap.Field{zap.String("variable", w.Name), zap.String("command", cmd.CommandPath())}
		switch {
		case len(w.SettingOf) > 0:
			fields = append(fields, zap.String("setting_of", strings.Join(w.SettingOf, ", ")))
		case w.Closest != "":
			fields = append(fields, zap.String("did_you_mean", w.Closest))
		}
		log.Warn("ignoring an environment variable that is not a setting of this command", fields...)
	}
}

// closestName is the candidate nearest to name by edit distance, if it is
// close enough to be a likely typo: at most a quarter of the name's length
// (and at least 2) edits away. Ties go to the first in order.
func closestName(name string, candidates []string) string {
	best, bestD := "", max(2, len(name)/4)+1
	for _, c := range candidates {
		if d := editDistance(name, c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b (bytes: the
// names are ASCII).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
