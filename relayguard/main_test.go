package relayguard

import (
	"testing"

	"go.uber.org/goleak"
)

// Every goroutine a Guard starts must be stopped by Close.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
