/* The floor of a careful freezer, in C: what any signal or ptrace freezer of a process
 * tree must do, and nothing else, so that treeguard's backends can be measured against it.
 *
 *   floor signal|ptrace ROOT
 *
 * Reads one command per line on stdin ("f": freeze, "t": thaw, "q": quit) and answers
 * "ok NANOSECONDS CPU_NANOSECONDS" (the time the work took, measured here, and the CPU
 * time this process spent on it) or "err WHAT".
 *
 * Both modes go down the tree below ROOT (ROOT included) one generation at a time, and read
 * the children of every thread of a process only once it is proven stopped (then the lists
 * are final):
 *
 * - signal: pidfd_open, the identity check (the stat names the parent that listed it),
 *   SIGSTOP through the pidfd; then every task's stat is read until it shows 'T'. The thaw
 *   sends SIGCONT through the pidfds, last first.
 * - ptrace: PTRACE_SEIZE every thread (with the clone, fork and vfork options) and
 *   PTRACE_INTERRUPT it; then waitpid(tid, __WALL) collects each stop. The thaw detaches
 *   every thread, last first.
 *
 * Built by benchmarks/run.py with the system's C compiler; idle trees only.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX 65536

static int mode_ptrace;
static int root;
static int pids[MAX], pidfds[MAX], parents[MAX];
static int npids;
static int tids[MAX * 8];
static int ntids;

static long long clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* The state letter and ppid of a stat line, anchored on the last ')'. */
static int read_stat(const char *path, char *state, int *ppid) {
    char buf[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *close_paren = strrchr(buf, ')');
    if (!close_paren || close_paren[1] != ' ') return -1;
    *state = close_paren[2];
    if (ppid) *ppid = atoi(close_paren + 4);
    return 0;
}

/* The thread ids of pid, into out (at most cap); their number, or -1 if it is gone. */
static int list_tids(int pid, int *out, int cap) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < cap)
        if (e->d_name[0] != '.') out[n++] = atoi(e->d_name);
    closedir(d);
    return n;
}

/* Append the children of every thread of pid to kids; returns the new count. */
static int children_of(int pid, int *kids, int nkids) {
    int t[256];
    int n = list_tids(pid, t, 256);
    for (int i = 0; i < n; i++) {
        char path[96], buf[65536];
        snprintf(path, sizeof path, "/proc/%d/task/%d/children", pid, t[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        /* seq_file hands out a page at a time: read to the end */
        ssize_t len = 0, got;
        while (len < (ssize_t)sizeof buf - 1 &&
               (got = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
            len += got;
        close(fd);
        if (len <= 0) continue;
        buf[len] = 0;
        for (char *p = buf; *p && nkids < MAX;) {
            kids[nkids++] = (int)strtol(p, &p, 10);
            while (*p == ' ') p++;
        }
    }
    return nkids;
}

static int stop_signal(int pid, int parent) {
    int fd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (fd < 0) return 0; /* gone */
    char path[64], state;
    int ppid;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if (read_stat(path, &state, &ppid) < 0 || (parent && ppid != parent)) {
        close(fd); /* gone, or its PID reused: not the child listed */
        return 0;
    }
    if (syscall(SYS_pidfd_send_signal, fd, SIGSTOP, NULL, 0) < 0) {
        close(fd);
        return 0;
    }
    pids[npids] = pid;
    pidfds[npids] = fd;
    parents[npids++] = parent;
    return 1;
}

static void wait_signal_stopped(int from) {
    for (int i = from; i < npids; i++) {
        int t[256];
        int n = list_tids(pids[i], t, 256);
        for (int j = 0; j < n; j++) {
            char path[96], state = 0;
            snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pids[i], t[j]);
            while (read_stat(path, &state, NULL) == 0 && state != 'T' && state != 'Z')
                sched_yield();
        }
    }
}

static int stop_ptrace(int pid, int parent) {
    char path[64], state;
    int ppid;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    if (read_stat(path, &state, &ppid) < 0 || (parent && ppid != parent)) return 0;
    int t[256];
    int n = list_tids(pid, t, 256);
    long options = PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK;
    for (int j = 0; j < n; j++) {
        if (ptrace(PTRACE_SEIZE, t[j], NULL, (void *)options) < 0) continue;
        ptrace(PTRACE_INTERRUPT, t[j], NULL, NULL);
        tids[ntids++] = t[j];
    }
    pids[npids] = pid;
    parents[npids++] = parent;
    return 1;
}

static void wait_ptrace_stopped(int from) {
    for (int i = from; i < ntids; i++) {
        int status;
        waitpid(tids[i], &status, __WALL);
    }
}

static void freeze(void) {
    static int gen[MAX], gen_par[MAX], next[MAX], next_par[MAX];
    int ngen = 1;
    gen[0] = root;
    gen_par[0] = 0; /* where the walk starts: no parent to check */
    npids = ntids = 0;
    while (ngen) {
        int first = npids, first_tid = ntids;
        for (int i = 0; i < ngen; i++) {
            if (mode_ptrace)
                stop_ptrace(gen[i], gen_par[i]);
            else
                stop_signal(gen[i], gen_par[i]);
        }
        if (mode_ptrace)
            wait_ptrace_stopped(first_tid);
        else
            wait_signal_stopped(first);
        int nnext = 0;
        for (int i = first; i < npids; i++) {
            int before = nnext;
            nnext = children_of(pids[i], next, nnext);
            for (int k = before; k < nnext; k++) next_par[k] = pids[i];
        }
        memcpy(gen, next, nnext * sizeof(int));
        memcpy(gen_par, next_par, nnext * sizeof(int));
        ngen = nnext;
    }
}

static void thaw(void) {
    if (mode_ptrace) {
        for (int i = ntids - 1; i >= 0; i--) ptrace(PTRACE_DETACH, tids[i], NULL, NULL);
    } else {
        for (int i = npids - 1; i >= 0; i--) {
            syscall(SYS_pidfd_send_signal, pidfds[i], SIGCONT, NULL, 0);
            close(pidfds[i]);
        }
    }
    npids = ntids = 0;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "signal") && strcmp(argv[1], "ptrace"))) {
        fprintf(stderr, "usage: floor signal|ptrace ROOT\n");
        return 2;
    }
    mode_ptrace = !strcmp(argv[1], "ptrace");
    struct rlimit files; /* one pidfd per process: as many as the hard limit allows */
    if (getrlimit(RLIMIT_NOFILE, &files) == 0) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    root = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[16];
    while (fgets(line, sizeof line, stdin)) {
        long long t0 = now_ns(), c0 = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
        if (line[0] == 'f')
            freeze();
        else if (line[0] == 't')
            thaw();
        else
            break;
        long long took = now_ns() - t0;
        printf("ok %lld %lld\n", took, clock_ns(CLOCK_PROCESS_CPUTIME_ID) - c0);
    }
    thaw();
    return 0;
}
