package relayguard

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"time"

	"go.uber.org/zap"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
)

// admitKey is what a verdict is about: the webhook sees both the node key
// and the source address, so it may decide on either.
type admitKey struct {
	node key.NodePublic
	src  netip.Addr
}

// admit decides whether the client in req may connect: with no webhook,
// yes; with a fresh cached verdict, that; else it asks the webhook (one
// call per client at a time) and falls back on a recent admission, then
// on FailOpen, when the webhook cannot answer.
func (g *Guard) admit(req tailcfg.DERPAdmitClientRequest) bool {
	allow, _ := g.decide(req)
	return allow
}

// decide is admit; for an admission taken from the cache, it also returns
// until when that cached verdict is fresh (zero otherwise): the client's
// first re-verification is due by then.
func (g *Guard) decide(req tailcfg.DERPAdmitClientRequest) (allow bool, cachedUntil time.Time) {
	if g.opts.VerifyURL == "" {
		return true, time.Time{}
	}
	k := admitKey{node: req.NodePublic, src: req.Source}
	if allow, until, ok := g.cache.fresh(k, g.clock.Now()); ok {
		g.m.cacheHit.Inc()
		g.count(allow, "cache")
		return allow, until
	}
	g.m.cacheMiss.Inc()
	res, _, _ := g.flight.Do(k.node.String()+"|"+k.src.String(), func() (any, error) {
		return g.askWebhook(k), nil
	})
	return res.(bool), time.Time{}
}

// askWebhook calls the webhook for k and turns its answer, or its failure,
// into a decision.
func (g *Guard) askWebhook(k admitKey) bool {
	allow, err := g.askCtx(context.Background(), k)
	if err == nil {
		g.count(allow, "webhook")
		return allow
	}
	switch {
	case g.cache.stale(k, g.clock.Now()):
		g.count(true, "stale_cache")
		return true
	case g.opts.FailOpen:
		g.count(true, "fail_open")
		return true
	default:
		g.count(false, "fail_closed")
		return false
	}
}

// askCtx calls the webhook about k, records the answer in the cache and
// the webhook's health, and returns it; err is the webhook's failure
// (nothing cached then). Ending ctx abandons the call.
func (g *Guard) askCtx(ctx context.Context, k admitKey) (allow bool, err error) {
	start := g.clock.Now()
	allow, err = g.callWebhook(ctx, k)
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	g.m.webhookSeconds.Observe(g.clock.Since(start).Seconds())
	if err != nil {
		g.m.webhookErrors.Inc()
		g.setHealthy(false, err)
		return false, err
	}
	g.setHealthy(true, nil)
	now := g.clock.Now()
	if allow {
		g.cache.setAllow(k, admitted{freshUntil: now.Add(g.opts.AllowTTL), staleUntil: now.Add(g.opts.StaleTTL)})
	} else {
		g.cache.setDeny(k, now.Add(g.opts.DenyTTL))
	}
	return allow, nil
}

func (g *Guard) callWebhook(ctx context.Context, k admitKey) (bool, error) {
	body, err := json.Marshal(tailcfg.DERPAdmitClientRequest{NodePublic: k.node, Source: k.src})
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, g.opts.WebhookTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, g.opts.VerifyURL, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := g.opts.HTTPClient.Do(req)
	if err != nil {
		// The transport's error quotes the URL, query (a shared secret
		// some webhooks take) included: it is logged, so redact it.
		var uerr *url.Error
		if errors.As(err, &uerr) {
			uerr.URL = redact(uerr.URL)
		}
		return false, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 4<<10))
		return false, fmt.Errorf("%w %s", errWebhookStatus, res.Status)
	}
	var out tailcfg.DERPAdmitClientResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, 4<<10)).Decode(&out); err != nil {
		return false, fmt.Errorf("decode answer: %w", err)
	}
	return out.Allow, nil
}

func (g *Guard) count(allow bool, source string) {
	d := "deny"
	if allow {
		d = "allow"
	}
	g.m.decisions.WithLabelValues(d, source).Inc()
}

// setHealthy records the webhook's health and logs only when it changes.
func (g *Guard) setHealthy(ok bool, err error) {
	g.mu.Lock()
	changed := g.unhealthy == ok
	g.unhealthy = !ok
	g.mu.Unlock()
	if ok {
		g.m.webhookUp.Set(1)
	} else {
		g.m.webhookUp.Set(0)
	}
	if !changed {
		return
	}
	if ok {
		g.log.Info("derp admission webhook is answering again", zap.String("url", redact(g.opts.VerifyURL)))
		return
	}
	g.log.Warn("derp admission webhook is failing: connected clients keep their connections; new clients are admitted only from recent verdicts",
		zap.String("url", redact(g.opts.VerifyURL)), zap.Bool("fail_open", g.opts.FailOpen), zap.Error(err))
}
