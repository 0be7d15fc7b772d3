package main

import (
	"fmt"
	"html"
	"math"
	"sort"
	"strings"
)

// The chart: latency percentiles (p50, p99, p99.9; log scale) against offered load
// (open loop) for the sidecar and the baselines, as a self-contained SVG written by
// hand, and an HTML page that holds it with the text report.

type point struct {
	rate      float64
	lat       latency
	saturated bool
}

// chartPoints gathers steady's open-loop points by target: the merged pairs at -rate
// and one run per -rates value.
func chartPoints(sr *steadyResult) map[string][]point {
	pts := map[string][]point{}
	for t, s := range sr.OpenSummary {
		pts[t] = append(pts[t], point{sr.Rate, s.Latency, s.Saturated})
	}
	for _, r := range sr.Sweep {
		if !r.Discarded {
			pts[r.Target] = append(pts[r.Target], point{r.Rate, r.Latency, r.saturated()})
		}
	}
	for t := range pts {
		sort.Slice(pts[t], func(a, b int) bool { return pts[t][a].rate < pts[t][b].rate })
	}
	return pts
}

func chartOrder(pts map[string][]point) []string {
	m := map[string]targetSummary{}
	for t := range pts {
		m[t] = targetSummary{}
	}
	return sortedTargets(m)
}

var seriesColor = map[string]string{"sidecar": "#d62728", "bare": "#1f77b4", "nginx": "#2ca02c", "upstream": "#7f7f7f", "bare-b": "#9467bd"}

// latencyChart draws the first steady result of r, or says there is none.
func latencyChart(r *results) string {
	var sr *steadyResult
	for _, s := range r.Scenarios {
		if s.Steady != nil {
			sr = s.Steady
			break
		}
	}
	const W, H = 1080, 400
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n", W, H, W, H)
	b.WriteString(`<rect width="100%" height="100%" fill="white"/>` + "\n")
	if sr == nil {
		b.WriteString(`<text x="20" y="40" font-size="14">No steady results in this run.</text></svg>` + "\n")
		return b.String()
	}
	pts := chartPoints(sr)
	order := chartOrder(pts)
	fmt.Fprintf(&b, `<text x="20" y="22" font-size="14" font-weight="bold">Latency against offered load — open loop, measured from the intended send time (%s)</text>`+"\n",
		html.EscapeString(r.Machine.CPUModel+", "+fmt.Sprint(r.Machine.Cores)+" cores"))
	// Legend.
	x := 20.0
	for _, t := range order {
		fmt.Fprintf(&b, `<rect x="%.0f" y="34" width="14" height="4" fill="%s"/><text x="%.0f" y="40">%s</text>`+"\n", x, seriesColor[t], x+18, t)
		x += 30 + 7*float64(len(t))
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="40" fill="#555">hollow marker: the target could not keep the offered rate</text>`+"\n", x+10)

	var maxRate, lo, hi float64 = 0, math.Inf(1), 0
	for _, ps := range pts {
		for _, p := range ps {
			maxRate = max(maxRate, p.rate)
			for _, v := range []float64{p.lat.P50, p.lat.P99, p.lat.P999} {
				if v > 0 {
					lo, hi = min(lo, v), max(hi, v)
				}
			}
		}
	}
	if hi == 0 {
		lo, hi = 0.01, 1
	}
	ylo, yhi := math.Pow(10, math.Floor(math.Log10(lo))), math.Pow(10, math.Ceil(math.Log10(hi)))
	if yhi <= ylo {
		yhi = ylo * 10
	}
	panels := []struct {
		name string
		get  func(latency) float64
	}{{"p50", func(l latency) float64 { return l.P50 }}, {"p99", func(l latency) float64 { return l.P99 }}, {"p99.9", func(l latency) float64 { return l.P999 }}}
	const pw, ph, top = 290.0, 270.0, 80.0
	for i, pn := range panels {
		left := 70 + float64(i)*(pw+65)
		xOf := func(rate float64) float64 { return left + pw*rate/(maxRate*1.08) }
		yOf := func(v float64) float64 {
			v = max(v, ylo)
			return top + ph - ph*(math.Log10(v)-math.Log10(ylo))/(math.Log10(yhi)-math.Log10(ylo))
		}
		fmt.Fprintf(&b, `<g><rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#999"/>`+"\n", left, top, pw, ph)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="13" font-weight="bold">%s</text>`+"\n", left+pw/2-12, top-8, pn.name)
		for d := ylo; d <= yhi*1.0001; d *= 10 {
			for _, m := range []float64{1, 2, 5} {
				v := d * m
				if v > yhi*1.0001 {
					break
				}
				y := yOf(v)
				stroke := "#eee"
				if m == 1 {
					stroke = "#ccc"
				}
				fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="%s"/>`, left, left+pw, y, y, stroke)
				if i == 0 || m == 1 {
					fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`, left-4, y+4, trimFloat(v))
				}
				b.WriteString("\n")
			}
		}
		step := niceStep(maxRate / 5)
		for r := 0.0; r <= maxRate*1.08; r += step {
			fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#999"/><text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n",
				xOf(r), xOf(r), top+ph, top+ph+4, xOf(r), top+ph+16, shortRate(r))
		}
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">offered load, requests/s</text>`+"\n", left+pw/2, top+ph+32)
		fmt.Fprintf(&b, `<text transform="translate(%.1f,%.1f) rotate(-90)" text-anchor="middle">latency, ms (log)</text>`+"\n", left-44, top+ph/2)
		for _, t := range order {
			var poly []string
			for _, p := range pts[t] {
				poly = append(poly, fmt.Sprintf("%.1f,%.1f", xOf(p.rate), yOf(pn.get(p.lat))))
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.8" points="%s"/>`+"\n", seriesColor[t], strings.Join(poly, " "))
			for _, p := range pts[t] {
				fill := seriesColor[t]
				if p.saturated {
					fill = "white"
				}
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s" stroke="%s"><title>%s at %s/s: %s ms</title></circle>`+"\n",
					xOf(p.rate), yOf(pn.get(p.lat)), fill, seriesColor[t], t, thousands(p.rate), fmtMs(pn.get(p.lat)))
			}
		}
		b.WriteString("</g>\n")
	}
	b.WriteString("</svg>\n")
	return b.String()
}

func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if raw <= m*mag {
			return m * mag
		}
	}
	return 10 * mag
}

func shortRate(r float64) string {
	if r >= 1000 {
		return trimFloat(r/1000) + "k"
	}
	return trimFloat(r)
}

func trimFloat(v float64) string {
	s := fmt.Sprintf("%.3f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

// htmlReport is one self-contained page: the chart and the text report.
func htmlReport(r *results, text, svg string) string {
	var b strings.Builder
	b.WriteString("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>gatehouse bench</title>\n")
	b.WriteString("<style>body{font-family:sans-serif;margin:2em;max-width:1200px}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}td,th{padding:2px 10px;text-align:left}</style></head><body>\n")
	fmt.Fprintf(&b, "<h1>gatehouse bench</h1>\n<p><code>%s</code> — %s UTC, %.0f s, overall: <b>%s</b></p>\n",
		html.EscapeString(r.Command), r.StartedAt.Format("2006-01-02 15:04:05"), r.Seconds, map[bool]string{true: "PASS", false: "FAIL"}[r.Pass])
	m := r.Machine
	b.WriteString("<table>\n")
	for _, kv := range [][2]string{
		{"CPU", fmt.Sprintf("%s, %d cores", m.CPUModel, m.Cores)}, {"kernel", m.Kernel}, {"Go", m.GoVersion},
		{"gatehouse", m.Gatehouse + " (" + m.Commit + ")"}, {"nginx", m.Nginx},
		{"GOMAXPROCS", "generator " + m.Generator + ", proxies " + m.ProxyProcs},
	} {
		fmt.Fprintf(&b, "<tr><th>%s</th><td>%s</td></tr>\n", kv[0], html.EscapeString(kv[1]))
	}
	b.WriteString("</table>\n")
	b.WriteString(svg)
	b.WriteString("<h2>Report</h2>\n<pre>")
	b.WriteString(html.EscapeString(text))
	b.WriteString("</pre>\n<h2>How to read it</h2>\n<ul>\n")
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "<li>%s</li>\n", html.EscapeString(n))
	}
	b.WriteString("</ul>\n<p>Every figure is in results.json next to this file.</p>\n</body></html>\n")
	return b.String()
}
