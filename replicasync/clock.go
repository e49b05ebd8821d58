// This file holds the offset clock (--debug-clock-offset).

package replicasync

import (
	"time"

	"github.com/coder/quartz"
)

// OffsetClock is base with Now shifted by offset: a machine whose clock is
// wrong (--debug-clock-offset). Tickers and timers run at base's pace.
func OffsetClock(base quartz.Clock, offset time.Duration) quartz.Clock {
	return offsetClock{Clock: base, offset: offset}
}

type offsetClock struct {
	quartz.Clock
	offset time.Duration
}

func (c offsetClock) Now(tags ...string) time.Time { return c.Clock.Now(tags...).Add(c.offset) }

func (c offsetClock) Since(t time.Time, tags ...string) time.Duration { return c.Now(tags...).Sub(t) }

func (c offsetClock) Until(t time.Time, tags ...string) time.Duration { return t.Sub(c.Now(tags...)) }
