// Command natssrv is the bench harness's standalone NATS server: a nats-server with
// JetStream on file storage, in a process of its own, so that the outage scenario can
// stop it while a sidecar serves and start it again on the same address and store. A
// sidecar's embedded server cannot be stopped apart from the sidecar.
//
//	natssrv -listen 127.0.0.1:4222 -store /tmp/x/nats
//
// It serves until SIGTERM or SIGINT and then shuts down cleanly; SIGKILL is a crash,
// after which JetStream recovers its store on the next start.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:4222", "client address")
	store := flag.String("store", "", "JetStream store directory (required)")
	flag.Parse()
	if err := run(*listen, *store); err != nil {
		fmt.Fprintln(os.Stderr, "natssrv:", err)
		os.Exit(1)
	}
}

func run(listen, store string) error {
	if store == "" {
		return errors.New("-store is required")
	}
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port <= 0 {
		return fmt.Errorf("-listen %q: give a port", listen)
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "bench-nats",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   store,
		// As gatehouse's embedded server: snapshots up to 1 MiB travel with headers.
		MaxPayload:             8 << 20,
		NoSigs:                 true,
		DisableJetStreamBanner: true,
	})
	if err != nil {
		return err
	}
	s.ConfigureLogger()
	s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return fmt.Errorf("not ready for connections on %s after 30s", listen)
	}
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	<-c
	s.Shutdown()
	s.WaitForShutdown()
	return nil
}
