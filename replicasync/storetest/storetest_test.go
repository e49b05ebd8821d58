package storetest_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/replicasync"
	"github.com/coder-ha/coder/replicasync/storetest"
)

func TestMain(m *testing.M) { dbtest.MainLeakChecked(m) }

func TestMemoryStorePassesTheContract(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		s := storetest.NewMemory(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		return storetest.Harness{Store: s, Advance: s.Advance, Delete: s.DeleteReplica, StaleAfter: 15 * time.Second}
	})
}

func TestPostgresStorePassesTheContract(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Harness {
		db := dbtest.NewDB(t)
		return storetest.Harness{
			Store:      replicasync.NewPostgresStore(db),
			Advance:    time.Sleep, // the database's clock cannot be stepped
			StaleAfter: 300 * time.Millisecond,
			Delete: func(id uuid.UUID) {
				if err := db.DeleteReplica(context.Background(), id); err != nil {
					t.Fatal(err)
				}
			},
		}
	})
}
