package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// -profile: after the closed-loop rounds, load the sidecar and the bare proxy once more
// each with `perf record` attached, and say where their CPU goes, per request. The
// figures are from one extra run each and are not part of the comparisons.

type profileResult struct {
	Target    string       `json:"target"`
	CPUPerReq float64      `json:"cpu_us_per_request"`
	Samples   int          `json:"samples"`
	Self      []profileRow `json:"top_self"`            // hottest symbols, own time
	Inclusive []profileRow `json:"gatehouse_inclusive"` // gatehouse's and fasthttp's functions, with callees
	Files     []string     `json:"files"`
}

type profileRow struct {
	Symbol  string  `json:"symbol"`
	Percent float64 `json:"percent"`
	USPerRq float64 `json:"us_per_request"`
}

func (e *env) profile(ctx context.Context, wl *workload, spec runSpec, targets ...*proc) ([]profileResult, error) {
	perf, err := exec.LookPath("perf")
	if err != nil {
		e.logf("profile: perf is not installed; skipped")
		return nil, nil
	}
	var out []profileResult
	for _, p := range targets {
		data := filepath.Join(e.out, "perf-"+p.name+".data")
		var pids []string
		for _, pid := range p.pids {
			pids = append(pids, strconv.Itoa(pid))
		}
		rec := exec.Command(perf, "record", "-F", "999", "-g", "-p", strings.Join(pids, ","), "-o", data)
		var stderr bytes.Buffer
		rec.Stderr = &stderr
		if err := rec.Start(); err != nil {
			return out, fmt.Errorf("perf record: %w", err)
		}
		time.Sleep(300 * time.Millisecond) // let perf attach
		r, _, err := e.measure(ctx, "profile (perf attached)", "profile", 0, p, wl, spec)
		_ = rec.Process.Signal(syscall.SIGINT)
		werr := rec.Wait()
		if err != nil {
			return out, err
		}
		if _, serr := os.Stat(data); serr != nil {
			e.logf("profile: perf record failed (%v): %s", werr, strings.TrimSpace(stderr.String()))
			return out, nil
		}
		pr := profileResult{Target: p.name, CPUPerReq: r.TargetCPU, Files: []string{data}}
		self, n, err := perfReport(perf, data, "--no-children", 0.4)
		if err != nil {
			return out, err
		}
		incl, _, err := perfReport(perf, data, "--children", 0.2)
		if err != nil {
			return out, err
		}
		pr.Samples = n
		for i, row := range self {
			if i == 25 {
				break
			}
			row.USPerRq = row.Percent / 100 * r.TargetCPU
			pr.Self = append(pr.Self, row)
		}
		for _, row := range incl {
			if strings.Contains(row.Symbol, "gatehouse-dev/gatehouse") || strings.Contains(row.Symbol, "fasthttp.(*HostClient).Do") ||
				strings.Contains(row.Symbol, "fasthttp.(*Server).serveConn") || strings.Contains(row.Symbol, "main.") ||
				strings.Contains(row.Symbol, "prometheus") || row.Symbol == "runtime.gcBgMarkWorker" || row.Symbol == "runtime.findRunnable" ||
				row.Symbol == "runtime.mallocgc" {
				row.USPerRq = row.Percent / 100 * r.TargetCPU
				pr.Inclusive = append(pr.Inclusive, row)
			}
		}
		txt := filepath.Join(e.out, "perf-"+p.name+".txt")
		if err := os.WriteFile(txt, []byte(pr.String()), 0o644); err == nil {
			pr.Files = append(pr.Files, txt)
		}
		out = append(out, pr)
	}
	return out, nil
}

// perfReport runs perf report and returns its rows, by percent, and the sample count.
func perfReport(perf, data, mode string, limit float64) ([]profileRow, int, error) {
	cmd := exec.Command(perf, "report", "-i", data, mode, "--sort", "symbol", "--stdio", "-g", "none",
		"--percent-limit", strconv.FormatFloat(limit, 'f', -1, 64))
	b, err := cmd.Output()
	if err != nil {
		return nil, 0, fmt.Errorf("perf report: %w", err)
	}
	var rows []profileRow
	samples := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if rest, ok := strings.CutPrefix(l, "# Samples: "); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				v := strings.TrimSuffix(strings.TrimSuffix(f[0], "K"), "M")
				n, _ := strconv.ParseFloat(v, 64)
				switch {
				case strings.HasSuffix(f[0], "K"):
					n *= 1e3
				case strings.HasSuffix(f[0], "M"):
					n *= 1e6
				}
				samples = int(n)
			}
			continue
		}
		if l == "" || l[0] == '#' {
			continue
		}
		f := strings.Fields(l)
		// children: "12.3%  4.5%  [.] symbol"; self: "12.3%  [.] symbol"
		if len(f) < 3 || !strings.HasSuffix(f[0], "%") {
			continue
		}
		pct, err := strconv.ParseFloat(strings.TrimSuffix(f[0], "%"), 64)
		if err != nil {
			continue
		}
		i := 1
		if strings.HasSuffix(f[1], "%") {
			i = 2
		}
		if i+1 >= len(f) {
			continue
		}
		rows = append(rows, profileRow{Symbol: f[i+1], Percent: pct})
	}
	sort.SliceStable(rows, func(a, b int) bool { return rows[a].Percent > rows[b].Percent })
	return rows, samples, nil
}

func (p profileResult) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %.1f µs of CPU per request, %d samples\n\nhottest symbols (own time):\n", p.Target, p.CPUPerReq, p.Samples)
	for _, r := range p.Self {
		fmt.Fprintf(&b, "  %6.2f%%  %6.2f µs  %s\n", r.Percent, r.USPerRq, r.Symbol)
	}
	b.WriteString("\ninclusive (with callees):\n")
	for _, r := range p.Inclusive {
		fmt.Fprintf(&b, "  %6.2f%%  %6.2f µs  %s\n", r.Percent, r.USPerRq, r.Symbol)
	}
	return b.String()
}
