// A node program of ferry's own for the benchmarks (see README.md): a ring of 1024
// buffers and a map that grows to 20000 entries, one buffer rewritten with the tick's
// count every 10 ms (and garbage made); when DIR/check appears it checks them all.
//
//     node ticker.js DIR
'use strict';
const fs = require('fs');
const dir = process.argv[2];
const RING = 1024, LEN = 4096;
const bufs = new Array(RING), wrote = new Array(RING).fill(0), map = new Map();
function fill(b, slot, tick) { for (let i = 0; i < b.length; i++) b[i] = (slot * 7 + i + tick) & 0xff; }
let tick = 0, seen = -1;
function step() {
  tick++;
  const s = tick % RING;
  const b = Buffer.alloc(LEN);
  fill(b, s, tick);
  bufs[s] = b; wrote[s] = tick;
  if (map.size < 20000) map.set('k' + tick, { tick, text: 'value ' + tick });
  JSON.stringify({ garbage: new Array(64).fill(tick) });
  if (seen < 0 && fs.existsSync(dir + '/check')) seen = tick;
  if (seen >= 0 && tick >= seen + 5) return check();
  setTimeout(step, 10);
}
function check() {
  let bad = null;
  const want = Buffer.alloc(LEN);
  for (let s = 0; s < RING && !bad; s++) {
    if (!bufs[s]) continue;
    fill(want, s, wrote[s]);
    if (!want.equals(bufs[s])) bad = 'buffer ' + s;
  }
  for (const [k, v] of map) if (!bad && (k !== 'k' + v.tick || v.text !== 'value ' + v.tick)) bad = 'map entry ' + k;
  fs.writeFileSync(dir + '/result.tmp', bad ? 'FAIL ' + bad + '\n' : 'PASS ' + tick + ' ticks\n');
  fs.renameSync(dir + '/result.tmp', dir + '/result');
  setInterval(() => {}, 1 << 30);
}
fs.writeFileSync(dir + '/ready', '');
step();
