package helm_test

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	corev1 "k8s.io/api/core/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const chartDir = "coder"

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
