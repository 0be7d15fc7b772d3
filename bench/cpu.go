package main

import (
	"bufio"
	"bytes"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"
)

// CPU accounting. Every run samples /proc/stat and the CPU time of every process the
// harness started, at both edges of its recorded phase. From the differences:
//
//	generator, target, upstream: what each of our processes used
//	idle_ours:  what our other processes (idle baselines) used
//	other:      user+nice+system time not used by any of our processes: someone else
//	softirq:    kernel network processing (loopback TCP), mostly on our behalf
//	steal:      time the hypervisor gave to another guest
//
// all as a share of the machine (cores x elapsed). A run whose other+steal is high was
// disturbed, and its pair is redone.

// clockTicks is USER_HZ, the unit of /proc/stat and /proc/<pid>/stat; 100 on every
// Linux the harness targets.
const clockTicks = 100

// sample is a snapshot of the CPU counters, in clock ticks.
type sample struct {
	at    time.Time
	sys   [8]int64 // user nice system idle iowait irq softirq steal
	self  int64
	procs map[string]int64
}

// cpuMonitor samples the machine and a set of named processes.
type cpuMonitor struct {
	mu    sync.Mutex // guards procs: the outage scenario restarts NATS during a run
	procs map[string]*proc
}

func newCPUMonitor() *cpuMonitor { return &cpuMonitor{procs: map[string]*proc{}} }

func (m *cpuMonitor) add(p *proc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.procs[p.name] = p
}

func (m *cpuMonitor) remove(p *proc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.procs, p.name)
}

func (m *cpuMonitor) sample() sample {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := sample{at: time.Now(), procs: make(map[string]int64, len(m.procs))}
	s.sys = readSysStat()
	if st, err := readProcStat(0); err == nil {
		s.self = st.utime + st.stime
	}
	for name, p := range m.procs {
		s.procs[name] = p.ticks()
	}
	return s
}

func readSysStat() [8]int64 {
	var out [8]int64
	f, err := os.Open("/proc/stat")
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return out
	}
	fields := bytes.Fields(sc.Bytes())
	if len(fields) < 9 || string(fields[0]) != "cpu" {
		return out
	}
	for i := range out {
		out[i], _ = strconv.ParseInt(string(fields[i+1]), 10, 64)
	}
	return out
}

// cpuUse is how the machine's CPU was spent during a run, each field a share of the
// whole machine (1.0 = every core busy for the whole run).
type cpuUse struct {
	Generator float64 `json:"generator"`
	Target    float64 `json:"target"`
	Upstream  float64 `json:"upstream"`
	IdleOurs  float64 `json:"idle_ours"`
	Other     float64 `json:"other"`
	Softirq   float64 `json:"softirq"`
	Steal     float64 `json:"steal"`
	Idle      float64 `json:"idle"`
	// Beside is what short-lived helpers run beside the load used (churn's pushes),
	// measured from their exit status and taken out of Other.
	Beside float64 `json:"beside,omitempty"`
	// TargetTicks and GenTicks are the raw clock ticks, for CPU per request.
	TargetTicks int64 `json:"target_ticks"`
	GenTicks    int64 `json:"generator_ticks"`
}

// noise is the share of the machine that neither we nor the kernel on our behalf used.
func (c cpuUse) noise() float64 { return c.Other + c.Steal }

// usage turns two samples into shares. upstream and targets name processes in the
// monitor ("" for none); the targets' CPU is added up.
func usage(a, b sample, upstream string, targets ...string) cpuUse {
	var d [8]int64
	var total int64
	for i := range d {
		d[i] = b.sys[i] - a.sys[i]
		total += d[i]
	}
	if total <= 0 {
		return cpuUse{}
	}
	share := func(t int64) float64 { return float64(t) / float64(total) }
	var u cpuUse
	gen := b.self - a.self
	ours := gen
	u.Generator = share(gen)
	u.GenTicks = gen
	for name, tb := range b.procs {
		t := max(0, tb-a.procs[name]) // a process that ended reads 0
		ours += t
		switch {
		case slices.Contains(targets, name):
			u.Target += share(t)
			u.TargetTicks += t
		case name == upstream:
			u.Upstream = share(t)
		default:
			u.IdleOurs += share(t)
		}
	}
	busy := d[0] + d[1] + d[2]
	u.Other = max(0, share(busy-ours))
	u.Softirq = share(d[5] + d[6])
	u.Steal = share(d[7])
	u.Idle = share(d[3] + d[4])
	return u
}
