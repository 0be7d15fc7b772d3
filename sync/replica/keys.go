package replica

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
)

// KV key encoding. A KV key may hold only [-/_=.a-zA-Z0-9] and is a NATS subject, so it
// may not start or end with '.' nor hold "..". A customer id is 1 to 256 visible ASCII
// bytes (limiter.CheckCustomerID). Each id has exactly one key:
//
//	"c." + id                          when every byte of id is in [-/_=.a-zA-Z0-9] and id
//	                                   neither starts nor ends with '.' nor holds ".."
//	"b." + base64url(id), no padding   otherwise
//
// A key in any other form, or a non-canonical one (a "b." key for an id that has a "c."
// form), names no customer: its values are rejected.
const (
	plainPrefix  = "c."
	base64Prefix = "b."
)

var b64 = base64.RawURLEncoding

// KeyFor returns the KV key of a customer id. The id must pass limiter.CheckCustomerID.
func KeyFor(customerID string) string {
	if plainSafe(customerID) {
		return plainPrefix + customerID
	}
	return base64Prefix + b64.EncodeToString([]byte(customerID))
}

// CustomerIDFromKey returns the customer id that a KV key names, or an error when the key
// is not the canonical key of a valid customer id.
func CustomerIDFromKey(key string) (string, error) {
	var id string
	switch {
	case len(key) > len(plainPrefix) && key[:len(plainPrefix)] == plainPrefix:
		id = key[len(plainPrefix):]
		if !plainSafe(id) {
			return "", fmt.Errorf("key %q: not a canonical customer key", key)
		}
	case len(key) > len(base64Prefix) && key[:len(base64Prefix)] == base64Prefix:
		b, err := b64.DecodeString(key[len(base64Prefix):])
		if err != nil {
			return "", fmt.Errorf("key %q: %w", key, err)
		}
		id = string(b)
		if plainSafe(id) {
			return "", fmt.Errorf("key %q: not canonical: customer %q has key %q", key, id, KeyFor(id))
		}
		if KeyFor(id) != key {
			return "", fmt.Errorf("key %q: not canonical base64", key)
		}
	default:
		return "", fmt.Errorf("key %q: customer keys start with %q or %q", key, plainPrefix, base64Prefix)
	}
	if err := limiter.CheckCustomerID(id); err != nil {
		return "", fmt.Errorf("key %q: customer id %w", key, err)
	}
	return id, nil
}

func plainSafe(id string) bool {
	if id == "" || id[0] == '.' || id[len(id)-1] == '.' {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '/', c == '_', c == '=':
		case c == '.':
			if id[i-1] == '.' {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// Badger keys (see package store for the layout).

func entKey(id string) []byte { return append([]byte(store.PrefixEntitlement), id...) }

func apiKeyKey(sum *[sha256.Size]byte) []byte {
	return append([]byte(store.PrefixAPIKey), sum[:]...)
}

func subjKey(kvKey string) []byte { return append([]byte(store.PrefixSubject), kvKey...) }

// subject kinds: the state of a KV key as the replica last saw it.
const (
	kindLive     byte = 'L' // its latest value is the snapshot under e/
	kindDeleted  byte = 'D' // deleted or purged
	kindRejected byte = 'R' // its latest value was rejected; e/ keeps the last good one, if any
)

type subjState struct {
	kind byte
	rev  uint64
}

func (s subjState) encode() []byte {
	b := make([]byte, 9)
	b[0] = s.kind
	binary.BigEndian.PutUint64(b[1:], s.rev)
	return b
}

func decodeSubj(b []byte) (subjState, error) {
	if len(b) != 9 {
		return subjState{}, errors.New("subject state: bad length")
	}
	return subjState{kind: b[0], rev: binary.BigEndian.Uint64(b[1:])}, nil
}

// encodeEnt is the e/ value: the revision, then the snapshot JSON as received.
func encodeEnt(rev uint64, raw []byte) []byte {
	b := make([]byte, 8+len(raw))
	binary.BigEndian.PutUint64(b, rev)
	copy(b[8:], raw)
	return b
}

func decodeEnt(b []byte) (rev uint64, raw []byte, err error) {
	if len(b) < 8 {
		return 0, nil, errors.New("entitlement value: too short")
	}
	return binary.BigEndian.Uint64(b), b[8:], nil
}
