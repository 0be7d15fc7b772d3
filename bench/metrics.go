package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// metricSum reads a sidecar's admin /metrics and sums the samples of metric name whose
// labels contain every one of labels (each written `key="value"`); 0 when none does.
func metricSum(admin, name string, labels ...string) (float64, error) {
	var total float64
	err := scrape(admin, func(metric, ls string, v float64) {
		if metric != name {
			return
		}
		for _, l := range labels {
			if !strings.Contains(ls, l) {
				return
			}
		}
		total += v
	})
	return total, err
}

// metricSums reads a sidecar's admin /metrics once and sums each named metric over its
// label sets.
func metricSums(admin string, names ...string) (map[string]float64, error) {
	out := map[string]float64{}
	err := scrape(admin, func(metric, _ string, v float64) {
		for _, n := range names {
			if metric == n {
				out[n] += v
			}
		}
	})
	return out, err
}

// scrape calls f for every sample of the Prometheus text exposition at admin's
// /metrics: the metric name, its label set as written ("" for none) and its value.
func scrape(admin string, f func(metric, labels string, v float64)) error {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + admin + "/metrics")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		sp := strings.LastIndexByte(l, ' ')
		if sp < 0 {
			continue
		}
		v, err := strconv.ParseFloat(l[sp+1:], 64)
		if err != nil {
			return fmt.Errorf("metrics line %q: %w", l, err)
		}
		metric, labels := l[:sp], ""
		if i := strings.IndexByte(metric, '{'); i >= 0 {
			metric, labels = metric[:i], metric[i:]
		}
		f(metric, labels, v)
	}
	return sc.Err()
}

// leaseUnits asks a sidecar's admin GET /v1/customers/{id} how many units of feature it
// holds in fleet leases and does not use, and how many it took back to return and the
// bucket has not confirmed, over the customer's windows.
func leaseUnits(admin, customer, feature string) (units, pending int64, err error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + admin + "/v1/customers/" + customer)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET /v1/customers/%s: %s", customer, resp.Status)
	}
	var info struct {
		Usage []struct {
			Feature string `json:"feature"`
			Lease   *struct {
				Units   int64 `json:"units"`
				Pending int64 `json:"pending"`
			} `json:"lease"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		return 0, 0, fmt.Errorf("GET /v1/customers/%s: %w", customer, err)
	}
	for _, u := range info.Usage {
		if u.Feature == feature && u.Lease != nil {
			units += u.Lease.Units
			pending += u.Lease.Pending
		}
	}
	return units, pending, nil
}

// refusals reads a sidecar's gatehouse_decisions_total and sums the decisions that did
// not allow (result other than "allow") by result and reason, e.g. "deny
// quota_unavailable".
func refusals(admin string) (map[string]float64, error) {
	out := map[string]float64{}
	err := scrape(admin, func(metric, labels string, v float64) {
		if metric != "gatehouse_decisions_total" {
			return
		}
		if res := labelValue(labels, "result"); res != "allow" {
			out[res+" "+labelValue(labels, "reason")] += v
		}
	})
	return out, err
}

// labelValue is the value of label key in a label set written {a="x",b="y"}.
func labelValue(labels, key string) string {
	i := strings.Index(labels, key+`="`)
	for i > 0 && labels[i-1] != '{' && labels[i-1] != ',' { // a longer name ending in key
		j := strings.Index(labels[i+1:], key+`="`)
		if j < 0 {
			return ""
		}
		i += 1 + j
	}
	if i < 0 {
		return ""
	}
	rest := labels[i+len(key)+2:]
	if j := strings.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return ""
}

// diff is after - before, key by key, without the keys that did not change.
func diff(before, after map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

func sortedKeys(m map[string]float64) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
