// Rendering the chart the way helm install does, and decoding what it
// renders into typed Kubernetes objects.

package helm_test

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/strvals"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/yaml"
)

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
