package quota

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// errConflict is a compare-and-set that lost: someone wrote the key since it was read.
var errConflict = errors.New("quota: the key changed since it was read")

// markerTTL is how long the bucket keeps the marker of a key that its TTL removed.
const markerTTL = time.Minute

// bucket is the opened KV bucket.
type bucket struct {
	name   string
	stream string // KV_<name>
	ttl    bool   // the stream takes per-message TTLs: keys of past windows expire
	kv     jetstream.KeyValue
}

// openBucket opens the bucket, creating it when it does not exist, with per-key TTLs
// when the server supports them.
func (m *Manager) openBucket(ctx context.Context) (*bucket, error) {
	m.bucketMu.Lock()
	defer m.bucketMu.Unlock()
	if m.bkt != nil {
		return m.bkt, nil
	}
	name := m.opts.Bucket
	b := &bucket{name: name, stream: "KV_" + name}
	kv, err := m.js.KeyValue(ctx, name)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		cfg := jetstream.KeyValueConfig{
			Bucket:         name,
			Description:    "gatehouse fleet quota leases, one key per customer, feature and window",
			History:        1,
			Storage:        jetstream.FileStorage,
			Replicas:       m.opts.Replicas,
			LimitMarkerTTL: markerTTL,
		}
		kv, err = m.js.CreateKeyValue(ctx, cfg)
		if errors.Is(err, jetstream.ErrLimitMarkerTTLNotSupported) {
			cfg.LimitMarkerTTL = 0
			kv, err = m.js.CreateKeyValue(ctx, cfg)
		}
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = m.js.KeyValue(ctx, name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", name, err)
	}
	st, err := m.js.Stream(ctx, b.stream)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", name, err)
	}
	b.kv, b.ttl = kv, st.CachedInfo().Config.AllowMsgTTL
	if !b.ttl {
		m.log.Warn("the quota bucket takes no per-key TTL: keys of past windows are deleted by the sidecars that held them",
			zap.String("bucket", name))
	}
	m.bkt = b
	return b, nil
}

func (b *bucket) subject(key string) string { return "$KV." + b.name + "." + key }

// msgGetResponse is the JetStream API's answer to STREAM.MSG.GET.
type msgGetResponse struct {
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
	Message *struct {
		Seq  uint64 `json:"seq"`
		Hdrs []byte `json:"hdrs"`
		Data []byte `json:"data"`
	} `json:"message"`
}

// read returns the key's current value and revision, nil and the revision of the last
// delete marker (0 when there was never one) when the key holds no value.
func (m *Manager) read(ctx context.Context, b *bucket, key string) (*Value, uint64, error) {
	raw, rev, err := m.readRaw(ctx, b, key)
	if err != nil || raw == nil {
		return nil, rev, err
	}
	v, err := decodeValue(raw)
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", key, err)
	}
	return v, rev, nil
}

// readRaw returns the bytes of the key's current value and its revision, nil and the
// revision of the last delete marker (0 when there was never one) when the key holds
// no value. It asks the stream leader, not a direct-get replica, so that what it
// returns is never older than a write this sidecar saw acknowledged.
func (m *Manager) readRaw(ctx context.Context, b *bucket, key string) ([]byte, uint64, error) {
	req, _ := json.Marshal(struct {
		LastBySubj string `json:"last_by_subj"`
	}{b.subject(key)})
	msg, err := m.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+b.stream, req)
	if err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", key, err)
	}
	var resp msgGetResponse
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return nil, 0, fmt.Errorf("read %s: %w", key, err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrCode == int(jetstream.JSErrCodeMessageNotFound):
		return nil, 0, nil
	case resp.Error != nil:
		return nil, 0, fmt.Errorf("read %s: %s (%d)", key, resp.Error.Description, resp.Error.ErrCode)
	case resp.Message == nil:
		return nil, 0, fmt.Errorf("read %s: empty answer", key)
	}
	if len(resp.Message.Hdrs) > 0 {
		h, err := nats.DecodeHeadersMsg(resp.Message.Hdrs)
		if err != nil {
			return nil, 0, fmt.Errorf("read %s: %w", key, err)
		}
		if h.Get("KV-Operation") != "" || h.Get("Nats-Marker-Reason") != "" {
			return nil, resp.Message.Seq, nil // deleted, purged or expired
		}
	}
	if resp.Message.Data == nil {
		resp.Message.Data = []byte{}
	}
	return resp.Message.Data, resp.Message.Seq, nil
}

// write stores v under key if the key's revision is still rev (0: the key never
// existed), with a TTL that removes it retention after its window ends. It returns the
// new revision, or errConflict.
func (m *Manager) write(ctx context.Context, b *bucket, key string, v *Value, rev uint64, end int64) (uint64, error) {
	var ttl time.Duration
	if v.WindowEnd != nil {
		ttl = time.Unix(0, end).Add(m.opts.Retention).Sub(m.now())
	}
	return m.writeRaw(ctx, b, key, v.encode(), rev, ttl)
}

// writeRaw stores data under key if the key's revision is still rev, removed by the
// bucket after ttl (at least 1s) when ttl > 0 and the bucket takes TTLs.
func (m *Manager) writeRaw(ctx context.Context, b *bucket, key string, data []byte, rev uint64, ttl time.Duration) (uint64, error) {
	opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(rev)}
	if b.ttl && ttl > 0 {
		opts = append(opts, jetstream.WithMsgTTL(max(ttl, time.Second).Round(time.Second)))
	}
	ack, err := m.js.PublishMsg(ctx, &nats.Msg{Subject: b.subject(key), Data: data}, opts...)
	if err != nil {
		var apiErr *jetstream.APIError
		if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
			return 0, errConflict
		}
		return 0, fmt.Errorf("write %s: %w", key, err)
	}
	return ack.Sequence, nil
}
