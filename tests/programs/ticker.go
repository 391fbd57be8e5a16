// A Go program of ferry's own for the benchmarks (see README.md): 8 goroutines that
// each keep a ring of 256 buffers, rewrite one with its tick count every tick (and
// make some garbage), and when DIR/check appears check every buffer they kept.
//
//	go build -o ticker ticker.go && ./ticker DIR [KIB_PER_BUFFER [TICK_MS]]
package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

const workers, ring = 8, 256

var bufLen, tickMs = 4 << 10, 10

func arg(i int, v *int, unit int) {
	if len(os.Args) > i {
		n, err := strconv.Atoi(os.Args[i])
		if err != nil || n <= 0 {
			fmt.Fprintln(os.Stderr, "usage: ticker DIR [KIB_PER_BUFFER [TICK_MS]]")
			os.Exit(2)
		}
		*v = n * unit
	}
}

func fill(b []byte, w, slot int, tick uint64) {
	for i := range b {
		b[i] = byte(uint64(w*31+slot*7+i) + tick)
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func main() {
	dir := os.Args[1]
	arg(2, &bufLen, 1<<10)
	arg(3, &tickMs, 1)
	var done sync.WaitGroup
	quit := make(chan struct{})
	bad := make([]string, workers)
	ticks := make([]uint64, workers) // read from main: atomic
	for w := 0; w < workers; w++ {
		done.Add(1)
		go func(w int) {
			defer done.Done()
			bufs := make([][]byte, ring)
			wrote := make([]uint64, ring)
			var tick uint64
			for {
				select {
				case <-quit:
					want := make([]byte, bufLen)
					for s, b := range bufs {
						if b == nil {
							continue
						}
						fill(want, w, s, wrote[s])
						if string(want) != string(b) {
							bad[w] = fmt.Sprintf("goroutine %d buffer %d", w, s)
							return
						}
					}
					return
				default:
				}
				tick++
				atomic.StoreUint64(&ticks[w], tick)
				s := int(tick % ring)
				b := make([]byte, bufLen) // the old one is garbage now
				fill(b, w, s, tick)
				bufs[s], wrote[s] = b, tick
				_ = make([]byte, 4096)
				time.Sleep(time.Duration(tickMs) * time.Millisecond)
			}
		}(w)
	}
	os.WriteFile(dir+"/ready", nil, 0o644)
	for !exists(dir + "/check") {
		time.Sleep(10 * time.Millisecond)
	}
	// Ticks counted from here on: the goroutines must still tick in the copy.
	start := make([]uint64, workers)
	for w := range start {
		start[w] = atomic.LoadUint64(&ticks[w])
	}
	time.Sleep(time.Duration(5*tickMs) * time.Millisecond)
	close(quit)
	done.Wait()
	result := "PASS\n"
	for w := 0; w < workers; w++ {
		if bad[w] != "" {
			result = "FAIL " + bad[w] + "\n"
			break
		}
		if atomic.LoadUint64(&ticks[w]) <= start[w] {
			result = fmt.Sprintf("FAIL goroutine %d stopped ticking\n", w)
			break
		}
	}
	os.WriteFile(dir+"/result.tmp", []byte(result), 0o644)
	os.Rename(dir+"/result.tmp", dir+"/result")
	time.Sleep(time.Hour)
}
