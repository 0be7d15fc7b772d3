package natsd

import (
	"context"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestEmbeddedKeepsDataAcrossRestarts(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	for _, listen := range []string{"127.0.0.1:0", "127.0.0.1:-1"} {
		c, err := Connect(ctx, Options{DataDir: dir, EmbeddedListen: listen, Log: testutil.Logger(t)})
		if err != nil {
			t.Fatalf("listen %s: %v", listen, err)
		}
		if !c.Embedded() || c.ClientURL() == "" || c.ClientURL() == "nats://127.0.0.1:4222" {
			t.Errorf("listen %s: embedded %v, url %q", listen, c.Embedded(), c.ClientURL())
		}
		kv, err := c.JS().CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "t"})
		if err != nil {
			t.Fatal(err)
		}
		if e, err := kv.Get(ctx, "k"); err == nil {
			if string(e.Value()) != "v" {
				t.Errorf("value after restart: %q", e.Value())
			}
		} else if _, err := kv.Put(ctx, "k", []byte("v")); err != nil {
			t.Fatal(err)
		}

		// Other sidecars and the control plane reach it over TCP on loopback.
		other, err := nats.Connect(c.ClientURL())
		if err != nil {
			t.Fatalf("connect to %s: %v", c.ClientURL(), err)
		}
		other.Close()

		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("second close: %v", err)
		}
	}
	// The second round found the value: the data dir kept it.
}

func TestRemoteReconnectsForever(t *testing.T) {
	t.Parallel()
	n := testutil.StartNATS(t)
	url := n.URL()
	n.Shutdown()
	// Connect returns at once while the server is away.
	c, err := Connect(context.Background(), Options{
		URLs: []string{url}, Log: testutil.Logger(t),
		PingInterval: 100 * time.Millisecond, reconnectWait: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.NC().IsConnected() {
		t.Fatal("connected to a server that is down")
	}
	n.Restart()
	waitFor(t, "connect", c.NC().IsConnected)
	n.Restart()
	waitFor(t, "reconnect", func() bool { return c.NC().IsConnected() && c.NC().Reconnects > 0 })
	if c.ClientURL() == "" {
		t.Error("no client url while connected")
	}
}

func TestBadOptions(t *testing.T) {
	t.Parallel()
	for _, o := range []Options{
		{},                                     // embedded without a data dir
		{DataDir: "x", EmbeddedListen: "nope"}, // no port
		{URLs: []string{"nats://127.0.0.1:1"}, Credentials: "/does/not/exist.creds"},
		{URLs: []string{"nats://127.0.0.1:1"}, FailFast: true}, // nothing listens there
	} {
		if c, err := Connect(context.Background(), o); err == nil {
			c.Close()
			t.Errorf("Connect(%+v) succeeded", o)
		}
	}
}
