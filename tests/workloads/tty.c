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
