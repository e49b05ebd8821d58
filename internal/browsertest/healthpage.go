package browsertest

import (
	"github.com/chromedp/chromedp"
)

// HealthPage is what the /health page shows, read from its DOM (the data-
// attributes and text the page renders), for tests to compare with what the
// API answers.
type HealthPage struct {
	// State is #app's data-state: "signin", "loading" or "cluster".
	State string `json:"state"`
	// Stale is "true" while the last refresh failed (data-stale).
	Stale string `json:"stale"`
	// SignInError and FetchError are the visible alert texts ("" when
	// hidden).
	SignInError string `json:"signinError"`
	FetchError  string `json:"fetchError"`
	// ClusterVisible reports whether the cluster part is shown.
	ClusterVisible bool `json:"clusterVisible"`
	// Refreshes counts the page's completed refreshes (data-refreshes).
	Refreshes int `json:"refreshes"`
	// Healthy is the overall verdict shown ("true", "false", "" when none)
	// and Overall its text.
	Healthy string `json:"healthy"`
	Overall string `json:"overall"`
	// Sections are the health sections in page order.
	Sections []HealthPageSection `json:"sections"`
	// MixedVersions is the visible mixed-versions notice ("" when hidden).
	MixedVersions string `json:"mixedVersions"`
	// Replicas are the rows of the replica table.
	Replicas []HealthPageReplica `json:"replicas"`
	// Cells are the latency matrix's cells, row by row.
	Cells []HealthPageCell `json:"cells"`
	// Token is what the tab keeps in sessionStorage; Cookie is
	// document.cookie; URL is location.href.
	Token  string `json:"token"`
	Cookie string `json:"cookie"`
	URL    string `json:"url"`
	// Markup counts elements inside the page's data areas that only
	// injected HTML could have made (img, script, svg, iframe, b, i, a,
	// object, embed, style, link).
	Markup int `json:"markup"`
	// ScrollWidth and ClientWidth of the document: ScrollWidth >
	// ClientWidth means the page overflows horizontally.
	ScrollWidth int `json:"scrollWidth"`
	ClientWidth int `json:"clientWidth"`
}

// HealthPageSection is one health section as shown.
type HealthPageSection struct {
	Name     string   `json:"name"`
	Healthy  string   `json:"healthy"`
	Warnings []string `json:"warnings"`
}

// HealthPageReplica is one row of the replica table.
type HealthPageReplica struct {
	ID        string   `json:"id"`
	Hostname  string   `json:"hostname"`
	RelayURL  string   `json:"relayURL"`
	Version   string   `json:"version"`
	Mixed     string   `json:"mixed"`
	VersionBG string   `json:"versionBG"`
	Region    string   `json:"region"`
	DBLatency string   `json:"dbLatency"`
	Error     string   `json:"error"`
	Warnings  []string `json:"warnings"`
}

// HealthPageCell is one cell of the latency matrix.
type HealthPageCell struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Kind is "self", "ok", "over" (above the threshold), "error",
	// "pending" (no sample yet) or "unmeasured".
	Kind string `json:"kind"`
	// Text is the visible text; LatencyMS the latency the cell was drawn
	// from (data-latency-ms, 0 when none); Error the error shown.
	Text      string  `json:"text"`
	LatencyMS float64 `json:"latencyMS"`
	Error     string  `json:"error"`
	Title     string  `json:"title"`
	// Background is the computed background colour.
	Background string `json:"background"`
}

// Cell finds the cell from → to (ok false when there is none).
func (p HealthPage) Cell(from, to string) (HealthPageCell, bool) {
	for _, c := range p.Cells {
		if c.From == from && c.To == to {
			return c, true
		}
	}
	return HealthPageCell{}, false
}

// Section finds a section by its API name.
func (p HealthPage) Section(name string) (HealthPageSection, bool) {
	for _, s := range p.Sections {
		if s.Name == name {
			return s, true
		}
	}
	return HealthPageSection{}, false
}

const readHealthPageJS = `(() => {
  const q = (s, root) => (root || document).querySelector(s);
  const qa = (s, root) => Array.from((root || document).querySelectorAll(s));
  const visibleText = (el) => (el && !el.hidden) ? el.textContent : '';
  const app = q('#app');
  const cluster = q('#cluster');
  let token = '';
  try { token = sessionStorage.getItem('coder-health-token') || ''; } catch (e) {}
  return {
    state: app.getAttribute('data-state') || '',
    stale: app.getAttribute('data-stale') || '',
    signinError: visibleText(q('#signin-error')),
    fetchError: visibleText(q('#fetch-error')),
    clusterVisible: !cluster.hidden,
    refreshes: parseInt(q('#refresh').getAttribute('data-refreshes') || '0', 10),
    healthy: q('#overall').getAttribute('data-healthy') || '',
    overall: q('#overall').textContent,
    sections: qa('[data-section]').map((s) => ({
      name: s.getAttribute('data-section'),
      healthy: s.getAttribute('data-healthy'),
      warnings: qa('li[data-warning]', s).map((li) => li.textContent),
    })),
    mixedVersions: visibleText(q('#versions')),
    replicas: qa('#replicas tr[data-replica-id]').map((tr) => {
      const f = (name) => q('td[data-field="' + name + '"]', tr);
      return {
        id: tr.getAttribute('data-replica-id'),
        hostname: f('hostname').textContent,
        relayURL: f('relay_address').textContent,
        version: f('version').textContent,
        mixed: f('version').getAttribute('data-mixed'),
        versionBG: getComputedStyle(f('version').firstElementChild).backgroundColor,
        region: f('region_id').textContent,
        dbLatency: f('database_latency_ms').textContent,
        error: f('error').textContent,
        warnings: qa('li[data-warning]', f('warnings')).map((li) => li.textContent),
      };
    }),
    cells: qa('#matrix td[data-from]').map((td) => ({
      from: td.getAttribute('data-from'),
      to: td.getAttribute('data-to'),
      kind: td.getAttribute('data-kind'),
      text: td.textContent,
      latencyMS: parseFloat(td.getAttribute('data-latency-ms') || '0'),
      error: td.getAttribute('data-error') || '',
      title: td.getAttribute('title') || '',
      background: getComputedStyle(td).backgroundColor,
    })),
    token: token,
    cookie: document.cookie,
    url: location.href,
    markup: qa('#app img, #app script, #app svg, #app iframe, #app b, #app i, #app a, #app object, #app embed, #app style, #app link').length,
    scrollWidth: document.documentElement.scrollWidth,
    clientWidth: document.documentElement.clientWidth,
  };
})()`

// ReadHealthPage reads what the /health page in the tab shows.
func ReadHealthPage(b *Browser) (HealthPage, error) {
	return Eval[HealthPage](b, readHealthPageJS)
}

// SignIn types token into the /health page's password field and clicks
// the form's button, as a person would (chromedp.Submit would call
// form.submit(), which skips the page's submit handler).
func SignIn(b *Browser, token string) error {
	return b.Do(
		chromedp.WaitVisible(chromedp.CSS(`#token`)),
		// chromedp.Clear resets the value attribute, not what was typed.
		chromedp.Evaluate[chromedp.Void](`document.getElementById('token').value = ''`),
		chromedp.SendKeys(chromedp.CSS(`#token`), token),
		chromedp.Click(chromedp.CSS(`#signin-form button[type="submit"]`)),
	)
}
