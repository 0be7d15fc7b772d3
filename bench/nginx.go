package main

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// nginx as a reverse proxy baseline, configured the way one would to make it fast and
// to keep it comparable to the fasthttp proxies:
//
//   - worker_processes: one per core (2 here). The Go proxies run with GOMAXPROCS = all
//     cores, so each proxy under test may use the whole machine; one nginx worker would
//     cap nginx at one core while the Go proxies get two. -nginx-workers changes it.
//   - listen ... reuseport, so the kernel spreads connections over the workers evenly.
//   - keepalive to the upstream (HTTP/1.1, Connection cleared), as HostClient does, and
//     keepalive_requests high on both sides: fasthttp never closes a busy connection.
//   - no access log (the sidecar writes none either), daemon off, pid, error log and
//     temp paths in the run's temp dir.
const nginxConf = `# Written by the bench harness (bench/nginx.go).
worker_processes WORKERS;
daemon off;
pid PREFIX/nginx.pid;
error_log PREFIX/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path PREFIX/tmp/body;
    proxy_temp_path PREFIX/tmp/proxy;
    fastcgi_temp_path PREFIX/tmp/fastcgi;
    uwsgi_temp_path PREFIX/tmp/uwsgi;
    scgi_temp_path PREFIX/tmp/scgi;
    keepalive_requests 100000000;
    upstream up {
        server UPSTREAM;
        keepalive 256;
        keepalive_requests 100000000;
    }
    server {
        listen LISTEN reuseport backlog=4096;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`

// startNginx writes a configuration into its own temp dir and runs nginx in the
// foreground with it.
func (e *env) startNginx(ctx context.Context) (*proc, error) {
	dir := filepath.Join(e.tmp, "nginx")
	if err := os.MkdirAll(filepath.Join(dir, "tmp"), 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	workers := e.o.NginxWorkers
	if workers <= 0 {
		workers = runtime.NumCPU()
	}
	conf := strings.NewReplacer("WORKERS", strconv.Itoa(workers), "PREFIX", dir, "UPSTREAM", e.up.addr, "LISTEN", addr).Replace(nginxConf)
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	p, err := e.startProc(ctx, "nginx", addr, 0, e.nginx, "-p", dir+"/", "-e", filepath.Join(dir, "error.log"), "-c", path)
	if err != nil {
		return nil, err
	}
	// The master listens before it forks the workers; wait for them so that their CPU
	// is counted.
	for deadline := time.Now().Add(3 * time.Second); len(p.pids) < workers+1 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		p.refreshPids()
	}
	return p, nil
}
