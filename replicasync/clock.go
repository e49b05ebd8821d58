package replicasync

import "time"

// Clock is the Manager's local time: it times measurements (probe and
// database round trips) and paces the loops. It never decides whether a
// replica is alive: every liveness time is the database's now(), so a
// Clock that is hours off changes nothing about membership.
//
// A Clock that also implements TickerClock paces the heartbeat, the retry
// during an outage and the retention cleanup, so tests can step beats by
// hand. Any other Clock gets real tickers.
type Clock interface {
	Now() time.Time
}

// TickerClock is a Clock that also makes the Manager's tickers.
type TickerClock interface {
	Clock
	// NewTicker behaves like time.NewTicker: a tick is dropped, never
	// queued, when the previous one was not taken yet.
	NewTicker(d time.Duration) Ticker
}

// Ticker is what a TickerClock returns.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

// RealClock is the machine's clock. It is the default.
type RealClock struct{}

// Now is time.Now.
func (RealClock) Now() time.Time { return time.Now() }

// NewTicker is time.NewTicker.
func (RealClock) NewTicker(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }

type realTicker struct{ t *time.Ticker }

func (t realTicker) C() <-chan time.Time { return t.t.C }
func (t realTicker) Stop()               { t.t.Stop() }

// newTicker makes a ticker from c if it can, from the real clock if not.
func newTicker(c Clock, d time.Duration) Ticker {
	if tc, ok := c.(TickerClock); ok {
		return tc.NewTicker(d)
	}
	return RealClock{}.NewTicker(d)
}

// since is c.Now() - t. With the real clock (or one offset from it by a
// constant) this is the monotonic elapsed time.
func since(c Clock, t time.Time) time.Duration { return c.Now().Sub(t) }
