package deploy_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/proxy"
	"go.yaml.in/yaml/v3"
)

// object is the part of a Kubernetes object that the checks read.
type object struct {
	Kind     string `yaml:"kind"`
	Metadata struct {
		Name string `yaml:"name"`
	} `yaml:"metadata"`
	Data map[string]string `yaml:"data"`
	Spec struct {
		Template struct {
			Metadata struct {
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"metadata"`
			Spec podSpec `yaml:"spec"`
		} `yaml:"template"`
		Ports []struct {
			Name       string `yaml:"name"`
			TargetPort any    `yaml:"targetPort"`
		} `yaml:"ports"`
	} `yaml:"spec"`
}

type podSpec struct {
	TerminationGracePeriodSeconds int         `yaml:"terminationGracePeriodSeconds"`
	Containers                    []container `yaml:"containers"`
	Volumes                       []struct {
		Name      string `yaml:"name"`
		ConfigMap *struct {
			Name string `yaml:"name"`
		} `yaml:"configMap"`
		Secret *struct {
			SecretName string `yaml:"secretName"`
		} `yaml:"secret"`
		EmptyDir any `yaml:"emptyDir"`
	} `yaml:"volumes"`
}

type container struct {
	Name  string   `yaml:"name"`
	Image string   `yaml:"image"`
	Args  []string `yaml:"args"`
	Ports []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	Resources struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	StartupProbe   *probe `yaml:"startupProbe"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
	VolumeMounts   []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		SubPath   string `yaml:"subPath"`
	} `yaml:"volumeMounts"`
}

type probe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"`
	} `yaml:"httpGet"`
}

// port resolves a probe's or Service's port, a number or a container port's name.
func (c *container) port(t *testing.T, p any) int {
	t.Helper()
	switch v := p.(type) {
	case int:
		return v
	case string:
		for _, cp := range c.Ports {
			if cp.Name == v {
				return cp.ContainerPort
			}
		}
	}
	t.Fatalf("container %s has no port %v", c.Name, p)
	return 0
}

func listenPort(t *testing.T, field, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", field, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s %q: %v", field, addr, err)
	}
	return n
}

func decodeAll(t *testing.T, file string) []object {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var objs []object
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", file, len(objs)+1, err)
		}
		objs = append(objs, o)
	}
}

// TestKubernetesManifest decodes the example manifest and checks that its gatehouse
// configuration loads, and that the probes, ports, mounts and arguments agree with it.
func TestKubernetesManifest(t *testing.T) {
	objs := decodeAll(t, filepath.Join("kubernetes", "gatehouse.yaml"))
	byKind := map[string]*object{}
	for i := range objs {
		byKind[objs[i].Kind] = &objs[i]
	}
	cm, dep, svc := byKind["ConfigMap"], byKind["Deployment"], byKind["Service"]
	if cm == nil || dep == nil || svc == nil || byKind["NetworkPolicy"] == nil {
		t.Fatalf("want a ConfigMap, a Deployment, a Service and a NetworkPolicy; got %d objects", len(objs))
	}
	if len(cm.Data) != 1 {
		t.Fatalf("the ConfigMap should hold one file, has %d", len(cm.Data))
	}
	var key, text string
	for key, text = range cm.Data {
	}
	cfg, err := config.Parse(strings.NewReader(text))
	if err != nil {
		t.Fatalf("the ConfigMap's %s does not load:\n%v", key, err)
	}

	pod := &dep.Spec.Template.Spec
	var gh, api *container
	for i := range pod.Containers {
		switch pod.Containers[i].Name {
		case "gatehouse":
			gh = &pod.Containers[i]
		case "api":
			api = &pod.Containers[i]
		}
	}
	if gh == nil || api == nil {
		t.Fatal("the pod needs the containers api and gatehouse")
	}
	mounts := map[string]string{} // volume -> mount path in the gatehouse container
	for _, m := range gh.VolumeMounts {
		mounts[m.Name] = m.MountPath
		if m.SubPath != "" {
			t.Errorf("mount %s uses subPath: its updates never reach the container, so hot reload cannot see them", m.Name)
		}
	}
	volumes := map[string]bool{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = true
		if v.ConfigMap != nil && v.ConfigMap.Name == cm.Metadata.Name {
			// gatehouse is started on the file that the ConfigMap's key becomes.
			want := path.Join(mounts[v.Name], key)
			if i := indexOf(gh.Args, "-config"); i < 0 || i+1 >= len(gh.Args) || gh.Args[i+1] != want {
				t.Errorf("gatehouse args %v, want -config %s", gh.Args, want)
			}
		}
	}
	for name := range mounts {
		if !volumes[name] {
			t.Errorf("mount of undeclared volume %s", name)
		}
	}
	under := func(field, file string) {
		for _, dir := range mounts {
			if file == dir || strings.HasPrefix(file, dir+"/") {
				return
			}
		}
		t.Errorf("%s %s is on no volume of the gatehouse container", field, file)
	}
	under("data_dir", cfg.DataDir)
	under("nats.credentials", cfg.NATS.Credentials)

	// Probes: on the admin listener's port, at the paths the admin listener serves.
	admin := listenPort(t, "admin_listen", cfg.AdminListen)
	for _, p := range []struct {
		name string
		p    *probe
		path string
	}{{"startup", gh.StartupProbe, sidecar.HealthPath}, {"liveness", gh.LivenessProbe, sidecar.HealthPath}, {"readiness", gh.ReadinessProbe, sidecar.ReadyPath}} {
		if p.p == nil || p.p.HTTPGet == nil {
			t.Errorf("%s probe: want an httpGet probe", p.name)
			continue
		}
		if got := gh.port(t, p.p.HTTPGet.Port); got != admin {
			t.Errorf("%s probe on port %d, but admin_listen is %q", p.name, got, cfg.AdminListen)
		}
		if p.p.HTTPGet.Path != p.path {
			t.Errorf("%s probe at %s, want %s", p.name, p.p.HTTPGet.Path, p.path)
		}
	}
	if host, _, _ := net.SplitHostPort(cfg.AdminListen); host == "127.0.0.1" || host == "localhost" {
		t.Errorf("admin_listen %q: the kubelet probes the pod IP, not loopback", cfg.AdminListen)
	}
	if a := dep.Spec.Template.Metadata.Annotations; a["prometheus.io/port"] != strconv.Itoa(admin) || a["prometheus.io/path"] != sidecar.MetricsPath {
		t.Errorf("scrape annotations %v do not point at %s on port %d", a, sidecar.MetricsPath, admin)
	}

	// Traffic enters through gatehouse: the Service targets the proxy listener, and the
	// API listens on loopback where gatehouse forwards.
	if len(svc.Spec.Ports) == 0 {
		t.Fatal("the Service has no port")
	}
	for _, sp := range svc.Spec.Ports {
		if got, want := gh.port(t, sp.TargetPort), listenPort(t, "listen", cfg.Listen); got != want {
			t.Errorf("Service port %s targets %d, but gatehouse listens on %q", sp.Name, got, cfg.Listen)
		}
	}
	up, err := url.Parse(cfg.Upstream.URL)
	if err != nil {
		t.Fatal(err)
	}
	if up.Hostname() != "127.0.0.1" {
		t.Errorf("upstream.url %s: the API must be in the pod, on loopback", cfg.Upstream.URL)
	}
	if !strings.Contains(strings.Join(api.Args, " "), up.Host) {
		t.Errorf("the API container's args %v do not listen on %s, where gatehouse forwards", api.Args, up.Host)
	}
	if len(cfg.NATS.URLs) < 3 {
		t.Errorf("nats.urls %v: the example connects to a NATS cluster", cfg.NATS.URLs)
	}

	// Sized for 10k requests/s (see README); a grace period that covers the shutdown.
	if r := gh.Resources.Requests; r["cpu"] != "500m" || r["memory"] != "128Mi" {
		t.Errorf("gatehouse requests %v, want cpu 500m and memory 128Mi", r)
	}
	if _, ok := gh.Resources.Limits["cpu"]; ok {
		t.Error("a CPU limit throttles every request in a burst; the example sets none")
	}
	if grace := time.Duration(pod.TerminationGracePeriodSeconds) * time.Second; grace <= cfg.Server.ShutdownTimeout {
		t.Errorf("terminationGracePeriodSeconds %v does not cover server.shutdown_timeout %v and the outbox drain", grace, cfg.Server.ShutdownTimeout)
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// TestGatewayExamples checks that the Envoy and Traefik examples call the check
// endpoints where gatehouse serves them and pass the headers it sets.
func TestGatewayExamples(t *testing.T) {
	read := func(file string) map[string]any {
		t.Helper()
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := yaml.Unmarshal(data, &v); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		return v
	}
	envoy := read(filepath.Join("envoy", "envoy.yaml"))
	var prefixes, upstream []string
	walk(envoy, func(key string, v any) {
		switch key {
		case "path_prefix":
			prefixes = append(prefixes, v.(string))
		case "allowed_upstream_headers":
			walk(v, func(k string, v any) {
				if k == "exact" {
					upstream = append(upstream, strings.ToLower(v.(string)))
				}
			})
		}
	})
	if len(prefixes) != 1 || prefixes[0] != proxy.CheckEnvoy {
		t.Errorf("envoy path_prefix %v, want %s", prefixes, proxy.CheckEnvoy)
	}
	if indexOf(upstream, "x-customer-id") < 0 {
		t.Errorf("envoy allowed_upstream_headers %v lack x-customer-id", upstream)
	}

	traefik := read(filepath.Join("traefik", "dynamic.yaml"))
	var address string
	var headers []any
	walk(traefik, func(key string, v any) {
		switch key {
		case "address":
			address = v.(string)
		case "authResponseHeaders":
			headers = v.([]any)
		}
	})
	if u, err := url.Parse(address); err != nil || u.Path != proxy.CheckTraefik {
		t.Errorf("traefik forwardAuth address %q, want path %s", address, proxy.CheckTraefik)
	}
	if len(headers) == 0 || headers[0] != "X-Customer-Id" {
		t.Errorf("traefik authResponseHeaders %v lack X-Customer-Id", headers)
	}
	if !strings.Contains(readString(t, filepath.Join("nginx", "gatehouse.conf")), "location = "+proxy.CheckNginx+" {") {
		t.Errorf("nginx example does not route its auth subrequest to %s", proxy.CheckNginx)
	}
}

func readString(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// walk calls fn for every key of every mapping in v, depth first.
func walk(v any, fn func(key string, v any)) {
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			fn(k, c)
			walk(c, fn)
		}
	case []any:
		for _, c := range x {
			walk(c, fn)
		}
	}
}
