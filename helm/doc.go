// Package helm holds the tests of the coder Helm chart (helm/coder). It is
// a separate module so that helm and the Kubernetes API types never enter
// the server binary's dependencies.
package helm
