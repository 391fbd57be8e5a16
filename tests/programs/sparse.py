# A python3 program of ferry's own for the benchmarks (see README.md): 1 GiB mapped
# private and anonymous of which it writes only 4 MiB, then ticks every 10 ms,
# rewriting one of those pages with the tick's count. When DIR/check appears it
# checks every page it wrote, and a sample of the rest, which must read as zeros.
#
#     python3 sparse.py DIR
import mmap, os, struct, sys, time
d, PAGE, PAGES = sys.argv[1], 4096, 1024
m = mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
def page(i, tick): return struct.pack('<QQ', i + 1, tick) * 256
wrote = [0] * PAGES
for i in range(PAGES): m[i*PAGE:(i+1)*PAGE] = page(i, 0)
open(d + '/ready', 'w').close()
tick, seen = 0, None
while seen is None or tick < seen + 5:
    tick += 1
    i = tick % PAGES
    m[i*PAGE:(i+1)*PAGE] = page(i, tick)
    wrote[i] = tick
    if seen is None and os.path.exists(d + '/check'): seen = tick
    time.sleep(0.01)
bad = [i for i in range(PAGES) if m[i*PAGE:(i+1)*PAGE] != page(i, wrote[i])]
bad += [i for i in range(PAGES, 1 << 18, 997) if m[i*PAGE:(i+1)*PAGE] != bytes(PAGE)]
with open(d + '/result.tmp', 'w') as f:
    f.write('FAIL page %d of %d\n' % (bad[0], len(bad)) if bad else 'PASS %d ticks\n' % tick)
os.rename(d + '/result.tmp', d + '/result')
time.sleep(3600)
