package replicasync

import (
	"reflect"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database"
)

// Every field of the database's row has a field of the same name and type
// in replicasync's value, and the conversion carries each one: a field
// added to one side and forgotten in the adapter fails here.
func TestPostgresRowsConvertFieldForField(t *testing.T) {
	stopped := time.Date(2026, 1, 1, 0, 0, 3, 0, time.UTC)
	row := database.Replica{
		ID: uuid.New(), CreatedAt: time.Date(2026, 1, 1, 0, 0, 1, 0, time.UTC), StartedAt: time.Date(2026, 1, 1, 0, 0, 2, 0, time.UTC),
		StoppedAt: &stopped, UpdatedAt: time.Date(2026, 1, 1, 0, 0, 4, 0, time.UTC), Hostname: "h", RegionID: 7,
		RelayAddress: "http://r", Version: "v1", DatabaseLatency: 3 * time.Millisecond, Error: "e",
		Peers:    []database.PeerReport{{ID: uuid.New(), LatencyMS: 1.5, Error: "p"}},
		Warnings: []string{"w"}, Live: true,
	}
	assertSameFields(t, reflect.ValueOf(row), reflect.ValueOf(replicaFromRow(row)))

	state := ReplicaState{
		ID: uuid.New(), Hostname: "h", RegionID: 7, RelayAddress: "http://r", Version: "v1",
		DatabaseLatency: 3 * time.Millisecond, Error: "e",
		Peers: []PeerReport{{ID: uuid.New(), LatencyMS: 1.5, Error: "p"}}, Warnings: []string{"w"},
	}
	assertSameFields(t, reflect.ValueOf(state), reflect.ValueOf(stateToRow(state)))
}

// assertSameFields checks that a and b have the same exported fields, by
// name, each set (non-zero) and equal; slices of structs element by
// element.
func assertSameFields(t *testing.T, a, b reflect.Value) {
	t.Helper()
	exported := func(v reflect.Value) map[string]reflect.Value {
		out := map[string]reflect.Value{}
		for i := 0; i < v.NumField(); i++ {
			if f := v.Type().Field(i); f.IsExported() {
				out[f.Name] = v.Field(i)
			}
		}
		return out
	}
	fa, fb := exported(a), exported(b)
	if len(fa) != len(fb) {
		t.Fatalf("%s has %d fields, %s %d", a.Type(), len(fa), b.Type(), len(fb))
	}
	for name, va := range fa {
		vb, ok := fb[name]
		if !ok {
			t.Fatalf("%s.%s has no counterpart in %s", a.Type(), name, b.Type())
		}
		if va.IsZero() {
			t.Fatalf("the test leaves %s.%s unset", a.Type(), name)
		}
		if va.Kind() == reflect.Slice && va.Type().Elem().Kind() == reflect.Struct {
			if va.Len() != vb.Len() {
				t.Fatalf("%s: %d entries became %d", name, va.Len(), vb.Len())
			}
			for i := 0; i < va.Len(); i++ {
				assertSameFields(t, va.Index(i), vb.Index(i))
			}
			continue
		}
		if !reflect.DeepEqual(va.Interface(), vb.Interface()) {
			t.Fatalf("%s: %v became %v", name, va.Interface(), vb.Interface())
		}
	}
}

// The conversion runs on every beat of up to 100 replicas: a member read
// (no latency matrix) converts in one allocation whatever its length, and
// a beat's state (this replica's own matrix row) in one.
func TestPostgresConversionAllocatesOncePerRead(t *testing.T) {
	members := make([]database.Replica, 100)
	for i := range members {
		members[i] = database.Replica{ID: uuid.New(), Hostname: "h", Peers: []database.PeerReport{}, Warnings: []string{}, Live: true}
	}
	if n := testing.AllocsPerRun(20, func() { _ = replicasFromRows(members) }); n != 1 {
		t.Fatalf("converting 100 member rows costs %v allocations, want 1", n)
	}
	converted := replicasFromRows(members)
	if converted[0].Peers == nil || len(converted[0].Peers) != 0 {
		t.Fatalf("an empty matrix row became %#v, want empty and not nil", converted[0].Peers)
	}

	state := ReplicaState{ID: uuid.New(), Peers: make([]PeerReport, 99), Warnings: []string{"w"}}
	if n := testing.AllocsPerRun(20, func() { _ = stateToRow(state) }); n != 1 {
		t.Fatalf("converting a beat's state with 99 peers costs %v allocations, want 1", n)
	}
}
