// Package echo is a small upstream API that answers every request with a JSON
// description of what reached it: method, path, query, headers and body size. The demo,
// the tests and the bench harness put gatehouse in front of it.
//
// Two request headers steer it, so tests can exercise the proxy's response handling:
// X-Echo-Status sets the response status, and X-Echo-Response-Header ("Name: value",
// may repeat) adds response headers.
package echo

import (
	"encoding/json"
	"net"
	"strconv"
	"strings"

	"github.com/valyala/fasthttp"
)

// Reply is the JSON body the echo upstream sends.
type Reply struct {
	Method   string            `json:"method"`
	Path     string            `json:"path"`
	Query    string            `json:"query,omitempty"`
	Headers  map[string]string `json:"headers"`
	BodySize int               `json:"body_size"`
}

// Handler answers with a Reply.
func Handler(ctx *fasthttp.RequestCtx) {
	r := Reply{
		Method:   string(ctx.Method()),
		Path:     string(ctx.Path()),
		Query:    string(ctx.QueryArgs().QueryString()),
		Headers:  map[string]string{},
		BodySize: len(ctx.PostBody()),
	}
	for k, v := range ctx.Request.Header.All() {
		name := string(k)
		if prev, ok := r.Headers[name]; ok {
			r.Headers[name] = prev + ", " + string(v)
		} else {
			r.Headers[name] = string(v)
		}
	}
	if s := ctx.Request.Header.Peek("X-Echo-Status"); len(s) > 0 {
		if code, err := strconv.Atoi(string(s)); err == nil && code >= 100 && code <= 599 {
			ctx.SetStatusCode(code)
		}
	}
	for _, h := range ctx.Request.Header.PeekAll("X-Echo-Response-Header") {
		if name, value, ok := strings.Cut(string(h), ":"); ok {
			ctx.Response.Header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
		}
	}
	ctx.SetContentType("application/json")
	body, _ := json.Marshal(r)
	ctx.SetBody(body)
}

// FastHandler answers with a fixed small body and no parsing, for benchmarks where the
// upstream should cost as little as possible.
func FastHandler(ctx *fasthttp.RequestCtx) {
	ctx.SetContentType("text/plain")
	ctx.SetBodyString("ok\n")
}

// Serve runs an echo upstream on ln until ln is closed.
func Serve(ln net.Listener, fast bool) error {
	h := Handler
	if fast {
		h = FastHandler
	}
	s := &fasthttp.Server{Handler: h, Name: "echo", NoDefaultDate: true}
	return s.Serve(ln)
}
