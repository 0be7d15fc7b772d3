package sidecar

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"go.uber.org/zap"
	"go.yaml.in/yaml/v3"
)

// Hot reload. A new configuration file swaps in its routes, identity, policies (shadow,
// unmatched, on_unavailable), upstream.timeout and log.access_log atomically: a request
// runs under the old table or the new one, never a mix, and none fails for the swap.
// Everything else (listeners, upstream address and connections, data_dir, nats, server
// limits, usage, log level and format, entitlements.file) takes a restart: a change to
// it is logged and the running value stays, so that GET /v1/config shows what runs.
//
// A file that does not load keeps the running configuration; every problem in it is
// logged, and the failure is counted in gatehouse_config_reloads_total{result="error"}.

// configState is the running configuration and where it came from.
type configState struct {
	cfg       *config.Config
	file      string // empty until a file was reloaded or watched
	sum       [sha256.Size]byte
	loadedAt  time.Time
	lastErr   string // the last failed reload; cleared by a success
	lastErrAt time.Time
}

// reloadMu makes reloads one at a time in the process (a SIGHUP and the file watch may
// race). Reloads are rare; one lock for all sidecars costs nothing.
var reloadMu sync.Mutex

// ReloadFile loads the configuration file at path and swaps it in. On error the running
// configuration stays; every problem is logged and the failure is counted.
func (s *Sidecar) ReloadFile(path string) error {
	data, err := readConfigFile(path)
	if err != nil {
		reloadMu.Lock()
		defer reloadMu.Unlock()
		s.reloadFailed(path, err)
		return err
	}
	return s.reloadData(path, data)
}

// WatchConfig reloads the configuration file at path whenever its content changes,
// polling its modification time and size every interval (0: one second) and comparing
// content hashes, until ctx is done. It blocks; run it in a goroutine that you wait for.
//
// The content found at the start is taken to be what the sidecar runs. A half-written
// file fails to load and is retried when it changes again; write the file atomically
// (rename over it, as Kubernetes does for a ConfigMap) to avoid the noise.
func (s *Sidecar) WatchConfig(ctx context.Context, path string, interval time.Duration) {
	if interval <= 0 {
		interval = time.Second
	}
	type stamp struct {
		mod  time.Time
		size int64
	}
	var (
		last     [sha256.Size]byte // content last seen, loaded or not
		seen     stamp
		unusable bool // the file could not be read; logged once until it can
	)
	if fi, err := os.Stat(path); err == nil {
		if data, err := readConfigFile(path); err == nil {
			last, seen = sha256.Sum256(data), stamp{fi.ModTime(), fi.Size()}
			s.adoptFile(path, last)
		}
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		var data []byte
		if err == nil && (stamp{fi.ModTime(), fi.Size()}) != seen {
			data, err = readConfigFile(path)
		}
		if err != nil {
			if !unusable {
				s.log.Warn("configuration file unreadable; the running configuration stays", zap.String("file", path), zap.Error(err))
				unusable = true
			}
			continue
		}
		unusable = false
		if data == nil {
			continue
		}
		seen = stamp{fi.ModTime(), fi.Size()}
		sum := sha256.Sum256(data)
		if sum == last || sum == s.appliedSum() {
			last = sum
			continue
		}
		last = sum
		_ = s.reloadData(path, data) // logged and counted
	}
}

// reloadData parses data, the content of path, and swaps it in.
func (s *Sidecar) reloadData(path string, data []byte) error {
	reloadMu.Lock()
	defer reloadMu.Unlock()
	cfg, err := config.Parse(bytes.NewReader(data))
	var ce *config.Error
	var se *config.SyntaxError
	switch {
	case errors.As(err, &ce):
		ce.File = path
	case errors.As(err, &se):
		se.File = path
	}
	var restart []string
	if err == nil {
		cfg, restart = s.effective(cfg)
		err = s.Reload(cfg)
	}
	if err != nil {
		s.reloadFailed(path, err)
		return fmt.Errorf("reload configuration: %w", err)
	}
	for _, name := range restart {
		s.log.Warn("configuration setting changed, but it takes a restart; the running value stays",
			zap.String("file", path), zap.String("setting", name))
	}
	sum := sha256.Sum256(data)
	s.Proxy.Metrics().ConfigReloaded(nil)
	if s.admin != nil {
		s.admin.conf.Store(&configState{cfg: cfg, file: path, sum: sum, loadedAt: time.Now()})
	}
	s.log.Info("configuration reloaded", zap.String("file", path), zap.String("sha256", fmt.Sprintf("%x", sum[:8])),
		zap.Int("routes", len(cfg.Routes)), zap.Bool("shadow", cfg.Shadow))
	return nil
}

// reloadFailed logs every problem of a failed reload and counts it. reloadMu is held.
func (s *Sidecar) reloadFailed(path string, err error) {
	var ce *config.Error
	if errors.As(err, &ce) {
		for _, p := range ce.Problems {
			s.log.Error("invalid configuration; the running one stays", zap.String("file", path), zap.String("problem", p.String()))
		}
	} else {
		s.log.Error("configuration reload failed; the running one stays", zap.String("file", path), zap.Error(err))
	}
	s.Proxy.Metrics().ConfigReloaded(err)
	if s.admin != nil {
		st := *s.admin.conf.Load()
		st.lastErr, st.lastErrAt = err.Error(), time.Now()
		s.admin.conf.Store(&st)
	}
}

// running is the configuration in force.
func (s *Sidecar) running() *config.Config {
	if s.admin != nil {
		return s.admin.conf.Load().cfg
	}
	return s.cfg
}

// appliedSum is the hash of the file content in force; zero when unknown.
func (s *Sidecar) appliedSum() [sha256.Size]byte {
	if s.admin != nil {
		return s.admin.conf.Load().sum
	}
	return [sha256.Size]byte{}
}

// adoptFile records that the running configuration came from path with content sum,
// unless a file was recorded already.
func (s *Sidecar) adoptFile(path string, sum [sha256.Size]byte) {
	if s.admin == nil {
		return
	}
	st := *s.admin.conf.Load()
	if st.file == "" {
		st.file, st.sum = path, sum
		s.admin.conf.Store(&st)
	}
}

// effective is next with every setting that takes a restart kept at its running
// value; changed names the settings that differed.
func (s *Sidecar) effective(next *config.Config) (eff *config.Config, changed []string) {
	run := s.running()
	c := *next
	for _, f := range []struct {
		name      string
		next, run any
	}{
		{"listen", &c.Listen, &run.Listen},
		{"admin_listen", &c.AdminListen, &run.AdminListen},
		{"upstream.url", &c.Upstream.URL, &run.Upstream.URL},
		{"upstream.dial_timeout", &c.Upstream.DialTimeout, &run.Upstream.DialTimeout},
		{"upstream.max_conns", &c.Upstream.MaxConns, &run.Upstream.MaxConns},
		{"data_dir", &c.DataDir, &run.DataDir},
		{"nats", &c.NATS, &run.NATS},
		{"entitlements", &c.Entitlements, &run.Entitlements},
		{"server", &c.Server, &run.Server},
		{"usage", &c.Usage, &run.Usage},
		{"log.level", &c.Log.Level, &run.Log.Level},
		{"log.format", &c.Log.Format, &run.Log.Format},
		{"flexprice", &c.Flexprice, &run.Flexprice},
	} {
		nv, rv := reflect.ValueOf(f.next).Elem(), reflect.ValueOf(f.run).Elem()
		if !reflect.DeepEqual(nv.Interface(), rv.Interface()) {
			changed = append(changed, f.name)
			nv.Set(rv)
		}
	}
	return &c, changed
}

func readConfigFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read configuration: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, config.MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read configuration %s: %w", path, err)
	}
	if len(data) > config.MaxFileBytes {
		return nil, fmt.Errorf("read configuration %s: larger than %d bytes", path, config.MaxFileBytes)
	}
	return data, nil
}

// redacted replaces a secret in the configuration shown by GET /v1/config.
const redacted = "REDACTED"

// redactedYAML is cfg as YAML that config.Parse reads back, with secrets replaced:
// the user info (user names, passwords, tokens) of every URL, secret-looking query
// parameters, and any value whose key names a password, secret, token or key (api_key).
// File paths (nats.credentials, flexprice.api_key_file) and environment variable names
// (flexprice.api_key_env) are not secrets and stay.
func redactedYAML(cfg *config.Config) ([]byte, error) {
	var n yaml.Node
	if err := n.Encode(cfg); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	redactNode(&n, "")
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&n); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode configuration: %w", err)
	}
	return buf.Bytes(), nil
}

func redactNode(n *yaml.Node, key string) {
	switch n.Kind {
	case yaml.DocumentNode, yaml.SequenceNode:
		for _, c := range n.Content {
			redactNode(c, key)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			redactNode(n.Content[i+1], n.Content[i].Value)
		}
	case yaml.ScalarNode:
		switch {
		case n.Tag == "!!null" || n.Value == "":
		case secretKey(key):
			n.Value, n.Tag, n.Style = redacted, "!!str", 0
		default:
			n.Value = redactURL(n.Value)
		}
	}
}

// secretKey reports whether a key or query parameter name says its value is a secret.
func secretKey(k string) bool {
	k = strings.ToLower(k)
	for _, s := range []string{"password", "passwd", "secret", "token"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return k == "key" || k == "api_key" || k == "apikey" || strings.HasSuffix(k, "_api_key")
}

// redactURL removes the user info and secret-looking query values of a URL; any other
// string comes back as it was.
func redactURL(s string) string {
	if !strings.Contains(s, "://") {
		return s
	}
	u, err := url.Parse(s)
	if err != nil {
		if strings.Contains(s, "@") {
			return redacted // an address with credentials we cannot take apart
		}
		return s
	}
	changed := false
	if u.User != nil {
		u.User = url.User(redacted)
		changed = true
	}
	if q := u.Query(); len(q) > 0 {
		for k := range q {
			if secretKey(k) {
				q.Set(k, redacted)
				changed = true
			}
		}
		if changed {
			u.RawQuery = q.Encode()
		}
	}
	if !changed {
		return s
	}
	return u.String()
}
