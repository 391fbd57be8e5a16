#!/usr/bin/env python3
# A Python workload for ferry's end-to-end tests: holds ~50 MiB of patterned objects,
# appends `tick N` lines to the log (argv[1]), and on SIGTERM checks the objects and
# writes PASS or FAIL: <what> as the last line (exit 0 or 1).
import os
import signal
import struct
import sys
import time

SEED = 0x5EEDF00D
PAGES = 12800  # 50 MiB of 4 KiB pages
ENTRIES = 100_000


def page(p):
    # Each page names its index, so a page restored in the wrong place is caught.
    return struct.pack("<QQ", p, SEED) * 256


def value(i):
    return "v%d" % (i * i + SEED)


def main():
    log = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def line(text):
        # One write per line, straight to the fd: nothing buffered across a checkpoint.
        os.write(log, (text + "\n").encode())

    stop = False

    def on_term(_sig, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    big = bytearray(b"".join(page(p) for p in range(PAGES)))
    table = {i: value(i) for i in range(ENTRIES)}
    line("ready")

    tick = 0
    while not stop:
        tick += 1
        line("tick %d" % tick)
        time.sleep(0.02)  # resumes after signals (PEP 475); the flag is seen next turn

    failure = None
    if len(big) != PAGES * 4096:
        failure = "bytearray length %d" % len(big)
    else:
        for p in range(PAGES):
            if big[p * 4096:(p + 1) * 4096] != page(p):
                failure = "bytearray page %d differs" % p
                break
    if failure is None:
        if len(table) != ENTRIES:
            failure = "dict has %d entries" % len(table)
        else:
            for i in range(ENTRIES):
                if table.get(i) != value(i):
                    failure = "dict entry %d is %r" % (i, table.get(i))
                    break
    line("PASS" if failure is None else "FAIL: " + failure)
    sys.exit(0 if failure is None else 1)


main()
