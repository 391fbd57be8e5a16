// A Java program of ferry's own for the benchmarks (see README.md): 8 threads that
// each keep a ring of 256 arrays, rewrite one with their tick count every 10 ms (and
// make garbage), and when DIR/check appears check every array they kept.
//
//     java Ticker.java DIR
import java.nio.file.*;
import java.util.concurrent.atomic.AtomicLongArray;

public class Ticker {
    static final int WORKERS = 8, RING = 256, LEN = 4096;
    static final AtomicLongArray ticks = new AtomicLongArray(WORKERS);
    static final String[] bad = new String[WORKERS];
    static volatile boolean quit;

    static void fill(byte[] b, int w, int slot, long tick) {
        for (int i = 0; i < b.length; i++) b[i] = (byte) (w * 31 + slot * 7 + i + tick);
    }

    public static void main(String[] args) throws Exception {
        Path dir = Paths.get(args[0]);
        Thread[] threads = new Thread[WORKERS];
        for (int k = 0; k < WORKERS; k++) {
            final int w = k;
            threads[k] = new Thread(() -> {
                byte[][] bufs = new byte[RING][];
                long[] wrote = new long[RING];
                long tick = 0;
                while (!quit) {
                    tick++;
                    ticks.set(w, tick);
                    int s = (int) (tick % RING);
                    byte[] b = new byte[LEN];
                    fill(b, w, s, tick);
                    bufs[s] = b;
                    wrote[s] = tick;
                    byte[] garbage = new byte[4096];
                    garbage[0] = (byte) tick;
                    try { Thread.sleep(10); } catch (InterruptedException e) { return; }
                }
                byte[] want = new byte[LEN];
                for (int s = 0; s < RING; s++) {
                    if (bufs[s] == null) continue;
                    fill(want, w, s, wrote[s]);
                    if (!java.util.Arrays.equals(want, bufs[s])) { bad[w] = "thread " + w + " array " + s; return; }
                }
            });
            threads[k].start();
        }
        Files.write(dir.resolve("ready"), new byte[0]);
        while (!Files.exists(dir.resolve("check"))) Thread.sleep(10);
        long[] start = new long[WORKERS];
        for (int w = 0; w < WORKERS; w++) start[w] = ticks.get(w);
        Thread.sleep(50);
        quit = true;
        for (Thread t : threads) t.join();
        String result = "PASS\n";
        for (int w = 0; w < WORKERS; w++) {
            if (bad[w] != null) { result = "FAIL " + bad[w] + "\n"; break; }
            if (ticks.get(w) <= start[w]) { result = "FAIL thread " + w + " stopped ticking\n"; break; }
        }
        Files.write(dir.resolve("result.tmp"), result.getBytes());
        Files.move(dir.resolve("result.tmp"), dir.resolve("result"));
        Thread.sleep(3_600_000);
    }
}
