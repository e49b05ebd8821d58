package helm_test

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/strvals"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const chartDir = "coder"

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	c, err := loader.Load(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// render renders the chart like `helm template coder ./coder -f file --set
// sets...`, with the schema checked.
func render(t *testing.T, valuesFile string, sets ...string) (map[string]string, error) {
	t.Helper()
	c := loadChart(t)
	vals := map[string]any{}
	if valuesFile != "" {
		v, err := chartutil.ReadValuesFile(valuesFile)
		if err != nil {
			t.Fatal(err)
		}
		vals = v.AsMap()
	}
	for _, s := range sets {
		if err := strvals.ParseInto(s, vals); err != nil {
			t.Fatal(err)
		}
	}
	rv, err := chartutil.ToRenderValues(c, vals, chartutil.ReleaseOptions{Name: "coder", Namespace: "coder", IsInstall: true, Revision: 1}, chartutil.DefaultCapabilities)
	if err != nil {
		return nil, err
	}
	return engine.Render(c, rv)
}

// manifests splits the rendered files into YAML documents, in a stable
// order, dropping empty ones and NOTES.txt.
func manifests(files map[string]string) []string {
	var names []string
	for n := range files {
		if strings.HasSuffix(n, ".yaml") {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var docs []string
	for _, n := range names {
		for _, d := range strings.Split(files[n], "\n---") {
			if strings.TrimSpace(stripComments(d)) != "" {
				docs = append(docs, strings.TrimSpace(d))
			}
		}
	}
	return docs
}

func stripComments(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// objects decodes every manifest strictly into its Kubernetes API type:
// an unknown or misspelled field is an error.
type objects struct {
	deployments []appsv1.Deployment
	services    []corev1.Service
	secrets     []corev1.Secret
	pdbs        []policyv1.PodDisruptionBudget
	ingresses   []networkingv1.Ingress
	accounts    []corev1.ServiceAccount
	others      []map[string]any
}

func decode(t *testing.T, docs []string) objects {
	t.Helper()
	var o objects
	for _, d := range docs {
		var meta struct {
			Kind string `json:"kind"`
		}
		if err := yaml.Unmarshal([]byte(d), &meta); err != nil {
			t.Fatalf("not YAML: %v\n%s", err, d)
		}
		var err error
		switch meta.Kind {
		case "Deployment":
			var v appsv1.Deployment
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.deployments = append(o.deployments, v)
		case "Service":
			var v corev1.Service
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.services = append(o.services, v)
		case "Secret":
			var v corev1.Secret
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.secrets = append(o.secrets, v)
		case "PodDisruptionBudget":
			var v policyv1.PodDisruptionBudget
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.pdbs = append(o.pdbs, v)
		case "Ingress":
			var v networkingv1.Ingress
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.ingresses = append(o.ingresses, v)
		case "ServiceAccount":
			var v corev1.ServiceAccount
			err = yaml.UnmarshalStrict([]byte(d), &v)
			o.accounts = append(o.accounts, v)
		case "ServiceMonitor":
			var v map[string]any
			err = yaml.Unmarshal([]byte(d), &v)
			o.others = append(o.others, v)
		default:
			t.Fatalf("unexpected kind %q", meta.Kind)
		}
		if err != nil {
			t.Fatalf("%s does not decode strictly: %v\n%s", meta.Kind, err, d)
		}
	}
	return o
}

var valuesFiles = []string{"single", "ha3", "existing-secret", "loadbalancer-ingress-monitoring", "coder-chart-env"}

func TestChartLintsClean(t *testing.T) {
	for _, name := range valuesFiles {
		v, err := chartutil.ReadValuesFile(filepath.Join("testdata", "values", name+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		linter := lint.All(chartDir, v.AsMap(), "coder", false)
		for _, m := range linter.Messages {
			if m.Severity >= support.WarningSev {
				t.Errorf("%s: helm lint: %s", name, m)
			}
		}
	}
}

func TestEveryValuesFileRendersStrictlyValidObjectsMatchingGolden(t *testing.T) {
	for _, name := range valuesFiles {
		t.Run(name, func(t *testing.T) {
			files, err := render(t, filepath.Join("testdata", "values", name+".yaml"))
			if err != nil {
				t.Fatal(err)
			}
			docs := manifests(files)
			o := decode(t, docs)
			for _, d := range o.deployments {
				for _, c := range d.Spec.Template.Spec.Containers {
					seen := map[string]bool{}
					for _, e := range c.Env {
						if seen[e.Name] {
							t.Errorf("container %s sets %s twice", c.Name, e.Name)
						}
						seen[e.Name] = true
					}
				}
			}
			got := strings.Join(docs, "\n---\n") + "\n"
			golden := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run: go test ./... -update)", err)
			}
			if !bytes.Equal(want, []byte(got)) {
				t.Fatalf("rendered output differs from %s (rerun with -update if intended):\n%s", golden, diff(string(want), got))
			}
		})
	}
}

func TestThreeReplicasGetPodIPRelayURLsProbesRollingUpdateAndPDB(t *testing.T) {
	files, err := render(t, filepath.Join("testdata", "values", "single.yaml"), "coder.replicaCount=3")
	if err != nil {
		t.Fatal(err)
	}
	o := decode(t, manifests(files))
	if len(o.deployments) != 1 {
		t.Fatalf("%d deployments", len(o.deployments))
	}
	d := o.deployments[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		t.Fatalf("replicas = %v, want 3", d.Spec.Replicas)
	}
	c := d.Spec.Template.Spec.Containers[0]
	env := map[string]int{}
	for i, e := range c.Env {
		env[e.Name] = i
	}
	podIP, ok := env["POD_IP"]
	if !ok || c.Env[podIP].ValueFrom == nil || c.Env[podIP].ValueFrom.FieldRef == nil || c.Env[podIP].ValueFrom.FieldRef.FieldPath != "status.podIP" {
		t.Fatal("POD_IP does not come from status.podIP")
	}
	relay, ok := env["CODER_DERP_SERVER_RELAY_URL"]
	if !ok || c.Env[relay].Value != "http://$(POD_IP):8080" || relay < podIP {
		t.Fatalf("relay URL env wrong or before POD_IP: %+v", c.Env)
	}
	if i, ok := env["CODER_HTTP_ADDRESS"]; !ok || c.Env[i].Value != "0.0.0.0:8080" {
		t.Fatal("CODER_HTTP_ADDRESS is not 0.0.0.0:8080")
	}
	if i, ok := env["CODER_PG_CONNECTION_URL_FILE"]; !ok || postgresURLVolume(t, d, c.Env[i].Value) == nil {
		t.Fatal("the Postgres URL does not come from a Secret")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Fatal("readiness does not probe /readyz")
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Fatal("liveness does not probe /healthz")
	}
	if c.LivenessProbe.FailureThreshold <= c.ReadinessProbe.FailureThreshold {
		t.Fatal("liveness must tolerate more failures than readiness")
	}
	ru := d.Spec.Strategy.RollingUpdate
	if ru == nil || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 0 {
		t.Fatal("rolling update does not keep every replica up (maxUnavailable: 0)")
	}
	if len(o.pdbs) != 1 {
		t.Fatal("no PodDisruptionBudget with 3 replicas")
	}
	if d.Spec.Template.Spec.TerminationGracePeriodSeconds == nil || *d.Spec.Template.Spec.TerminationGracePeriodSeconds <= 15 {
		t.Fatal("terminationGracePeriodSeconds is not longer than the shutdown grace period")
	}
	sc := c.SecurityContext
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || d.Spec.Template.Spec.SecurityContext.RunAsNonRoot == nil {
		t.Fatal("the container is not non-root with a read-only root filesystem")
	}
	sel := d.Spec.Template.Spec.TopologySpreadConstraints[0].LabelSelector.MatchLabels
	if sel["app.kubernetes.io/instance"] != "coder" {
		t.Fatalf("topology spread does not select this release: %v", sel)
	}
}

func TestOneReplicaHasNoPDB(t *testing.T) {
	files, err := render(t, filepath.Join("testdata", "values", "single.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if o := decode(t, manifests(files)); len(o.pdbs) != 0 {
		t.Fatal("a PDB for a single replica would block node drains forever")
	}
}

func TestWrongValuesFailWithClearMessages(t *testing.T) {
	single := filepath.Join("testdata", "values", "single.yaml")
	for _, tc := range []struct {
		name, valuesFile string
		sets             []string
		want             string
	}{
		{"replicaCount=three", single, []string{"coder.replicaCount=three"}, "replicaCount"},
		{"replicaCount=0", single, []string{"coder.replicaCount=0"}, "replicaCount"},
		{"misspelled key", single, []string{"coder.replicas=3"}, "replicas"},
		{"no postgres", "", nil, "set coder.postgres.url, coder.postgres.existingSecret.name, or a CODER_PG_CONNECTION_URL entry in coder.env"},
		{"postgres env entry without a value", "", []string{"coder.env[0].name=CODER_PG_CONNECTION_URL"}, "CODER_PG_CONNECTION_URL has neither value nor valueFrom"},
		{"postgres url and env entry", single, []string{"coder.env[0].name=CODER_PG_CONNECTION_URL", "coder.env[0].value=postgres://x@db/coder"}, "given more than once (env, url)"},
		{"postgres url and existing secret", single, []string{"coder.postgres.existingSecret.name=db"}, "given more than once (existingSecret, url)"},
		{"env overrides the listen address", single, []string{"coder.env[0].name=CODER_HTTP_ADDRESS", "coder.env[0].value=0.0.0.0:3000"}, "coder.env sets CODER_HTTP_ADDRESS, which the chart sets itself"},
		{"env repeats a name", single, []string{"coder.env[0].name=CODER_VERBOSE", "coder.env[0].value=true", "coder.env[1].name=CODER_VERBOSE", "coder.env[1].value=false"}, "coder.env lists CODER_VERBOSE twice"},
		{"access URL twice", single, []string{"coder.accessURL=https://a.example.com", "coder.env[0].name=CODER_ACCESS_URL", "coder.env[0].value=https://b.example.com"}, "the access URL is given twice"},
		{"grace longer than termination", single, []string{"coder.shutdownGracePeriod=60s"}, "terminationGracePeriodSeconds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, tc.valuesFile, tc.sets...)
			if err == nil {
				t.Fatal("rendered; want an error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error does not mention %q: %v", tc.want, err)
			}
		})
	}
}

// envOf returns the coder container's environment and how often each
// name appears.
func envOf(t *testing.T, o objects) ([]corev1.EnvVar, map[string]int) {
	t.Helper()
	if len(o.deployments) != 1 {
		t.Fatalf("%d deployments", len(o.deployments))
	}
	env := o.deployments[0].Spec.Template.Spec.Containers[0].Env
	count := map[string]int{}
	for _, e := range env {
		count[e.Name]++
	}
	return env, count
}

// Values written for Coder's own chart, with the Postgres URL in coder.env
// (a secretKeyRef or a plain value), render: the container gets exactly one
// CODER_PG_CONNECTION_URL, the user's, and the chart creates no Secret of
// its own.
func TestPostgresURLFromCoderEnvAsInCodersChart(t *testing.T) {
	for _, tc := range []struct {
		name       string
		valuesFile string
		sets       []string
		check      func(corev1.EnvVar) bool
	}{
		{"secretKeyRef", filepath.Join("testdata", "values", "coder-chart-env.yaml"), nil, func(e corev1.EnvVar) bool {
			return e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Name == "coder-db-url" && e.ValueFrom.SecretKeyRef.Key == "url"
		}},
		{"plain value", "", []string{"coder.env[0].name=CODER_PG_CONNECTION_URL", "coder.env[0].value=postgres://coder@db:5432/coder"}, func(e corev1.EnvVar) bool {
			return e.Value == "postgres://coder@db:5432/coder" && e.ValueFrom == nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files, err := render(t, tc.valuesFile, tc.sets...)
			if err != nil {
				t.Fatalf("values in Coder's chart's style do not render: %v", err)
			}
			o := decode(t, manifests(files))
			env, count := envOf(t, o)
			if count["CODER_PG_CONNECTION_URL"] != 1 {
				t.Fatalf("CODER_PG_CONNECTION_URL appears %d times, want once", count["CODER_PG_CONNECTION_URL"])
			}
			for _, e := range env {
				if e.Name == "CODER_PG_CONNECTION_URL" && !tc.check(e) {
					t.Fatalf("CODER_PG_CONNECTION_URL is not the one from coder.env: %+v", e)
				}
			}
			if len(o.secrets) != 0 {
				t.Fatalf("the chart created %d Secret(s) although the URL comes from coder.env", len(o.secrets))
			}
		})
	}
}

// A values file in Coder's chart's style also sets CODER_ACCESS_URL and
// CODER_PROMETHEUS_ENABLE through coder.env: they are used as given (once
// each), and Prometheus being on there exposes the metrics port on the
// pods and the -metrics Service, as coder.prometheus.enable would.
func TestCoderChartStyleAccessURLAndPrometheusFromEnv(t *testing.T) {
	files, err := render(t, filepath.Join("testdata", "values", "coder-chart-env.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	o := decode(t, manifests(files))
	env, count := envOf(t, o)
	for _, name := range []string{"CODER_ACCESS_URL", "CODER_PROMETHEUS_ENABLE", "CODER_PROMETHEUS_ADDRESS", "CODER_PG_CONNECTION_URL"} {
		if count[name] != 1 {
			t.Errorf("%s appears %d times, want once", name, count[name])
		}
	}
	for _, e := range env {
		if e.Name == "CODER_ACCESS_URL" && e.Value != "https://coder.example.com" {
			t.Errorf("CODER_ACCESS_URL = %q, want the one from coder.env", e.Value)
		}
		if e.Name == "CODER_PROMETHEUS_ADDRESS" && e.Value != "0.0.0.0:2112" {
			t.Errorf("CODER_PROMETHEUS_ADDRESS = %q: the pods must listen for scrapes", e.Value)
		}
	}
	ports := o.deployments[0].Spec.Template.Spec.Containers[0].Ports
	if len(ports) != 2 || ports[1].Name != "metrics" || ports[1].ContainerPort != 2112 {
		t.Errorf("container ports %+v, want http and metrics (2112)", ports)
	}
	var metricsService bool
	for _, s := range o.services {
		if s.Name == "coder-metrics" {
			metricsService = true
		}
		if s.Name == "coder" && len(s.Spec.Ports) != 1 {
			t.Errorf("client-facing Service exposes %+v", s.Spec.Ports)
		}
	}
	if !metricsService {
		t.Error("CODER_PROMETHEUS_ENABLE=true in coder.env did not create the coder-metrics Service")
	}
}

// With the chart's own Postgres sources the URL is given once too: the
// file (by default) or the variable, never both.
func TestPostgresURLFromValuesIsSetOnce(t *testing.T) {
	for _, name := range []string{"single", "existing-secret"} {
		for _, sets := range [][]string{nil, {"coder.postgres.mountAsFile=false"}} {
			files, err := render(t, filepath.Join("testdata", "values", name+".yaml"), sets...)
			if err != nil {
				t.Fatal(err)
			}
			if _, count := envOf(t, decode(t, manifests(files))); count["CODER_PG_CONNECTION_URL"]+count["CODER_PG_CONNECTION_URL_FILE"] != 1 {
				t.Fatalf("%s %v: CODER_PG_CONNECTION_URL appears %d times, CODER_PG_CONNECTION_URL_FILE %d times", name, sets,
					count["CODER_PG_CONNECTION_URL"], count["CODER_PG_CONNECTION_URL_FILE"])
			}
		}
	}
}

// postgresURLVolume returns the Secret volume that holds the file path
// (mounted read-only as a whole directory: the kubelet never updates a
// subPath mount), or nil.
func postgresURLVolume(t *testing.T, d appsv1.Deployment, path string) *corev1.SecretVolumeSource {
	t.Helper()
	c := d.Spec.Template.Spec.Containers[0]
	for _, m := range c.VolumeMounts {
		if !strings.HasPrefix(path, m.MountPath+"/") {
			continue
		}
		if m.SubPath != "" || !m.ReadOnly {
			t.Fatalf("the Postgres URL volume is mounted with subPath %q, readOnly %v: it must be the whole volume, read-only", m.SubPath, m.ReadOnly)
		}
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				for _, it := range v.Secret.Items {
					if m.MountPath+"/"+it.Path == path {
						return v.Secret
					}
				}
			}
		}
	}
	return nil
}

// By default the Postgres Secret (the chart's or an existing one) is a
// volume and the server reads the URL from the file, so a rotated password
// reaches running pods; coder.postgres.mountAsFile=false goes back to the
// variable from a secretKeyRef (no volume). coder.env may not point the
// server at a file of its own.
func TestPostgresSecretIsMountedAsAFileForRotation(t *testing.T) {
	for _, tc := range []struct {
		values, secret, key string
	}{
		{"single", "coder-postgres", "url"},
		{"existing-secret", "coder-db", "connection-url"},
	} {
		files, err := render(t, filepath.Join("testdata", "values", tc.values+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		o := decode(t, manifests(files))
		env, count := envOf(t, o)
		if count["CODER_PG_CONNECTION_URL"] != 0 || count["CODER_PG_CONNECTION_URL_FILE"] != 1 {
			t.Fatalf("%s: want only CODER_PG_CONNECTION_URL_FILE, got %+v", tc.values, env)
		}
		var path string
		for _, e := range env {
			if e.Name == "CODER_PG_CONNECTION_URL_FILE" {
				path = e.Value
			}
		}
		v := postgresURLVolume(t, o.deployments[0], path)
		if v == nil || v.SecretName != tc.secret || len(v.Items) != 1 || v.Items[0].Key != tc.key {
			t.Fatalf("%s: %s is not the key %q of Secret %q mounted as a volume: %+v", tc.values, path, tc.key, tc.secret, v)
		}
		if v.DefaultMode == nil || *v.DefaultMode&0o007 != 0 {
			t.Fatalf("%s: the URL file is readable by others: mode %v", tc.values, v.DefaultMode)
		}

		files, err = render(t, filepath.Join("testdata", "values", tc.values+".yaml"), "coder.postgres.mountAsFile=false")
		if err != nil {
			t.Fatal(err)
		}
		o = decode(t, manifests(files))
		_, count = envOf(t, o)
		if count["CODER_PG_CONNECTION_URL"] != 1 || count["CODER_PG_CONNECTION_URL_FILE"] != 0 || len(o.deployments[0].Spec.Template.Spec.Volumes) != 2 {
			t.Fatalf("%s with mountAsFile=false: want the variable and no Secret volume", tc.values)
		}
	}
	for _, sets := range [][]string{
		{"coder.env[0].name=CODER_PG_CONNECTION_URL_FILE", "coder.env[0].value=/x"},
		{"coder.postgres.mountAsFile=yes"},
	} {
		if _, err := render(t, filepath.Join("testdata", "values", "single.yaml"), sets...); err == nil {
			t.Fatalf("%v rendered; want an error", sets)
		}
	}
}

// The client-facing Service never carries the metrics port, even with
// Prometheus on; a separate headless -metrics Service does, and the
// ServiceMonitor selects that Service only.
func TestMetricsPortIsNotOnTheClientFacingService(t *testing.T) {
	files, err := render(t, filepath.Join("testdata", "values", "loadbalancer-ingress-monitoring.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	o := decode(t, manifests(files))
	var client, metrics *corev1.Service
	for i := range o.services {
		switch o.services[i].Name {
		case "coder":
			client = &o.services[i]
		case "coder-metrics":
			metrics = &o.services[i]
		}
	}
	if client == nil || metrics == nil {
		t.Fatalf("want Services coder and coder-metrics, got %d services", len(o.services))
	}
	if len(client.Spec.Ports) != 1 || client.Spec.Ports[0].Name != "http" {
		t.Fatalf("client-facing Service (%s) exposes %+v; want only http", client.Spec.Type, client.Spec.Ports)
	}
	if metrics.Spec.Type != corev1.ServiceTypeClusterIP || metrics.Spec.ClusterIP != "None" ||
		len(metrics.Spec.Ports) != 1 || metrics.Spec.Ports[0].Port != 2112 || metrics.Spec.Ports[0].TargetPort.String() != "metrics" {
		t.Fatalf("metrics Service is not a headless ClusterIP with port 2112→metrics: %+v", metrics.Spec)
	}
	if len(o.others) != 1 {
		t.Fatalf("want one ServiceMonitor, got %d", len(o.others))
	}
	sel, _ := o.others[0]["spec"].(map[string]any)["selector"].(map[string]any)["matchLabels"].(map[string]any)
	matches := func(labels map[string]string) bool {
		for k, v := range sel {
			if labels[k] != v {
				return false
			}
		}
		return true
	}
	if !matches(metrics.Labels) || matches(client.Labels) {
		t.Fatalf("ServiceMonitor selector %v must select coder-metrics (%v) and not coder (%v)", sel, metrics.Labels, client.Labels)
	}
	for k, v := range metrics.Spec.Selector {
		if o.deployments[0].Spec.Template.Labels[k] != v {
			t.Fatalf("metrics Service selector %v does not select the pods", metrics.Spec.Selector)
		}
	}

	// Without Prometheus there is no metrics Service and no metrics port.
	files, err = render(t, filepath.Join("testdata", "values", "ha3.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	o = decode(t, manifests(files))
	if len(o.services) != 1 || len(o.services[0].Spec.Ports) != 1 {
		t.Fatalf("without coder.prometheus.enable: %d services, ports %+v", len(o.services), o.services[0].Spec.Ports)
	}
}

// diff shows the first differing lines.
func diff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var a, b string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			b = g[i]
		}
		if a != b {
			return fmt.Sprintf("line %d:\n- %s\n+ %s", i+1, a, b)
		}
	}
	return ""
}
