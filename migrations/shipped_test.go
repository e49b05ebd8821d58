//go:build !upgradetest

package migrations_test

import (
	"testing"

	"github.com/coder-ha/coder/migrations"
)

// A build without the upgradetest tag (every shipped binary) carries none
// of the test-only next release's migrations.
func TestShippedBuildCarriesNoTestMigration(t *testing.T) {
	expand, err := migrations.Expand()
	if err != nil {
		t.Fatal(err)
	}
	contract, err := migrations.Contract()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range append(expand, contract...) {
		if f.Version >= 90000 {
			t.Errorf("the test-only %s %s is embedded in a build without the upgradetest tag", f.Kind, f.Name)
		}
	}
	if len(expand) < 2 {
		t.Fatalf("only %d expand migrations embedded", len(expand))
	}
}
