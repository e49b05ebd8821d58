//go:build upgradetest

package migrations

import (
	"embed"
	"io/fs"
)

// The test-only next release (see testrelease/README.md). Built only with
// -tags upgradetest: a shipped binary never carries these files.
var (
	//go:embed testrelease/*.sql
	testReleaseExpand embed.FS
	//go:embed testrelease/contract/*.sql
	testReleaseContract embed.FS
)

func init() {
	testExpand, _ = fs.Sub(testReleaseExpand, "testrelease")
	testContract, _ = fs.Sub(testReleaseContract, "testrelease/contract")
}
