/* Deleted files and memfds mapped into memory, included by workload.c (a block of its
 * own: the options below, one setup, one verify; issue 12):
 *
 *   --mapped-deleted  DIR/mapped-del (3 pages and 100 bytes of a pattern) is mapped
 *                     private read-only whole, and private writable again, where one
 *                     page is written (a private copy); DIR/mapped-shr (2 pages) is
 *                     mapped shared twice, one word written through the first. Both
 *                     files are closed and unlinked; so is DIR/mapped-part (64 pages),
 *                     of which pages 10-11 alone are mapped, private read-only. At the end: the contents, the
 *                     written page and the untouched ones, a write through one shared
 *                     mapping seen in the other, each mapping named DIR/<name>
 *                     (deleted) in /proc/self/maps with the name itself free, and
 *                     mapped-part still 64 pages long, mode 0640 (read through map_files).
 *   --memfd-map       a memfd "ferry-mapped" (2 pages and 10 bytes, sealed against
 *                     growing and shrinking) is mapped shared twice and private once,
 *                     a word written through the first shared one, and its fd closed.
 *                     At the end: the same, the maps named /memfd:ferry-mapped
 *                     (deleted), its seals and size read through /proc/self/map_files.
 *   --memfd-fd        with --memfd-map: the memfd's fd stays open, and at the end a
 *                     write through it must show in the mappings (one object, not a
 *                     copy for the fd and another for the mappings). */

static int opt_mapped_deleted, opt_memfd_map, opt_memfd_fd;

#define MD_SIZE (3 * PAGE + 100)
#define MS_SIZE (2 * PAGE)
#define MF_SIZE (2 * PAGE + 10)
#define MD_WORD 0x5ca1ab1edeadbeefULL

#define MP_PAGES 64
#define MP_OFF (10 * PAGE)

static unsigned char *mp, *md_ro, *md_rw, *ms_a, *ms_b, *mf_a, *mf_b, *mf_p;
static int mf_fd = -1;

static unsigned char md_byte(size_t i, int salt)
{
    return (unsigned char)((i * 131 + salt * 7 + (i >> 12)) & 0xff);
}

static int md_make(const char *name, size_t size, int salt)
{
    char p[PATH_MAX + 32];
    dl_path(p, name);
    int fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd < 0)
        die(name);
    unsigned char *buf = malloc(size);
    if (!buf)
        die("malloc");
    for (size_t i = 0; i < size; i++)
        buf[i] = md_byte(i, salt);
    write_all(fd, buf, size, name);
    free(buf);
    return fd;
}

static unsigned char *md_map(size_t len, int prot, int flags, int fd, const char *what)
{
    void *p = mmap(NULL, len, prot, flags, fd, 0);
    if (p == MAP_FAILED)
        die(what);
    return p;
}

static void setup_mapped(void)
{
    char p[PATH_MAX + 32];
    if (opt_mapped_deleted) {
        int fd = md_make("mapped-del", MD_SIZE, 1);
        md_ro = md_map(MD_SIZE, PROT_READ, MAP_PRIVATE, fd, "mmap mapped-del");
        md_rw = md_map(MD_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, "mmap mapped-del rw");
        memset(md_rw + PAGE, 0xa5, PAGE);
        close(fd);
        dl_path(p, "mapped-del");
        if (unlink(p) != 0)
            die("unlink mapped-del");
        fd = md_make("mapped-part", MP_PAGES * PAGE, 4);
        void *p2 = mmap(NULL, 2 * PAGE, PROT_READ, MAP_PRIVATE, fd, MP_OFF);
        if (p2 == MAP_FAILED)
            die("mmap mapped-part");
        mp = p2;
        close(fd);
        dl_path(p, "mapped-part");
        if (unlink(p) != 0)
            die("unlink mapped-part");
        fd = md_make("mapped-shr", MS_SIZE, 2);
        ms_a = md_map(MS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, "mmap mapped-shr");
        ms_b = md_map(MS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, "mmap mapped-shr again");
        memcpy(ms_a + 8, &(uint64_t){MD_WORD}, 8);
        close(fd);
        dl_path(p, "mapped-shr");
        if (unlink(p) != 0)
            die("unlink mapped-shr");
    }
    if (opt_memfd_map) {
        int fd = memfd_create("ferry-mapped", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (fd < 0)
            die("memfd_create");
        unsigned char *buf = malloc(MF_SIZE);
        if (!buf)
            die("malloc");
        for (size_t i = 0; i < MF_SIZE; i++)
            buf[i] = md_byte(i, 3);
        write_all(fd, buf, MF_SIZE, "memfd");
        free(buf);
        mf_a = md_map(MF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, "mmap memfd");
        mf_b = md_map(MF_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, "mmap memfd again");
        mf_p = md_map(MF_SIZE, PROT_READ, MAP_PRIVATE, fd, "mmap memfd private");
        memcpy(mf_a + 16, &(uint64_t){MD_WORD}, 8);
        if (fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) != 0)
            die("F_ADD_SEALS");
        if (opt_memfd_fd)
            mf_fd = fd;
        else
            close(fd);
    }
}

/* The line of /proc/self/maps for `at` names `want`. */
static int md_named(const void *at, const char *want)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        return 0;
    char line[PATH_MAX + 256];
    int ok = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        int name = 0;
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &s, &e, &name) < 2 || name == 0)
            continue;
        if ((uintptr_t)at >= s && (uintptr_t)at < e) {
            line[strcspn(line, "\n")] = 0;
            ok = !strcmp(line + name, want);
            break;
        }
    }
    fclose(f);
    return ok;
}

/* Bytes [from, to) of `m` follow the pattern of `salt`; answers the first that does not, or -1. */
static long md_differs(const unsigned char *m, size_t from, size_t to, int salt)
{
    for (size_t i = from; i < to; i++)
        if (m[i] != md_byte(i, salt))
            return (long)i;
    return -1;
}

/* A write through `a` at `off` shows through `b`. */
static int md_shared(unsigned char *a, unsigned char *b, size_t off, unsigned char v)
{
    a[off] = v;
    return ((volatile unsigned char *)b)[off] == v;
}

static void verify_mapped(void)
{
    char want[PATH_MAX + 64];
    long at;
    uint64_t w;
    if (opt_mapped_deleted) {
        if ((at = md_differs(md_ro, 0, MD_SIZE, 1)) >= 0)
            FAIL_RET("mapped-deleted: byte %ld of the read-only mapping differs", at);
        if ((at = md_differs(md_rw, 0, PAGE, 1)) >= 0 || (at = md_differs(md_rw, 2 * PAGE, MD_SIZE, 1)) >= 0)
            FAIL_RET("mapped-deleted: byte %ld of the writable private mapping differs", at);
        for (size_t i = PAGE; i < 2 * PAGE; i++)
            if (md_rw[i] != 0xa5)
                FAIL_RET("mapped-deleted: the private page written lost byte %zu", i - PAGE);
        memcpy(&w, ms_b + 8, 8);
        if (w != MD_WORD || md_differs(ms_a, 16, MS_SIZE, 2) >= 0 || md_differs(ms_a, 0, 8, 2) >= 0)
            FAIL_RET("mapped-deleted: the shared file's contents differ (word %#llx)", (unsigned long long)w);
        if (!md_shared(ms_b, ms_a, 5000, 0x3c) || !md_shared(ms_a, ms_b, 77, 0xc3))
            FAIL_RET("mapped-deleted: a write through one shared mapping is not seen in the other");
        dl_path(want, "mapped-del");
        int free_name = access(want, F_OK) != 0 && errno == ENOENT;
        strcat(want, " (deleted)");
        if (!free_name || !md_named(md_ro, want) || !md_named(md_rw + PAGE, want))
            FAIL_RET("mapped-deleted: the private mappings are not named %s, or the name is taken", want);
        for (size_t i = 0; i < 2 * PAGE; i++)
            if (mp[i] != md_byte(MP_OFF + i, 4))
                FAIL_RET("mapped-deleted: byte %zu of the partly mapped file differs", MP_OFF + i);
        char mf[64];
        struct stat st;
        snprintf(mf, sizeof mf, "/proc/self/map_files/%lx-%lx", (unsigned long)(uintptr_t)mp,
                 (unsigned long)(uintptr_t)mp + 2 * PAGE);
        if (stat(mf, &st) != 0 || st.st_size != MP_PAGES * PAGE || st.st_nlink != 0 || (st.st_mode & 07777) != 0640)
            FAIL_RET("mapped-deleted: the partly mapped file is %lld bytes with %d links, mode 0%o, want %d, 0, 0640",
                     (long long)st.st_size, (int)st.st_nlink, (unsigned)st.st_mode & 07777, MP_PAGES * PAGE);
        dl_path(want, "mapped-part");
        strcat(want, " (deleted)");
        if (!md_named(mp, want))
            FAIL_RET("mapped-deleted: the partly mapped file is not named %s", want);
        dl_path(want, "mapped-shr");
        strcat(want, " (deleted)");
        if (!md_named(ms_a, want) || !md_named(ms_b, want))
            FAIL_RET("mapped-deleted: the shared mappings are not named %s", want);
    }
    if (opt_memfd_map) {
        memcpy(&w, mf_b + 16, 8);
        if (w != MD_WORD || md_differs(mf_a, 24, MF_SIZE, 3) >= 0 || md_differs(mf_p, 0, 16, 3) >= 0)
            FAIL_RET("memfd-map: the memfd's contents differ (word %#llx)", (unsigned long long)w);
        if (!md_shared(mf_b, mf_a, PAGE + 3, 0x11) || !md_shared(mf_a, mf_b, 2 * PAGE + 9, 0x22))
            FAIL_RET("memfd-map: a write through one shared mapping is not seen in the other");
        if (mf_p[PAGE + 3] != 0x11)
            FAIL_RET("memfd-map: the private mapping does not see the memfd's page");
        if (!md_named(mf_a, "/memfd:ferry-mapped (deleted)") || !md_named(mf_p, "/memfd:ferry-mapped (deleted)"))
            FAIL_RET("memfd-map: the mappings are not named /memfd:ferry-mapped (deleted)");
        char mf[64];
        snprintf(mf, sizeof mf, "/proc/self/map_files/%lx-%lx", (unsigned long)(uintptr_t)mf_a,
                 (unsigned long)(uintptr_t)mf_a + 3 * PAGE);
        int fd = open(mf, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0)
            FAIL_RET("memfd-map: %s: %s", mf, strerror(errno));
        int seals = fcntl(fd, F_GET_SEALS);
        close(fd);
        if (st.st_size != MF_SIZE || seals != (F_SEAL_GROW | F_SEAL_SHRINK))
            FAIL_RET("memfd-map: size %lld seals %#x, want %d and %#x", (long long)st.st_size, seals, MF_SIZE,
                     F_SEAL_GROW | F_SEAL_SHRINK);
        if (mf_fd >= 0) {
            if (pwrite(mf_fd, "Q", 1, 40) != 1 || mf_a[40] != 'Q')
                FAIL_RET("memfd-fd: a write through the fd is not seen in the mapping");
        }
    }
}
