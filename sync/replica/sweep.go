package replica

import (
	"bytes"
	"slices"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/sync/store"
)

// keySet is the set of KV keys that a full sync received before its end-of-initial-values
// marker: one arena and sorted offsets, about 8 bytes plus the key per key (some 20 MiB
// for a million customers), exact, and gone when the sweep is done.
type keySet struct {
	arena []byte
	refs  []uint64 // offset<<16 | length
}

func (s *keySet) add(k string) {
	s.refs = append(s.refs, uint64(len(s.arena))<<16|uint64(len(k)))
	s.arena = append(s.arena, k...)
}

func (s *keySet) sort() {
	slices.SortFunc(s.refs, func(a, b uint64) int {
		return bytes.Compare(s.arena[a>>16:a>>16+a&0xffff], s.arena[b>>16:b>>16+b&0xffff])
	})
}

// has reports whether k is in the set; sort first.
func (s *keySet) has(k []byte) bool {
	_, ok := slices.BinarySearchFunc(s.refs, k, func(ref uint64, k []byte) int {
		return bytes.Compare(s.arena[ref>>16:ref>>16+ref&0xffff], k)
	})
	return ok
}

// sweep removes every KV key the replica holds that is not in seen, with its customer,
// in transactions of up to maxBatch keys. It runs at the end of a full sync's initial
// values, so seen holds every key the bucket had when the watch began; keys created
// since arrive after the marker and are applied after the sweep.
func (r *Replica) sweep(seen *keySet) error {
	seen.sort()
	prefix := []byte(store.PrefixSubject)
	from := prefix
	for {
		var gone []string
		err := r.db.View(func(txn *badger.Txn) error {
			opts := badger.DefaultIteratorOptions
			opts.PrefetchValues = false
			opts.Prefix = prefix
			it := txn.NewIterator(opts)
			defer it.Close()
			for it.Seek(from); it.Valid(); it.Next() {
				k := it.Item().Key()[len(prefix):]
				if !seen.has(k) {
					gone = append(gone, string(k))
					if len(gone) == r.maxBatch {
						break
					}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(gone) == 0 {
			return nil
		}
		if err := r.remove(gone); err != nil {
			return err
		}
		if len(gone) < r.maxBatch {
			return nil
		}
		from = subjKey(gone[len(gone)-1] + "\x00")
	}
}

// remove forgets KV keys that are absent upstream, revoking their customers.
func (r *Replica) remove(keys []string) error {
	pos := r.pos
	var effects []effect
	err := r.db.Update(func(txn *badger.Txn) error {
		for _, key := range keys {
			if err := txn.Delete(subjKey(key)); err != nil {
				return err
			}
			pos.Subjects--
			id, err := CustomerIDFromKey(key)
			if err != nil {
				continue
			}
			old, err := getEnt(txn, id)
			if err != nil {
				return err
			}
			if old == nil {
				continue
			}
			ef := effect{id: id, hadOld: true, oldRaw: old, oldKeys: apiKeysOf(old), swept: true}
			if err := txn.Delete(entKey(id)); err != nil {
				return err
			}
			if err := r.reindex(txn, id, ef.oldKeys, nil); err != nil {
				return err
			}
			pos.Customers--
			effects = append(effects, ef)
		}
		return setPosition(txn, &pos)
	})
	if err != nil {
		return err
	}
	r.pos = pos
	for i := range effects {
		r.effect(&effects[i])
	}
	r.publish() // after the effects: a reader that sees the revision sees its changes
	return nil
}
