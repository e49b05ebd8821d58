// The coder container's environment: how the Postgres URL, the access
// URL and Prometheus reach it, written as in Coder's own chart.

package helm_test

import (
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

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
