// Command benchsrv is the bench harness's helper process: the upstream that every
// target forwards to, and the bare fasthttp reverse proxy that is the ceiling for any
// fasthttp sidecar. It runs as its own process so that it shares no Go runtime with the
// load generator or with the proxy under test.
//
//	benchsrv -role upstream -listen 127.0.0.1:9000
//	benchsrv -role bare -listen 127.0.0.1:9001 -upstream 127.0.0.1:9000
//
// The bare proxy does what any correct reverse proxy must and nothing else: it drops
// hop-by-hop headers both ways, sets X-Forwarded-For, and forwards with the same
// fasthttp.Server and fasthttp.HostClient settings as gatehouse's proxy package
// (config.Default values). It checks nothing. It must not grow features: it is a
// baseline.
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

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/valyala/fasthttp"
)

func main() {
	role := flag.String("role", "", "upstream | bare")
	listen := flag.String("listen", "127.0.0.1:0", "listen address")
	upstream := flag.String("upstream", "", "bare: upstream host:port")
	flag.Parse()
	if err := run(*role, *listen, *upstream); err != nil {
		fmt.Fprintln(os.Stderr, "benchsrv:", err)
		os.Exit(1)
	}
}

func run(role, listen, upstream string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	var s *fasthttp.Server
	switch role {
	case "upstream":
		// The same server as echo.Serve(ln, true): the cheapest honest upstream.
		s = &fasthttp.Server{Handler: echo.FastHandler, Name: "echo", NoDefaultDate: true}
	case "bare":
		if upstream == "" {
			return errors.New("-upstream is required for -role bare")
		}
		s = bareProxy(upstream)
	default:
		return fmt.Errorf("unknown -role %q", role)
	}
	go func() {
		c := make(chan os.Signal, 1)
		signal.Notify(c, os.Interrupt, syscall.SIGTERM)
		<-c
		_ = s.Shutdown()
	}()
	return s.Serve(ln)
}

// hopByHop are the headers a proxy must not forward (RFC 9110 section 7.6.1); the same
// list as gatehouse's proxy.
var hopByHop = [][]byte{
	[]byte("Connection"), []byte("Proxy-Connection"), []byte("Keep-Alive"),
	[]byte("Proxy-Authenticate"), []byte("Proxy-Authorization"), []byte("Te"),
	[]byte("Trailer"), []byte("Transfer-Encoding"), []byte("Upgrade"),
}

// bareProxy builds the server and client exactly as proxy.New and newUpstreamClient do
// with config.Default, minus the entitlement check.
func bareProxy(upstream string) *fasthttp.Server {
	d := config.Default()
	u, srv := d.Upstream, d.Server
	dialTimeout := u.DialTimeout
	client := &fasthttp.HostClient{
		Addr:                     upstream,
		MaxConns:                 u.MaxConns,
		MaxIdleConnDuration:      90 * time.Second,
		NoDefaultUserAgentHeader: true,
		Dial: func(addr string) (net.Conn, error) {
			return fasthttp.DialTimeout(addr, dialTimeout)
		},
	}
	timeout := u.Timeout
	handler := func(ctx *fasthttp.RequestCtx) {
		req, resp := &ctx.Request, &ctx.Response
		for _, name := range hopByHop {
			req.Header.DelBytes(name)
		}
		var ip [16]byte
		req.Header.SetBytesV("X-Forwarded-For", appendIP(ip[:0], ctx.RemoteIP()))
		if err := client.DoTimeout(req, resp, timeout); err != nil {
			resp.Reset()
			ctx.SetStatusCode(fasthttp.StatusBadGateway)
			return
		}
		for _, name := range hopByHop {
			resp.Header.DelBytes(name)
		}
	}
	return &fasthttp.Server{
		Handler:                      handler,
		ReadTimeout:                  srv.ReadTimeout,
		WriteTimeout:                 srv.WriteTimeout,
		IdleTimeout:                  srv.IdleTimeout,
		ReadBufferSize:               srv.MaxHeaderBytes,
		MaxRequestBodySize:           srv.MaxBodyBytes,
		Concurrency:                  srv.Concurrency,
		NoDefaultServerHeader:        true,
		NoDefaultContentType:         true,
		DisablePreParseMultipartForm: true,
		CloseOnShutdown:              true,
	}
}

func appendIP(b []byte, ip net.IP) []byte {
	if v4 := ip.To4(); v4 != nil {
		for i, c := range v4 {
			if i > 0 {
				b = append(b, '.')
			}
			b = strconv.AppendUint(b, uint64(c), 10)
		}
		return b
	}
	return append(b, ip.String()...)
}
