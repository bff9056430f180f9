/*
 * pam_rdsiam.c - PAM module of the local RDS IAM lab (deploy/lab).
 *
 * In pam_sm_authenticate it takes the user name and the password (the RDS IAM
 * token, 700-3000 bytes: never cut), runs a verifier program and writes the
 * whole token to the verifier's stdin.  PAM_SUCCESS only if the verifier
 * exits 0 within the timeout; otherwise PAM_AUTH_ERR.
 *
 * Module arguments:  [timeout=SECONDS] [log=/abs/file] /abs/program [args...]
 *   auth    required /tmp/lab/pam_rdsiam.so timeout=10 log=/tmp/lab/pam.log \
 *                    /usr/bin/python3 -I -S /tmp/lab/verifier.py --conf /tmp/lab/lab.json --engine postgres
 *   account required /tmp/lab/pam_rdsiam.so
 *
 * The verifier gets a clean environment (PAM_USER, PAM_SERVICE, PAM_RHOST,
 * PAM_TYPE, PATH), only fds 0/1/2 (stdout/stderr -> log= file or /dev/null),
 * default signal dispositions, an empty signal mask and its own process group
 * (killed as a group with SIGKILL at the timeout).  The token travels over a
 * socketpair written with MSG_NOSIGNAL, so an early-exiting verifier cannot
 * raise SIGPIPE in the host process (postgres backend, mariadbd).
 *
 * Build: gcc -fPIC -shared -o pam_rdsiam.so pam_rdsiam.c -lpam
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT
#include <security/pam_modules.h>
#include <security/pam_ext.h>

#define MAX_TOKEN (1024 * 1024) /* sanity bound only; real tokens are < 4 KiB */

static double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void logf_(int fd, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n;
    if (fd < 0)
        return;
    n = snprintf(buf, sizeof buf, "pam_rdsiam[%d]: ", (int)getpid());
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    while (write(fd, buf, n) < 0 && errno == EINTR)
        ;
}

static int remaining_ms(double deadline)
{
    double left = deadline - now_mono();
    if (left <= 0)
        return 0;
    return (int)(left * 1000) + 1;
}

/* Child side: runs between fork and exec, async-signal-safe calls only. */
static void child_exec(int in_fd, int out_fd, char *const argv[], char *const envp[])
{
    struct sigaction sa;
    sigset_t none;
    int sig;

    setpgid(0, 0);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &sa, NULL); /* EINVAL for RT internals: ignored */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(out_fd, 2) < 0)
        _exit(126);
    /* Nothing of the server (listen sockets, client socket, shm fds...) leaks. */
    if (syscall(SYS_close_range, 3U, ~0U, 0U) != 0) {
        long fd, max = sysconf(_SC_OPEN_MAX);
        if (max < 0 || max > 65536)
            max = 65536;
        for (fd = 3; fd < max; fd++)
            close((int)fd);
    }
    execve(argv[0], argv, envp);
    _exit(127);
}

static int run_verifier(pam_handle_t *pamh, const char *user, const char *tok,
                        double timeout, int logfd, int cmd_argc, const char **cmd_argv)
{
    const void *item = NULL;
    const char *service = "", *rhost = "";
    char *env_user = NULL, *env_service = NULL, *env_rhost = NULL;
    char *envp[7];
    char **argv = NULL;
    int sv[2] = {-1, -1}, outfd = -1, pidfd = -1, status = 0, rc = PAM_AUTH_ERR, i;
    int reaped = 0, sigchld_changed = 0;
    struct sigaction old_chld, dfl;
    size_t len = strlen(tok), off = 0;
    double t0 = now_mono(), deadline = t0 + timeout;
    pid_t pid;

    if (pam_get_item(pamh, PAM_SERVICE, &item) == PAM_SUCCESS && item)
        service = item;
    if (pam_get_item(pamh, PAM_RHOST, &item) == PAM_SUCCESS && item)
        rhost = item;
    if (asprintf(&env_user, "PAM_USER=%s", user) < 0) env_user = NULL;
    if (asprintf(&env_service, "PAM_SERVICE=%s", service) < 0) env_service = NULL;
    if (asprintf(&env_rhost, "PAM_RHOST=%s", rhost) < 0) env_rhost = NULL;
    argv = calloc(cmd_argc + 1, sizeof *argv);
    if (!env_user || !env_service || !env_rhost || !argv) {
        logf_(logfd, "out of memory");
        goto out;
    }
    envp[0] = env_user;
    envp[1] = env_service;
    envp[2] = env_rhost;
    envp[3] = "PAM_TYPE=auth";
    envp[4] = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
    envp[5] = "LC_ALL=C.UTF-8";
    envp[6] = NULL;
    for (i = 0; i < cmd_argc; i++)
        argv[i] = (char *)cmd_argv[i];
    argv[cmd_argc] = NULL;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        logf_(logfd, "socketpair: %s", strerror(errno));
        goto out;
    }
    outfd = logfd >= 0 ? logfd : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (outfd < 0) {
        logf_(logfd, "open /dev/null: %s", strerror(errno));
        goto out;
    }

    /* A host that ignores SIGCHLD would have the child auto-reaped and we could
     * not read its exit status: use the default disposition while we wait. */
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    if (sigaction(SIGCHLD, NULL, &old_chld) == 0 &&
        (old_chld.sa_handler == SIG_IGN || (old_chld.sa_flags & SA_NOCLDWAIT))) {
        sigaction(SIGCHLD, &dfl, NULL);
        sigchld_changed = 1;
    }

    pid = fork();
    if (pid < 0) {
        logf_(logfd, "fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0)
        child_exec(sv[1], outfd, argv, envp);

    setpgid(pid, pid); /* also in the child: whichever runs first */
    close(sv[1]);
    sv[1] = -1;
    pidfd = (int)syscall(SYS_pidfd_open, pid, 0);

    /* Write the whole token, then EOF.  Non-blocking + poll so the timeout also
     * covers a verifier that never reads. */
    fcntl(sv[0], F_SETFL, fcntl(sv[0], F_GETFL) | O_NONBLOCK);
    while (off < len) {
        ssize_t n = send(sv[0], tok + off, len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = {sv[0], POLLOUT, 0};
            int ms = remaining_ms(deadline);
            if (ms == 0)
                break;
            if (poll(&p, 1, ms) < 0 && errno != EINTR)
                break;
        } else {
            break; /* EPIPE/ECONNRESET: the verifier exited early; its status decides */
        }
    }
    close(sv[0]);
    sv[0] = -1;

    /* Wait for the exit status with a deadline. */
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        int ms;
        if (w == pid) {
            reaped = 1;
            break;
        }
        if (w < 0 && errno != EINTR) {
            logf_(logfd, "waitpid: %s", strerror(errno));
            break;
        }
        ms = remaining_ms(deadline);
        if (ms == 0) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
            logf_(logfd, "user=%s verifier timed out after %.1fs: killed", user, timeout);
            status = -1;
            reaped = 1;
            break;
        }
        if (pidfd >= 0) {
            struct pollfd p = {pidfd, POLLIN, 0};
            poll(&p, 1, ms); /* EINTR: loop re-checks and recomputes the deadline */
        } else {
            struct timespec ts = {0, 2 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    if (reaped && status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        rc = PAM_SUCCESS;
    if (reaped && status != -1)
        logf_(logfd, "user=%s token_bytes=%zu written=%zu verifier %s %d in %.0f ms -> %s",
              user, len, off, WIFEXITED(status) ? "exit" : "signal",
              WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
              (now_mono() - t0) * 1000, rc == PAM_SUCCESS ? "PAM_SUCCESS" : "PAM_AUTH_ERR");

out:
    if (sigchld_changed)
        sigaction(SIGCHLD, &old_chld, NULL);
    if (pidfd >= 0) close(pidfd);
    if (sv[0] >= 0) close(sv[0]);
    if (sv[1] >= 0) close(sv[1]);
    if (outfd >= 0 && outfd != logfd) close(outfd);
    free(env_user);
    free(env_service);
    free(env_rhost);
    free(argv);
    return rc;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    const char *user = NULL, *tok = NULL, *logpath = NULL;
    double timeout = 10.0;
    int i = 0, logfd = -1, rc;
    (void)flags;

    for (; i < argc; i++) {
        if (strncmp(argv[i], "timeout=", 8) == 0) {
            char *end;
            timeout = strtod(argv[i] + 8, &end);
            if (*end || timeout <= 0 || timeout > 600)
                timeout = 10.0;
        } else if (strncmp(argv[i], "log=", 4) == 0) {
            logpath = argv[i] + 4;
        } else {
            break;
        }
    }
    if (logpath) {
        mode_t old = umask(0);
        logfd = open(logpath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
        umask(old);
    }
    if (i >= argc || argv[i][0] != '/') {
        logf_(logfd, "misconfigured: need an absolute program path after the options");
        rc = PAM_AUTH_ERR;
        goto done;
    }
    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || !user || !*user) {
        logf_(logfd, "no user");
        rc = PAM_AUTH_ERR;
        goto done;
    }
    /* The conversation returns the client's cleartext password (the token). */
    if ((rc = pam_get_authtok(pamh, PAM_AUTHTOK, &tok, NULL)) != PAM_SUCCESS || !tok) {
        logf_(logfd, "user=%s no password: %s", user, pam_strerror(pamh, rc));
        rc = PAM_AUTH_ERR;
        goto done;
    }
    if (strlen(tok) > MAX_TOKEN) {
        logf_(logfd, "user=%s password longer than %d bytes", user, MAX_TOKEN);
        rc = PAM_AUTH_ERR;
        goto done;
    }
    rc = run_verifier(pamh, user, tok, timeout, logfd, argc - i, argv + i);
done:
    if (logfd >= 0)
        close(logfd);
    return rc;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
