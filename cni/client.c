/* weft's CNI plugin as the container runtime starts it, when a C compiler was there at install
 * time (cni/install.py builds it; otherwise the launcher is Python and runs cni/client.py).
 *
 * It does what cni/client.py does when the node's resident helper answers, and nothing else:
 * pass the CNI_* variables, PATH and stdin to the helper listening on the abstract unix socket
 * @weft-cni of this network namespace (cni/helper.py), and copy its answer to stdout, stderr and
 * the exit code. A Python interpreter's start-up costs ~15 ms of CPU here, about what a whole
 * ADD of Debian's ptp plugin costs; this costs ~1 ms.
 *
 * In every other case -- no helper, a helper of another user, one that declines the call
 * (another PATH or mount namespace, "helper": false), one that retires (weft's code changed) or
 * dies before answering in full -- it runs the Python client (cni/client.py) in its place, with
 * the same stdin: that one asks again, runs the plugin in its own process and starts a helper.
 * The wire format is client.py's `request` and helper.py's answer.
 *
 * Built with the installation's constants (cni/install.py writes them to weft_client.h):
 *   WEFT_CODE    the installed weft package's directory, as client.py's CODE_ROOT
 *   WEFT_PYTHON  the interpreter, and WEFT_BOOT the Python launcher's code it runs with -I -S
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "weft_client.h"

#define LIMIT (64u << 20)           /* a configuration or answer larger than this is the Python client's */

static const char *const PASSED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                     "CNI_ARGS", "CNI_PATH", "PATH", NULL};

struct buf {
    char *data;
    size_t len, cap;
};

static int put(struct buf *b, const void *data, size_t n)
{
    if (n > LIMIT || b->len > LIMIT - n)
        return -1;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            return -1;
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
    return 0;
}

/* Everything `fd` gives until its end; -1 on an error or past LIMIT. */
static int read_all(int fd, struct buf *b)
{
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0)
            return 0;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (put(b, chunk, (size_t)n) < 0)
            return -1;
    }
}

/* `socket`: a socket, written without SIGPIPE (a helper that died is an answer like any other). */
static int write_all(int fd, const char *data, size_t n, int socket)
{
    while (n) {
        ssize_t done = socket ? send(fd, data, n, MSG_NOSIGNAL) : write(fd, data, n);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += done;
        n -= (size_t)done;
    }
    return 0;
}

/* Run the Python client in this process's place, its stdin what this one read (`in`), or what is
 * left of the original stdin when reading it failed (`in` NULL): the Python client reports that. */
static int fallback(const struct buf *in)
{
    if (in) {
        int fd = memfd_create("weft-cni-stdin", 0);
        if (fd < 0 || write_all(fd, in->data ? in->data : "", in->len, 0) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
            dup2(fd, 0) < 0) {
            fprintf(stderr, "weft-cni: cannot hand stdin to the plugin: %s\n", strerror(errno));
            printf("{\"cniVersion\": \"1.1.0\", \"code\": 5, \"msg\": \"I/O error\", \"details\": "
                   "\"cannot hand stdin to the plugin\"}\n");
            return 1;
        }
        if (fd != 0)
            close(fd);
    }
    char *const argv[] = {WEFT_PYTHON, "-IS", "-c", WEFT_BOOT, NULL};
    execv(WEFT_PYTHON, argv);
    fprintf(stderr, "weft-cni: cannot run %s: %s\n", WEFT_PYTHON, strerror(errno));
    printf("{\"cniVersion\": \"1.1.0\", \"code\": 999, \"msg\": \"internal error\", \"details\": "
           "\"cannot run weft's Python interpreter\"}\n");
    return 1;
}

int main(void)
{
    struct buf in = {0}, env = {0}, req = {0}, ans = {0};
    if (read_all(0, &in) < 0)
        return fallback(NULL);

    for (const char *const *name = PASSED; *name; name++) {
        const char *value = getenv(*name);
        if (value && (put(&env, *name, strlen(*name)) < 0 || put(&env, "=", 1) < 0 ||
                      put(&env, value, strlen(value) + 1) < 0))
            return fallback(&in);
    }
    struct stat mnt;
    char line[160];
    if (stat("/proc/self/ns/mnt", &mnt) < 0)
        return fallback(&in);
    int n = snprintf(line, sizeof line, "WEFT_MNTNS=%llu:%llu", (unsigned long long)mnt.st_dev,
                     (unsigned long long)mnt.st_ino);
    if (put(&env, "WEFT_CODE=" WEFT_CODE, sizeof("WEFT_CODE=" WEFT_CODE)) < 0 || put(&env, line, (size_t)n + 1) < 0)
        return fallback(&in);
    n = snprintf(line, sizeof line, "%zu\n", env.len);
    if (put(&req, line, (size_t)n) < 0 || put(&req, env.data, env.len) < 0 ||
        (in.len && put(&req, in.data, in.len) < 0))
        return fallback(&in);

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    static const char name[] = "\0weft-cni";                 /* abstract: no file, one per netns */
    memcpy(addr.sun_path, name, sizeof name - 1);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, offsetof(struct sockaddr_un, sun_path) + sizeof name - 1))
        return fallback(&in);
    struct ucred peer;
    socklen_t size = sizeof peer;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &size) < 0 || peer.uid != geteuid())
        return fallback(&in);                                 /* not our helper: the Python client says so */
    if (write_all(sock, req.data, req.len, 1) < 0 || shutdown(sock, SHUT_WR) < 0 || read_all(sock, &ans) < 0)
        return fallback(&in);                                 /* it died while serving us */
    close(sock);

    char *newline = ans.len ? memchr(ans.data, '\n', ans.len) : NULL;
    if (!newline || ans.data[0] == '-')
        return fallback(&in);                                 /* declined, stale, or cut short */
    *newline = '\0';
    char *end;
    errno = 0;
    long code = strtol(ans.data, &end, 10);
    if (errno || end == ans.data || *end != ' ' || code < 0 || code > 255)
        return fallback(&in);
    char *rest = end + 1;
    unsigned long long length = strtoull(rest, &end, 10);
    size_t body = ans.len - (size_t)(newline + 1 - ans.data);
    if (errno || end == rest || *end != '\0' || *rest == '-' || length > body)
        return fallback(&in);
    if (write_all(1, newline + 1, (size_t)length, 0) < 0)
        return 1;
    write_all(2, newline + 1 + length, body - (size_t)length, 0);
    return (int)code;
}
