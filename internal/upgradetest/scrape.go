// Reading the replicas' /metrics pages and the database's applied
// migrations.

package upgradetest

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/dbtest"
)

// scrapeSum is the sum of every series of name on a /metrics page.
func scrapeSum(url, name string) float64 {
	var sum float64
	for _, v := range scrape(url, name, "") {
		sum += v
	}
	return sum
}

// scrapeLabels is name's series by the value of label.
func scrapeLabels(url, name, label string) map[string]float64 {
	return scrape(url, name, label)
}

func scrape(url, name, label string) map[string]float64 {
	out := map[string]float64{}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get(url)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			continue
		}
		key := ""
		if label != "" {
			if i := strings.Index(line, label+`="`); i >= 0 {
				rest := line[i+len(label)+2:]
				key = rest[:strings.IndexByte(rest, '"')]
			}
		}
		out[key] += v
	}
	return out
}

// appliedCounts is how often goose_db_version records each version.
func appliedCounts(t testing.TB, pg string) map[int64]int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(context.Background())
	return dbtest.AppliedCounts(t, c)
}
