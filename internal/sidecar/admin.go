package sidecar

import (
	"context"
	"net"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// adminServer serves health, readiness and metrics on the admin listener.
type adminServer struct {
	s   *Sidecar
	srv *http.Server
}

func newAdmin(s *Sidecar) *adminServer {
	a := &adminServer{s: s}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", a.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{}))
	a.srv = &http.Server{Handler: mux}
	return a
}

func (a *adminServer) readyz(w http.ResponseWriter, _ *http.Request) {
	if !a.s.Source.Ready() {
		w.WriteHeader(http.StatusServiceUnavailable)
		w.Write([]byte("not ready: entitlements not synced yet\n"))
		return
	}
	w.Write([]byte("ready\n"))
}

func (a *adminServer) serve(ln net.Listener) error {
	err := a.srv.Serve(ln)
	if err == http.ErrServerClosed {
		return nil
	}
	return err
}

func (a *adminServer) shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }
