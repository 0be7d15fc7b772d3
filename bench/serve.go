package main

import (
	"context"
	"fmt"
	"io"
)

// serveOnly (-serve) starts steady's targets and waits for Ctrl-C, printing the wrk
// commands that cross-check the harness's figures with an independent generator.
func serveOnly(ctx context.Context, o *options, w io.Writer) error {
	e, err := newEnv(ctx, o, w)
	if err != nil {
		return err
	}
	defer e.close()
	ts, err := startSteadyTargets(ctx, e)
	if err != nil {
		return err
	}
	defer ts.stop(e)
	wl := steadyWorkload(o.Customers)
	if err := steadySanity(wl, nil, ts.sidecar, ts.bare, ts.bareB, ts.nginx, e.up); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nServing steady's targets (%d customers) until Ctrl-C. Logs and configs: %s\n\n", o.Customers, e.tmp)
	for _, p := range nonNil(ts.sidecar, ts.bare, ts.bareB, ts.nginx, e.up) {
		fmt.Fprintf(w, "  %-9s http://%s\n", p.name, p.addr)
	}
	fmt.Fprintf(w, "\nCross-check with wrk (one thread, like the harness's generator with -gen-procs 1):\n\n")
	for _, p := range nonNil(ts.sidecar, ts.bare, ts.nginx) {
		fmt.Fprintf(w, "  CUSTOMERS=%d wrk -t1 -c%d -d10s -s %s/bench/wrk/steady.lua http://%s\n", o.Customers, o.Conns, e.root, p.addr)
	}
	<-ctx.Done()
	return nil
}
