package main

import (
	"context"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
)

// configPollInterval is how often serve looks at its configuration file for changes.
const configPollInterval = time.Second

// startReloader reloads sc's configuration from path on SIGHUP and whenever the file
// changes, until ctx is done. The returned func waits for it to stop; call it after
// ctx is done.
func startReloader(ctx context.Context, sc *sidecar.Sidecar, path string) (wait func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		sc.WatchConfig(ctx, path, configPollInterval)
	}()
	go func() {
		defer wg.Done()
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				_ = sc.ReloadFile(path) // logged and counted by the sidecar
			}
		}
	}()
	return wg.Wait
}
