package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// proc is a child process the harness started: an upstream, a proxy under test, nginx.
type proc struct {
	name string
	addr string // where it serves HTTP
	// A sidecar's admin address, configuration file, and the client address of its own
	// NATS server ("" when it connects to another's).
	admin, config, nats string
	natsProc            *proc // its own NATS server, stopped with it
	usageOff            bool  // a sidecar run with usage: {enabled: false}
	// acct, when set, is read at both edges of every recorded phase of a run of this
	// target (the usage scenario's Badger writes, records and publishes).
	acct *accountingReader
	// A view (env.view) has no process of its own: it stands for group under its own
	// name, loaded together (a fleet), and runs beside, when set, next to each measured
	// run (churn's updates). Its other fields are unused.
	group  []*proc
	beside func(ctx context.Context) (stop func() besideUse)
	cmd    *exec.Cmd
	log    string // its stdout and stderr
	pids   []int  // the process and its descendants (nginx workers), for CPU accounting
	done   chan struct{}
	err    error // set when done is closed
}

// startProc starts argv with extra environment env, logging to dir/name.log, and waits
// until addr accepts connections.
func startProc(ctx context.Context, dir, name, addr string, env []string, argv ...string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so stop reaches nginx's workers too; killed if we die.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, addr: addr, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := p.waitReady(ctx, 15*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	p.refreshPids()
	return p, nil
}

func (p *proc) waitReady(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		c, err := net.DialTimeout("tcp", p.addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before serving (%v); log %s:\n%s", p.name, p.err, p.log, tail(p.log))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not accept connections on %s after %s; log %s", p.name, p.addr, limit, p.log)
		}
	}
}

// alive reports whether the process still runs.
func (p *proc) alive() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop asks the process group to end, and kills it after a grace period.
func (p *proc) stop() {
	if p == nil || !p.alive() {
		return
	}
	pgid := -p.cmd.Process.Pid
	_ = syscall.Kill(pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(pgid, syscall.SIGKILL)
		<-p.done
	}
}

// kill ends the process group at once with SIGKILL, as a crash would, and waits for it.
func (p *proc) kill() {
	if p == nil || !p.alive() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// refreshPids finds the process's descendants (nginx's workers) by scanning /proc.
func (p *proc) refreshPids() {
	root := p.cmd.Process.Pid
	p.pids = []int{root}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	parent := map[int]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readProcStat(pid); err == nil {
			parent[pid] = st.ppid
		}
	}
	for changed := true; changed; {
		changed = false
		for pid, pp := range parent {
			if contains(p.pids, pp) && !contains(p.pids, pid) {
				p.pids = append(p.pids, pid)
				changed = true
			}
		}
	}
}

// ticks is the CPU time (user+system, clock ticks) of the process and its descendants.
func (p *proc) ticks() int64 {
	var t int64
	for _, pid := range p.pids {
		if st, err := readProcStat(pid); err == nil {
			t += st.utime + st.stime
		}
	}
	return t
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

type procStat struct {
	ppid         int
	utime, stime int64
}

// readProcStat reads /proc/<pid>/stat (pid 0: this process).
func readProcStat(pid int) (procStat, error) {
	path := "/proc/self/stat"
	if pid != 0 {
		path = "/proc/" + strconv.Itoa(pid) + "/stat"
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, err
	}
	// The command name may hold spaces and parentheses: fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("bad stat")
	}
	f := bytes.Fields(b[i+1:])
	// f[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return procStat{}, errors.New("short stat")
	}
	ppid, _ := strconv.Atoi(string(f[1]))
	ut, _ := strconv.ParseInt(string(f[11]), 10, 64)
	stt, _ := strconv.ParseInt(string(f[12]), 10, 64)
	return procStat{ppid: ppid, utime: ut, stime: stt}, nil
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}
