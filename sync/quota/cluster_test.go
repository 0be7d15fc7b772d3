package quota_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/quota"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestFleetCluster is TestFleet on a 3-node NATS cluster whose buckets have 3
// replicas, with the node that leads the quota bucket stopped midway: never more than
// the limit, and exactly the limit since every sidecar stays up.
func TestFleetCluster(t *testing.T) {
	c := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	js := c.js(t)
	for _, cfg := range []jetstream.KeyValueConfig{
		{Bucket: replica.DefaultBucket, History: 1, Storage: jetstream.FileStorage, Replicas: 3, MaxValueSize: limiter.MaxSnapshotBytes},
		{Bucket: quota.DefaultBucket, History: 1, Storage: jetstream.FileStorage, Replicas: 3, LimitMarkerTTL: time.Minute},
	} {
		// The cluster may not have placed every peer in JetStream's meta group yet:
		// retry "no suitable peers" until the deadline.
		for {
			_, err := js.CreateKeyValue(ctx, cfg)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("create bucket %s: %v", cfg.Bucket, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	f := newFleet(t, c.urls(), 4, []*limiter.Snapshot{fleetSnap(t, fleetLimit)}, func(cfg *config.Config) {
		cfg.Quota.Replicas, cfg.Usage.StreamReplicas = 3, 3
		noUsage(cfg)
	})
	var once sync.Once
	stopped := ""
	r := f.run("/v1/calls", fleetClients, fleetAttempts, func(int64) {
		if f.up.served.Load() >= fleetLimit/2 {
			once.Do(func() { stopped = c.stopLeader(t, "KV_"+quota.DefaultBucket) })
		}
	})
	served := f.up.served.Load()
	t.Logf("%v; stopped %s, the quota bucket's leader; refills %v; upstream served %d", r, stopped, f.refills(), served)
	if served > fleetLimit {
		t.Errorf("upstream served %d, over the limit of %d", served, fleetLimit)
	}
	// While the leader is away, a refill can outlast quota.wait: its request is refused
	// with 503 (the route's on_unavailable policy) and the grant it was waiting for may
	// land after the request gave up, so the fleet can end the 20,000 attempts a few
	// units short (seen once under a loaded CI). Those units are held, not lost: a few
	// more requests spend them, and never one more than the limit.
	admitted := r.ok.Load()
	for round := 0; served < fleetLimit && round < 20; round++ {
		more := f.run("/v1/calls", 8, 64, nil)
		admitted += more.ok.Load()
		served = f.up.served.Load()
	}
	if short := fleetLimit - r.ok.Load(); short > 0 {
		t.Logf("after the 20,000 attempts %d units were still held by sidecars; %d more requests admitted", short, admitted-r.ok.Load())
	}
	if served != fleetLimit || admitted != fleetLimit {
		t.Errorf("upstream served %d, clients saw %d admitted: want exactly %d, every sidecar being up", served, admitted, fleetLimit)
	}
}

// cluster is NATS servers clustered on loopback, with JetStream.
type cluster struct {
	servers []*server.Server
}

func startCluster(t testing.TB, n int) *cluster {
	t.Helper()
	ports := make([]int, n)
	routes := make([]string, n)
	for i := range ports {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		routes[i] = fmt.Sprintf("nats-route://127.0.0.1:%d", ports[i])
	}
	c := &cluster{}
	for i := range n {
		o := &server.Options{
			ServerName: fmt.Sprintf("n%d", i), Host: "127.0.0.1", Port: -1,
			JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, MaxPayload: 8 << 20,
			Cluster: server.ClusterOpts{Name: "gatehouse-test", Host: "127.0.0.1", Port: ports[i]},
			Routes:  server.RoutesFromStr(strings.Join(routes, ",")),
		}
		s, err := server.NewServer(o)
		if err != nil {
			t.Fatal(err)
		}
		s.Start()
		c.servers = append(c.servers, s)
		t.Cleanup(func() { s.Shutdown(); s.WaitForShutdown() })
	}
	for _, s := range c.servers {
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats-server not ready")
		}
	}
	eventually(t, "a JetStream meta leader", func() bool {
		for _, s := range c.servers {
			if s.JetStreamIsLeader() {
				return true
			}
		}
		return false
	})
	return c
}

func (c *cluster) urls() []string {
	var out []string
	for _, s := range c.servers {
		out = append(out, s.ClientURL())
	}
	return out
}

func (c *cluster) js(t testing.TB) jetstream.JetStream {
	nc, err := nats.Connect(strings.Join(c.urls(), ","))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// stopLeader stops the server that leads stream (any server when none does) and
// returns its name.
func (c *cluster) stopLeader(t testing.TB, stream string) string {
	victim := c.servers[0]
	for _, s := range c.servers {
		if s.JetStreamIsStreamLeader("$G", stream) {
			victim = s
		}
	}
	victim.Shutdown()
	return victim.Name()
}
