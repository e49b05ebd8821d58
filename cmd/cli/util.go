package cli

import (
	"os"

	"go.uber.org/zap"
)

func zapSignal(sig os.Signal) zap.Field { return zap.String("signal", sig.String()) }
