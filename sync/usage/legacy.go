package usage

import (
	"fmt"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// migrateBatches moves the outbox batches an earlier version kept in Badger (u/o/b/<seq>
// at or above u/s/floor; those below are in messages) into folded totals (u/o/k/), which
// the next cut takes first, and then deletes the batches. Each transaction adds some
// batches to the totals and raises u/s/floor past them, so that a crash midway neither
// loses nor doubles usage: the batches' usage is in exactly one of the two places at
// every moment, as Restore requires.
func (r *Recorder) migrateBatches() error {
	ops := int(min(r.db.MaxBatchCount()/2, 20000))
	migrated := 0
	for {
		var floor uint64
		changed := make(map[limiter.CounterKey]*delta)
		var maxSeq uint64
		err := r.db.View(func(txn *badger.Txn) error {
			if err := getValue(txn, keyFloor, func(v []byte) (err error) { floor, err = decodeU64(v); return err }); err != nil {
				return err
			}
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBatch), PrefetchValues: true, PrefetchSize: 64})
			defer it.Close()
			for it.Seek(batchKey(nil, floor)); it.Valid(); it.Next() {
				if len(changed) >= ops {
					break // the rest in the next transaction
				}
				item := it.Item()
				err := item.Value(func(v []byte) error {
					return decodeBatch(v, func(k limiter.CounterKey, d delta) {
						t := changed[k]
						if t == nil {
							t = &delta{}
							changed[k] = t
						}
						t.add(&d)
					})
				})
				if err != nil {
					return fmt.Errorf("outbox batch %d: %w", batchSeq(item.Key()), err)
				}
				maxSeq = batchSeq(item.Key())
			}
			for k, d := range changed { // onto the totals already there
				err := getValue(txn, string(appendCK([]byte(prefixTotal), &k)), func(v []byte) error {
					old, err := decodeTotal(v)
					d.add(&old)
					return err
				})
				if err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(changed) == 0 {
			break
		}
		err = r.update(func(txn *badger.Txn) error {
			for k, d := range changed {
				if err := txn.Set(appendCK([]byte(prefixTotal), &k), appendTotal(nil, d)); err != nil {
					return err
				}
			}
			return txn.Set([]byte(keyFloor), encodeU64(maxSeq+1))
		})
		if err != nil {
			return err
		}
		migrated++
	}
	// Every batch is below the floor now: delete them all, then the floor.
	var keys [][]byte
	err := r.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBatch)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			keys = append(keys, it.Item().KeyCopy(nil))
		}
		return nil
	})
	if err != nil || len(keys) == 0 && migrated == 0 {
		return err
	}
	wb := r.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range keys {
		if err := wb.Delete(k); err != nil {
			return err
		}
	}
	if err := wb.Flush(); err != nil {
		return err
	}
	// The floor goes last: with it, batches a crash left undeleted are ignored.
	if err := r.update(func(txn *badger.Txn) error { return txn.Delete([]byte(keyFloor)) }); err != nil {
		return err
	}
	r.log.Info("usage outbox batches of an earlier version moved into per-key totals", zap.Int("batches_deleted", len(keys)))
	return nil
}
