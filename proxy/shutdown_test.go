package proxy

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// TestShutdownRacesServe: a Shutdown that comes before Serve has started (a signal at
// start-up) still stops it. fasthttp alone would serve such a listener for ever.
func TestShutdownRacesServe(t *testing.T) {
	cfg := testConfig(testRoutes()...)
	cfg.Upstream.URL = "http://" + closedAddr(t)
	for i := range 50 {
		p, err := New(Options{Config: cfg, Source: limiter.NewMemorySource(), Limiter: limiter.New(), Log: testutil.Logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		ln, err := Listen("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		start := func() { served <- p.Serve(ln) }
		if i%2 == 0 {
			go start() // Shutdown may come before, during or after Serve's start
		}
		if err := p.Shutdown(context.Background()); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		if i%2 == 1 {
			go start() // Serve after Shutdown
		}
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: Serve still running 5 s after Shutdown", i)
		}
		if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
			c.Close()
			t.Fatalf("round %d: the listener still accepts connections after Shutdown", i)
		}
	}
}
