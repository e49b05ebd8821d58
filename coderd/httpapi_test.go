package coderd

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"

	"github.com/google/uuid"
)

// The replica list is written row by row; it must still be one valid JSON
// array with every row and field, empty or large.
func TestReplicaListIsOneJSONArrayRowByRow(t *testing.T) {
	t.Parallel()
	for _, n := range []int{0, 1, 100} {
		rows := make([]Replica, n)
		for i := range rows {
			rows[i] = Replica{ID: uuid.New(), Hostname: "r", Warnings: []string{"w"}}
			for j := 0; j < n; j++ {
				rows[i].Peers = append(rows[i].Peers, ReplicaPeer{ID: uuid.New(), LatencyMS: 0.5})
			}
		}
		rec := httptest.NewRecorder()
		writeJSONList(rec, http.StatusOK, rows)
		if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("n=%d: status %d, content type %q", n, rec.Code, rec.Header().Get("Content-Type"))
		}
		var got []Replica
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("n=%d: not one JSON array: %v\n%.200s", n, err, rec.Body.String())
		}
		if len(got) != n || (n > 0 && !reflect.DeepEqual(got, rows)) {
			t.Fatalf("n=%d: %d rows came back, or different ones", n, len(got))
		}
	}
}
