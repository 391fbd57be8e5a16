/* The self-checking workload of ferry's end-to-end tests (in the manner of CRIU's
 * ZDTM): it sets up memory, file, signal, timer and thread state, ticks into a log,
 * and on SIGTERM verifies that all of it survived, logging PASS or FAIL: <what>.
 *
 * Log lines (each one write(2), so a checkpoint never splits one):
 *   region <name> 0x<start> 0x<end>   where a pattern region lies (end exclusive)
 *   ready                             all state is set up
 *   tick N                            N = 1, 2, 3... with no gap or repeat
 *   usr1 K                            K SIGUSR1s delivered so far (logged at a tick)
 *   stall MS tick N                   tick N began MS ms after tick N-1 did, over two
 *                                     periods + 5 ms (what a migration costs the
 *                                     process: wall clock, so it holds across machines)
 *   fork-check ok N pid P             --fork-check: a child's check passed (see fork_check)
 *   fork-check quiet pid P            SIGHUP: no child until restored (or asked again)
 *   fork-check resumed pid P WHY      forking again: restored | asked | timeout
 *   fork-check failed pid P           a child's check failed, or was not this process's
 *                                     (the verdict will be FAIL)
 *   PASS | FAIL: <first failure>      the last line; exit status 0 | 1
 *
 * Nothing here caches a pid or tid: after a restore they may differ. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/securebits.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/eventfd.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/rseq.h>
#include <sys/shm.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <grp.h>
#include <time.h>
#include <unistd.h>

#define SEED 0x5eedf00dcafe1234ULL
#define PAGE 4096
#define WORDS_PER_PAGE (PAGE / 8)
#define MAX_THREADS 64
#define HEAP_SIZE (3 * 1024 * 1024 + 123)
#define GLOBAL_WORDS 8192
#define STACK_WORDS 2048
#define PIPE_BYTES 1000
#define DELETED_SIZE (3 * PAGE + 17)
#define NULL_FD 50
#define ALTSTACK_SIZE (64 * 1024)
#define TIMER_SECS 3600

/* ---- options ---- */
static const char *opt_log;
static const char *opt_dir;
static long opt_mem_mib = 1;
static long opt_threads;
static long opt_tick_ms = 20;
static long opt_dirty_pages;
static int opt_files = 1;
static int opt_churn;
static int opt_move_mem;
static int opt_fork_check;
static int opt_rseq;
static int opt_process_state;
static int opt_seccomp;
static int opt_shared_anon;
static int opt_event_fds;
static int opt_listen;
static int opt_creds;
static int opt_mm_flags;
static int opt_mm_sealed;
static int opt_shared_twice;
static int opt_locks;
static uint64_t tsc_per_ms;
static volatile uint64_t rseq_aborts;
static pid_t fork_child;

/* ---- state that must survive ---- */
static int log_fd = -1;
static char real_dir[PATH_MAX];
static uint64_t *mem;             /* anonymous private mmap */
static size_t mem_pages;
static uint64_t dirty_rewrites;   /* pages of mem rewritten so far, round robin */
static unsigned char *heap;
static uint64_t global_array[GLOBAL_WORDS];
static int fd_data = -1, fd_dup = -1, fd_data2 = -1, fd_append = -1, fd_deleted = -1;
static int pipe_fds[2] = {-1, -1};
static volatile sig_atomic_t usr1_count, term_flag, alrm_count;
static atomic_int stop_threads;
static atomic_uint_fast64_t mirror[MAX_THREADS];
static char thread_fail[MAX_THREADS][256];
static void *altstacks[MAX_THREADS];

static __thread uint64_t tls_counter;
static __thread long tls_index;

/* The first failure is the one reported: later ones are usually consequences. */
static char failure[512];

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    if (failure[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(failure, sizeof failure, fmt, ap);
    va_end(ap);
}

/* Records a failure and leaves the (void) check function. */
#define FAIL_RET(...)                                                                                        \
    do {                                                                                                     \
        fail(__VA_ARGS__);                                                                                   \
        return;                                                                                              \
    } while (0)

/* One line, one write(2): a line is never half in the log after a checkpoint. */
static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logf_(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(log_fd, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            _exit(3);
        off += w;
    }
}

static void log_region(const char *name, const void *start, size_t len)
{
    logf_("region %s 0x%lx 0x%lx", name, (unsigned long)(uintptr_t)start, (unsigned long)((uintptr_t)start + len));
}

static void die(const char *what)
{
    char msg[512];
    snprintf(msg, sizeof msg, "FAIL: setup: %s: %s", what, strerror(errno));
    fprintf(stderr, "%s\n", msg);
    if (log_fd >= 0)
        logf_("%s", msg);
    exit(2);
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The pattern word `index` of region `tag`: differs per word, page and region, so a
 * page restored at the wrong address or from the wrong region is caught. */
static uint64_t pattern(uint64_t tag, uint64_t index, uint64_t seed)
{
    return splitmix(index ^ (tag << 56) ^ seed);
}

static unsigned char heap_byte(size_t i)
{
    return (unsigned char)(i * 251 + (i >> 12) * 7 + 0x5a);
}

static unsigned char pipe_byte(size_t i)
{
    return (unsigned char)(i * 13 + (i >> 8) * 5 + 7);
}

static unsigned char deleted_byte(size_t i)
{
    return (unsigned char)(i * 31 + (i >> 12) * 3 + 0xc3);
}

/* How many times page `p` of mem has been rewritten: the rewrites go round robin. */
static uint64_t page_generation(size_t p)
{
    return dirty_rewrites / mem_pages + (p < dirty_rewrites % mem_pages ? 1 : 0);
}

static void fill_mem_page(size_t p, uint64_t gen)
{
    uint64_t seed = SEED + gen * 0x9e3779b97f4a7c15ULL;
    for (size_t w = 0; w < WORDS_PER_PAGE; w++)
        mem[p * WORDS_PER_PAGE + w] = pattern(1, p * WORDS_PER_PAGE + w, seed);
}

/* ---- signals ---- */
static void on_usr1(int sig)
{
    (void)sig;
    usr1_count++;
}

static void on_term(int sig)
{
    (void)sig;
    term_flag = 1;
}

static void on_alrm(int sig)
{
    (void)sig;
    alrm_count++;
}

/* Sleeps `ms`, resuming after signals (and after a checkpoint's interruptions) with
 * the time left, until the time is up or SIGTERM came. */
static void sleep_ms(long ms)
{
    struct timespec req = {ms / 1000, (ms % 1000) * 1000000L}, rem;
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &req, &rem) == EINTR) {
        if (term_flag || atomic_load(&stop_threads))
            return;
        req = rem;
    }
}

/* The least time (ms) the process has run since it armed its timers, by its own count:
 * each tick slept opt_tick_ms at least (the main thread's TLS counter is its tick). A
 * freeze may hide up to a tick from a timer (a sleep's clock runs on while the process
 * is frozen; a timer's time left is carried as it was), so TIMER_SLACK_TICKS are left
 * out, and a tenth for the spin of --rseq. A timer re-armed from scratch after a
 * restore has more time left than this allows, and a timerfd fewer expirations. */
#define TIMER_SLACK_TICKS 10
static long min_run_ms(void)
{
    uint64_t t = tls_counter;
    return t > TIMER_SLACK_TICKS ? (long)(t - TIMER_SLACK_TICKS) * opt_tick_ms * 9 / 10 : 0;
}

/* ---- process state (--process-state): scheduling, affinity, limits, personality
 * and POSIX timers, which a restore child would otherwise inherit from ferry ---- */
#define MAIN_NICE 7
#define PT_PERIOD_NS 3000000L   /* the process-directed timer */
#define PT_THREAD_NS 4000000L   /* the one aimed at the main thread */
#define PERSONA (PER_LINUX | ADDR_NO_RANDOMIZE)
static timer_t pt_proc, pt_thread, pt_none, pt_gap;
static volatile sig_atomic_t pt_proc_count, pt_thread_count, pt_bad;

static int thread_nice(long i)
{
    return 1 + (int)(i % 3);
}

static void on_ptimer(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (si->si_code != SI_TIMER) {
        pt_bad = 1;
    } else if (sig == SIGRTMIN + 2) {
        if (si->si_value.sival_int != 4242)
            pt_bad = 2;
        pt_proc_count++;
    } else {
        if (si->si_value.sival_int != 4343)
            pt_bad = 3;
        pt_thread_count++;
    }
}

static void arm(timer_t t, long value_ns, long interval_ns)
{
    struct itimerspec its = {{interval_ns / 1000000000L, interval_ns % 1000000000L},
                             {value_ns / 1000000000L, value_ns % 1000000000L}};
    if (timer_settime(t, 0, &its, NULL) != 0)
        die("timer_settime");
}

/* After the threads are made: they keep the affinity and nice value they started with. */
static void setup_process_state(void)
{
    if (setpriority(PRIO_PROCESS, 0, MAIN_NICE) != 0) /* 0: this thread */
        die("setpriority");
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    if (sched_setaffinity(0, sizeof one, &one) != 0)
        die("sched_setaffinity");
    struct rlimit rl = {777, 4096};
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        die("setrlimit NOFILE");
    rl = (struct rlimit){12345, 23456};
    if (setrlimit(RLIMIT_MSGQUEUE, &rl) != 0)
        die("setrlimit MSGQUEUE");
    if (personality(PERSONA) < 0)
        die("personality");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die("PR_SET_NO_NEW_PRIVS");

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_ptimer;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGRTMIN + 2, &sa, NULL) != 0 || sigaction(SIGRTMIN + 3, &sa, NULL) != 0)
        die("sigaction RT");
    /* Ids 0..3; 1 is deleted again, so the last two ids are not the first free ones. */
    struct sigevent se;
    memset(&se, 0, sizeof se);
    se.sigev_notify = SIGEV_SIGNAL;
    se.sigev_signo = SIGRTMIN + 2;
    se.sigev_value.sival_int = 4242;
    if (timer_create(CLOCK_MONOTONIC, &se, &pt_proc) != 0 || timer_create(CLOCK_MONOTONIC, &se, &pt_gap) != 0)
        die("timer_create");
    se.sigev_notify = SIGEV_THREAD_ID;
    se._sigev_un._tid = gettid();
    se.sigev_signo = SIGRTMIN + 3;
    se.sigev_value.sival_int = 4343;
    if (timer_create(CLOCK_MONOTONIC, &se, &pt_thread) != 0)
        die("timer_create thread");
    se.sigev_notify = SIGEV_NONE;
    if (timer_create(CLOCK_BOOTTIME, &se, &pt_none) != 0)
        die("timer_create none");
    if (timer_delete(pt_gap) != 0)
        die("timer_delete");
    arm(pt_proc, PT_PERIOD_NS, PT_PERIOD_NS);
    arm(pt_thread, PT_THREAD_NS, PT_THREAD_NS);
    arm(pt_none, TIMER_SECS * 1000000000L, 0);
}

static int interval_is(timer_t t, long ns)
{
    struct itimerspec its;
    return timer_gettime(t, &its) == 0 && its.it_interval.tv_sec * 1000000000L + its.it_interval.tv_nsec == ns;
}

static void verify_process_state(void)
{
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (errno || nice != MAIN_NICE)
        FAIL_RET("main thread's nice value is %d, want %d", nice, MAIN_NICE);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0 || CPU_COUNT(&set) != 1 || !CPU_ISSET(0, &set))
        FAIL_RET("main thread's CPU affinity is not CPU 0 alone");
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur != 777 || rl.rlim_max != 4096)
        FAIL_RET("RLIMIT_NOFILE is %llu/%llu, want 777/4096", (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max);
    if (getrlimit(RLIMIT_MSGQUEUE, &rl) != 0 || rl.rlim_cur != 12345 || rl.rlim_max != 23456)
        FAIL_RET("RLIMIT_MSGQUEUE is %llu/%llu, want 12345/23456", (unsigned long long)rl.rlim_cur,
                 (unsigned long long)rl.rlim_max);
    int p = personality(0xffffffff);
    if (p != PERSONA)
        FAIL_RET("personality is 0x%x, want 0x%x", p, PERSONA);
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        FAIL_RET("no_new_privs was lost");
    if (!interval_is(pt_proc, PT_PERIOD_NS) || !interval_is(pt_thread, PT_THREAD_NS))
        FAIL_RET("a periodic POSIX timer lost its id or its interval");
    struct itimerspec its;
    if (timer_gettime(pt_none, &its) != 0 || its.it_interval.tv_sec || its.it_interval.tv_nsec ||
        (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) || its.it_value.tv_sec > TIMER_SECS)
        FAIL_RET("the one-shot POSIX timer lost its id or its time left");
    long left_ms = its.it_value.tv_sec * 1000L + its.it_value.tv_nsec / 1000000L;
    if (left_ms > TIMER_SECS * 1000L - min_run_ms())
        FAIL_RET("the one-shot POSIX timer has %ld ms left after at least %ld ms run: re-armed from scratch", left_ms,
                 min_run_ms());
    if (timer_gettime(pt_gap, &its) == 0 || errno != EINVAL)
        FAIL_RET("the deleted timer's id came back");
    if (pt_bad)
        FAIL_RET("a POSIX timer signal came with the wrong siginfo (%d)", (int)pt_bad);
    /* Both still fire, here, now. */
    sig_atomic_t c0 = pt_proc_count, t0 = pt_thread_count;
    struct timespec ms = {0, 1000000L};
    for (int i = 0; i < 2000 && (pt_proc_count == c0 || pt_thread_count == t0); i++)
        nanosleep(&ms, NULL); /* sleep_ms would not: SIGTERM came */
    if (pt_proc_count == c0 || pt_thread_count == t0)
        FAIL_RET("the POSIX timers stopped firing (%d, %d signals)", (int)pt_proc_count, (int)pt_thread_count);
}

/* ---- shared anonymous memory (--shared-anon): MAP_SHARED | MAP_ANONYMOUS, every
 * fourth page never touched (a hole that must stay one), the last quarter made
 * read-only (which splits the mapping in two areas of one object) ---- */
#define SHARED_PAGES 1024
static unsigned char *shared_mem;

static void setup_shared_anon(void)
{
    shared_mem = mmap(NULL, SHARED_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared_mem == MAP_FAILED)
        die("mmap shared");
    for (size_t p = 0; p < SHARED_PAGES; p++)
        if (p % 4 != 3)
            for (size_t w = 0; w < WORDS_PER_PAGE; w++)
                ((uint64_t *)(shared_mem + p * PAGE))[w] = pattern(7, p * WORDS_PER_PAGE + w, SEED);
    if (mprotect(shared_mem + SHARED_PAGES * PAGE * 3 / 4, SHARED_PAGES * PAGE / 4, PROT_READ) != 0)
        die("mprotect shared");
    log_region("shared", shared_mem, SHARED_PAGES * PAGE);
}

static void verify_shared_anon(void)
{
    for (size_t p = 0; p < SHARED_PAGES; p++)
        for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
            uint64_t want = p % 4 == 3 ? 0 : pattern(7, p * WORDS_PER_PAGE + w, SEED);
            if (((uint64_t *)(shared_mem + p * PAGE))[w] != want)
                FAIL_RET("shared memory page %zu word %zu differs", p, w);
        }
    /* Still shared, still one object in two areas: rw then read-only. */
    char line[512], want_rw[64], want_ro[64];
    snprintf(want_rw, sizeof want_rw, "%lx-", (unsigned long)shared_mem);
    snprintf(want_ro, sizeof want_ro, "%lx-", (unsigned long)(shared_mem + SHARED_PAGES * PAGE * 3 / 4));
    FILE *f = fopen("/proc/self/maps", "r");
    int seen = 0;
    unsigned long ino_rw = 0, ino_ro = 1;
    while (f && fgets(line, sizeof line, f)) {
        char perms[8];
        unsigned long ino;
        if (sscanf(line, "%*s %7s %*s %*s %lu", perms, &ino) != 2)
            continue;
        if (!strncmp(line, want_rw, strlen(want_rw))) {
            seen |= strcmp(perms, "rw-s") == 0;
            ino_rw = ino;
        } else if (!strncmp(line, want_ro, strlen(want_ro))) {
            seen |= (strcmp(perms, "r--s") == 0) << 1;
            ino_ro = ino;
        }
    }
    if (f)
        fclose(f);
    if (seen != 3 || ino_rw != ino_ro)
        FAIL_RET("shared memory is no longer one shared object in a rw-s and an r--s area");
}

/* ---- per-mapping flags and memory policy (--mm-flags): one area per madvise flag
 * that changes behaviour, an mlocked area and one locked on fault (a page of four
 * touched), PR_SET_THP_DISABLE, KSM for every mapping (PR_SET_MEMORY_MERGE, where the
 * kernel has KSM) but the DONTDUMP area and, last, mlockall(MCL_FUTURE). Checked from
 * /proc/self/smaps (each area whole, with its flag) and by behaviour in a forked
 * child: a DONTFORK area is not there, a WIPEONFORK area reads zeros ---- */
#define MMF_PAGES 4
static const struct {
    const char *name;
    int advice;   /* 0: mlock instead */
    const char *vmflags; /* codes its VmFlags line must hold */
} mmf[] = {
    {"mmf-dontfork", MADV_DONTFORK, "dc"}, {"mmf-wipeonfork", MADV_WIPEONFORK, "wf"},
    {"mmf-hugepage", MADV_HUGEPAGE, "hg"}, {"mmf-nohugepage", MADV_NOHUGEPAGE, "nh"},
    {"mmf-dontdump", MADV_DONTDUMP, "dd"}, {"mmf-random", MADV_RANDOM, "rr"},
    {"mmf-locked", 0, "lo"},               {"mmf-onfault", 0, "lo lf"},
};
#define MMF_AREAS (sizeof mmf / sizeof mmf[0])
static uint64_t *mmf_area[MMF_AREAS];
/* Four pages, the second a guard region (MADV_GUARD_INSTALL, Linux 6.13): it faults. */
static uint64_t *mmf_guarded;
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
static int mmf_merge; /* PR_SET_MEMORY_MERGE took */
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif

/* Whether word w of area i holds data: the on-fault area has only its first page. */
static int mmf_filled(size_t i, size_t w)
{
    return strcmp(mmf[i].name, "mmf-onfault") != 0 || w < WORDS_PER_PAGE;
}

static void setup_mm_flags(void)
{
    for (size_t i = 0; i < MMF_AREAS; i++) {
        /* The WIPEONFORK area above the others: post-copy sends pages in address
         * order, so it is among the last to arrive (a child forked before must still
         * see it zero). */
        void *hint = mmf[i].advice == MADV_WIPEONFORK ? (void *)0x7ff000000000UL : NULL;
        mmf_area[i] = mmap(hint, MMF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mmf_area[i] == MAP_FAILED)
            die("mmap mm-flags area");
        int onfault = !strcmp(mmf[i].name, "mmf-onfault");
        if (onfault && mlock2(mmf_area[i], MMF_PAGES * PAGE, MLOCK_ONFAULT) != 0)
            die("mlock2 MLOCK_ONFAULT");
        for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
            if (mmf_filled(i, w))
                mmf_area[i][w] = pattern(20 + i, w, SEED);
        if (mmf[i].advice && madvise(mmf_area[i], MMF_PAGES * PAGE, mmf[i].advice) != 0)
            die(mmf[i].name);
        if (!mmf[i].advice && !onfault && mlock(mmf_area[i], MMF_PAGES * PAGE) != 0)
            die("mlock");
        log_region(mmf[i].name, mmf_area[i], MMF_PAGES * PAGE);
    }
    mmf_guarded = mmap(NULL, MMF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mmf_guarded == MAP_FAILED)
        die("mmap guarded area");
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        mmf_guarded[w] = pattern(30, w, SEED);
    if (madvise((char *)mmf_guarded + PAGE, PAGE, MADV_GUARD_INSTALL) != 0)
        die("MADV_GUARD_INSTALL");
    log_region("mmf-guarded", mmf_guarded, MMF_PAGES * PAGE);
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0)
        die("PR_SET_THP_DISABLE");
    mmf_merge = prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0;
    if (!mmf_merge && errno != EINVAL)
        die("PR_SET_MEMORY_MERGE");
    if (mmf_merge && madvise(mmf_area[4], MMF_PAGES * PAGE, MADV_UNMERGEABLE) != 0)
        die("MADV_UNMERGEABLE");
    /* From here every new mapping of the process (thread stacks among them) is locked. */
    if (mlockall(MCL_FUTURE) != 0)
        die("mlockall MCL_FUTURE");
}

/* Each tick, the first pages of the patterned mapping are locked (odd ticks) or
 * unlocked (even ones): a lock taken while post-copy still has those pages on their
 * way faults each of them in through ferry's userfaultfd. */
static void mmf_tick(uint64_t tick)
{
    size_t len = (mem_pages < 16 ? mem_pages : 16) * PAGE;
    if (len && (tick & 1 ? mlock(mem, len) : munlock(mem, len)) != 0)
        fail("mm-flags: %s of the patterned mapping at tick %llu: %s", tick & 1 ? "mlock" : "munlock",
             (unsigned long long)tick, strerror(errno));
}

/* The VmFlags line of the mapping starting at `start`, which must end at `end`. */
static int mmf_vmflags(const void *start, const void *end, char *out, size_t len)
{
    char line[512], head[64];
    snprintf(head, sizeof head, "%lx-%lx ", (unsigned long)start, (unsigned long)end);
    FILE *f = fopen("/proc/self/smaps", "r");
    int in = 0, found = 0;
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, head, strlen(head)))
            in = 1;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            snprintf(out, len, "%s", line + 8);
            out[strcspn(out, "\n")] = 0;
            found = 1;
            break;
        }
    }
    if (f)
        fclose(f);
    return found;
}

/* Whether the VmFlags line `flags` holds every code of `want` (space separated). */
static int mmf_has(const char *flags, const char *want)
{
    char codes[64], probe[8];
    snprintf(codes, sizeof codes, "%s", want);
    for (char *save, *c = strtok_r(codes, " ", &save); c; c = strtok_r(NULL, " ", &save)) {
        snprintf(probe, sizeof probe, " %s ", c);
        char padded[600];
        snprintf(padded, sizeof padded, " %s ", flags);
        if (!strstr(padded, probe))
            return 0;
    }
    return 1;
}

/* In a forked child: 0 when the DONTFORK area is absent, the WIPEONFORK area reads
 * zeros and an area without either kept its data; else which of them failed. */
static int mmf_in_child(void)
{
    unsigned char vec[MMF_PAGES];
    if (mincore(mmf_area[0], MMF_PAGES * PAGE, vec) == 0 || errno != ENOMEM)
        return 2;
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        if (mmf_area[1][w] != 0)
            return 3;
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        if (mmf_area[2][w] != pattern(22, w, SEED))
            return 4;
    return 0;
}

static void verify_mm_flags(void)
{
    char flags[512];
    for (size_t i = 0; i < MMF_AREAS; i++) {
        for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
            if (mmf_area[i][w] != (mmf_filled(i, w) ? pattern(20 + i, w, SEED) : 0))
                FAIL_RET("%s word %zu differs", mmf[i].name, w);
        if (!mmf_vmflags(mmf_area[i], (char *)mmf_area[i] + MMF_PAGES * PAGE, flags, sizeof flags))
            FAIL_RET("%s is no longer one mapping of its own", mmf[i].name);
        if (!mmf_has(flags, mmf[i].vmflags))
            FAIL_RET("%s lost VmFlags %s: it has%s", mmf[i].name, mmf[i].vmflags, flags);
    }
    int thp = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    if (thp != 1)
        FAIL_RET("PR_GET_THP_DISABLE is %d, want 1", thp);
    if (mmf_merge) {
        if (prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) != 1)
            FAIL_RET("PR_GET_MEMORY_MERGE is no longer 1");
        for (size_t i = 0; i < MMF_AREAS; i++) {
            if (!mmf_vmflags(mmf_area[i], (char *)mmf_area[i] + MMF_PAGES * PAGE, flags, sizeof flags))
                FAIL_RET("%s is no longer one mapping of its own", mmf[i].name);
            if (mmf_has(flags, "mg") != (mmf[i].advice != MADV_DONTDUMP))
                FAIL_RET("%s: KSM merging %s (VmFlags%s)", mmf[i].name, mmf[i].advice == MADV_DONTDUMP ? "came back" : "was lost", flags);
        }
    }
    /* MCL_FUTURE: a new mapping comes locked. */
    void *fresh = mmap(NULL, PAGE, PROT_NONE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED)
        FAIL_RET("mmap after restore: %s", strerror(errno));
    int found = mmf_vmflags(fresh, (char *)fresh + PAGE, flags, sizeof flags);
    munmap(fresh, PAGE);
    if (!found || !mmf_has(flags, "lo"))
        FAIL_RET("mlockall(MCL_FUTURE) was lost: a new mapping is not locked");
    /* Behaviour: in a child, the DONTFORK area is absent and the WIPEONFORK one zero. */
    pid_t child = fork();
    if (child < 0)
        FAIL_RET("mm-flags fork: %s", strerror(errno));
    if (child == 0)
        _exit(mmf_in_child());
    int status;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL_RET("mm-flags: a forked child saw DONTFORK/WIPEONFORK areas wrong (status %#x: 2 dontfork mapped, 3 wipeonfork not zero)", status);
    /* The guard page: the others hold their data, it faults (in a child, which
     * inherits guard regions). */
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        if (w / WORDS_PER_PAGE != 1 && mmf_guarded[w] != pattern(30, w, SEED))
            FAIL_RET("mmf-guarded word %zu differs", w);
    child = fork();
    if (child < 0)
        FAIL_RET("mm-flags fork: %s", strerror(errno));
    if (child == 0) {
        volatile uint64_t v = mmf_guarded[WORDS_PER_PAGE];
        (void)v;
        _exit(0);
    }
    if (waitpid(child, &status, 0) != child || !WIFSIGNALED(status) || WTERMSIG(status) != SIGSEGV)
        FAIL_RET("mm-flags: the guard page no longer faults (child status %#x)", status);
}

/* ---- a sealed mapping (--mm-sealed): mseal(2) forbids unmapping or changing it, so
 * ferry cannot make it again; it must refuse with a line and leave the process
 * running ---- */
#define MSEAL_NR 462
static uint64_t *sealed_area;

static void setup_mm_sealed(void)
{
    sealed_area = mmap(NULL, MMF_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (sealed_area == MAP_FAILED)
        die("mmap sealed area");
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        sealed_area[w] = pattern(40, w, SEED);
    if (syscall(MSEAL_NR, sealed_area, MMF_PAGES * PAGE, 0) != 0)
        die("mseal");
    log_region("mmf-sealed", sealed_area, MMF_PAGES * PAGE);
}

static void verify_mm_sealed(void)
{
    for (size_t w = 0; w < MMF_PAGES * WORDS_PER_PAGE; w++)
        if (sealed_area[w] != pattern(40, w, SEED))
            FAIL_RET("the sealed area's word %zu differs", w);
}

/* ---- shared anonymous memory mapped twice (--shared-twice): eight pages (the sixth
 * never touched), and pages 2-5 of the same object mapped again elsewhere
 * (mremap with old_size 0). After a restore both views must still be one object:
 * the data in each, a write through one seen through the other ---- */
#define TWICE_PAGES 8
static uint64_t *twice_a, *twice_b; /* b shows pages 2-5 of a */

static void setup_shared_twice(void)
{
    twice_a = mmap(NULL, TWICE_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (twice_a == MAP_FAILED)
        die("mmap shared-twice");
    for (size_t w = 0; w < TWICE_PAGES * WORDS_PER_PAGE; w++)
        if (w / WORDS_PER_PAGE != 5)
            twice_a[w] = pattern(41, w, SEED);
    twice_b = mremap((char *)twice_a + 2 * PAGE, 0, 4 * PAGE, MREMAP_MAYMOVE);
    if (twice_b == MAP_FAILED)
        die("mremap shared-twice");
    log_region("twice-a", twice_a, TWICE_PAGES * PAGE);
    log_region("twice-b", twice_b, 4 * PAGE);
}

static void verify_shared_twice(void)
{
    for (size_t w = 0; w < TWICE_PAGES * WORDS_PER_PAGE; w++) {
        uint64_t want = w / WORDS_PER_PAGE == 5 ? 0 : pattern(41, w, SEED);
        if (twice_a[w] != want)
            FAIL_RET("shared-twice: word %zu of the first view differs", w);
        if (w >= 2 * WORDS_PER_PAGE && w < 6 * WORDS_PER_PAGE && twice_b[w - 2 * WORDS_PER_PAGE] != want)
            FAIL_RET("shared-twice: word %zu of the second view differs", w);
    }
    twice_a[3 * WORDS_PER_PAGE + 7] = 0x7717;
    twice_b[3 * WORDS_PER_PAGE + 9] = 0x9919;
    if (twice_b[WORDS_PER_PAGE + 7] != 0x7717 || twice_a[5 * WORDS_PER_PAGE + 9] != 0x9919)
        FAIL_RET("shared-twice: the two views are no longer one object");
}

/* ---- event fds (--event-fds): an eventfd (semaphore, count 5), a periodic timerfd,
 * a signalfd, and an epoll instance watching them and a pipe with a byte in it ---- */
#define TFD_PERIOD_NS 7000000L
static int ev_efd = -1, ev_tfd = -1, ev_sfd = -1, ev_epfd = -1, ev_pipe[2] = {-1, -1};

static void watch(int fd, uint64_t data)
{
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = data};
    if (epoll_ctl(ev_epfd, EPOLL_CTL_ADD, fd, &e) != 0)
        die("epoll_ctl");
}

/* Before the threads start: they inherit SIGRTMIN+5 blocked, for the signalfd. */
static void setup_event_fds(void)
{
    ev_efd = eventfd(5, EFD_SEMAPHORE | EFD_NONBLOCK);
    ev_tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec its = {{0, TFD_PERIOD_NS}, {0, TFD_PERIOD_NS}};
    if (ev_efd < 0 || ev_tfd < 0 || timerfd_settime(ev_tfd, 0, &its, NULL) != 0)
        die("eventfd/timerfd");
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 5);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0 || (ev_sfd = signalfd(-1, &set, SFD_NONBLOCK)) < 0)
        die("signalfd");
    if (pipe(ev_pipe) != 0 || write(ev_pipe[1], "x", 1) != 1)
        die("event pipe");
    if ((ev_epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
        die("epoll_create1");
    watch(ev_efd, 0xabc);
    watch(ev_tfd, 0xdef);
    watch(ev_pipe[0], 0x123);
    watch(ev_sfd, 0x5f);
}

static void verify_event_fds(void)
{
    /* The epoll instance reports the eventfd, the pipe, (within a period) the timer and,
     * with its signal pending, the signalfd: each with its data word. */
    kill(getpid(), SIGRTMIN + 5);
    int seen = 0;
    /* For 2 s at most (the eventfd and the pipe are always ready: a count of rounds
     * would pass in microseconds, before a timer re-armed a moment ago fires). */
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (now = t0; seen != 15 && now.tv_sec - t0.tv_sec < 2; clock_gettime(CLOCK_MONOTONIC, &now)) {
        struct epoll_event evs[8];
        int n = epoll_wait(ev_epfd, evs, 8, 20);
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            seen |= d == 0xabc ? 1 : d == 0x123 ? 2 : d == 0xdef ? 4 : d == 0x5f ? 8 : 0;
        }
    }
    if (seen != 15)
        FAIL_RET("epoll reported %d of eventfd|pipe|timerfd|signalfd (15)", seen);
    /* A semaphore with 5 in it: five reads of 1, then nothing. */
    for (int i = 0; i < 5; i++) {
        uint64_t v = 0;
        if (read(ev_efd, &v, 8) != 8 || v != 1)
            FAIL_RET("eventfd read %d gave %llu", i, (unsigned long long)v);
    }
    uint64_t v;
    if (read(ev_efd, &v, 8) != -1 || errno != EAGAIN)
        FAIL_RET("eventfd held more than 5");
    struct itimerspec its;
    if (timerfd_gettime(ev_tfd, &its) != 0 || its.it_interval.tv_sec != 0 || its.it_interval.tv_nsec != TFD_PERIOD_NS)
        FAIL_RET("timerfd lost its interval");
    /* Never read before: every expiration since the setup is counted, a restore's too. */
    long want = min_run_ms() / (TFD_PERIOD_NS / 1000000L);
    if (read(ev_tfd, &v, 8) != 8)
        FAIL_RET("timerfd has not expired: %s", strerror(errno));
    if (v < (uint64_t)want)
        FAIL_RET("timerfd counts %llu expirations after at least %ld ms run (every %ld ms): lost or re-armed from scratch",
                 (unsigned long long)v, min_run_ms(), TFD_PERIOD_NS / 1000000L);
    struct signalfd_siginfo si;
    if (read(ev_sfd, &si, sizeof si) != sizeof si || si.ssi_signo != (uint32_t)(SIGRTMIN + 5))
        FAIL_RET("signalfd did not read SIGRTMIN+5");
}

/* ---- a TCP listener (--listen) on 127.0.0.1, non-blocking: each tick answers one
 * waiting connection with `hello N`; beside it a UDP socket connected to itself, a Unix
 * stream listener bound to a path (its file made 0666) and a Unix seqpacket listener
 * with an abstract name, which answer the same way, and a Unix datagram socket bound to
 * a path with an unbound one connected to it ---- */
static int listen_fd = -1, udp_fd = -1, unix_fd = -1, abstract_fd = -1, dgram_fd = -1, sender_fd = -1;
static struct sockaddr_un dgram_addr;
static socklen_t dgram_len;
static int listen_port, udp_port;
static struct sockaddr_un unix_addr, abstract_addr;
static socklen_t unix_len, abstract_len;

static int unix_listener(int type, struct sockaddr_un *a, socklen_t len)
{
    int fd = socket(AF_UNIX, type | SOCK_NONBLOCK, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)a, len) != 0 || listen(fd, 4) != 0)
        die("unix listener");
    return fd;
}

static int int_opt(int fd, int level, int name)
{
    int v = -1;
    socklen_t len = sizeof v;
    return getsockopt(fd, level, name, &v, &len) == 0 ? v : -1;
}

static void setup_listener(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int one = 1;
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (listen_fd < 0 || setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        setsockopt(listen_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        bind(listen_fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(listen_fd, 8) != 0 ||
        getsockname(listen_fd, (struct sockaddr *)&a, &len) != 0)
        die("listener");
    listen_port = ntohs(a.sin_port);
    logf_("listen %d", listen_port);
    struct sockaddr_in u = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    len = sizeof u;
    udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (udp_fd < 0 || bind(udp_fd, (struct sockaddr *)&u, sizeof u) != 0 ||
        getsockname(udp_fd, (struct sockaddr *)&u, &len) != 0 || connect(udp_fd, (struct sockaddr *)&u, len) != 0)
        die("udp socket");
    udp_port = ntohs(u.sin_port);

    abstract_addr.sun_family = AF_UNIX;
    int n = snprintf(abstract_addr.sun_path + 1, sizeof abstract_addr.sun_path - 1, "ferry-workload-%d", (int)getpid());
    abstract_len = offsetof(struct sockaddr_un, sun_path) + 1 + n;
    abstract_fd = unix_listener(SOCK_SEQPACKET, &abstract_addr, abstract_len);
    if (opt_dir) {
        char dir[PATH_MAX];
        if (!realpath(opt_dir, dir))
            die("realpath of --dir");
        unix_addr.sun_family = AF_UNIX;
        n = snprintf(unix_addr.sun_path, sizeof unix_addr.sun_path, "%s/listener.sock", dir);
        if (n >= (int)sizeof unix_addr.sun_path)
            die("unix listener path too long");
        unix_len = offsetof(struct sockaddr_un, sun_path) + n + 1;
        unix_fd = unix_listener(SOCK_STREAM, &unix_addr, unix_len);
        if (chmod(unix_addr.sun_path, 0666) != 0)
            die("chmod of the unix listener");
        logf_("unix-listen %s", unix_addr.sun_path);
        dgram_addr.sun_family = AF_UNIX;
        n = snprintf(dgram_addr.sun_path, sizeof dgram_addr.sun_path, "%s/dgram.sock", dir);
        dgram_len = offsetof(struct sockaddr_un, sun_path) + n + 1;
        dgram_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        sender_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (dgram_fd < 0 || sender_fd < 0 || bind(dgram_fd, (struct sockaddr *)&dgram_addr, dgram_len) != 0 ||
            connect(sender_fd, (struct sockaddr *)&dgram_addr, dgram_len) != 0)
            die("unix datagram sockets");
    }
}

static void answer(int listener, uint64_t tick)
{
    int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0)
        return;
    char line[64];
    int n = snprintf(line, sizeof line, "hello %llu\n", (unsigned long long)tick);
    if (write(c, line, n) != n)
        fail("answering a connection: %s", strerror(errno));
    close(c);
}

/* Sends `msg` on `from` and waits up to 2 s for it to arrive on non-blocking `to`. */
static int datagram_arrives(int from, int to, const char *msg)
{
    size_t len = strlen(msg);
    char got[64];
    ssize_t n = -1;
    struct timespec ms = {0, 1000000L};
    if (send(from, msg, len, 0) != (ssize_t)len)
        return 0;
    for (int i = 0; i < 2000 && n < 0; i++)
        if ((n = recv(to, got, sizeof got, 0)) < 0)
            nanosleep(&ms, NULL);
    return n == (ssize_t)len && memcmp(got, msg, len) == 0;
}

/* Connects to Unix listener `fd` at `a`, has it accept, and gets a byte across. */
static void verify_unix_listener(int fd, int type, const struct sockaddr_un *a, socklen_t len, const char *what)
{
    struct sockaddr_un got;
    socklen_t got_len = sizeof got;
    if (int_opt(fd, SOL_SOCKET, SO_ACCEPTCONN) != 1 || int_opt(fd, SOL_SOCKET, SO_TYPE) != type)
        FAIL_RET("the %s listener no longer listens, or changed type", what);
    if (getsockname(fd, (struct sockaddr *)&got, &got_len) != 0 || got_len != len || memcmp(&got, a, len) != 0)
        FAIL_RET("the %s listener is no longer bound to its name", what);
    if (!(fcntl(fd, F_GETFL) & O_NONBLOCK))
        FAIL_RET("the %s listener lost O_NONBLOCK", what);
    int c = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)a, len) != 0)
        FAIL_RET("connecting to the %s listener: %s", what, strerror(errno));
    int s = -1;
    struct timespec ms = {0, 1000000L};
    for (int i = 0; i < 2000 && s < 0; i++)
        if ((s = accept4(fd, NULL, NULL, SOCK_CLOEXEC)) < 0)
            nanosleep(&ms, NULL);
    char b = 0;
    if (s < 0 || write(c, "x", 1) != 1 || read(s, &b, 1) != 1 || b != 'x')
        FAIL_RET("the %s listener did not take a connection", what);
    close(s);
    close(c);
}

static void serve_listener(uint64_t tick)
{
    answer(listen_fd, tick);
    answer(abstract_fd, tick);
    if (unix_fd >= 0)
        answer(unix_fd, tick);
}

static void verify_listener(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    if (int_opt(listen_fd, SOL_SOCKET, SO_ACCEPTCONN) != 1)
        FAIL_RET("the listener no longer listens");
    if (int_opt(listen_fd, SOL_SOCKET, SO_REUSEADDR) != 1 || int_opt(listen_fd, IPPROTO_TCP, TCP_NODELAY) != 1)
        FAIL_RET("the listener lost SO_REUSEADDR or TCP_NODELAY");
    if (getsockname(listen_fd, (struct sockaddr *)&a, &len) != 0 || ntohs(a.sin_port) != listen_port ||
        a.sin_addr.s_addr != htonl(INADDR_LOOPBACK))
        FAIL_RET("the listener is no longer at 127.0.0.1:%d", listen_port);
    if (!(fcntl(listen_fd, F_GETFL) & O_NONBLOCK))
        FAIL_RET("the listener lost O_NONBLOCK");
    /* The UDP socket: same port, still connected to itself. */
    struct sockaddr_in u;
    len = sizeof u;
    if (getsockname(udp_fd, (struct sockaddr *)&u, &len) != 0 || ntohs(u.sin_port) != udp_port)
        FAIL_RET("the UDP socket is no longer at port %d", udp_port);
    if (!datagram_arrives(udp_fd, udp_fd, "ping"))
        FAIL_RET("the UDP socket did not get its own datagram back (%s)", strerror(errno));
    verify_unix_listener(abstract_fd, SOCK_SEQPACKET, &abstract_addr, abstract_len, "abstract seqpacket");
    if (unix_fd < 0 || failure[0])
        return;
    verify_unix_listener(unix_fd, SOCK_STREAM, &unix_addr, unix_len, "path");
    /* The datagram pair by name: the sender still reaches the bound socket. */
    struct sockaddr_un peer;
    socklen_t peer_len = sizeof peer;
    if (getpeername(sender_fd, (struct sockaddr *)&peer, &peer_len) != 0 || peer_len != dgram_len ||
        memcmp(&peer, &dgram_addr, dgram_len) != 0)
        FAIL_RET("the Unix datagram sender is no longer connected to %s", dgram_addr.sun_path);
    if (!datagram_arrives(sender_fd, dgram_fd, "dgram"))
        FAIL_RET("the Unix datagram socket at %s did not get the datagram (%s)", dgram_addr.sun_path, strerror(errno));
    struct stat st;
    if (stat(unix_addr.sun_path, &st) != 0 || !S_ISSOCK(st.st_mode) || (st.st_mode & 07777) != 0666)
        FAIL_RET("%s is not the listener's socket file with mode 0666", unix_addr.sun_path);
}

/* ---- credentials (--creds): another user with saved and fs ids of their own,
 * supplementary groups, a reduced bounding set, an inheritable capability outside it,
 * ambient capabilities, securebits, the login uid, dumpable, a parent-death signal and
 * oom_score_adj; thread 0 takes other uids and thread 1 gives up its effective
 * capabilities (raw calls: credentials are per thread). A restore child is root. ---- */
static const uid_t cr_uids[4] = {65534, 4012, 4013, 4014}; /* real, effective, saved, fs */
static const gid_t cr_gids[4] = {65534, 4002, 4003, 4004};
static const gid_t cr_groups[3] = {4242, 4343, 65534}; /* sorted, as the kernel keeps them */
#define CR_THREAD0_UID 4013
#define CR_LOGINUID 4242
#define CR_OOM_SCORE_ADJ 345
#define CR_PDEATHSIG SIGURG /* ignored by default: harmless when it fires */
#define CAPBIT(c) (1ULL << (c))
#define CR_INH (CAPBIT(CAP_NET_BIND_SERVICE) | CAPBIT(CAP_SYS_MODULE))
#define CR_PRM (CAPBIT(CAP_NET_BIND_SERVICE) | CAPBIT(CAP_CHOWN))
#define CR_EFF CAPBIT(CAP_NET_BIND_SERVICE)
#define CR_AMB CAPBIT(CAP_NET_BIND_SERVICE)
#define CR_DROPPED (CAPBIT(CAP_SYS_MODULE) | CAPBIT(CAP_SYS_ADMIN) | CAPBIT(CAP_NET_ADMIN))
#define CR_SECUREBITS (SECBIT_KEEP_CAPS | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NOROOT)
static int cr_loginuid; /* whether this kernel let us set the login uid */
static uint64_t cr_bounding; /* the bounding set wanted: what we had, less CR_DROPPED */
static atomic_int cr_threads_ready;

static int cr_capset(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2] = {{(uint32_t)eff, (uint32_t)prm, (uint32_t)inh},
                                          {(uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32)}};
    return (int)syscall(SYS_capset, &h, d);
}

static int cr_capget(uint64_t *eff, uint64_t *prm, uint64_t *inh)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0)
        return -1;
    *eff = d[0].effective | (uint64_t)d[1].effective << 32;
    *prm = d[0].permitted | (uint64_t)d[1].permitted << 32;
    *inh = d[0].inheritable | (uint64_t)d[1].inheritable << 32;
    return 0;
}

static int write_proc(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    int ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
    close(fd);
    return ok;
}

static long read_proc_number(const char *path)
{
    char buf[32] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return LONG_MIN;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? strtol(buf, NULL, 10) : LONG_MIN;
}

/* Before the threads: they start with these credentials. */
static void setup_creds(void)
{
    /* Unset, a login uid may be set once without privilege; else leave it. */
    cr_loginuid = read_proc_number("/proc/self/loginuid") == 4294967295L && write_proc("/proc/self/loginuid", "4242");
    if (!write_proc("/proc/self/oom_score_adj", "345"))
        die("oom_score_adj");
    uint64_t eff, prm, inh;
    if (cr_capget(&eff, &prm, &inh) != 0)
        die("capget");
    /* The inheritable set first: capset refuses ones outside the bounding set. */
    if (cr_capset(prm, prm, CR_INH) != 0)
        die("capset inheritable");
    for (int c = 0; c < 64 && prctl(PR_CAPBSET_READ, c, 0, 0, 0) >= 0; c++)
        if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1 && !(CR_DROPPED & CAPBIT(c)))
            cr_bounding |= CAPBIT(c);
    for (int c = 0; c < 64; c++)
        if ((CR_DROPPED & CAPBIT(c)) && prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0)
            die("PR_CAPBSET_DROP");
    if (prctl(PR_SET_SECUREBITS, SECBIT_KEEP_CAPS, 0, 0, 0) != 0)
        die("PR_SET_SECUREBITS keep caps");
    if (setgroups(3, cr_groups) != 0 || setresgid(cr_gids[0], cr_gids[1], cr_gids[2]) != 0)
        die("setgroups/setresgid");
    setfsgid(cr_gids[3]);
    if (setresuid(cr_uids[0], cr_uids[1], cr_uids[2]) != 0)
        die("setresuid");
    /* KEEP_CAPS kept the permitted set; the effective one comes back by capset. */
    if (cr_capset(prm, prm, CR_INH) != 0)
        die("capset effective");
    setfsuid(cr_uids[3]);
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) != 0)
        die("PR_CAP_AMBIENT_RAISE");
    if (prctl(PR_SET_SECUREBITS, CR_SECUREBITS, 0, 0, 0) != 0)
        die("PR_SET_SECUREBITS");
    if (cr_capset(CR_EFF, CR_PRM, CR_INH) != 0)
        die("capset");
    if (prctl(PR_SET_PDEATHSIG, CR_PDEATHSIG, 0, 0, 0) != 0 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die("PR_SET_PDEATHSIG/NO_NEW_PRIVS");
}

/* After the threads changed theirs (which made the process undumpable). */
static void setup_creds_dumpable(void)
{
    long want = opt_threads < 2 ? opt_threads : 2;
    for (int waited = 0; atomic_load(&cr_threads_ready) < want; waited++) {
        if (waited > 30000)
            die("threads' credentials");
        sleep_ms(1);
    }
    if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0)
        die("PR_SET_DUMPABLE");
}

static int creds_thread_setup(long i)
{
    int r = 0;
    if (i == 0)
        r = (int)syscall(SYS_setresuid, CR_THREAD0_UID, CR_THREAD0_UID, CR_THREAD0_UID);
    else if (i == 1)
        r = cr_capset(0, CR_PRM, CR_INH);
    if (r != 0) {
        snprintf(thread_fail[i], sizeof thread_fail[i], "thread %ld: changing credentials: %s", i, strerror(errno));
        return 0;
    }
    if (i < 2)
        atomic_fetch_add(&cr_threads_ready, 1);
    return 1;
}

static int creds_thread_verify(long i, char *f, size_t fs)
{
    uid_t r, e, s;
    uint64_t eff, prm, inh;
    uid_t want = i == 0 ? CR_THREAD0_UID : cr_uids[1];
    if (syscall(SYS_getresuid, &r, &e, &s) != 0 || cr_capget(&eff, &prm, &inh) != 0)
        snprintf(f, fs, "thread %ld: getresuid/capget: %s", i, strerror(errno));
    else if (r != (i == 0 ? want : cr_uids[0]) || e != want || s != (i == 0 ? want : cr_uids[2]))
        snprintf(f, fs, "thread %ld: uids %u/%u/%u", i, r, e, s);
    else if ((uid_t)syscall(SYS_setfsuid, -1) != (i == 0 ? want : cr_uids[3]))
        snprintf(f, fs, "thread %ld: fsuid %d", i, (int)syscall(SYS_setfsuid, -1));
    else if (eff != (i == 1 ? 0 : CR_EFF) || prm != CR_PRM || inh != CR_INH)
        snprintf(f, fs, "thread %ld: capabilities eff %llx prm %llx inh %llx", i, (unsigned long long)eff,
                 (unsigned long long)prm, (unsigned long long)inh);
    else
        return 1;
    return 0;
}

static void verify_creds(void)
{
    uid_t u[3];
    gid_t g[3], groups[8];
    uint64_t eff, prm, inh;
    if (getresuid(&u[0], &u[1], &u[2]) != 0 || u[0] != cr_uids[0] || u[1] != cr_uids[1] || u[2] != cr_uids[2])
        FAIL_RET("uids are %u/%u/%u, want %u/%u/%u", u[0], u[1], u[2], cr_uids[0], cr_uids[1], cr_uids[2]);
    if ((uid_t)setfsuid(-1) != cr_uids[3])
        FAIL_RET("fsuid is %d, want %u", setfsuid(-1), cr_uids[3]);
    if (getresgid(&g[0], &g[1], &g[2]) != 0 || g[0] != cr_gids[0] || g[1] != cr_gids[1] || g[2] != cr_gids[2])
        FAIL_RET("gids are %u/%u/%u", g[0], g[1], g[2]);
    if ((gid_t)setfsgid(-1) != cr_gids[3])
        FAIL_RET("fsgid is %d, want %u", setfsgid(-1), cr_gids[3]);
    int n = getgroups(8, groups);
    if (n != 3 || memcmp(groups, cr_groups, sizeof cr_groups) != 0)
        FAIL_RET("%d supplementary groups, not 4242 4343 65534", n);
    if (cr_capget(&eff, &prm, &inh) != 0 || eff != CR_EFF || prm != CR_PRM || inh != CR_INH)
        FAIL_RET("capabilities eff %llx prm %llx inh %llx, want %llx %llx %llx", (unsigned long long)eff,
                 (unsigned long long)prm, (unsigned long long)inh, CR_EFF, CR_PRM, CR_INH);
    for (int c = 0; c < 64; c++) {
        int bounded = prctl(PR_CAPBSET_READ, c, 0, 0, 0);
        if (bounded < 0)
            break; /* past this kernel's last capability */
        if (bounded != !!(cr_bounding & CAPBIT(c)))
            FAIL_RET("capability %d is %sin the bounding set", c, bounded ? "" : "not ");
        int ambient = prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0);
        if (ambient != !!(CR_AMB & CAPBIT(c)))
            FAIL_RET("ambient capability %d is %d", c, ambient);
    }
    if (prctl(PR_GET_SECUREBITS, 0, 0, 0, 0) != CR_SECUREBITS)
        FAIL_RET("securebits are %#x, want %#x", prctl(PR_GET_SECUREBITS, 0, 0, 0, 0), CR_SECUREBITS);
    if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 1)
        FAIL_RET("dumpable is %d, want 1", prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
    int sig = 0;
    if (prctl(PR_GET_PDEATHSIG, &sig, 0, 0, 0) != 0 || sig != CR_PDEATHSIG)
        FAIL_RET("parent-death signal is %d, want %d", sig, CR_PDEATHSIG);
    if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
        FAIL_RET("no_new_privs was lost");
    if (cr_loginuid && read_proc_number("/proc/self/loginuid") != CR_LOGINUID)
        FAIL_RET("login uid is %ld, want %d", read_proc_number("/proc/self/loginuid"), CR_LOGINUID);
    if (read_proc_number("/proc/self/oom_score_adj") != CR_OOM_SCORE_ADJ)
        FAIL_RET("oom_score_adj is %ld, want %d", read_proc_number("/proc/self/oom_score_adj"), CR_OOM_SCORE_ADJ);
}

/* ---- threads ---- */
static void *thread_main(void *arg)
{
    long i = (long)arg;
    tls_index = i;
    if (opt_process_state && setpriority(PRIO_PROCESS, 0, thread_nice(i)) != 0) {
        snprintf(thread_fail[i], sizeof thread_fail[i], "thread %ld: setpriority: %s", i, strerror(errno));
        return NULL;
    }

    if (opt_creds && !creds_thread_setup(i))
        return NULL;

    /* Even threads block SIGWINCH, odd ones do not: masks are per thread. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGWINCH);
    pthread_sigmask(i % 2 == 0 ? SIG_BLOCK : SIG_UNBLOCK, &set, NULL);

    stack_t ss = {.ss_sp = altstacks[i], .ss_size = ALTSTACK_SIZE, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) {
        snprintf(thread_fail[i], sizeof thread_fail[i], "thread %ld: sigaltstack: %s", i, strerror(errno));
        return NULL;
    }

    while (!atomic_load(&stop_threads)) {
        tls_counter++;
        atomic_store(&mirror[i], tls_counter);
        sleep_ms(opt_tick_ms);
    }

    /* The thread checks what only it can see: its TLS, mask and altstack. */
    char *f = thread_fail[i];
    size_t fs = sizeof thread_fail[i];
    uint64_t m = atomic_load(&mirror[i]);
    sigset_t cur;
    stack_t old;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (opt_process_state && (errno || nice != thread_nice(i)))
        snprintf(f, fs, "thread %ld: nice value %d, want %d", i, nice, thread_nice(i));
    else if (tls_index != i)
        snprintf(f, fs, "thread %ld: TLS index is %ld", i, tls_index);
    else if (tls_counter == 0 || tls_counter != m)
        snprintf(f, fs, "thread %ld: TLS counter %llu, mirror %llu", i, (unsigned long long)tls_counter,
                 (unsigned long long)m);
    else if (pthread_sigmask(SIG_BLOCK, NULL, &cur) != 0)
        snprintf(f, fs, "thread %ld: pthread_sigmask failed", i);
    else if (opt_creds && !creds_thread_verify(i, f, fs))
        ;
    else if (sigismember(&cur, SIGWINCH) != (i % 2 == 0))
        snprintf(f, fs, "thread %ld: SIGWINCH %s", i, i % 2 == 0 ? "not blocked" : "blocked");
    else if (!sigismember(&cur, SIGUSR2))
        snprintf(f, fs, "thread %ld: SIGUSR2 not blocked", i);
    else if (sigaltstack(NULL, &old) != 0)
        snprintf(f, fs, "thread %ld: sigaltstack query: %s", i, strerror(errno));
    else if (old.ss_sp != altstacks[i] || old.ss_size != ALTSTACK_SIZE || (old.ss_flags & SS_DISABLE))
        snprintf(f, fs, "thread %ld: sigaltstack is %p+%zu flags %d, want %p+%d", i, old.ss_sp, old.ss_size,
                 old.ss_flags, altstacks[i], ALTSTACK_SIZE);
    return NULL;
}

/* ---- setup ---- */
static void write_all(int fd, const void *buf, size_t n, const char *what)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die(what);
        p += w;
        n -= w;
    }
}

/* DIR/name into out (PATH_MAX + 32 bytes); string ops, as snprintf warns of truncation. */
static void in_dir(char *out, const char *name)
{
    if (strlen(real_dir) + 1 + strlen(name) >= PATH_MAX + 32) {
        errno = ENAMETOOLONG;
        die(name);
    }
    strcpy(out, real_dir);
    strcat(out, "/");
    strcat(out, name);
}

static int open_in_dir(const char *name, int flags)
{
    char path[PATH_MAX + 32];
    in_dir(path, name);
    int fd = open(path, flags, 0644);
    if (fd < 0)
        die(name);
    return fd;
}

static void setup_files(void)
{
    fd_data = open_in_dir("data", O_RDWR | O_CREAT | O_TRUNC);
    write_all(fd_data, "0123456789", 10, "write data");
    fd_dup = dup(fd_data); /* shares fd_data's file description and so its offset */
    if (fd_dup < 0)
        die("dup");
    fd_data2 = open_in_dir("data", O_RDONLY); /* same file, its own description */
    if (lseek(fd_data2, 3, SEEK_SET) != 3)
        die("lseek data2");

    fd_append = open_in_dir("append", O_RDWR | O_APPEND | O_CREAT | O_TRUNC);
    write_all(fd_append, "line1\n", 6, "write append");

    if (pipe(pipe_fds) != 0)
        die("pipe");
    unsigned char pbuf[PIPE_BYTES];
    for (size_t i = 0; i < PIPE_BYTES; i++)
        pbuf[i] = pipe_byte(i);
    write_all(pipe_fds[1], pbuf, PIPE_BYTES, "write pipe");
    if (fcntl(pipe_fds[1], F_SETFL, O_NONBLOCK) != 0)
        die("pipe O_NONBLOCK");

    fd_deleted = open_in_dir("deleted", O_RDWR | O_CREAT | O_TRUNC);
    unsigned char *dbuf = malloc(DELETED_SIZE);
    if (!dbuf)
        die("malloc");
    for (size_t i = 0; i < DELETED_SIZE; i++)
        dbuf[i] = deleted_byte(i);
    write_all(fd_deleted, dbuf, DELETED_SIZE, "write deleted");
    free(dbuf);
    char path[PATH_MAX + 32];
    in_dir(path, "deleted");
    if (unlink(path) != 0)
        die("unlink deleted");

    int null_fd = open("/dev/null", O_RDWR);
    if (null_fd < 0)
        die("/dev/null");
    if (dup2(null_fd, NULL_FD) != NULL_FD)
        die("dup2 /dev/null");
    close(null_fd);
    if (fcntl(NULL_FD, F_SETFD, FD_CLOEXEC) != 0)
        die("FD_CLOEXEC");

    if (chdir(real_dir) != 0)
        die("chdir");
}

static void setup_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART | SA_ONSTACK; /* on a thread, it runs on the altstack */
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        die("sigaction USR1");

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) != 0)
        die("sigaction TERM");

    /* The itimer fires after an hour: only its settings are checked, never a firing. */
    sa.sa_handler = on_alrm;
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGALRM, &sa, NULL) != 0)
        die("sigaction ALRM");
    struct itimerval it = {{TIMER_SECS, 0}, {TIMER_SECS, 0}};
    if (setitimer(ITIMER_REAL, &it, NULL) != 0)
        die("setitimer");

    /* SIGUSR2 blocked before the threads start, so they inherit it blocked. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
        die("block USR2");
}

/* ---- verification ---- */
static void verify_memory(const uint64_t *stack_array)
{
    for (size_t p = 0; p < mem_pages && !failure[0]; p++) {
        uint64_t seed = SEED + page_generation(p) * 0x9e3779b97f4a7c15ULL;
        for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
            uint64_t want = pattern(1, p * WORDS_PER_PAGE + w, seed);
            uint64_t *at = &mem[p * WORDS_PER_PAGE + w];
            if (*at != want) {
                fail("mem pattern mismatch at %p (page %zu word %zu): got 0x%016llx, want 0x%016llx", (void *)at, p, w,
                     (unsigned long long)*at, (unsigned long long)want);
                break;
            }
        }
    }
    for (size_t i = 0; i < HEAP_SIZE && !failure[0]; i++)
        if (heap[i] != heap_byte(i))
            fail("heap pattern mismatch at %p (byte %zu): got 0x%02x, want 0x%02x", (void *)&heap[i], i, heap[i],
                 heap_byte(i));
    for (size_t i = 0; i < GLOBAL_WORDS && !failure[0]; i++)
        if (global_array[i] != pattern(2, i, SEED))
            fail("global pattern mismatch at %p (word %zu): got 0x%016llx", (void *)&global_array[i], i,
                 (unsigned long long)global_array[i]);
    for (size_t i = 0; i < STACK_WORDS && !failure[0]; i++)
        if (stack_array[i] != pattern(3, i, SEED))
            fail("stack pattern mismatch at %p (word %zu): got 0x%016llx", (void *)&stack_array[i], i,
                 (unsigned long long)stack_array[i]);
}

static off_t offset_of(int fd)
{
    return lseek(fd, 0, SEEK_CUR);
}

static void verify_fd_points_at(int fd, const char *name, const char *want)
{
    char link[64], target[PATH_MAX + 32];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) {
        fail("%s: fd %d: readlink: %s", name, fd, strerror(errno));
        return;
    }
    target[n] = 0;
    if (strcmp(target, want) != 0)
        fail("%s: fd %d points at %s, want %s", name, fd, target, want);
}

static void verify_files(void)
{
    char buf[64], want[PATH_MAX + 32];
    struct stat a, b;

    /* data, its dup and its second open */
    in_dir(want, "data");
    verify_fd_points_at(fd_data, "data", want);
    if (failure[0])
        return;
    if (offset_of(fd_data) != 10)
        FAIL_RET("data: offset %lld, want 10", (long long)offset_of(fd_data));
    if (offset_of(fd_dup) != 10)
        FAIL_RET("data dup: offset %lld, want 10", (long long)offset_of(fd_dup));
    if (offset_of(fd_data2) != 3)
        FAIL_RET("data second open: offset %lld, want 3", (long long)offset_of(fd_data2));
    if ((fcntl(fd_data, F_GETFL) & O_ACCMODE) != O_RDWR)
        FAIL_RET("data: not O_RDWR");
    if ((fcntl(fd_data2, F_GETFL) & O_ACCMODE) != O_RDONLY)
        FAIL_RET("data second open: not O_RDONLY");
    if (fcntl(fd_data, F_GETFD) != 0)
        FAIL_RET("data: fd flags %d, want 0", fcntl(fd_data, F_GETFD));
    ssize_t n = pread(fd_data, buf, sizeof buf, 0);
    if (n != 10 || memcmp(buf, "0123456789", 10) != 0)
        FAIL_RET("data: contents differ (%zd bytes)", n);
    if (fstat(fd_data, &a) != 0 || fstat(fd_dup, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev)
        FAIL_RET("data dup: not the same file");
    if (write(fd_dup, "AB", 2) != 2)
        FAIL_RET("data dup: write: %s", strerror(errno));
    if (offset_of(fd_data) != 12)
        FAIL_RET("data dup: offset not shared (data at %lld after writing 2 bytes via the dup, want 12)",
                    (long long)offset_of(fd_data));
    if (offset_of(fd_data2) != 3)
        FAIL_RET("data second open: offset moved to %lld by a write via another description",
                    (long long)offset_of(fd_data2));
    n = pread(fd_data2, buf, sizeof buf, 0);
    if (n != 12 || memcmp(buf, "0123456789AB", 12) != 0)
        FAIL_RET("data second open: contents differ after the write (%zd bytes)", n);

    /* append */
    int fl = fcntl(fd_append, F_GETFL);
    if (fl < 0 || !(fl & O_APPEND))
        FAIL_RET("append: O_APPEND lost (flags 0%o)", fl);
    if ((fl & O_ACCMODE) != O_RDWR)
        FAIL_RET("append: not O_RDWR");
    if (lseek(fd_append, 0, SEEK_SET) != 0 || write(fd_append, "line2\n", 6) != 6)
        FAIL_RET("append: write: %s", strerror(errno));
    n = pread(fd_append, buf, sizeof buf, 0);
    if (n != 12 || memcmp(buf, "line1\nline2\n", 12) != 0)
        FAIL_RET("append: contents differ after an append (%zd bytes)", n);

    /* pipe */
    if (fstat(pipe_fds[0], &a) != 0 || fstat(pipe_fds[1], &b) != 0 || !S_ISFIFO(a.st_mode) ||
        a.st_ino != b.st_ino)
        FAIL_RET("pipe: ends are not one pipe");
    if ((fcntl(pipe_fds[0], F_GETFL) & O_ACCMODE) != O_RDONLY ||
        (fcntl(pipe_fds[1], F_GETFL) & O_ACCMODE) != O_WRONLY)
        FAIL_RET("pipe: access modes differ");
    if (!(fcntl(pipe_fds[1], F_GETFL) & O_NONBLOCK))
        FAIL_RET("pipe: write end lost O_NONBLOCK");
    if (fcntl(pipe_fds[0], F_GETFL) & O_NONBLOCK)
        FAIL_RET("pipe: read end gained O_NONBLOCK");
    int queued = -1;
    if (ioctl(pipe_fds[0], FIONREAD, &queued) != 0 || queued != PIPE_BYTES)
        FAIL_RET("pipe: %d bytes queued, want %d", queued, PIPE_BYTES);
    unsigned char pbuf[PIPE_BYTES];
    size_t got = 0;
    while (got < PIPE_BYTES) {
        n = read(pipe_fds[0], pbuf + got, PIPE_BYTES - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            FAIL_RET("pipe: read: %s", n < 0 ? strerror(errno) : "end of file");
        got += n;
    }
    for (size_t i = 0; i < PIPE_BYTES; i++)
        if (pbuf[i] != pipe_byte(i))
            FAIL_RET("pipe: byte %zu is 0x%02x, want 0x%02x", i, pbuf[i], pipe_byte(i));

    /* deleted */
    in_dir(want, "deleted (deleted)");
    verify_fd_points_at(fd_deleted, "deleted", want);
    if (failure[0])
        return;
    if (fstat(fd_deleted, &a) != 0 || a.st_nlink != 0 || a.st_size != DELETED_SIZE)
        FAIL_RET("deleted: nlink %lu size %lld, want 0 and %d", (unsigned long)a.st_nlink, (long long)a.st_size,
                    DELETED_SIZE);
    if (offset_of(fd_deleted) != DELETED_SIZE)
        FAIL_RET("deleted: offset %lld, want %d", (long long)offset_of(fd_deleted), DELETED_SIZE);
    unsigned char *dbuf = malloc(DELETED_SIZE);
    if (!dbuf)
        FAIL_RET("deleted: malloc");
    n = pread(fd_deleted, dbuf, DELETED_SIZE, 0);
    size_t bad = DELETED_SIZE;
    for (size_t i = 0; n == DELETED_SIZE && i < DELETED_SIZE; i++)
        if (dbuf[i] != deleted_byte(i)) {
            bad = i;
            break;
        }
    free(dbuf);
    if (n != DELETED_SIZE)
        FAIL_RET("deleted: read %zd bytes, want %d", n, DELETED_SIZE);
    if (bad != DELETED_SIZE)
        FAIL_RET("deleted: byte %zu differs", bad);

    /* /dev/null */
    if (fstat(NULL_FD, &a) != 0 || !S_ISCHR(a.st_mode) || a.st_rdev != makedev(1, 3))
        FAIL_RET("fd %d: not /dev/null", NULL_FD);
    if ((fcntl(NULL_FD, F_GETFL) & O_ACCMODE) != O_RDWR)
        FAIL_RET("fd %d: /dev/null not O_RDWR", NULL_FD);
    if (fcntl(NULL_FD, F_GETFD) != FD_CLOEXEC)
        FAIL_RET("fd %d: FD_CLOEXEC lost", NULL_FD);

    /* cwd */
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd))
        FAIL_RET("cwd: getcwd: %s", strerror(errno));
    if (strcmp(cwd, real_dir) != 0)
        FAIL_RET("cwd is %s, want %s", cwd, real_dir);
}

static void verify_process(void)
{
    mode_t old = umask(0);
    umask(old);
    if (old != 027)
        FAIL_RET("umask is 0%o, want 027", (unsigned)old);

    int fl = fcntl(log_fd, F_GETFL);
    if (fl < 0 || !(fl & O_APPEND))
        FAIL_RET("log: O_APPEND lost");

    sigset_t set;
    if (sigpending(&set) != 0 || !sigismember(&set, SIGUSR2))
        FAIL_RET("SIGUSR2 not pending");
    if (sigismember(&set, SIGUSR1) || sigismember(&set, SIGWINCH))
        FAIL_RET("unexpected pending signal");
    if (pthread_sigmask(SIG_BLOCK, NULL, &set) != 0 || !sigismember(&set, SIGUSR2))
        FAIL_RET("SIGUSR2 not blocked in the main thread");
    if (sigismember(&set, SIGWINCH) || sigismember(&set, SIGUSR1) || sigismember(&set, SIGTERM))
        FAIL_RET("main thread blocks a signal it should not");

    struct sigaction sa;
    if (sigaction(SIGUSR1, NULL, &sa) != 0 || sa.sa_handler != on_usr1)
        FAIL_RET("SIGUSR1 handler lost");
    if ((sa.sa_flags & (SA_RESTART | SA_ONSTACK)) != (SA_RESTART | SA_ONSTACK))
        FAIL_RET("SIGUSR1 handler flags 0x%x lack SA_RESTART|SA_ONSTACK", sa.sa_flags);
    if (!sigismember(&sa.sa_mask, SIGUSR2) || sigismember(&sa.sa_mask, SIGWINCH))
        FAIL_RET("SIGUSR1 handler mask differs");
    if (sigaction(SIGTERM, NULL, &sa) != 0 || sa.sa_handler != on_term)
        FAIL_RET("SIGTERM handler lost");
    if (sigaction(SIGALRM, NULL, &sa) != 0 || sa.sa_handler != on_alrm)
        FAIL_RET("SIGALRM handler lost");
    if (sigaction(SIGWINCH, NULL, &sa) != 0 || sa.sa_handler != SIG_DFL)
        FAIL_RET("SIGWINCH gained a handler");

    struct itimerval it;
    if (getitimer(ITIMER_REAL, &it) != 0)
        FAIL_RET("getitimer: %s", strerror(errno));
    if (it.it_interval.tv_sec != TIMER_SECS || it.it_interval.tv_usec != 0)
        FAIL_RET("itimer interval %lld.%06lld s, want %d s", (long long)it.it_interval.tv_sec,
                    (long long)it.it_interval.tv_usec, TIMER_SECS);
    if ((it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0) || it.it_value.tv_sec > TIMER_SECS)
        FAIL_RET("itimer remaining %lld.%06lld s, want in (0, %d]", (long long)it.it_value.tv_sec,
                    (long long)it.it_value.tv_usec, TIMER_SECS);
    long left_ms = it.it_value.tv_sec * 1000L + it.it_value.tv_usec / 1000;
    if (left_ms > TIMER_SECS * 1000L - min_run_ms())
        FAIL_RET("itimer has %ld ms left after at least %ld ms run: re-armed from scratch", left_ms, min_run_ms());
    if (alrm_count != 0)
        FAIL_RET("SIGALRM fired %d times", (int)alrm_count);
}

/* ---- mapping churn (--churn): areas mapped, grown, moved, emptied and replaced
 * every tick, for pre-copy rounds that must follow the process's mapping changes ---- */
#define CHURN_SLOTS 4
struct churn {
    unsigned char *p;
    size_t len;
    uint64_t seed;
    long zero_page; /* a page emptied with MADV_DONTNEED, which must read zero; or -1 */
};
static struct churn churn[CHURN_SLOTS];

static unsigned char churn_byte(uint64_t seed, size_t i)
{
    return (unsigned char)((seed * 131 + i * 7 + (i >> 12)) & 0xff);
}

static void churn_fill(struct churn *c, size_t from)
{
    for (size_t i = from; i < c->len; i++)
        c->p[i] = churn_byte(c->seed, i);
}

static void churn_check(void)
{
    for (int s = 0; s < CHURN_SLOTS && !failure[0]; s++) {
        struct churn *c = &churn[s];
        for (size_t i = 0; c->p && i < c->len; i++) {
            unsigned char want = (long)(i / PAGE) == c->zero_page ? 0 : churn_byte(c->seed, i);
            if (c->p[i] != want) {
                fail("churn slot %d byte %zu of %zu: %u, expected %u", s, i, c->len, c->p[i], want);
                break;
            }
        }
    }
}

static void churn_step(uint64_t tick)
{
    struct churn *c = &churn[tick % CHURN_SLOTS];
    switch (c->p ? (tick / CHURN_SLOTS) % 3 : 0) {
    case 0: /* replace: a new area, likely at the old address */
        if (c->p)
            munmap(c->p, c->len);
        c->len = PAGE * (16 + tick % 48);
        c->seed = tick;
        c->zero_page = -1;
        c->p = mmap(NULL, c->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c->p == MAP_FAILED)
            die("churn mmap");
        churn_fill(c, 0);
        break;
    case 1: { /* grow, moving when it must */
        size_t old = c->len;
        void *q = mremap(c->p, old, old + 4 * PAGE, MREMAP_MAYMOVE);
        if (q == MAP_FAILED)
            die("churn mremap");
        c->p = q;
        c->len = old + 4 * PAGE;
        churn_fill(c, old);
        break;
    }
    default: /* empty one page: it reads zero from now on */
        c->zero_page = (long)((tick / 7) % (c->len / PAGE));
        if (madvise(c->p + c->zero_page * PAGE, PAGE, MADV_DONTNEED))
            die("churn madvise");
        break;
    }
}

/* A region that is, tick by tick, three mappings (two written areas around a PROT_NONE
 * page) and then one fresh mapping over all of it: a copy must have it as one mapping
 * whenever it is one here (split, a call on the whole of it such as mremap fails). */
#define RESHAPE_PAGES 17
#define RESHAPE_HOLE 8
static unsigned char *reshape_base;
static int reshape_whole;
static uint64_t reshape_seed;

static int reshape_written(size_t page)
{
    return reshape_whole || page != RESHAPE_HOLE;
}

static void reshape_check(void)
{
    uintptr_t start = (uintptr_t)reshape_base, end = start + RESHAPE_PAGES * PAGE;
    if (!reshape_base || failure[0])
        return;
    for (size_t i = 0; i < RESHAPE_PAGES * PAGE; i++) {
        if (reshape_written(i / PAGE) && reshape_base[i] != churn_byte(reshape_seed, i)) {
            fail("reshaped region byte %zu: %u, expected %u", i, reshape_base[i], churn_byte(reshape_seed, i));
            return;
        }
    }
    if (!reshape_whole)
        return;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps)
        die("reshape: /proc/self/maps");
    char line[512];
    while (fgets(line, sizeof line, maps)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx", &s, &e) != 2)
            continue;
        if ((s > start && s < end) || (e > start && e < end)) {
            fail("reshaped region %#lx-%#lx is split at a mapping %lx-%lx", (unsigned long)start, (unsigned long)end, s, e);
            break;
        }
    }
    fclose(maps);
}

static void reshape_step(uint64_t tick)
{
    size_t len = RESHAPE_PAGES * PAGE;
    int rw = PROT_READ | PROT_WRITE, fixed = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    if (!reshape_base) {
        reshape_base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (reshape_base == MAP_FAILED)
            die("reshape mmap");
    }
    reshape_whole = !reshape_whole;
    reshape_seed = tick;
    if (reshape_whole) {
        if (mmap(reshape_base, len, rw, fixed, -1, 0) == MAP_FAILED)
            die("reshape mmap");
    } else {
        unsigned char *hole = reshape_base + RESHAPE_HOLE * PAGE;
        if (mmap(reshape_base, RESHAPE_HOLE * PAGE, rw, fixed, -1, 0) == MAP_FAILED ||
            mmap(hole, PAGE, PROT_NONE, fixed, -1, 0) == MAP_FAILED ||
            mmap(hole + PAGE, len - (RESHAPE_HOLE + 1) * PAGE, rw, fixed, -1, 0) == MAP_FAILED)
            die("reshape mmap");
    }
    for (size_t i = 0; i < len; i++)
        if (reshape_written(i / PAGE))
            reshape_base[i] = churn_byte(reshape_seed, i);
}

/* ---- --move-mem: every tick the patterned mapping moves to a new address (mremap), and
 * one of its pages is emptied (MADV_DONTNEED), must read zero, and is written again: what
 * a post-copy must follow while the pages are still on their way ---- */
static void move_mem(uint64_t tick)
{
    size_t len = mem_pages * PAGE;
    if (len == 0)
        return;
    void *to = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (to == MAP_FAILED)
        die("move-mem reserve");
    void *moved = mremap(mem, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
    if (moved == MAP_FAILED)
        die("move-mem mremap");
    mem = moved;
    size_t p = (size_t)(tick * 7919) % mem_pages;
    if (madvise((char *)mem + p * PAGE, PAGE, MADV_DONTNEED))
        die("move-mem madvise");
    for (size_t w = 0; w < WORDS_PER_PAGE; w++) {
        if (mem[p * WORDS_PER_PAGE + w] != 0) {
            fail("move-mem: page %zu holds data after MADV_DONTNEED", p);
            break;
        }
    }
    fill_mem_page(p, page_generation(p));
}

/* ---- --fork-check: every 20 ticks a child is forked that checks the patterned memory
 * (its own copy of it) and exits 0 or 1; the parent reaps it at a later tick, logging
 * `fork-check ok N pid P` (N checks passed so far, P the parent's pid now). What a
 * post-copy must get right for a process that forks before all its pages arrived.
 * A checkpoint would take a child along and a migration refuses it, so a test quiets
 * the check before a checkpoint: at SIGHUP the current child is reaped, `fork-check
 * quiet pid P` logged, and nothing is forked until the process finds itself restored
 * (its start time in /proc/self/stat changed: a new process, whatever its pid), a
 * second SIGHUP comes, or FORK_QUIET_SECS pass; then `fork-check resumed pid P <why>`
 * is logged and a child forked at once — in a post-copy, before the pages arrived.
 * A child that saw wrong memory is logged `fork-check failed pid P` at once and fails
 * the verdict; a child that is not this process's (ECHILD: dropped by a restore) fails
 * it too. At exit the last child is waited for ---- */
#define FORK_QUIET_SECS 60
static uint64_t fork_checks_ok;
static volatile sig_atomic_t hup_count;
static sig_atomic_t hup_seen;
static int fork_quiet, fork_now;
static unsigned long long quiet_start_time;
static struct timespec quiet_until;

static void on_hup(int sig)
{
    (void)sig;
    hup_count++;
}

static void setup_fork_check(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_hup;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGHUP, &sa, NULL) != 0)
        die("sigaction HUP");
}

/* Field 22 of /proc/self/stat: when this process started, in clock ticks since boot. */
static unsigned long long own_start_time(void)
{
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    /* The space before field f, from the one before the state (field 3). */
    for (int f = 3; p && f <= 22; f++)
        p = strchr(p + 1, ' ');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static void fork_check_reap(int flags)
{
    int status;
    pid_t r;
    do
        r = waitpid(fork_child, &status, flags);
    while (r < 0 && errno == EINTR);
    if (r == fork_child) {
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fail("fork-check: a child forked at a tick saw wrong memory (status %d)", status);
            logf_("fork-check failed pid %d", (int)getpid());
        } else
            logf_("fork-check ok %llu pid %d", (unsigned long long)++fork_checks_ok, (int)getpid());
        fork_child = 0;
    } else if (r < 0 && errno == ECHILD) {
        fail("fork-check: child %d is not this process's (ECHILD): a child dropped by a restore", (int)fork_child);
        logf_("fork-check failed pid %d", (int)getpid());
        fork_child = 0;
    } else if (r < 0) {
        fail("fork-check: waitpid: %s", strerror(errno));
        fork_child = 0;
    }
}

static void fork_check_resume(const char *why)
{
    fork_quiet = 0;
    fork_now = 1;
    logf_("fork-check resumed pid %d %s", (int)getpid(), why);
}

static void fork_check(uint64_t tick)
{
    sig_atomic_t h = hup_count;
    if (h != hup_seen) {
        hup_seen = h;
        if (!fork_quiet) {
            if (fork_child > 0)
                fork_check_reap(0);
            fork_quiet = 1;
            quiet_start_time = own_start_time();
            clock_gettime(CLOCK_MONOTONIC, &quiet_until);
            quiet_until.tv_sec += FORK_QUIET_SECS;
            logf_("fork-check quiet pid %d", (int)getpid());
            return;
        }
        fork_check_resume("asked");
    }
    if (fork_quiet) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        unsigned long long started = own_start_time();
        if (started != 0 && started != quiet_start_time)
            fork_check_resume("restored");
        else if (now.tv_sec > quiet_until.tv_sec)
            fork_check_resume("timeout");
        else
            return;
    }
    if (fork_child > 0) {
        fork_check_reap(WNOHANG);
        return;
    }
    if (!fork_now && tick % 20 != 0)
        return;
    fork_now = 0;
    fork_child = fork();
    if (fork_child < 0)
        die("fork-check fork");
    if (fork_child == 0) {
        for (size_t p = 0; p < mem_pages; p++) {
            uint64_t seed = SEED + page_generation(p) * 0x9e3779b97f4a7c15ULL;
            for (size_t w = 0; w < WORDS_PER_PAGE; w++)
                if (mem[p * WORDS_PER_PAGE + w] != pattern(1, p * WORDS_PER_PAGE + w, seed))
                    _exit(1);
        }
        _exit(opt_mm_flags ? mmf_in_child() : 0);
    }
}

/* ---- --rseq: the main thread waits for its next tick spinning inside an rseq critical
 * section (reading the TSC), so a checkpoint almost always stops it there. Whatever
 * interrupts the section — preemption, migration, a checkpoint — must send it to the
 * abort handler, which counts and enters again ---- */
static uint64_t rdtsc_now(void)
{
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static void calibrate_tsc(void)
{
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t t0 = rdtsc_now();
    sleep_ms(20);
    uint64_t t1 = rdtsc_now();
    clock_gettime(CLOCK_MONOTONIC, &b);
    uint64_t ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ull + (uint64_t)(b.tv_nsec - a.tv_nsec);
    tsc_per_ms = (t1 - t0) * 1000000ull / (ns ? ns : 1);
}

/* One pass of the section: 0 once the deadline passed, 1 if aborted. */
__attribute__((noinline)) static int rseq_spin(struct rseq *rs, uint64_t deadline)
{
    int aborted = 0;
    __asm__ __volatile__(
        ".pushsection __rseq_cs, \"aw\"\n\t"
        ".balign 32\n\t"
        "ferry_rseq_desc:\n\t"
        ".long 0, 0\n\t"
        ".quad ferry_rseq_start, ferry_rseq_end - ferry_rseq_start, ferry_rseq_abort\n\t"
        ".popsection\n\t"
        "leaq ferry_rseq_desc(%%rip), %%rax\n\t"
        "movq %%rax, %[cs]\n\t"
        ".globl ferry_rseq_start\n\t"
        "ferry_rseq_start:\n\t"
        "rdtsc\n\t"
        "shlq $32, %%rdx\n\t"
        "orq %%rdx, %%rax\n\t"
        "cmpq %[deadline], %%rax\n\t"
        "jb ferry_rseq_start\n\t"
        ".globl ferry_rseq_end\n\t"
        "ferry_rseq_end:\n\t"
        "jmp 6f\n\t"
        ".pushsection __rseq_failure, \"ax\"\n\t"
        ".byte 0x0f, 0xb9, 0x3d\n\t"
        ".long 0x53053053\n\t"
        ".globl ferry_rseq_abort\n\t"
        "ferry_rseq_abort:\n\t"
        "movl $1, %[aborted]\n\t"
        "jmp 6f\n\t"
        ".popsection\n\t"
        "6:\n\t"
        : [cs] "=m"(rs->rseq_cs), [aborted] "+m"(aborted)
        : [deadline] "r"(deadline)
        : "rax", "rdx", "memory", "cc");
    return aborted;
}

extern char ferry_rseq_start[], ferry_rseq_end[], ferry_rseq_abort[];

static void rseq_wait(long ms)
{
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    uint64_t deadline = rdtsc_now() + tsc_per_ms * (uint64_t)ms;
    while (rseq_spin(rs, deadline))
        rseq_aborts++;
}

/* After a restore the main thread's rseq area must be registered again, where glibc
 * registered it and with its signature: asking to register it once more answers EBUSY
 * exactly then (EINVAL or EPERM: registered otherwise; 0: it was not registered, and
 * now is). Without it the kernel would never abort a section again. */
static void verify_rseq(void)
{
    struct rseq *rs = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    unsigned int len = __rseq_size < 32 ? 32 : __rseq_size; /* what glibc registers */
    long r = syscall(SYS_rseq, rs, len, 0, RSEQ_SIG);
    if (r == 0)
        FAIL_RET("rseq: the main thread's area was not registered");
    if (errno != EBUSY)
        FAIL_RET("rseq: the main thread's area is registered otherwise (%s)", strerror(errno));
}

/* ---- file locks (--locks): in DIR, "lock-posix" holds POSIX write locks on bytes 0-9
 * (fcntl) and 20-24 (lockf) and a read lock from byte 100 to the end; "lock-ofd" an OFD
 * write lock on bytes 0-4095 and an OFD read lock on 8192-8291; "lock-flock" flock
 * LOCK_EX through an fd and its dup (one description); "lock-shared" flock LOCK_SH.
 * The check runs in a forked helper, another process with descriptions of its own, which
 * must meet every lock exactly where it was (and nowhere else). */
static int lk_posix = -1, lk_ofd = -1, lk_flock = -1, lk_flock_dup = -1, lk_shared = -1;

static int lk_set(int fd, int cmd, short type, off_t start, off_t len)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl);
}

static void setup_locks(void)
{
    lk_posix = open_in_dir("lock-posix", O_RDWR | O_CREAT | O_TRUNC);
    if (lk_set(lk_posix, F_SETLK, F_WRLCK, 0, 10) != 0 || lseek(lk_posix, 20, SEEK_SET) != 20 ||
        lockf(lk_posix, F_TLOCK, 5) != 0 || lk_set(lk_posix, F_SETLK, F_RDLCK, 100, 0) != 0)
        die("POSIX locks on lock-posix");
    lk_ofd = open_in_dir("lock-ofd", O_RDWR | O_CREAT | O_TRUNC);
    if (lk_set(lk_ofd, F_OFD_SETLK, F_WRLCK, 0, 4096) != 0 || lk_set(lk_ofd, F_OFD_SETLK, F_RDLCK, 8192, 100) != 0)
        die("OFD locks on lock-ofd");
    lk_flock = open_in_dir("lock-flock", O_RDWR | O_CREAT | O_TRUNC);
    lk_flock_dup = dup(lk_flock);
    if (lk_flock_dup < 0 || flock(lk_flock_dup, LOCK_EX | LOCK_NB) != 0)
        die("flock LOCK_EX on lock-flock");
    lk_shared = open_in_dir("lock-shared", O_RDONLY | O_CREAT);
    if (flock(lk_shared, LOCK_SH | LOCK_NB) != 0)
        die("flock LOCK_SH on lock-shared");
}

/* What F_GETLK (or F_OFD_GETLK) answers for a `type` lock on [start, start+len):
 * the conflicting lock's type, start, length and pid. */
static int lk_probe(int fd, int cmd, short type, off_t start, off_t len, short want_type, off_t want_start,
                    off_t want_len, pid_t want_pid, char *msg, size_t n, const char *file)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    if (fcntl(fd, cmd, &fl) != 0) {
        snprintf(msg, n, "%s: GETLK: %s", file, strerror(errno));
        return 0;
    }
    if (fl.l_type != want_type ||
        (want_type != F_UNLCK && (fl.l_start != want_start || fl.l_len != want_len || fl.l_pid != want_pid))) {
        snprintf(msg, n, "%s: a %s lock on %lld+%lld meets type %d at %lld+%lld of pid %d, want type %d at %lld+%lld of pid %d",
                 file, type == F_WRLCK ? "write" : "read", (long long)start, (long long)len, fl.l_type,
                 (long long)fl.l_start, (long long)fl.l_len, fl.l_pid, want_type, (long long)want_start,
                 (long long)want_len, want_pid);
        return 0;
    }
    return 1;
}

/* In the helper: msg gets the first lock of `holder` found missing or changed. */
static void locks_from_outside(pid_t holder, char *msg, size_t n)
{
    char path[PATH_MAX + 32];
    in_dir(path, "lock-posix");
    int p = open(path, O_RDWR);
    in_dir(path, "lock-ofd");
    int o = open(path, O_RDWR);
    in_dir(path, "lock-flock");
    int f = open(path, O_RDONLY);
    in_dir(path, "lock-shared");
    int s = open(path, O_RDONLY);
    if (p < 0 || o < 0 || f < 0 || s < 0) {
        snprintf(msg, n, "helper: opening the lock files: %s", strerror(errno));
        return;
    }
    const char *pf = "lock-posix", *of = "lock-ofd";
    if (!lk_probe(p, F_GETLK, F_WRLCK, 0, 1, F_WRLCK, 0, 10, holder, msg, n, pf) ||
        !lk_probe(p, F_GETLK, F_WRLCK, 10, 10, F_UNLCK, 0, 0, 0, msg, n, pf) ||
        !lk_probe(p, F_GETLK, F_WRLCK, 20, 1, F_WRLCK, 20, 5, holder, msg, n, pf) ||
        !lk_probe(p, F_GETLK, F_WRLCK, 25, 75, F_UNLCK, 0, 0, 0, msg, n, pf) ||
        !lk_probe(p, F_GETLK, F_RDLCK, 100, 0, F_UNLCK, 0, 0, 0, msg, n, pf) ||
        !lk_probe(p, F_GETLK, F_WRLCK, 1000, 1, F_RDLCK, 100, 0, holder, msg, n, pf) ||
        !lk_probe(o, F_OFD_GETLK, F_WRLCK, 0, 1, F_WRLCK, 0, 4096, -1, msg, n, of) ||
        !lk_probe(o, F_OFD_GETLK, F_WRLCK, 4096, 4096, F_UNLCK, 0, 0, 0, msg, n, of) ||
        !lk_probe(o, F_OFD_GETLK, F_WRLCK, 8291, 1, F_RDLCK, 8192, 100, -1, msg, n, of) ||
        !lk_probe(o, F_OFD_GETLK, F_RDLCK, 8192, 1, F_UNLCK, 0, 0, 0, msg, n, of) ||
        !lk_probe(o, F_OFD_GETLK, F_WRLCK, 8292, 1, F_UNLCK, 0, 0, 0, msg, n, of))
        return;
    if (flock(f, LOCK_SH | LOCK_NB) == 0 || errno != EWOULDBLOCK)
        snprintf(msg, n, "lock-flock: another process got LOCK_SH (%s): the LOCK_EX is gone", strerror(errno));
    else if (flock(s, LOCK_SH | LOCK_NB) != 0)
        snprintf(msg, n, "lock-shared: another process cannot share it: %s", strerror(errno));
    else if (flock(s, LOCK_UN) != 0 || flock(s, LOCK_EX | LOCK_NB) == 0 || errno != EWOULDBLOCK)
        snprintf(msg, n, "lock-shared: another process got LOCK_EX (%s): the LOCK_SH is gone", strerror(errno));
}

static void verify_locks(void)
{
    int ends[2];
    if (pipe(ends) != 0)
        FAIL_RET("locks: pipe: %s", strerror(errno));
    pid_t holder = getpid();
    pid_t child = fork();
    if (child < 0)
        FAIL_RET("locks: fork: %s", strerror(errno));
    if (child == 0) {
        char msg[400] = "";
        locks_from_outside(holder, msg, sizeof msg);
        write_all(ends[1], msg, strlen(msg), "helper write");
        _exit(0);
    }
    close(ends[1]);
    char msg[400];
    size_t got = 0;
    for (ssize_t r; got < sizeof msg - 1 && (r = read(ends[0], msg + got, sizeof msg - 1 - got)) != 0;)
        if (r > 0)
            got += r;
        else if (errno != EINTR)
            break;
    msg[got] = 0;
    close(ends[0]);
    int status;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR)
        ;
    if (msg[0])
        FAIL_RET("%s", msg);
    /* The holder's own fds: the dup still shares the flock description. */
    if (flock(lk_flock, LOCK_EX | LOCK_NB) != 0)
        FAIL_RET("lock-flock: its own fd cannot take LOCK_EX: %s", strerror(errno));
}

/* ---- seccomp (--seccomp) ----
 * Two stacked filters: the first installed with TSYNC (and LOG) by the main thread once
 * the threads run, so every thread shares it; the second in the main thread alone. Each
 * turns one harmless call into an errno and kills the process for a call ferry's own
 * checkpoint injects (an executable mmap: its scratch area; prctl(PR_GET_SECUREBITS):
 * the creds plugin), so a checkpoint that let its calls meet the filters kills it. */
static int sc_install(unsigned flags, struct sock_filter *insns, unsigned short len)
{
    struct sock_fprog prog = {len, insns};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

#define SC_NR BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define SC_ARG(n) BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[n]))

static void setup_seccomp(void)
{
    struct sock_filter first[] = {
        SC_NR,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mmap, 0, 3),
        SC_ARG(2),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_filter second[] = {
        SC_NR,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getsid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_prctl, 0, 3),
        SC_ARG(0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PR_GET_SECUREBITS, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    /* Root: CAP_SYS_ADMIN lets it install filters without no_new_privs. */
    if (sc_install(SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG, first, sizeof first / sizeof first[0]) != 0)
        die("seccomp: first filter (TSYNC)");
    if (sc_install(0, second, sizeof second / sizeof second[0]) != 0)
        die("seccomp: second filter");
}

/* The status line `key` of thread `tid` as a number, or -1. */
static long sc_status(pid_t tid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/self/task/%d/status", (int)tid);
    FILE *f = fopen(path, "r");
    long v = -1;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':')
            v = strtol(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

/* A forked child that makes a call the filters kill: it must die of SIGSYS. */
static int sc_killed(int exec_mmap)
{
    pid_t c = fork();
    if (c == 0) {
        if (exec_mmap)
            mmap(NULL, PAGE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        else
            prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
        _exit(0);
    }
    int status;
    if (c < 0 || waitpid(c, &status, 0) != c)
        return 0;
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS;
}

/* Every tick: the first filter is in force (after a post-copy resume too, while the
 * memory still arrives under ferry's tracing). */
static void seccomp_tick(uint64_t tick)
{
    errno = 0;
    if (syscall(SYS_getppid) != -1 || errno != EPERM)
        fail("seccomp: at tick %llu getppid gave %s, want EPERM: the filters were not in force",
             (unsigned long long)tick, errno ? strerror(errno) : "success");
}

/* Runs while the threads still do: each thread's filters are checked from /proc. */
static void verify_seccomp(void)
{
    pid_t me = getpid();
    if (sc_status(me, "Seccomp") != 2 || sc_status(me, "Seccomp_filters") != 2)
        FAIL_RET("seccomp: the main thread has Seccomp %ld, Seccomp_filters %ld, want 2 and 2", sc_status(me, "Seccomp"),
                 sc_status(me, "Seccomp_filters"));
    DIR *d = opendir("/proc/self/task");
    if (!d)
        FAIL_RET("seccomp: /proc/self/task: %s", strerror(errno));
    long threads = 0;
    for (struct dirent *e; (e = readdir(d));) {
        pid_t tid = (pid_t)atoi(e->d_name);
        if (tid <= 0 || tid == me)
            continue;
        threads++;
        if (sc_status(tid, "Seccomp") != 2 || sc_status(tid, "Seccomp_filters") != 1) {
            closedir(d);
            FAIL_RET("seccomp: thread %d has Seccomp %ld, Seccomp_filters %ld, want 2 and 1 (the shared filter)", (int)tid,
                     sc_status(tid, "Seccomp"), sc_status(tid, "Seccomp_filters"));
        }
    }
    closedir(d);
    if (threads != opt_threads)
        FAIL_RET("seccomp: %ld other threads, want %ld", threads, opt_threads);
    errno = 0;
    if (syscall(SYS_getppid) != -1 || errno != EPERM)
        FAIL_RET("seccomp: getppid gave %s, want EPERM from the first filter", strerror(errno));
    errno = 0;
    if (syscall(SYS_getsid, 0) != -1 || errno != EACCES)
        FAIL_RET("seccomp: getsid gave %s, want EACCES from the second filter", strerror(errno));
    if (syscall(SYS_getpid) != me || syscall(SYS_getuid) < 0)
        FAIL_RET("seccomp: an allowed call failed");
    if (!sc_killed(0))
        FAIL_RET("seccomp: prctl(PR_GET_SECUREBITS) no longer kills (second filter)");
    if (!sc_killed(1))
        FAIL_RET("seccomp: an executable mmap no longer kills (first filter)");
    /* TSYNC again: it works only while every thread's filters are the main thread's
     * own or their ancestors — the first filter still one object shared by all. */
    struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    long r = sc_install(SECCOMP_FILTER_FLAG_TSYNC, allow, 1);
    if (r != 0)
        FAIL_RET("seccomp: TSYNC failed (%ld, %s): the threads no longer share the first filter", r, strerror(errno));
}

/* ---- traps, debug registers and the vDSO (--self-trap, --single-step, --watchpoint,
 * --sigtrap-pending, --vdso-moved, --vdso-unmapped, --vdso-moved-whole): see traps.c ---- */
#include "traps.c"
/* ---- --tree N: N children, forked before `ready`, each a process of its own that a
 * checkpoint must take with its parent. A child closes every fd it inherited (it shares
 * no open file description with its parent), maps a 1 MiB region of its own with a
 * pattern seeded by its index, and every tick checks that region whole and one page of
 * the memory it inherited (round robin); at the first mismatch it exits 1, at SIGTERM
 * it exits 0. The parent checks every tick that it still has its N children (listed in
 * /proc/self/task/TID/children) and that none has exited (waitpid(-1, WNOHANG) gives 0:
 * children, none gone — ECHILD would mean they are not its own); at the end it sends
 * each a SIGTERM and reaps them all, each of which must exit 0 ---- */
#define TREE_MAX 16
#define TREE_WORDS (1024 * 1024 / 8)
static long opt_tree;

/* --tree-pipes: the children in a ring of pipes, child k writing pipe k (fd 101) and
 * reading pipe k-1 (fd 100), each made before the first fork and closed by the parent,
 * so that each end is in one process only. Every tick a child writes up to RING_BURST
 * words (a tag | its count; O_NONBLOCK, up to a full pipe) and reads half as many: the
 * pipes fill, and bytes are in flight at any moment. The reader checks each word is
 * the next of its writer's (a byte lost or read twice breaks the sequence), the writer
 * that its pipe has the size it set (32 KiB or 128 KiB, not the default). At a failure
 * the child exits with the code of the check (4 size, 5 write, 6 read or end of file,
 * 7 sequence).
 * --tree-sockets: the children also in a ring of socket pairs (stream, datagram for odd
 * k: a word a message), child k holding one end of pair k (fd 102, the other end child
 * k+1's) and one of pair k-1 (fd 103): words flow both ways on each pair, checked as on the pipes (exit 8 write, 9 read or
 * end of file, 10 sequence). */
#define RING_BURST 64
static int opt_tree_pipes, opt_tree_sockets;
static int ring[TREE_MAX][2], sock_ring[TREE_MAX][2];

static int ring_size(long k)
{
    return k % 2 ? 128 * 1024 : 32 * 1024;
}

static void setup_ring(void)
{
    for (long k = 0; opt_tree_pipes && k < opt_tree; k++) {
        if (pipe2(ring[k], O_NONBLOCK | O_CLOEXEC) != 0)
            die("ring pipe2");
        if (fcntl(ring[k][1], F_SETPIPE_SZ, ring_size(k)) != ring_size(k))
            die("ring F_SETPIPE_SZ");
    }
    for (long k = 0; opt_tree_sockets && k < opt_tree; k++)
        if (socketpair(AF_UNIX, (k % 2 ? SOCK_DGRAM : SOCK_STREAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sock_ring[k]) != 0)
            die("ring socketpair");
}

/* One flow: up to RING_BURST words written to `out` (tag_out | count), half as many
 * read from `in`, each checked to be tag_in | the next count. 0, or 1 write, 2 read,
 * 3 sequence; negative (-1 write, -2 read) when the other side is gone (EPIPE, end of
 * file): a neighbour that failed its own check and exited, which its parent reports,
 * and only at the end this child (else the neighbour's exit races with this one's).
 * Nothing once told to end. */
static int flow_step(int out, int in, uint64_t tag_out, uint64_t tag_in, uint64_t *sent, uint64_t *got)
{
    for (int i = 0; i < RING_BURST && !term_flag; i++) {
        uint64_t v = tag_out | *sent;
        ssize_t n = write(out, &v, sizeof v);
        if (n < 0 && errno == EAGAIN)
            break;
        if (n < 0 && (errno == EPIPE || errno == ECONNREFUSED || errno == ECONNRESET))
            return -1;
        if (n != sizeof v)
            return 1;
        (*sent)++;
    }
    for (int i = 0; i < RING_BURST / 2 && !term_flag; i++) {
        uint64_t v;
        ssize_t n = read(in, &v, sizeof v);
        if (n < 0 && errno == EAGAIN)
            break;
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            return -2;
        if (n != sizeof v)
            return 2;
        if (v != (tag_in | *got))
            return 3;
        (*got)++;
    }
    return 0;
}

#define TAG(kind, k) ((uint64_t)((kind) * 0x100 + (k)) << 40)

static int ring_tick(long k, uint64_t counts[6])
{
    long prev = (k + opt_tree - 1) % opt_tree, next = (k + 1) % opt_tree;
    if (opt_tree_pipes) {
        if (fcntl(101, F_GETPIPE_SZ) != ring_size(k))
            return 4;
        int r = flow_step(101, 100, TAG(0, k), TAG(0, prev), &counts[0], &counts[1]);
        if (r)
            return r > 0 ? 4 + r : -(4 - r);
    }
    if (opt_tree_sockets) {
        /* On pair k (fd 102) child k+1 writes with tag 2; on pair k-1 (fd 103) child
         * k-1 writes with tag 1. */
        int r = flow_step(102, 102, TAG(1, k), TAG(2, next), &counts[2], &counts[3]);
        if (!r)
            r = flow_step(103, 103, TAG(2, k), TAG(1, prev), &counts[4], &counts[5]);
        if (r)
            return r > 0 ? 7 + r : -(7 - r);
    }
    return 0;
}

/* --tree-shared: 16 MiB of MAP_SHARED | MAP_ANONYMOUS memory mapped before the forks,
 * one object in the parent and every child (--tree-sysv: a System V segment instead).
 * Word 0 is the parent's token (its tick
 * count), word 1 + k child k's echo of it; from word 64 on, a pattern the parent wrote
 * before the forks. Every tick a child checks a page of the pattern (exit 11 at a
 * mismatch) and echoes the token; at the end the parent writes a last token and waits
 * (5 s at most) for every child to echo it: a child mapping a copy of its own, not the
 * one object, never does. */
#define TREE_SHARED_WORDS (16 * 1024 * 1024 / 8)
static int opt_tree_shared, opt_tree_sysv;
static volatile uint64_t *tree_shared;

static void setup_tree_shared(void)
{
    void *m;
    if (opt_tree_sysv) {
        /* The same checks on a System V segment, private and marked for removal at
         * once (it goes with the last process detached). */
        int id = shmget(IPC_PRIVATE, TREE_SHARED_WORDS * 8, IPC_CREAT | 0600);
        if (id < 0)
            die("tree shmget");
        m = shmat(id, NULL, 0);
        if (m == (void *)-1)
            die("tree shmat");
        if (shmctl(id, IPC_RMID, NULL) != 0)
            die("tree shmctl IPC_RMID");
    } else {
        m = mmap(NULL, TREE_SHARED_WORDS * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            die("tree shared mmap");
    }
    tree_shared = m;
    for (size_t w = 64; w < TREE_SHARED_WORDS; w++)
        tree_shared[w] = pattern(5, w, SEED);
    log_region("tree-shared", m, TREE_SHARED_WORDS * 8);
}

static int tree_shared_tick(long k, uint64_t t)
{
    /* One page a tick, round robin (the first page's pattern starts at word 64). */
    size_t page = t % (TREE_SHARED_WORDS / WORDS_PER_PAGE);
    for (size_t w = page ? page * WORDS_PER_PAGE : 64; w < (page + 1) * WORDS_PER_PAGE; w++)
        if (tree_shared[w] != pattern(5, w, SEED))
            return 11;
    tree_shared[1 + k] = tree_shared[0];
    return 0;
}

static void tree_child(long k)
{
    if (opt_tree_pipes || opt_tree_sockets) {
        /* Only this child's ends: pipes at 100 (reading) and 101 (writing), sockets at
         * 102 and 103. */
        long prev = (k + opt_tree - 1) % opt_tree;
        if (opt_tree_pipes && (dup3(ring[prev][0], 100, O_CLOEXEC) != 100 || dup3(ring[k][1], 101, O_CLOEXEC) != 101))
            _exit(3);
        if (opt_tree_sockets && (dup3(sock_ring[k][0], 102, O_CLOEXEC) != 102 || dup3(sock_ring[prev][1], 103, O_CLOEXEC) != 103))
            _exit(3);
        syscall(SYS_close_range, 0U, 99U, 0U);
        syscall(SYS_close_range, 104U, ~0U, 0U);
    } else {
        syscall(SYS_close_range, 0U, ~0U, 0U);
    }
    uint64_t counts[6] = {0};
    int deferred = 0;
    signal(SIGPIPE, SIG_IGN);
    uint64_t *own = mmap(NULL, TREE_WORDS * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (own == MAP_FAILED)
        _exit(3);
    uint64_t seed = SEED ^ (0x100 + (uint64_t)k);
    for (size_t w = 0; w < TREE_WORDS; w++)
        own[w] = pattern(4, w, seed);
    for (uint64_t t = 0; !term_flag; t++) {
        for (size_t w = 0; w < TREE_WORDS; w++)
            if (own[w] != pattern(4, w, seed))
                _exit(1);
        if (mem_pages > 0) {
            size_t p = t % mem_pages;
            uint64_t pseed = SEED + page_generation(p) * 0x9e3779b97f4a7c15ULL;
            for (size_t w = 0; w < WORDS_PER_PAGE; w++)
                if (mem[p * WORDS_PER_PAGE + w] != pattern(1, p * WORDS_PER_PAGE + w, pseed))
                    _exit(1);
        }
        if (tree_shared && tree_shared_tick(k, t))
            _exit(11);
        int ring_failed = deferred ? 0 : ring_tick(k, counts);
        if (ring_failed > 0)
            _exit(ring_failed);
        if (ring_failed < 0)
            deferred = -ring_failed;
        struct timespec req = {opt_tick_ms / 1000, (opt_tick_ms % 1000) * 1000000L};
        clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);
    }
    _exit(deferred);
}

static void setup_tree(void)
{
    setup_ring();
    if (opt_tree_shared || opt_tree_sysv)
        setup_tree_shared();
    for (long k = 0; k < opt_tree; k++) {
        pid_t c = fork();
        if (c < 0)
            die("tree fork");
        if (c == 0)
            tree_child(k);
    }
    for (long k = 0; k < opt_tree; k++) {
        if (opt_tree_pipes) {
            close(ring[k][0]);
            close(ring[k][1]);
        }
        if (opt_tree_sockets) {
            close(sock_ring[k][0]);
            close(sock_ring[k][1]);
        }
    }
    logf_("tree %ld children%s%s", opt_tree, opt_tree_pipes ? " in a ring of pipes" : "", opt_tree_sockets ? " in a ring of socket pairs" : "");
}

/* The pids of this thread's children, from /proc; answers how many (-1: unreadable). */
static long tree_children(pid_t *out, long max)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%ld/children", (long)syscall(SYS_gettid));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    long count = 0;
    for (char *p = buf; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        if (count < max)
            out[count] = (pid_t)v;
        count++;
        p = end;
    }
    return count;
}

static void tree_tick(void)
{
    if (failure[0])
        return;
    if (tree_shared)
        tree_shared[0]++;
    int status;
    pid_t r = waitpid(-1, &status, WNOHANG);
    if (r > 0)
        fail("tree: child %d exited early (status %#x; 1: its memory check failed, 4-7: its pipe ring check failed, 8-10: its socket ring check failed, 11: the shared memory's pattern)", (int)r, status);
    else if (r < 0)
        fail("tree: waitpid: %s (its children are not its own)", strerror(errno));
    pid_t kids[TREE_MAX];
    long n = tree_children(kids, TREE_MAX);
    if (!failure[0] && n != opt_tree)
        fail("tree: %ld children, want %ld", n, opt_tree);
}

/* The parent's last token, echoed by every child within 5 s; else a FAIL naming the
 * first child that does not see the parent's writes. */
static void verify_tree_shared(void)
{
    uint64_t token = 0xfeed000000000000ULL | tree_shared[0];
    tree_shared[0] = token;
    struct timespec start, now, ms = {0, 1000000L};
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        long missing = -1;
        for (long k = 0; k < opt_tree && missing < 0; k++)
            if (tree_shared[1 + k] != token)
                missing = k;
        if (missing < 0)
            break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec >= 5)
            FAIL_RET("tree: child %ld does not see the parent's writes to the shared memory (its echo %#llx, want %#llx)", missing,
                     (unsigned long long)tree_shared[1 + missing], (unsigned long long)token);
        nanosleep(&ms, NULL);
    }
    for (size_t w = 64; w < TREE_SHARED_WORDS; w++)
        if (tree_shared[w] != pattern(5, w, SEED))
            FAIL_RET("tree: the shared memory's word %zu changed in the parent", w);
}

static void verify_tree(void)
{
    if (tree_shared && !failure[0])
        verify_tree_shared();
    pid_t kids[TREE_MAX];
    long n = tree_children(kids, TREE_MAX);
    /* In a ring, a child that exits first must not be seen gone by one still at its
     * flows: all are stopped, told to end, and continued, so that each runs its SIGTERM
     * handler (which stops its flows) before anything else. */
    int ring = opt_tree_pipes || opt_tree_sockets;
    for (long i = 0; ring && i < n && i < TREE_MAX; i++) {
        int st;
        kill(kids[i], SIGSTOP);
        while (waitpid(kids[i], &st, WUNTRACED) < 0 && errno == EINTR)
            ;
    }
    for (long i = 0; i < n && i < TREE_MAX; i++)
        kill(kids[i], SIGTERM);
    for (long i = 0; ring && i < n && i < TREE_MAX; i++)
        kill(kids[i], SIGCONT);
    if (n != opt_tree)
        FAIL_RET("tree: %ld children at the end, want %ld", n, opt_tree);
    for (long i = 0; i < n; i++) {
        int status;
        pid_t r;
        do
            r = waitpid(-1, &status, 0);
        while (r < 0 && errno == EINTR);
        if (r < 0)
            FAIL_RET("tree: reaping child %ld of %ld: %s", i + 1, n, strerror(errno));
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            FAIL_RET("tree: child %d ended with status %#x (1: its memory check failed, 4-7: its pipe ring check failed, 8-10: its socket ring check failed, 11: the shared memory's pattern)", (int)r, status);
    }
    logf_("tree %ld children passed", n);
}

/* ---- removed things, chroot, epoll on a closed fd (issue 12), each its own option.
 * In DIR:
 *   --del-cwd       the cwd "gone-cwd" (0751, 1234:5678; a second fd open on it) and an
 *                   O_DIRECTORY fd on "gone-dir" (0705, 4321:8765), both rmdir'ed
 *   --del-dev       an fd on "gone-zero", a node of /dev/zero (1:5, 0640, 2222:3333), unlinked
 *   --del-sock      a stream listener and a datagram socket bound to "gone-listen" and
 *                   "gone-dgram", whose files were removed
 *   --epoll-closed  an epoll watch added by a pipe's fd N, which was dup'ed then closed,
 *                   N now another description of the same pipe
 *   --epoll-orphan  an epoll watch of a pipe only a forked child still holds (refused)
 *   --chroot        chroot into DIR/root, cwd /sub, "/sub/inside" open at offset 3 */
static int opt_del_cwd, opt_del_dev, opt_del_sock, opt_epoll_closed, opt_epoll_orphan, opt_chroot;
static int dl_dirfd = -1, dl_cwdfd = -1, dd_fd = -1, ds_listen = -1, ds_dgram = -1;
static int ec_ep = -1, ec_pipe[2] = {-1, -1}, ec_read = -1, ec_num = -1, eo_ep = -1, eo_wr = -1, ch_fd = -1;
static pid_t eo_child = -1;
static ino_t ch_root_ino;
static struct sockaddr_un ds_listen_addr, ds_dgram_addr;
#define EPOLL_DATA 0xfeedf00d12345678ULL

static void dl_path(char *out, const char *name)
{
    if (!real_dir[0] && !realpath(opt_dir, real_dir))
        die("realpath dir");
    in_dir(out, name);
}

static void dl_make(const char *name, mode_t type, mode_t perm, dev_t rdev, uid_t uid, gid_t gid)
{
    char p[PATH_MAX + 32];
    dl_path(p, name);
    if ((type == S_IFDIR ? mkdir(p, 0700) : mknod(p, type | 0600, rdev)) != 0 || chown(p, uid, gid) != 0 ||
        chmod(p, perm) != 0)
        die(name);
}

static void ds_bind(int *fd, int type, struct sockaddr_un *a, const char *name)
{
    a->sun_family = AF_UNIX;
    char p[PATH_MAX + 32];
    dl_path(p, name);
    if (strlen(p) >= sizeof a->sun_path)
        die("socket path too long");
    strcpy(a->sun_path, p);
    *fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    if (*fd < 0 || bind(*fd, (struct sockaddr *)a, sizeof *a) != 0 || (type == SOCK_STREAM && listen(*fd, 3) != 0) ||
        unlink(p) != 0)
        die(name);
}

static void setup_gone(void)
{
    char p[PATH_MAX + 32];
    if (opt_del_cwd) {
        dl_make("gone-cwd", S_IFDIR, 0751, 0, 1234, 5678);
        dl_make("gone-dir", S_IFDIR, 0705, 0, 4321, 8765);
        dl_path(p, "gone-cwd");
        if (chdir(p) != 0 || (dl_cwdfd = open(".", O_RDONLY | O_DIRECTORY)) < 0 || rmdir(p) != 0)
            die("gone-cwd");
        dl_path(p, "gone-dir");
        if ((dl_dirfd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 || rmdir(p) != 0)
            die("gone-dir");
    }
    if (opt_del_dev) {
        dl_make("gone-zero", S_IFCHR, 0640, makedev(1, 5), 2222, 3333);
        dl_path(p, "gone-zero");
        if ((dd_fd = open(p, O_RDWR)) < 0 || unlink(p) != 0)
            die("gone-zero");
    }
    if (opt_del_sock) {
        ds_bind(&ds_listen, SOCK_STREAM, &ds_listen_addr, "gone-listen");
        ds_bind(&ds_dgram, SOCK_DGRAM, &ds_dgram_addr, "gone-dgram");
    }
    if (opt_epoll_closed) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EPOLL_DATA};
        ec_ep = epoll_create1(EPOLL_CLOEXEC);
        if (ec_ep < 0 || pipe2(ec_pipe, O_NONBLOCK) != 0 || epoll_ctl(ec_ep, EPOLL_CTL_ADD, ec_pipe[0], &ev) != 0)
            die("epoll-closed");
        /* The watch stays keyed by (file, N); N now holds another description of the
         * same pipe (same inode), which a restore must not take for the watched one. */
        ec_num = ec_pipe[0];
        if ((ec_read = dup(ec_num)) < 0 || close(ec_num) != 0)
            die("epoll-closed dup");
        snprintf(p, sizeof p, "/proc/self/fd/%d", ec_read);
        int again = open(p, O_RDONLY | O_NONBLOCK);
        if (again < 0 || (again != ec_num && (dup2(again, ec_num) != ec_num || close(again) != 0)))
            die("epoll-closed reopen");
    }
    if (opt_epoll_orphan) {
        int pp[2];
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EPOLL_DATA};
        eo_ep = epoll_create1(EPOLL_CLOEXEC);
        if (eo_ep < 0 || pipe2(pp, O_NONBLOCK) != 0 || epoll_ctl(eo_ep, EPOLL_CTL_ADD, pp[0], &ev) != 0)
            die("epoll-orphan");
        /* Held by a process outside this one's tree (a grandchild whose parent exited):
         * a child would be taken with it, and refused for the pipe they share. It goes
         * once this process is gone. */
        pid_t parent = getpid();
        int gp[2];
        if (pipe(gp) != 0)
            die("epoll-orphan pipe");
        pid_t mid = fork();
        if (mid < 0)
            die("epoll-orphan fork");
        if (mid == 0) {
            pid_t g = fork();
            if (g == 0) {
                while (kill(parent, 0) == 0)
                    usleep(50000);
                _exit(0);
            }
            _exit(write(gp[1], &g, sizeof g) == sizeof g && g > 0 ? 0 : 1);
        }
        int status;
        if (waitpid(mid, &status, 0) != mid || !WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
            read(gp[0], &eo_child, sizeof eo_child) != sizeof eo_child)
            die("epoll-orphan grandchild");
        close(gp[0]);
        close(gp[1]);
        close(pp[0]); /* the grandchild's copy alone keeps the watched file */
        eo_wr = pp[1];
    }
    if (opt_chroot) {
        struct stat st;
        dl_path(p, "root");
        if (mkdir(p, 0755) != 0)
            die("chroot: mkdir root");
        dl_path(p, "root/sub");
        if (mkdir(p, 0755) != 0)
            die("chroot: mkdir root/sub");
        dl_path(p, "root/sub/inside");
        int f = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (f < 0 || write(f, "inside-the-root\n", 16) != 16 || close(f) != 0)
            die("chroot: root/sub/inside");
        dl_path(p, "root");
        if (chroot(p) != 0 || chdir("/sub") != 0 || stat("/", &st) != 0)
            die("chroot");
        ch_root_ino = st.st_ino;
        if ((ch_fd = open("/sub/inside", O_RDONLY)) < 0 || lseek(ch_fd, 3, SEEK_SET) != 3)
            die("chroot: open /sub/inside");
    }
}

/* The stat of fd (or path when fd < 0) is a removed `type` with `perm`, owned uid:gid. */
static int gone_as(int fd, const char *path, mode_t type, mode_t perm, uid_t uid, gid_t gid, struct stat *st)
{
    if ((fd >= 0 ? fstat(fd, st) : stat(path, st)) != 0)
        return 0;
    return (st->st_mode & S_IFMT) == type && (st->st_mode & 07777) == perm && st->st_uid == uid && st->st_gid == gid &&
           st->st_nlink == 0;
}

/* The link /proc/self/<what> is DIR/<name> (deleted); the name itself is free. */
static int gone_link(const char *what, const char *name)
{
    char link[64], got[PATH_MAX + 64], want[PATH_MAX + 64];
    snprintf(link, sizeof link, "/proc/self/%s", what);
    ssize_t n = readlink(link, got, sizeof got - 1);
    if (n < 0)
        return 0;
    got[n] = 0;
    dl_path(want, name);
    int free_name = access(want, F_OK) != 0 && errno == ENOENT;
    strcat(want, " (deleted)");
    return free_name && !strcmp(got, want);
}

static void verify_gone(void)
{
    struct stat st, c;
    char buf[PATH_MAX + 64];
    if (opt_del_cwd) {
        if (!gone_as(-1, ".", S_IFDIR, 0751, 1234, 5678, &c))
            FAIL_RET("del-cwd: the working directory is not the removed one (mode 0%o, %d:%d, %d links)",
                     (unsigned)c.st_mode, (int)c.st_uid, (int)c.st_gid, (int)c.st_nlink);
        if (getcwd(buf, sizeof buf) || errno != ENOENT)
            FAIL_RET("del-cwd: getcwd answers %s: the working directory is no longer a removed one", strerror(errno));
        snprintf(buf, sizeof buf, "cwd");
        if (!gone_link(buf, "gone-cwd"))
            FAIL_RET("del-cwd: /proc/self/cwd is not DIR/gone-cwd (deleted), or that name is taken");
        if (fstat(dl_cwdfd, &st) != 0 || st.st_ino != c.st_ino || st.st_dev != c.st_dev)
            FAIL_RET("del-cwd: the fd opened on the working directory is another directory");
        int f = openat(AT_FDCWD, "new", O_WRONLY | O_CREAT, 0600);
        if (f >= 0 || errno != ENOENT)
            FAIL_RET("del-cwd: a file could be made in the removed working directory (%s)", strerror(errno));
        if (!gone_as(dl_dirfd, NULL, S_IFDIR, 0705, 4321, 8765, &st))
            FAIL_RET("del-cwd: the fd of gone-dir is not the removed directory (mode 0%o, %d:%d, %d links)",
                     (unsigned)st.st_mode, (int)st.st_uid, (int)st.st_gid, (int)st.st_nlink);
        if (!(fcntl(dl_dirfd, F_GETFL) & O_DIRECTORY) || !(fcntl(dl_dirfd, F_GETFD) & FD_CLOEXEC))
            FAIL_RET("del-cwd: the fd of gone-dir lost O_DIRECTORY or FD_CLOEXEC");
        snprintf(buf, sizeof buf, "fd/%d", dl_dirfd);
        if (!gone_link(buf, "gone-dir"))
            FAIL_RET("del-cwd: the fd of gone-dir is not DIR/gone-dir (deleted), or that name is taken");
    }
    if (opt_del_dev) {
        unsigned char z[16];
        memset(z, 0xff, sizeof z);
        if (!gone_as(dd_fd, NULL, S_IFCHR, 0640, 2222, 3333, &st) || st.st_rdev != makedev(1, 5))
            FAIL_RET("del-dev: the fd of gone-zero is not the removed node of 1:5 (mode 0%o, %d:%d, %d links, %u:%u)",
                     (unsigned)st.st_mode, (int)st.st_uid, (int)st.st_gid, (int)st.st_nlink, major(st.st_rdev),
                     minor(st.st_rdev));
        if (read(dd_fd, z, sizeof z) != (ssize_t)sizeof z || memcmp(z, (unsigned char[16]){0}, sizeof z) != 0 ||
            write(dd_fd, "abcde", 5) != 5 || (fcntl(dd_fd, F_GETFL) & O_ACCMODE) != O_RDWR)
            FAIL_RET("del-dev: the fd of gone-zero does not read zeros and take writes: %s", strerror(errno));
        snprintf(buf, sizeof buf, "fd/%d", dd_fd);
        if (!gone_link(buf, "gone-zero"))
            FAIL_RET("del-dev: the fd of gone-zero is not DIR/gone-zero (deleted), or that name is taken");
    }
    if (opt_del_sock) {
        const struct {
            int fd, type;
            struct sockaddr_un *a;
            const char *name;
        } s[] = {{ds_listen, SOCK_STREAM, &ds_listen_addr, "gone-listen"}, {ds_dgram, SOCK_DGRAM, &ds_dgram_addr, "gone-dgram"}};
        for (size_t i = 0; i < 2; i++) {
            struct sockaddr_un got;
            socklen_t len = sizeof got;
            memset(&got, 0, sizeof got);
            if (getsockname(s[i].fd, (struct sockaddr *)&got, &len) != 0 || strcmp(got.sun_path, s[i].a->sun_path) != 0)
                FAIL_RET("del-sock: %s: getsockname gives %s", s[i].name, got.sun_path);
            if (int_opt(s[i].fd, SOL_SOCKET, SO_TYPE) != s[i].type ||
                int_opt(s[i].fd, SOL_SOCKET, SO_ACCEPTCONN) != (s[i].type == SOCK_STREAM))
                FAIL_RET("del-sock: %s changed type, or stopped listening", s[i].name);
            if (access(s[i].a->sun_path, F_OK) == 0 || errno != ENOENT)
                FAIL_RET("del-sock: %s has a socket file again", s[i].name);
        }
    }
    if (opt_epoll_closed) {
        struct epoll_event ev[4];
        if (epoll_wait(ec_ep, ev, 4, 0) != 0)
            FAIL_RET("epoll-closed: an event before any byte");
        int n = -1;
        if (write(ec_pipe[1], "e", 1) != 1 || (n = epoll_wait(ec_ep, ev, 4, 1000)) != 1 || ev[0].data.u64 != EPOLL_DATA ||
            !(ev[0].events & EPOLLIN))
            FAIL_RET("epoll-closed: the watch of closed fd %d gave %d events (data %llx)", ec_num, n,
                     n > 0 ? (unsigned long long)ev[0].data.u64 : 0ULL);
        char b;
        if (read(ec_read, &b, 1) != 1 || b != 'e')
            FAIL_RET("epoll-closed: the pipe's dup did not read the byte");
        /* Keyed by (file, N): neither the dup's number nor N (another description now) finds it. */
        if (epoll_ctl(ec_ep, EPOLL_CTL_DEL, ec_read, NULL) == 0 || epoll_ctl(ec_ep, EPOLL_CTL_DEL, ec_num, NULL) == 0)
            FAIL_RET("epoll-closed: the watch is no longer keyed by fd %d it was added by", ec_num);
    }
    if (opt_epoll_orphan) {
        struct epoll_event ev[2];
        if (write(eo_wr, "o", 1) != 1 || epoll_wait(eo_ep, ev, 2, 1000) != 1 || ev[0].data.u64 != EPOLL_DATA)
            FAIL_RET("epoll-orphan: the watch of the pipe the child holds gave no event");
    }
    if (opt_chroot) {
        if (!getcwd(buf, sizeof buf) || strcmp(buf, "/sub") != 0)
            FAIL_RET("chroot: getcwd is %s, want /sub", buf);
        if (stat("/", &st) != 0 || st.st_ino != ch_root_ino)
            FAIL_RET("chroot: / is not the root it chose");
        if (access("/etc/passwd", F_OK) == 0)
            FAIL_RET("chroot: /etc/passwd is reachable: the root is the machine's again");
        if (fstat(ch_fd, &c) != 0 || stat("inside", &st) != 0 || st.st_ino != c.st_ino || stat("/sub/inside", &st) != 0 ||
            st.st_ino != c.st_ino)
            FAIL_RET("chroot: inside and /sub/inside are not the file it opened in its root");
        char text[16];
        if (lseek(ch_fd, 0, SEEK_CUR) != 3 || pread(ch_fd, text, 6, 0) != 6 || memcmp(text, "inside", 6) != 0)
            FAIL_RET("chroot: /sub/inside lost its offset or contents");
    }
}

static void end_gone(void)
{
    if (eo_child > 0) {
        kill(eo_child, SIGKILL); /* not ours to reap: its parent exited */
    }
}

/* ---- main ---- */
/* ---- notification fds and pidfds (--inotify, --fanotify, --pidfd, --pidfd-other), in
 * DIR/notify:
 * --inotify: instance A (non-blocking, close-on-exec) watches "in-file" (wd 1,
 *   IN_OPEN|IN_MODIFY|IN_CLOSE_WRITE) and the directory "in-dir" (wd 3, IN_CREATE: wd 2
 *   was taken and given back, a gap); instance B (blocking, inherited by exec) watches
 *   "in-once" (wd 1, IN_ATTRIB|IN_ONESHOT). "in-file" stays open at a higher fd than A
 *   (a restore reopening it after remaking A would show in A). The check finds no event
 *   queued, touches each file and reads the events with their wd, mask and name; a new
 *   watch on A must get wd 4. Files a test creates in in-dir named "poke*" are
 *   expected and skipped.
 * --fanotify: an instance (FAN_CLASS_NOTIF|FAN_NONBLOCK, events O_RDONLY|O_LARGEFILE)
 *   marks "fan-file" for FAN_MODIFY|FAN_CLOSE_WRITE; the check writes to it and reads the
 *   event, whose fd must be that file.
 * --pidfd: a pidfd to itself (PIDFD_NONBLOCK), one to its main thread (PIDFD_THREAD),
 *   and one to a child that exited and was reaped: signal 0 goes through the first two
 *   and fails with ESRCH on the last, which alone polls readable.
 * --pidfd-other: a pidfd to a child it keeps (another process: ferry refuses it); the
 *   check kills the child through it and waits for it. ---- */
#include <poll.h>
#include <sys/fanotify.h>
#include <sys/inotify.h>
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef PIDFD_NONBLOCK
#define PIDFD_NONBLOCK O_NONBLOCK
#endif
static int opt_inotify, opt_fanotify, opt_pidfd, opt_pidfd_other;
static int nt_a = -1, nt_b = -1, nt_keep = -1, nt_fan = -1, nt_self = -1, nt_thread = -1, nt_dead = -1, nt_other = -1;
static char nt_dir[PATH_MAX];

static void nt_path(char *out, const char *name)
{
    if (snprintf(out, PATH_MAX, "%s/%s", nt_dir, name) >= PATH_MAX)
        out[0] = 0;
}

static void nt_create(const char *name)
{
    char p[PATH_MAX];
    nt_path(p, name);
    int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        die(name);
    close(fd);
}

static void setup_notify(void)
{
    char p[PATH_MAX];
    if (snprintf(nt_dir, sizeof nt_dir, "%s/notify", real_dir) >= (int)sizeof nt_dir || mkdir(nt_dir, 0755) != 0)
        die("mkdir notify");
    if (opt_inotify) {
        nt_create("in-file");
        nt_create("in-once");
        nt_path(p, "in-dir");
        if (mkdir(p, 0755) != 0)
            die("mkdir in-dir");
        nt_a = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        nt_b = inotify_init1(0);
        nt_path(p, "in-file");
        if (nt_a < 0 || nt_b < 0 || inotify_add_watch(nt_a, p, IN_OPEN | IN_MODIFY | IN_CLOSE_WRITE) != 1)
            die("inotify in-file");
        int gap = inotify_add_watch(nt_a, nt_dir, IN_DELETE);
        if (gap != 2 || inotify_rm_watch(nt_a, gap) != 0)
            die("inotify gap");
        struct inotify_event ev;
        if (read(nt_a, &ev, sizeof ev) != sizeof ev || ev.mask != IN_IGNORED)
            die("inotify gap's IN_IGNORED");
        nt_path(p, "in-dir");
        if (inotify_add_watch(nt_a, p, IN_CREATE) != 3)
            die("inotify in-dir");
        nt_path(p, "in-once");
        if (inotify_add_watch(nt_b, p, IN_ATTRIB | IN_ONESHOT) != 1)
            die("inotify in-once");
        nt_path(p, "in-file");
        if ((nt_keep = open(p, O_RDONLY)) < 0)
            die("open in-file");
        char buf[4096];
        while (read(nt_a, buf, sizeof buf) > 0) /* its IN_OPEN */
            ;
    }
    if (opt_fanotify) {
        nt_create("fan-file");
        nt_fan = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK | FAN_CLOEXEC, O_RDONLY | O_LARGEFILE);
        nt_path(p, "fan-file");
        if (nt_fan < 0 || fanotify_mark(nt_fan, FAN_MARK_ADD, FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD, p) != 0)
            die("fanotify");
    }
    if (opt_pidfd) {
        nt_self = syscall(SYS_pidfd_open, getpid(), PIDFD_NONBLOCK);
        nt_thread = syscall(SYS_pidfd_open, getpid(), PIDFD_THREAD);
        pid_t c = fork();
        if (c == 0)
            _exit(0);
        nt_dead = syscall(SYS_pidfd_open, c, 0);
        if (nt_self < 0 || nt_thread < 0 || c < 0 || nt_dead < 0 || waitpid(c, NULL, 0) != c)
            die("pidfds");
    }
    if (opt_pidfd_other) {
        pid_t c = fork();
        if (c == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            for (;;)
                pause();
        }
        nt_other = syscall(SYS_pidfd_open, c, 0);
        if (c < 0 || nt_other < 0)
            die("pidfd to a child");
    }
}

/* Reads the next inotify event of `fd` (waiting up to 2 s), skipping `poke*` creations
 * a test made; 0 when none came. */
static int nt_event(int fd, struct inotify_event *ev, char *name)
{
    char buf[4096] __attribute__((aligned(8)));
    static char pending[2][4096];
    static int pend_len[2], pend_off[2];
    int slot = fd == nt_a ? 0 : 1;
    for (;;) {
        if (pend_off[slot] >= pend_len[slot]) {
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            if (poll(&pf, 1, 2000) != 1)
                return 0;
            int n = read(fd, buf, sizeof buf);
            if (n <= 0)
                return 0;
            memcpy(pending[slot], buf, n);
            pend_len[slot] = n;
            pend_off[slot] = 0;
        }
        struct inotify_event *e = (struct inotify_event *)(pending[slot] + pend_off[slot]);
        pend_off[slot] += sizeof *e + e->len;
        *ev = *e;
        snprintf(name, 256, "%s", e->len ? e->name : "");
        if (!(e->mask == IN_CREATE && !strncmp(name, "poke", 4)))
            return 1;
    }
}

static void nt_expect(int fd, int wd, uint32_t mask, const char *name, const char *what)
{
    struct inotify_event ev;
    char got[256];
    if (!nt_event(fd, &ev, got))
        FAIL_RET("inotify: %s: no event (want wd %d mask %#x)", what, wd, mask);
    if (ev.wd != wd || ev.mask != mask || strcmp(got, name))
        FAIL_RET("inotify: %s: event wd %d mask %#x name \"%s\", want wd %d mask %#x name \"%s\"", what, ev.wd, ev.mask,
                 got, wd, mask, name);
}

/* `Pid:` of a pidfd, -2 if unreadable. */
static long nt_pidfd_pid(int fd)
{
    char p[64], buf[512];
    snprintf(p, sizeof p, "/proc/self/fdinfo/%d", fd);
    int f = open(p, O_RDONLY | O_CLOEXEC);
    int n = f < 0 ? -1 : read(f, buf, sizeof buf - 1);
    if (f >= 0)
        close(f);
    if (n <= 0)
        return -2;
    buf[n] = 0;
    char *at = strstr(buf, "\nPid:");
    return at ? strtol(at + 5, NULL, 10) : -2;
}

static void verify_notify(void)
{
    char p[PATH_MAX];
    if (opt_inotify) {
        if (!(fcntl(nt_a, F_GETFL) & O_NONBLOCK) || !(fcntl(nt_a, F_GETFD) & FD_CLOEXEC))
            FAIL_RET("inotify: instance A lost O_NONBLOCK or FD_CLOEXEC");
        if ((fcntl(nt_b, F_GETFL) & O_NONBLOCK) || (fcntl(nt_b, F_GETFD) & FD_CLOEXEC))
            FAIL_RET("inotify: instance B gained O_NONBLOCK or FD_CLOEXEC");
        char buf[4096] __attribute__((aligned(8)));
        for (int n; (n = read(nt_a, buf, sizeof buf)) > 0;)
            for (int off = 0; off < n;) {
                struct inotify_event *e = (struct inotify_event *)(buf + off);
                if (!(e->mask == IN_CREATE && e->len && !strncmp(e->name, "poke", 4)))
                    FAIL_RET("inotify: event wd %d mask %#x queued before the check", e->wd, e->mask);
                off += sizeof *e + e->len;
            }
        nt_path(p, "in-file");
        int fd = open(p, O_WRONLY | O_APPEND | O_CLOEXEC);
        if (fd < 0 || write(fd, "x", 1) != 1)
            FAIL_RET("inotify: writing in-file: %s", strerror(errno));
        close(fd);
        nt_expect(nt_a, 1, IN_OPEN, "", "in-file");
        nt_expect(nt_a, 1, IN_MODIFY, "", "in-file");
        nt_expect(nt_a, 1, IN_CLOSE_WRITE, "", "in-file");
        if (failure[0])
            return;
        nt_create("in-dir/new");
        nt_expect(nt_a, 3, IN_CREATE, "new", "in-dir");
        nt_path(p, "in-once");
        if (chmod(p, 0600) != 0)
            FAIL_RET("inotify: chmod in-once: %s", strerror(errno));
        nt_expect(nt_b, 1, IN_ATTRIB, "", "in-once");
        nt_expect(nt_b, 1, IN_IGNORED, "", "in-once (IN_ONESHOT)");
        if (failure[0])
            return;
        int wd = inotify_add_watch(nt_a, nt_dir, IN_DELETE);
        if (wd != 4)
            FAIL_RET("inotify: a new watch got wd %d, want 4", wd);
    }
    if (opt_fanotify) {
        if (!(fcntl(nt_fan, F_GETFL) & O_NONBLOCK))
            FAIL_RET("fanotify: lost O_NONBLOCK");
        nt_path(p, "fan-file");
        int fd = open(p, O_WRONLY | O_APPEND | O_CLOEXEC);
        struct stat want;
        if (fd < 0 || write(fd, "x", 1) != 1 || fstat(fd, &want) != 0)
            FAIL_RET("fanotify: writing fan-file: %s", strerror(errno));
        close(fd);
        struct pollfd pf = {.fd = nt_fan, .events = POLLIN};
        char buf[4096] __attribute__((aligned(8)));
        int n = poll(&pf, 1, 2000) == 1 ? read(nt_fan, buf, sizeof buf) : -1;
        if (n < (int)sizeof(struct fanotify_event_metadata))
            FAIL_RET("fanotify: no event on fan-file");
        uint64_t seen = 0;
        for (struct fanotify_event_metadata *m = (void *)buf; FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
            struct stat st;
            if (m->fd >= 0 && fstat(m->fd, &st) == 0 && st.st_ino == want.st_ino && st.st_dev == want.st_dev)
                seen |= m->mask;
            if (m->fd >= 0)
                close(m->fd);
        }
        if (!(seen & FAN_MODIFY))
            FAIL_RET("fanotify: fan-file: events %#llx, want FAN_MODIFY", (unsigned long long)seen);
    }
    if (opt_pidfd) {
        struct pollfd pf[2] = {{.fd = nt_self, .events = POLLIN}, {.fd = nt_dead, .events = POLLIN}};
        if (syscall(SYS_pidfd_send_signal, nt_self, 0, NULL, 0) != 0)
            FAIL_RET("pidfd: signal 0 to itself: %s", strerror(errno));
        if (syscall(SYS_pidfd_send_signal, nt_thread, 0, NULL, 0) != 0)
            FAIL_RET("pidfd: signal 0 to its main thread: %s", strerror(errno));
        if (nt_pidfd_pid(nt_self) != getpid() || nt_pidfd_pid(nt_thread) != getpid())
            FAIL_RET("pidfd: points to %ld and %ld, not to itself (%d)", nt_pidfd_pid(nt_self), nt_pidfd_pid(nt_thread), getpid());
        if (!(fcntl(nt_self, F_GETFL) & O_NONBLOCK) || !(fcntl(nt_thread, F_GETFL) & PIDFD_THREAD))
            FAIL_RET("pidfd: lost PIDFD_NONBLOCK or PIDFD_THREAD");
        if (syscall(SYS_pidfd_send_signal, nt_dead, 0, NULL, 0) == 0 || errno != ESRCH)
            FAIL_RET("pidfd: signal 0 to the exited child did not fail with ESRCH");
        if (poll(pf, 2, 0) != 1 || pf[0].revents || !(pf[1].revents & POLLIN))
            FAIL_RET("pidfd: poll: itself %#x, the exited child %#x (want 0, POLLIN)", pf[0].revents, pf[1].revents);
        if (nt_pidfd_pid(nt_dead) != -1)
            FAIL_RET("pidfd: the exited child's pidfd shows Pid %ld", nt_pidfd_pid(nt_dead));
    }
    if (opt_pidfd_other) {
        siginfo_t si;
        if (syscall(SYS_pidfd_send_signal, nt_other, SIGKILL, NULL, 0) != 0 || waitid(P_PIDFD, nt_other, &si, WEXITED) != 0)
            FAIL_RET("pidfd: killing the child through it: %s", strerror(errno));
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: workload --log PATH [--dir DIR] [--mem-mib N] [--threads N] [--tick-ms N]"
                    " [--dirty-pages N] [--churn] [--move-mem] [--fork-check] [--rseq] [--process-state] [--seccomp] [--shared-anon] [--event-fds] [--listen] [--creds] [--mm-flags] [--mm-sealed] [--shared-twice] [--locks] [--tree N [--tree-pipes] [--tree-sockets] [--tree-shared | --tree-sysv]] [--no-files]"
                    " [--inotify] [--fanotify] [--pidfd] [--pidfd-other]"
                    " [--self-trap] [--single-step] [--watchpoint] [--sigtrap-pending] [--vector-regs] [--vdso-moved] [--vdso-unmapped] [--vdso-moved-whole]"
                    " [--shell-tty PATH] [--pty-pair] [--tty-job] [--del-cwd] [--del-dev] [--del-sock] [--epoll-closed] [--epoll-orphan] [--chroot]\n");
    exit(2);
}

/* ---- Deleted files and memfds mapped into memory (--mapped-deleted, --memfd-map, --memfd-fd): see
 * mapped.c ---- */
#include "mapped.c"
/* ---- --shell-tty PATH, --pty-pair: see tty.c ---- */
#include "tty.c"

static long number(const char *s, long max)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < 0 || v > max)
        usage();
    return v;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        /* Flags: each sets its option to the value in the table. */
        static const struct {
            const char *name;
            int *opt;
            int value;
        } flags[] = {
            {"--no-files", &opt_files, 0},       {"--churn", &opt_churn, 1},
            {"--move-mem", &opt_move_mem, 1},    {"--fork-check", &opt_fork_check, 1},
            {"--rseq", &opt_rseq, 1},            {"--process-state", &opt_process_state, 1},
            {"--seccomp", &opt_seccomp, 1},      {"--shared-anon", &opt_shared_anon, 1},
            {"--event-fds", &opt_event_fds, 1},  {"--listen", &opt_listen, 1},
            {"--creds", &opt_creds, 1},
            {"--mm-flags", &opt_mm_flags, 1},    {"--mm-sealed", &opt_mm_sealed, 1},
            {"--shared-twice", &opt_shared_twice, 1},
            {"--locks", &opt_locks, 1},
            {"--inotify", &opt_inotify, 1},      {"--fanotify", &opt_fanotify, 1},
            {"--pidfd", &opt_pidfd, 1},          {"--pidfd-other", &opt_pidfd_other, 1},
            /* traps.c */
            {"--self-trap", &opt_self_trap, 1},  {"--single-step", &opt_single_step, 1},
            {"--watchpoint", &opt_watchpoint, 1}, {"--sigtrap-pending", &opt_sigtrap_pending, 1},
            {"--vector-regs", &opt_vector_regs, 1},
            {"--vdso-moved", &opt_vdso_moved, 1}, {"--vdso-unmapped", &opt_vdso_unmapped, 1},
            {"--vdso-moved-whole", &opt_vdso_moved_whole, 1},
            {"--del-cwd", &opt_del_cwd, 1},      {"--del-dev", &opt_del_dev, 1},
            {"--del-sock", &opt_del_sock, 1},    {"--epoll-closed", &opt_epoll_closed, 1},
            {"--epoll-orphan", &opt_epoll_orphan, 1}, {"--chroot", &opt_chroot, 1},
            {"--mapped-deleted", &opt_mapped_deleted, 1}, {"--memfd-map", &opt_memfd_map, 1},
            {"--memfd-fd", &opt_memfd_fd, 1},   {"--pty-pair", &opt_pty_pair, 1},
            {"--tty-job", &opt_tty_job, 1},
            {"--tree-pipes", &opt_tree_pipes, 1}, {"--tree-sockets", &opt_tree_sockets, 1},
            {"--tree-shared", &opt_tree_shared, 1}, {"--tree-sysv", &opt_tree_sysv, 1},
        };
        int flag = 0;
        for (size_t f = 0; f < sizeof flags / sizeof flags[0] && !flag; f++)
            if (!strcmp(a, flags[f].name)) {
                *flags[f].opt = flags[f].value;
                flag = 1;
            }
        if (flag)
            continue;
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--log"))
            opt_log = v;
        else if (!strcmp(a, "--dir"))
            opt_dir = v;
        else if (!strcmp(a, "--mem-mib"))
            opt_mem_mib = number(v, 1 << 20);
        else if (!strcmp(a, "--threads"))
            opt_threads = number(v, MAX_THREADS);
        else if (!strcmp(a, "--tick-ms"))
            opt_tick_ms = number(v, 1000000);
        else if (!strcmp(a, "--dirty-pages"))
            opt_dirty_pages = number(v, 1 << 20);
        else if (!strcmp(a, "--tree"))
            opt_tree = number(v, TREE_MAX);
        else if (!strcmp(a, "--shell-tty"))
            opt_shell_tty = v;
        else
            usage();
    }
    if (!opt_log || (opt_files && !opt_dir) || (opt_tree && opt_fork_check) || ((opt_tree_pipes || opt_tree_sockets) && opt_tree < 2))
        usage();

    log_fd = open(opt_log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (log_fd < 0)
        die("open log");
    if (opt_files && !realpath(opt_dir, real_dir))
        die("realpath dir");
    tls_index = -1;

    /* memory */
    mem_pages = (size_t)opt_mem_mib * 256;
    if (mem_pages > 0) {
        mem = mmap(NULL, mem_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED)
            die("mmap");
        for (size_t p = 0; p < mem_pages; p++)
            fill_mem_page(p, 0);
    }
    heap = malloc(HEAP_SIZE);
    if (!heap)
        die("malloc heap");
    for (size_t i = 0; i < HEAP_SIZE; i++)
        heap[i] = heap_byte(i);
    for (size_t i = 0; i < GLOBAL_WORDS; i++)
        global_array[i] = pattern(2, i, SEED);
    uint64_t stack_array[STACK_WORDS];
    for (size_t i = 0; i < STACK_WORDS; i++)
        stack_array[i] = pattern(3, i, SEED);

    log_region("mem", mem, mem_pages * PAGE);
    log_region("heap", heap, HEAP_SIZE);
    log_region("global", global_array, sizeof global_array);
    log_region("stack", stack_array, sizeof stack_array);
    if (opt_shared_anon)
        setup_shared_anon();
    if (opt_mm_flags)
        setup_mm_flags();
    if (opt_mm_sealed)
        setup_mm_sealed();
    if (opt_shared_twice)
        setup_shared_twice();

    if (opt_files)
        setup_files();
    umask(027);
    setup_signals();
    if (opt_fork_check)
        setup_fork_check();
    if (opt_event_fds)
        setup_event_fds();
    if (opt_listen)
        setup_listener();
    if (opt_locks)
        setup_locks();
    if (opt_inotify || opt_fanotify || opt_pidfd || opt_pidfd_other)
        setup_notify();
    setup_gone();
    setup_mapped();
    if (opt_shell_tty)
        setup_shell_tty();
    if (opt_pty_pair)
        setup_pty_pair();

    if (opt_creds)
        setup_creds();
    pthread_t threads[MAX_THREADS];
    for (long i = 0; i < opt_threads; i++) {
        altstacks[i] = malloc(ALTSTACK_SIZE);
        if (!altstacks[i])
            die("malloc altstack");
        errno = pthread_create(&threads[i], NULL, thread_main, (void *)i);
        if (errno)
            die("pthread_create");
    }
    setup_traps();
    if (opt_creds)
        setup_creds_dumpable();
    if (opt_process_state)
        setup_process_state();
    if (opt_seccomp)
        setup_seccomp();
    /* raise() is tgkill to this thread: a thread-directed signal pending across dumps. */
    if (raise(SIGUSR2) != 0)
        die("raise USR2");

    if (opt_rseq) {
        if (__rseq_size == 0)
            die("rseq is not registered by this libc");
        calibrate_tsc();
        logf_("rseq-cs %p %p %p", (void *)ferry_rseq_start, (void *)ferry_rseq_end, (void *)ferry_rseq_abort);
    }
    if (opt_tree)
        setup_tree();
    logf_("ready");
    uint64_t tick = 0;
    sig_atomic_t usr1_logged = 0;
    double last_tick_ms = 0;
    while (!term_flag) {
        struct timespec ts;
        /* Not through libc's vDSO pointer: --vdso-moved/--vdso-unmapped move it away. */
        syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts);
        double now_ms = ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
        if (tick > 0 && now_ms - last_tick_ms > 2.0 * opt_tick_ms + 5)
            logf_("stall %.1f tick %llu", now_ms - last_tick_ms, (unsigned long long)tick + 1);
        last_tick_ms = now_ms;
        sig_atomic_t u = usr1_count;
        if (u != usr1_logged) {
            logf_("usr1 %d", (int)u);
            usr1_logged = u;
        }
        tick++;
        tls_counter++;
        logf_("tick %llu", (unsigned long long)tick);
        /* Rewrite a few pages each tick so iterative (pre-copy) dumps see dirty pages. */
        for (long d = 0; d < opt_dirty_pages && mem_pages > 0; d++) {
            size_t p = dirty_rewrites % mem_pages;
            fill_mem_page(p, page_generation(p) + 1);
            dirty_rewrites++;
        }
        if (opt_churn) {
            churn_check();
            reshape_check();
            churn_step(tick);
            reshape_step(tick);
        }
        if (opt_move_mem)
            move_mem(tick);
        if (opt_fork_check)
            fork_check(tick);
        if (opt_tree)
            tree_tick();
        if (opt_listen)
            serve_listener(tick);
        if (opt_mm_flags)
            mmf_tick(tick);
        if (opt_seccomp)
            seccomp_tick(tick);
        traps_tick();
        if (opt_rseq) {
            logf_("rseq-aborts %llu", (unsigned long long)rseq_aborts);
            rseq_wait(opt_tick_ms);
        } else {
            sleep_ms(opt_tick_ms);
        }
    }

    if (opt_seccomp)
        verify_seccomp();
    atomic_store(&stop_threads, 1);
    verify_traps();
    for (long i = 0; i < opt_threads; i++) {
        errno = pthread_join(threads[i], NULL);
        if (errno)
            fail("thread %ld: join: %s", i, strerror(errno));
        else if (thread_fail[i][0])
            fail("%s", thread_fail[i]);
    }
    if (opt_fork_check && fork_child > 0)
        fork_check_reap(0);
    if (opt_tree)
        verify_tree();
    if (tls_index != -1 || tls_counter != tick)
        fail("main thread TLS: index %ld counter %llu, want -1 and %llu", tls_index,
             (unsigned long long)tls_counter, (unsigned long long)tick);
    verify_memory(stack_array);
    if (opt_churn) {
        churn_check();
        reshape_check();
    }
    if (opt_files && !failure[0])
        verify_files();
    if (!failure[0])
        verify_process();
    if (opt_process_state && !failure[0])
        verify_process_state();
    if (opt_shared_anon && !failure[0])
        verify_shared_anon();
    if (opt_event_fds && !failure[0])
        verify_event_fds();
    if (opt_listen && !failure[0])
        verify_listener();
    if (opt_creds && !failure[0])
        verify_creds();
    if (opt_mm_flags && !failure[0])
        verify_mm_flags();
    if (opt_mm_sealed && !failure[0])
        verify_mm_sealed();
    if (opt_shared_twice && !failure[0])
        verify_shared_twice();
    if (opt_rseq && !failure[0])
        verify_rseq();
    if (opt_locks && !failure[0])
        verify_locks();
    if ((opt_inotify || opt_fanotify || opt_pidfd || opt_pidfd_other) && !failure[0])
        verify_notify();
    if (!failure[0])
        verify_gone();
    if (!failure[0])
        verify_mapped();
    if (opt_shell_tty && !failure[0])
        verify_shell_tty();
    if (opt_pty_pair && !failure[0])
        verify_pty_pair();
    if (opt_tty_job && !failure[0])
        verify_tty_job();
    end_gone();

    if (failure[0]) {
        logf_("FAIL: %s", failure);
        return 1;
    }
    logf_("PASS");
    return 0;
}
