/* Traps and the vDSO, included by workload.c (a block of its own: the options below,
 * one setup, one verify). Every trap is counted from inside, where it happens:
 *
 *   --self-trap      a thread executes int3 in a loop; its SIGTRAP handler counts each
 *                    one and checks it came from that int3, the loop checks the count
 *                    went up by exactly one each time (no trap lost, none spurious)
 *   --single-step    a thread sets TF (pushf/or/popf) and steps through 64 nops; the
 *                    handler checks each trap's rip is the next instruction of that
 *                    sequence and clears TF at its end; the loop checks 65 traps a round
 *   --watchpoint     a helper child seizes a thread, arms a hardware write watchpoint
 *                    (DR0/DR7 with PTRACE_POKEUSER) on a variable and detaches; the
 *                    thread writes the variable in a loop and checks each write trapped
 *   --vector-regs    a thread keeps a value in ymm15 (xmm15 without AVX) while it spins
 *                    comparing it with the value in memory (10 ms at a time, loading it
 *                    again after each pause: calls may change it): the vector and FPU
 *                    state of a thread stopped anywhere, ferry's calls made in it, comes
 *                    back intact (checked each round, reported at the end)
 *   --sigtrap-pending the main thread blocks SIGTRAP and queues itself one with
 *                    si_code TRAP_BRKPT and a known si_addr: pending at every freeze,
 *                    checked (code, address, only one) at the end
 *   --vdso-moved     the process moves its [vdso] elsewhere with mremap (its vvar
 *                    stays): at the end both are where they were put, the vDSO intact
 *   --vdso-unmapped  the process unmaps its [vdso] and vvar areas: at the end none is
 *                    back, and clock_gettime by syscall still works
 *   --vdso-moved-whole the process moves its vvar areas and [vdso] together elsewhere
 *                    and calls clock_gettime through the vDSO there (found in its symbol
 *                    table) every tick, checked against the system call
 *
 * Log lines: `traps int3 N step R watch W` each tick (counts so far), `vdso 0x<start>`
 * for a moved vDSO. The vDSO options leave libc's vDSO calls alone afterwards (they
 * would jump to where the vDSO no longer is): time goes through syscall(). */
#include <elf.h>
#include <sys/auxv.h>
#include <sys/ptrace.h>
#include <sys/user.h>

static int opt_self_trap;
static int opt_single_step;
static int opt_watchpoint;
static int opt_sigtrap_pending;
static int opt_vector_regs;
static int opt_vdso_moved;
static int opt_vdso_unmapped;
static int opt_vdso_moved_whole;

#define STEP_NOPS 64
#define TRAP_BURST 200
#define PENDING_TRAP_ADDR ((void *)0x5eed7a9)

static volatile uint64_t int3_hits, int3_done;
static volatile uint64_t step_traps, step_rounds, step_next;
static volatile uint64_t watched;
static volatile uint64_t watch_hits, watch_writes;
static volatile uint64_t vector_rounds;
static char trap_fail[256];
static pthread_t trap_threads[4];
static int trap_nthreads;

/* The trap sites (in the asm below). */
extern char ferry_int3_after[], ferry_step_start[], ferry_step_end[];

static void trap_failed(const char *what, uint64_t got, uint64_t want)
{
    if (!trap_fail[0])
        snprintf(trap_fail, sizeof trap_fail, "%s: %#llx, want %#llx", what, (unsigned long long)got,
                 (unsigned long long)want);
}

static void on_trap(int sig, siginfo_t *si, void *uc_)
{
    (void)sig;
    ucontext_t *uc = uc_;
    uint64_t rip = uc->uc_mcontext.gregs[REG_RIP];
    if (si->si_code == SI_KERNEL) { /* int3 */
        if (rip != (uint64_t)ferry_int3_after)
            trap_failed("int3 trap from an unknown place", rip, (uint64_t)ferry_int3_after);
        int3_hits++;
    } else if (si->si_code == TRAP_TRACE) {
        if (rip != step_next)
            trap_failed("single-step trap at an unexpected rip", rip, step_next);
        step_traps++;
        if (rip >= (uint64_t)ferry_step_end)
            uc->uc_mcontext.gregs[REG_EFL] &= ~0x100LL;
        else
            step_next = rip + 1; /* every stepped instruction is a 1-byte nop */
    } else if (si->si_code == TRAP_HWBKPT) {
        watch_hits++;
    } else {
        trap_failed("SIGTRAP with an unexpected si_code", (uint64_t)si->si_code, TRAP_HWBKPT);
    }
}

/* No red zone below rsp is touched: the flags go through the stack 128 bytes down. */
__attribute__((noinline, noclone)) static void int3_once(void)
{
    __asm__ __volatile__("int3\n"
                         ".globl ferry_int3_after\n"
                         "ferry_int3_after:\n" ::: "memory");
}

__attribute__((noinline, noclone)) static void step_once(void)
{
    __asm__ __volatile__("lea -128(%%rsp), %%rsp\n"
                         "pushfq\n"
                         "orq $0x100, (%%rsp)\n"
                         "popfq\n"
                         "lea 128(%%rsp), %%rsp\n"
                         ".globl ferry_step_start\n"
                         "ferry_step_start:\n"
                         ".rept 64\n"
                         "nop\n"
                         ".endr\n"
                         ".globl ferry_step_end\n"
                         "ferry_step_end:\n"
                         "nop\n" ::: "memory", "cc");
}

static void *self_trap_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_threads)) {
        for (int i = 0; i < TRAP_BURST; i++) {
            uint64_t before = int3_hits;
            int3_once();
            int3_done++;
            if (int3_hits != before + 1)
                trap_failed("int3 traps counted across one int3", int3_hits - before, 1);
        }
        sleep_ms(5);
    }
    return NULL;
}

static void *single_step_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_threads)) {
        for (int i = 0; i < TRAP_BURST / 20; i++) {
            uint64_t before = step_traps;
            step_next = (uint64_t)ferry_step_start;
            step_once();
            step_rounds++;
            if (step_traps - before != STEP_NOPS + 1)
                trap_failed("single-step traps in a round", step_traps - before, STEP_NOPS + 1);
        }
        sleep_ms(5);
    }
    return NULL;
}

static const uint8_t vector_want[32] __attribute__((aligned(32))) = {
    0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xf0, 0x0f,
    0x1f, 0x2e, 0x3d, 0x4c, 0x5b, 0x6a, 0x79, 0x88, 0x97, 0xa6, 0xb5, 0xc4, 0xd3, 0xe2, 0xf1, 0x01};

/* Loads the value into ymm15 (xmm15) and spins comparing it with memory: 0 while they
 * stay equal, 1 at the first difference. */
static int vector_spin(int avx)
{
    int bad;
    if (avx)
        __asm__ __volatile__("vmovdqa %1, %%ymm15\n"
                             "mov $4000000, %%rcx\n"
                             "1: vpcmpeqb %1, %%ymm15, %%ymm14\n"
                             "vpmovmskb %%ymm14, %%eax\n"
                             "cmp $-1, %%eax\n"
                             "jne 2f\n"
                             "dec %%rcx\n"
                             "jnz 1b\n"
                             "xor %%eax, %%eax\n"
                             "jmp 3f\n"
                             "2: mov $1, %%eax\n"
                             "3: vzeroupper\n"
                             : "=a"(bad)
                             : "m"(vector_want)
                             : "rcx", "xmm14", "xmm15", "cc");
    else
        __asm__ __volatile__("movdqa %1, %%xmm15\n"
                             "mov $4000000, %%rcx\n"
                             "1: movdqa %%xmm15, %%xmm14\n"
                             "pcmpeqb %1, %%xmm14\n"
                             "pmovmskb %%xmm14, %%eax\n"
                             "cmp $0xffff, %%eax\n"
                             "jne 2f\n"
                             "dec %%rcx\n"
                             "jnz 1b\n"
                             "xor %%eax, %%eax\n"
                             "jmp 3f\n"
                             "2: mov $1, %%eax\n"
                             "3:\n"
                             : "=a"(bad)
                             : "m"(vector_want)
                             : "rcx", "xmm14", "xmm15", "cc");
    return bad;
}

static void *vector_main(void *arg)
{
    (void)arg;
    int avx = __builtin_cpu_supports("avx2");
    while (!atomic_load(&stop_threads)) {
        if (vector_spin(avx))
            trap_failed(avx ? "ymm15 changed under the thread in round" : "xmm15 changed under the thread in round",
                        vector_rounds, vector_rounds);
        vector_rounds++;
        sleep_ms(1);
    }
    return NULL;
}

/* The helper: seizes thread `tid` of its parent, arms DR0 as an 8-byte write watchpoint
 * on `watched`, and detaches, as a debugger that went away would. */
static void arm_watchpoint(pid_t tid)
{
    pid_t c = fork();
    if (c < 0)
        die("fork watchpoint helper");
    if (c == 0) {
        int st;
        if (ptrace(PTRACE_SEIZE, tid, 0, 0) != 0 || ptrace(PTRACE_INTERRUPT, tid, 0, 0) != 0 ||
            waitpid(tid, &st, __WALL) != tid)
            _exit(10);
        if (ptrace(PTRACE_POKEUSER, tid, offsetof(struct user, u_debugreg[0]), (void *)&watched) != 0)
            _exit(11);
        /* L0, RW0 = 01 (write), LEN0 = 10 (8 bytes) */
        if (ptrace(PTRACE_POKEUSER, tid, offsetof(struct user, u_debugreg[7]), (void *)0x90001L) != 0)
            _exit(12);
        _exit(ptrace(PTRACE_DETACH, tid, 0, 0) == 0 ? 0 : 13);
    }
    int st;
    while (waitpid(c, &st, 0) < 0)
        if (errno != EINTR)
            die("waitpid watchpoint helper");
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        fprintf(stderr, "watchpoint helper failed: status %#x\n", st);
        exit(3);
    }
}

static void *watchpoint_main(void *arg)
{
    (void)arg;
    arm_watchpoint((pid_t)syscall(SYS_gettid));
    while (!atomic_load(&stop_threads)) {
        for (int i = 0; i < TRAP_BURST; i++) {
            uint64_t before = watch_hits;
            watched = watch_writes + 1;
            watch_writes++;
            if (watch_hits != before + 1)
                trap_failed("watchpoint traps counted across one write", watch_hits - before, 1);
        }
        sleep_ms(5);
    }
    return NULL;
}

/* ---- the vDSO ---- */
static uint64_t vdso_at, vdso_len, vvar_at, vvar_len;
static unsigned char *vdso_copy;

/* The first area of /proc/self/maps named `name` (e.g. "[vdso]"): 1 if found. */
static int find_area(const char *name, uint64_t *start, uint64_t *end)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return 0;
    char line[512];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char n[256] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %255s", &s, &e, n) >= 2 && !strcmp(n, name)) {
            *start = s;
            *end = e;
            found = 1;
        }
    }
    fclose(f);
    return found;
}

static void setup_vdso(void)
{
    uint64_t s, e;
    if (!find_area("[vdso]", &s, &e) || !find_area("[vvar]", &vvar_at, &vvar_len))
        die("no [vdso] or [vvar] in /proc/self/maps");
    vvar_len -= vvar_at;
    vdso_len = e - s;
    if (opt_vdso_unmapped) {
        const char *areas[] = {"[vdso]", "[vvar]", "[vvar_vclock]"};
        for (size_t i = 0; i < sizeof areas / sizeof areas[0]; i++)
            if (find_area(areas[i], &s, &e) && munmap((void *)s, e - s) != 0)
                die("munmap vdso");
        return;
    }
    vdso_copy = malloc(vdso_len);
    if (!vdso_copy)
        die("malloc vdso copy");
    memcpy(vdso_copy, (void *)s, vdso_len);
    /* A free place well away from it: the kernel's pick for a larger area. */
    void *hole = mmap(NULL, vdso_len + (64 << 20), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED)
        die("mmap hole");
    uint64_t to = (uint64_t)hole + (32 << 20);
    munmap(hole, vdso_len + (64 << 20));
    if (mremap((void *)s, vdso_len, vdso_len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)to) != (void *)to)
        die("mremap vdso");
    vdso_at = to;
    logf_("vdso %#llx", (unsigned long long)to);
}

static void verify_vdso(void)
{
    uint64_t s, e;
    struct timespec a, b;
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &a) != 0 || syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &b) != 0 ||
        b.tv_sec < a.tv_sec)
        FAIL_RET("vdso: clock_gettime by syscall failed");
    if (opt_vdso_unmapped) {
        const char *areas[] = {"[vdso]", "[vvar]", "[vvar_vclock]"};
        for (size_t i = 0; i < sizeof areas / sizeof areas[0]; i++)
            if (find_area(areas[i], &s, &e))
                FAIL_RET("vdso: %s is back at %#lx after the process unmapped it", areas[i], (unsigned long)s);
        return;
    }
    if (!find_area("[vdso]", &s, &e))
        FAIL_RET("vdso: no [vdso] at all");
    if (s != vdso_at || e - s != vdso_len)
        FAIL_RET("vdso: [vdso] at %#lx (%lu bytes), the process moved it to %#lx", (unsigned long)s,
                 (unsigned long)(e - s), (unsigned long)vdso_at);
    if (memcmp((void *)s, vdso_copy, vdso_len) != 0)
        FAIL_RET("vdso: [vdso] at %#lx is not the vDSO it was", (unsigned long)s);
    if (!find_area("[vvar]", &s, &e) || s != vvar_at || e - s != vvar_len)
        FAIL_RET("vdso: [vvar] at %#lx, it stayed at %#lx", (unsigned long)s, (unsigned long)vvar_at);
}

/* ---- the vDSO moved whole, and called where it is ---- */
static uint64_t whole_at; /* where the vDSO went */
static int (*vdso_clock_gettime)(clockid_t, struct timespec *);

/* `name` in the vDSO's dynamic symbol table, the image loaded at `base`. */
static void *vdso_symbol(uint64_t base, const char *name)
{
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)base;
    const Elf64_Phdr *ph = (const Elf64_Phdr *)(base + eh->e_phoff);
    uint64_t load = base;
    for (int i = 0; i < eh->e_phnum; i++)
        if (ph[i].p_type == PT_LOAD) {
            load = base - ph[i].p_vaddr;
            break;
        }
    const Elf64_Shdr *sh = (const Elf64_Shdr *)(base + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_DYNSYM)
            continue;
        const Elf64_Sym *sym = (const Elf64_Sym *)(base + sh[i].sh_offset);
        const char *str = (const char *)(base + sh[sh[i].sh_link].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof *sym; k++)
            if (sym[k].st_name && !strcmp(str + sym[k].st_name, name) && sym[k].st_shndx != SHN_UNDEF)
                return (void *)(load + sym[k].st_value);
    }
    return NULL;
}

static void setup_vdso_whole(void)
{
    uint64_t lo = UINT64_MAX, hi = 0, s, e, vdso = 0;
    const char *areas[] = {"[vvar]", "[vvar_vclock]", "[vdso]"};
    for (size_t i = 0; i < 3; i++)
        if (find_area(areas[i], &s, &e)) {
            lo = s < lo ? s : lo;
            hi = e > hi ? e : hi;
            if (i == 2)
                vdso = s;
        }
    if (!vdso)
        die("no [vdso]");
    void *hole = mmap(NULL, (hi - lo) + (64 << 20), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (hole == MAP_FAILED)
        die("mmap hole");
    uint64_t to = (uint64_t)hole + (16 << 20);
    munmap(hole, (hi - lo) + (64 << 20));
    for (size_t i = 0; i < 3; i++)
        if (find_area(areas[i], &s, &e) &&
            mremap((void *)s, e - s, e - s, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)(to + (s - lo))) != (void *)(to + (s - lo)))
            die("mremap vdso whole");
    whole_at = to + (vdso - lo);
    vdso_clock_gettime = vdso_symbol(whole_at, "__vdso_clock_gettime");
    if (!vdso_clock_gettime)
        die("no __vdso_clock_gettime in the moved vDSO");
    logf_("vdso %#llx", (unsigned long long)whole_at);
}

/* clock_gettime through the moved vDSO agrees with the system call. */
static void vdso_whole_check(void)
{
    struct timespec a, v, b;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &a);
    int r = vdso_clock_gettime(CLOCK_MONOTONIC, &v);
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &b);
    int64_t na = a.tv_sec * 1000000000LL + a.tv_nsec, nv = v.tv_sec * 1000000000LL + v.tv_nsec,
            nb = b.tv_sec * 1000000000LL + b.tv_nsec;
    if (r != 0 || nv < na || nv > nb)
        trap_failed("clock_gettime through the moved vDSO (ns after the system call's)", (uint64_t)(nv - na),
                    (uint64_t)(nb - na));
}

/* ---- setup, tick, verify ---- */
static void setup_traps(void)
{
    if (opt_vdso_moved || opt_vdso_unmapped)
        setup_vdso();
    if (opt_vdso_moved_whole)
        setup_vdso_whole();
    if (opt_self_trap || opt_single_step || opt_watchpoint) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_trap;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        if (sigaction(SIGTRAP, &sa, NULL) != 0)
            die("sigaction TRAP");
    }
    void *(*mains[4])(void *) = {self_trap_main, single_step_main, watchpoint_main, vector_main};
    int want[4] = {opt_self_trap, opt_single_step, opt_watchpoint, opt_vector_regs};
    for (int i = 0; i < 4; i++)
        if (want[i]) {
            errno = pthread_create(&trap_threads[trap_nthreads++], NULL, mains[i], NULL);
            if (errno)
                die("pthread_create trap thread");
        }
    if (opt_watchpoint) {
        /* The helper is done when the first write trapped. */
        for (int i = 0; i < 5000 && watch_hits == 0 && !trap_fail[0]; i++)
            sleep_ms(1);
        if (watch_hits == 0)
            die("the watchpoint never trapped");
    }
    if (opt_sigtrap_pending) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTRAP);
        if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
            die("block TRAP");
        siginfo_t si;
        memset(&si, 0, sizeof si);
        si.si_signo = SIGTRAP;
        si.si_code = TRAP_BRKPT;
        si.si_addr = PENDING_TRAP_ADDR;
        if (syscall(SYS_rt_tgsigqueueinfo, getpid(), (pid_t)syscall(SYS_gettid), SIGTRAP, &si) != 0)
            die("rt_tgsigqueueinfo TRAP");
    }
}

static void traps_tick(void)
{
    if (opt_vdso_moved_whole)
        vdso_whole_check();
    if (opt_self_trap || opt_single_step || opt_watchpoint)
        logf_("traps int3 %llu step %llu watch %llu", (unsigned long long)int3_hits, (unsigned long long)step_rounds,
              (unsigned long long)watch_hits);
}

/* Called after the other threads are told to stop, before they are joined. */
static void verify_traps(void)
{
    for (int i = 0; i < trap_nthreads; i++) {
        errno = pthread_join(trap_threads[i], NULL);
        if (errno)
            FAIL_RET("traps: join: %s", strerror(errno));
    }
    if (trap_fail[0])
        FAIL_RET("traps: %s", trap_fail);
    if (opt_self_trap && (int3_hits != int3_done || int3_done == 0))
        FAIL_RET("traps: %llu int3 traps for %llu int3s", (unsigned long long)int3_hits, (unsigned long long)int3_done);
    if (opt_vector_regs && vector_rounds == 0)
        FAIL_RET("traps: the vector register thread never finished a round");
    if (opt_single_step && step_traps != step_rounds * (STEP_NOPS + 1))
        FAIL_RET("traps: %llu single-step traps in %llu rounds", (unsigned long long)step_traps,
                 (unsigned long long)step_rounds);
    if (opt_watchpoint && (watch_hits != watch_writes || watched != watch_writes))
        FAIL_RET("traps: %llu watchpoint traps for %llu writes", (unsigned long long)watch_hits,
                 (unsigned long long)watch_writes);
    if (opt_sigtrap_pending) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTRAP);
        siginfo_t si;
        struct timespec zero = {0, 0};
        if (sigtimedwait(&set, &si, &zero) != SIGTRAP)
            FAIL_RET("traps: the pending SIGTRAP is gone");
        if (si.si_code != TRAP_BRKPT || si.si_addr != PENDING_TRAP_ADDR)
            FAIL_RET("traps: the pending SIGTRAP has si_code %d si_addr %p, want %d %p", si.si_code, si.si_addr,
                     TRAP_BRKPT, PENDING_TRAP_ADDR);
        if (sigtimedwait(&set, &si, &zero) == SIGTRAP)
            FAIL_RET("traps: a second SIGTRAP was pending (si_code %d)", si.si_code);
    }
    if (opt_vdso_moved || opt_vdso_unmapped)
        verify_vdso();
    if (opt_vdso_moved_whole) {
        uint64_t s, e;
        vdso_whole_check();
        if (trap_fail[0])
            FAIL_RET("traps: %s", trap_fail);
        if (!find_area("[vdso]", &s, &e) || s != whole_at)
            FAIL_RET("vdso: [vdso] at %#lx, the process moved it to %#lx", (unsigned long)s, (unsigned long)whole_at);
    }
}
