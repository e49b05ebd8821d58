//go:build bench

package bench_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/upgradetest"
)

// upgradeHold is how long a reader holds a lock on replicas while the
// first new replica starts, in the rolls that measure the migration.
const upgradeHold = 10 * time.Second

// upgrade rolls 3 replicas of the previous release (41c5966) to the next
// one (the working tree plus the test-only expand migrations, one of which
// alters replicas) behind HAProxy, under HTTP load and DERP flows between
// replicas (upgradetest.Roll): runs rolls as they usually go, then runs
// rolls during which a reader holds a lock on replicas for upgradeHold,
// so the migration has to wait in short attempts.
func upgrade(t *testing.T) []Row {
	from := clitest.Release{Commit: clitest.PreviousRelease, Version: "v-old"}
	to := clitest.Release{Version: "v-next", Tags: []string{"upgradetest"}}
	var roll, rollLocked, heartbeat, readyAfter, lost, failed, hbFailures []float64
	packets, requests := 0, int64(0)
	for run := 0; run < runs; run++ {
		for _, hold := range []time.Duration{0, upgradeHold} {
			res := upgradetest.Roll(t, upgradetest.Options{From: from, To: to, HoldLock: hold})
			if hold == 0 {
				roll = append(roll, res.RollTime.Seconds())
			} else {
				rollLocked = append(rollLocked, res.RollTime.Seconds())
				heartbeat = append(heartbeat, ms(res.LongestHeartbeat))
				readyAfter = append(readyAfter, ms(res.ReadyAfterLockRelease))
			}
			lost = append(lost, float64(res.Lost))
			failed = append(failed, float64(res.FailedRequests))
			hbFailures = append(hbFailures, res.HeartbeatFailures)
			packets += res.Packets
			requests += res.Requests
		}
	}
	return []Row{
		summarize(Row{Measurement: "time to roll 3 replicas (41c5966 → next: start new, ready, SIGTERM old with 2 s grace, one at a time)", Unit: "s", Samples: roll}, "lower", 0),
		summarize(Row{Measurement: fmt.Sprintf("time to roll 3 replicas while a reader holds a lock on replicas for %s", upgradeHold), Unit: "s", Samples: rollLocked}, "lower", 0),
		summarize(Row{Measurement: "longest heartbeat delay an old replica saw during the migration (reader holding a lock on replicas)", Unit: "ms", Samples: heartbeat,
			Target: "< 1000 ms", Note: "a heartbeat-shaped UPDATE on replicas every 50 ms while the first new replica migrates; lock_timeout is 500 ms"}, "lower", 1000),
		summarize(Row{Measurement: "new replica ready after the reader's lock is released", Unit: "ms", Samples: readyAfter}, "lower", 0),
		zeroTarget(Row{Measurement: "packets lost between clients of replicas that stay up, per roll", Unit: "packets", Samples: lost,
			Note: fmt.Sprintf("%d packets sent in all rolls", packets)}),
		zeroTarget(Row{Measurement: "failed HTTP requests through HAProxy, per roll", Unit: "requests", Samples: failed,
			Note: fmt.Sprintf("%d requests sent in all rolls", requests)}),
		zeroTarget(Row{Measurement: "heartbeat failures on the old replicas, per roll", Unit: "failures", Samples: hbFailures}),
	}
}

// zeroTarget summarizes a row whose target is none at all: met when every
// run saw 0.
func zeroTarget(r Row) Row {
	r = summarize(r, "lower", 0)
	r.Target = "0"
	r.Met = "yes"
	if r.Max > 0 {
		r.Met = "no"
	}
	return r
}
