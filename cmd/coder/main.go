// Command coder is the highly available control-plane server and its
// client commands.
package main

import (
	"os"

	"github.com/coder-ha/coder/cmd/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr))
}
