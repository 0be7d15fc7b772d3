//go:build unix

package usage

import (
	"os"
	"syscall"
)

// mapSegment maps the file's first size bytes, shared: what is copied into the mapping
// is in the page cache at once, and reaches the file even if the process is killed.
func mapSegment(f *os.File, size int) ([]byte, error) {
	return syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
}

func unmapSegment(b []byte) { _ = syscall.Munmap(b) }
