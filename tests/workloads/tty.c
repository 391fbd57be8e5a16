/* ---- Terminals (included by workload.c).
 * --shell-tty PATH: a shell job's terminal. The workload (its own session leader, as
 *   the harness starts it) opens the terminal PATH, makes it its controlling terminal,
 *   puts it on fds 0, 1 and 2 and its group in the foreground. The check: fds 0-2 are
 *   one terminal, still its controlling terminal with its group in the foreground; a
 *   line typed on it (the test writes "ping" into the master) is read from fd 0; and
 *   "terminal ok PID" is written to it for the test to read on the master. ---- */
#include <sys/ioctl.h>
#include <termios.h>

static const char *opt_shell_tty;
/* --tty-job: a job of an interactive shell, on the shell's terminal (fds 0-2, as
 * inherited), in the shell's session. The check: fds 0-2 are still one terminal, and
 * "terminal ok PID" written to it. */
static int opt_tty_job;

static void verify_tty_job(void)
{
    struct stat st[3];
    for (int i = 0; i < 3; i++) {
        if (!isatty(i) || fstat(i, &st[i]) != 0)
            FAIL_RET("terminal: fd %d is no longer a terminal", i);
        if (st[i].st_rdev != st[0].st_rdev)
            FAIL_RET("terminal: fd %d is another terminal than fd 0", i);
    }
    dprintf(1, "terminal ok %d\n", getpid());
}

static void setup_shell_tty(void)
{
    int fd = open(opt_shell_tty, O_RDWR | O_NOCTTY);
    if (fd < 0)
        die("open --shell-tty");
    if (ioctl(fd, TIOCSCTTY, 0) != 0)
        die("TIOCSCTTY");
    for (int i = 0; i < 3; i++)
        if (dup2(fd, i) != i)
            die("dup2 the terminal");
    if (fd > 2)
        close(fd);
    /* A shell job that outlives its terminal's hangups (nohup's way): the test takes
     * the terminal away from it to show the check fails. */
    signal(SIGHUP, SIG_IGN);
    if (tcsetpgrp(0, getpgrp()) != 0)
        die("tcsetpgrp");
}

static void verify_shell_tty(void)
{
    struct stat st[3];
    for (int i = 0; i < 3; i++) {
        if (!isatty(i) || fstat(i, &st[i]) != 0)
            FAIL_RET("terminal: fd %d is no longer a terminal", i);
        if (st[i].st_rdev != st[0].st_rdev)
            FAIL_RET("terminal: fd %d is terminal %u:%u, fd 0 is %u:%u", i, major(st[i].st_rdev), minor(st[i].st_rdev),
                     major(st[0].st_rdev), minor(st[0].st_rdev));
    }
    if (getsid(0) != getpid() || tcgetsid(0) != getpid())
        FAIL_RET("terminal: not its controlling terminal (its session %d, the terminal's %d)", getsid(0), tcgetsid(0));
    if (tcgetpgrp(0) != getpgrp())
        FAIL_RET("terminal: its group %d is not the foreground (%d)", getpgrp(), tcgetpgrp(0));
    struct pollfd pf = {.fd = 0, .events = POLLIN};
    char line[64] = {0};
    if (poll(&pf, 1, 5000) != 1 || read(0, line, sizeof line - 1) <= 0 || strncmp(line, "ping", 4))
        FAIL_RET("terminal: read %.60s from it, want the \"ping\" typed on it", line);
    dprintf(1, "terminal ok %d\n", getpid());
}

/* ---- --pty-pair: a pseudo-terminal pair both of whose ends it holds (openpty), with
 *   settings of its own (canonical without echo, VINTR changed, window 33x101, packet
 *   mode) and bytes unread both ways: a typed line and a line being typed for the
 *   slave side, a line written by the slave side for the master. The check: the same
 *   /dev/pts/N, settings, window and mode; the slave side reads the line, then the
 *   line being typed once it is ended; the master reads the written line; a new byte
 *   goes through both ways. ---- */
#include <pty.h>

static int opt_pty_pair, pp_master = -1, pp_slave = -1;
static char pp_name[64];
static struct termios pp_termios;

static void setup_pty_pair(void)
{
    struct winsize ws = {.ws_row = 33, .ws_col = 101, .ws_xpixel = 7, .ws_ypixel = 9};
    if (openpty(&pp_master, &pp_slave, pp_name, NULL, &ws) != 0)
        die("openpty");
    if (tcgetattr(pp_slave, &pp_termios) != 0)
        die("tcgetattr");
    pp_termios.c_lflag &= ~(ECHO | ECHOE | ECHOK);
    pp_termios.c_cc[VINTR] = 0x07;
    if (tcsetattr(pp_slave, TCSANOW, &pp_termios) != 0 || tcgetattr(pp_slave, &pp_termios) != 0)
        die("tcsetattr");
    int one = 1;
    if (ioctl(pp_master, TIOCPKT, &one) != 0)
        die("TIOCPKT");
    const char typed[] = "typed-line\npartial", written[] = "written-line\n";
    if (write(pp_master, typed, strlen(typed)) != (ssize_t)strlen(typed) ||
        write(pp_slave, written, strlen(written)) != (ssize_t)strlen(written))
        die("pty writes");
    /* The line discipline takes bytes in asynchronously: wait until both are queued. */
    for (int i = 0; i < 2000; i++) {
        int in = 0, out = 0;
        ioctl(pp_slave, FIONREAD, &in);
        ioctl(pp_master, FIONREAD, &out);
        if (in == 11 && out == 14)
            return;
        sleep_ms(1);
    }
    die("pty bytes never queued");
}

/* Reads what fd has within 2 s (packet mode: the status byte dropped). */
static ssize_t pp_read(int fd, char *buf, size_t len, int packet)
{
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    buf[0] = 0;
    if (poll(&pf, 1, 2000) != 1)
        return -1;
    char raw[256];
    ssize_t n = read(fd, raw, sizeof raw < len ? sizeof raw : len);
    if (n <= 0)
        return n;
    if (packet) {
        if (raw[0] != TIOCPKT_DATA)
            return -1;
        memmove(raw, raw + 1, --n);
    }
    memcpy(buf, raw, n);
    buf[n] = 0;
    return n;
}

static void verify_pty_pair(void)
{
    char name[64], buf[256];
    if (ptsname_r(pp_master, name, sizeof name) != 0 || strcmp(name, pp_name))
        FAIL_RET("pty: the master is now %s's, want %s's", name, pp_name);
    struct stat a, b;
    if (fstat(pp_slave, &a) != 0 || stat(pp_name, &b) != 0 || a.st_rdev != b.st_rdev)
        FAIL_RET("pty: the slave fd is not %s", pp_name);
    struct termios t;
    if (tcgetattr(pp_slave, &t) != 0 || t.c_lflag != pp_termios.c_lflag || t.c_iflag != pp_termios.c_iflag ||
        t.c_oflag != pp_termios.c_oflag || t.c_cflag != pp_termios.c_cflag || memcmp(t.c_cc, pp_termios.c_cc, sizeof t.c_cc))
        FAIL_RET("pty: termios lflag %#x VINTR %#x, want %#x and %#x", t.c_lflag, t.c_cc[VINTR], pp_termios.c_lflag, pp_termios.c_cc[VINTR]);
    struct winsize ws;
    if (ioctl(pp_master, TIOCGWINSZ, &ws) != 0 || ws.ws_row != 33 || ws.ws_col != 101 || ws.ws_xpixel != 7 || ws.ws_ypixel != 9)
        FAIL_RET("pty: window %ux%u, want 33x101", ws.ws_row, ws.ws_col);
    int pkt = 0, lock = 1;
    if (ioctl(pp_master, TIOCGPKT, &pkt) != 0 || !pkt)
        FAIL_RET("pty: packet mode lost");
    if (ioctl(pp_master, TIOCGPTLCK, &lock) != 0 || lock)
        FAIL_RET("pty: locked, want unlocked");
    if (pp_read(pp_master, buf, sizeof buf - 1, 1) != 14 || strcmp(buf, "written-line\r\n"))
        FAIL_RET("pty: the master read \"%s\", want the line written before", buf);
    if (pp_read(pp_slave, buf, sizeof buf - 1, 0) != 11 || strcmp(buf, "typed-line\n"))
        FAIL_RET("pty: the slave side read \"%s\", want the typed line", buf);
    if (write(pp_master, "-end\n", 5) != 5 || pp_read(pp_slave, buf, sizeof buf - 1, 0) != 12 || strcmp(buf, "partial-end\n"))
        FAIL_RET("pty: the slave side read \"%s\", want the line being typed, ended", buf);
    if (write(pp_slave, "x", 1) != 1 || pp_read(pp_master, buf, sizeof buf - 1, 1) != 1 || buf[0] != 'x')
        FAIL_RET("pty: a new byte did not reach the master");
}
