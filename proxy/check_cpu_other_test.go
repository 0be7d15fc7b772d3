//go:build !linux

package proxy

import "time"

// chkThreadCPU is only measured on Linux; see check_cpu_linux_test.go.
func chkThreadCPU() (time.Duration, bool) { return 0, false }
