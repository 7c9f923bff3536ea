/*
 * spice_vmc_peer: a minimal SPICE server built on Debian's libspice-server
 * (the library QEMU embeds), exposing ONE spicevmc channel (a "port" or a
 * "usbredir" channel) whose device side is a unix stream socket.
 *
 * It is the side-by-side reference peer for the vmcrelay benchmark: a SPICE
 * client (spice-gtk, or vmcrelay in client mode) connects over TCP; bytes the
 * client sends on the channel are written to the unix socket, bytes read from
 * the unix socket are sent to the client.
 *
 *   spice_vmc_peer (--port P | --tls-port T --x509-dir DIR | both) [--addr 127.0.0.1]
 *                  (--password-file F | --disable-ticketing)
 *                  --kind port|usbredir [--port-name NAME] --unix PATH
 *                  [--dev-buffer BYTES] [--connect-timeout MS]
 *                  [--exit-on-endpoint-close] [--die-with-parent] [-v]
 *
 * Single thread: the SpiceCoreInterface (timers + fd watches) is implemented
 * over ppoll(). See benches/peers/README.md for the design notes, in
 * particular how the device write callback avoids the spice-server 0.15.1
 * crash on pending write buffers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <spice.h>
#include <spice/protocol.h>

/* ------------------------------------------------------------------ */
/* options and global state                                            */
/* ------------------------------------------------------------------ */

static struct {
    int port;
    int tls_port;               /* 0: no TLS listener */
    const char *x509_dir;       /* QEMU layout: ca-cert.pem, server-cert.pem, server-key.pem */
    const char *addr;
    const char *password_file;
    int disable_ticketing;
    const char *kind;
    const char *port_name;
    const char *unix_path;
    size_t dev_buffer;          /* bound on bytes held for the endpoint */
    int connect_timeout_ms;     /* start-up wait for the endpoint */
    int exit_on_endpoint_close;
    int die_with_parent;
    int verbose;
} opt = {
    .addr = "127.0.0.1",
    .port_name = "org.vmcrelay.bench.0",
    .dev_buffer = 1024 * 1024,
    .connect_timeout_ms = 5000,
};

static volatile sig_atomic_t g_stop;

static SpiceServer *g_server;
static SpiceCharDeviceInstance g_sin;
static int g_is_port;

/* endpoint (device side) */
static int ep_fd = -1;
static int ep_lost;             /* set inside callbacks; handled by the loop */
static uint64_t ep_reconnect_at; /* monotonic ms; 0 = no reconnect pending */

/* bytes accepted from spice-server but not yet written to the endpoint */
static uint8_t *ob_data;
static size_t ob_alloc, ob_start, ob_end;

/* flow-control flags */
static int client_attached;     /* between state(1) and state(0) */
static int write_refused;       /* write cb returned 0: wake spice later */
static size_t refused_len;      /* size of the buffer we refused */
static int read_blocked;        /* spice-server did not call read on wakeup */
static int read_called;         /* read cb invoked during the current wakeup */
static int last_read;           /* last read cb result */
static int need_wakeup;         /* deferred spice_server_char_device_wakeup */

/* counters, printed on exit with -v */
static uint64_t st_to_ep, st_from_ep, st_refused, st_max_ob, st_dropped;

static void logv(const char *fmt, ...)
{
    if (!opt.verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fputs("spice_vmc_peer: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("spice_vmc_peer: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stdout);
    _exit(1);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------------------ */
/* SpiceCoreInterface over poll()                                      */
/* ------------------------------------------------------------------ */

struct SpiceTimer {
    SpiceTimerFunc func;
    void *opaque;
    uint64_t expires;           /* monotonic ms */
    int active;
    int removed;
    struct SpiceTimer *next;
};

struct SpiceWatch {
    int fd;
    int mask;                   /* SPICE_WATCH_EVENT_* */
    SpiceWatchFunc func;
    void *opaque;
    int removed;
    struct SpiceWatch *next;
};

static struct SpiceTimer *g_timers;
static struct SpiceWatch *g_watches;
static int g_dispatching;       /* free removed items only outside dispatch */

static SpiceTimer *core_timer_add(SpiceTimerFunc func, void *opaque)
{
    struct SpiceTimer *t = calloc(1, sizeof(*t));
    if (!t)
        die("out of memory");
    t->func = func;
    t->opaque = opaque;
    t->next = g_timers;
    g_timers = t;
    return t;
}

static void core_timer_start(SpiceTimer *t, uint32_t ms)
{
    t->expires = now_ms() + ms;
    t->active = 1;
}

static void core_timer_cancel(SpiceTimer *t)
{
    t->active = 0;
}

static void core_timer_remove(SpiceTimer *t)
{
    if (!t)
        return;
    t->active = 0;
    t->removed = 1;             /* freed by reap() */
}

static SpiceWatch *core_watch_add(int fd, int mask, SpiceWatchFunc func, void *opaque)
{
    struct SpiceWatch *w = calloc(1, sizeof(*w));
    if (!w)
        die("out of memory");
    w->fd = fd;
    w->mask = mask;
    w->func = func;
    w->opaque = opaque;
    /* append, so that the listening socket keeps its place */
    struct SpiceWatch **pp = &g_watches;
    while (*pp)
        pp = &(*pp)->next;
    *pp = w;
    return w;
}

static void core_watch_update_mask(SpiceWatch *w, int mask)
{
    w->mask = mask;
}

static void core_watch_remove(SpiceWatch *w)
{
    if (!w)
        return;
    w->removed = 1;             /* freed by reap() */
}

static void core_channel_event(int event, SpiceChannelEventInfo *info)
{
    static const char *names[] = { "?", "connected", "initialized", "disconnected" };
    logv("channel event %s: type %d id %d connection %d",
         event >= 1 && event <= 3 ? names[event] : "?",
         info ? info->type : -1, info ? info->id : -1,
         info ? info->connection_id : -1);
}

static void reap(void)
{
    if (g_dispatching)
        return;
    for (struct SpiceTimer **pp = &g_timers; *pp;) {
        if ((*pp)->removed) {
            struct SpiceTimer *t = *pp;
            *pp = t->next;
            free(t);
        } else {
            pp = &(*pp)->next;
        }
    }
    for (struct SpiceWatch **pp = &g_watches; *pp;) {
        if ((*pp)->removed) {
            struct SpiceWatch *w = *pp;
            *pp = w->next;
            free(w);
        } else {
            pp = &(*pp)->next;
        }
    }
}

static SpiceCoreInterface core_iface = {
    .base = {
        .type = SPICE_INTERFACE_CORE,
        .description = "spice_vmc_peer poll core",
        .major_version = SPICE_INTERFACE_CORE_MAJOR,
        .minor_version = SPICE_INTERFACE_CORE_MINOR,
    },
    .timer_add = core_timer_add,
    .timer_start = core_timer_start,
    .timer_cancel = core_timer_cancel,
    .timer_remove = core_timer_remove,
    .watch_add = core_watch_add,
    .watch_update_mask = core_watch_update_mask,
    .watch_remove = core_watch_remove,
    .channel_event = core_channel_event,
};

/* ------------------------------------------------------------------ */
/* endpoint (unix socket)                                              */
/* ------------------------------------------------------------------ */

static int ep_try_connect(int *err)
{
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(opt.unix_path) >= sizeof(sa.sun_path))
        die("--unix path too long (max %zu bytes)", sizeof(sa.sun_path) - 1);
    strcpy(sa.sun_path, opt.unix_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket(AF_UNIX): %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    return fd;
}

static void ob_clear(void)
{
    st_dropped += ob_end - ob_start;
    ob_start = ob_end = 0;
}

/* Close the endpoint. May run inside a spice-server callback: everything
 * that calls back into spice-server is deferred to the main loop. */
static void ep_close(const char *why)
{
    if (ep_fd < 0)
        return;
    fprintf(stderr, "spice_vmc_peer: endpoint %s closed (%s), %zu held bytes dropped%s\n",
            opt.unix_path, why, ob_end - ob_start,
            opt.exit_on_endpoint_close ? ", exiting" : ", reconnecting every 100 ms");
    close(ep_fd);
    ep_fd = -1;
    ob_clear();
    ep_lost = 1;
}

/* Write held bytes to the endpoint; returns 0, or -1 if the endpoint died. */
static int ob_flush(void)
{
    while (ob_start < ob_end) {
        ssize_t n = write(ep_fd, ob_data + ob_start, ob_end - ob_start);
        if (n > 0) {
            ob_start += (size_t)n;
            st_to_ep += (uint64_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        ep_close(n < 0 ? strerror(errno) : "write returned 0");
        return -1;
    }
    if (ob_start == ob_end)
        ob_start = ob_end = 0;
    return 0;
}

/* ------------------------------------------------------------------ */
/* SpiceCharDeviceInterface                                            */
/* ------------------------------------------------------------------ */

static void dev_state(SpiceCharDeviceInstance *sin, int connected)
{
    (void)sin;
    logv("device state %d", connected);
    client_attached = connected;
    if (connected)
        need_wakeup = 1;        /* release buffers held while detached */
}

/*
 * All-or-nothing write: return len (the whole buffer is taken: written to the
 * endpoint or copied into our bounded buffer) or 0 (nothing taken). Never a
 * partial count. 0 is returned only while a client is attached (so the
 * buffer spice-server keeps is completed while that client's channel object
 * still exists), and while detached nothing is accepted at all: see README.
 */
static int dev_write(SpiceCharDeviceInstance *sin, const uint8_t *buf, int len)
{
    (void)sin;
    if (len <= 0)
        return 0;
    size_t n = (size_t)len;
    if (!client_attached || ep_fd < 0) {
        write_refused = 1;
        refused_len = n;
        st_refused++;
        return 0;
    }
    if (ob_start < ob_end && ob_flush() < 0) {
        write_refused = 1;
        refused_len = n;
        return 0;
    }
    size_t held = ob_end - ob_start;
    if (held > 0 && held + n > opt.dev_buffer) {
        write_refused = 1;
        refused_len = n;
        st_refused++;
        return 0;
    }
    write_refused = 0;
    size_t off = 0;
    if (held == 0) {
        /* fast path: straight to the socket, keep only the remainder */
        while (off < n) {
            ssize_t w = write(ep_fd, buf + off, n - off);
            if (w > 0) {
                off += (size_t)w;
                st_to_ep += (uint64_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            ep_close(w < 0 ? strerror(errno) : "write returned 0");
            write_refused = 1;
            refused_len = n;
            return 0;
        }
        if (off == n)
            return len;
    }
    size_t rest = n - off;
    if (ob_end + rest > ob_alloc) {
        if (ob_start > 0) {
            memmove(ob_data, ob_data + ob_start, ob_end - ob_start);
            ob_end -= ob_start;
            ob_start = 0;
        }
        if (ob_end + rest > ob_alloc) {
            /* only when a single message is larger than --dev-buffer */
            size_t na = ob_end + rest;
            uint8_t *p = realloc(ob_data, na);
            if (!p)
                die("out of memory (device buffer %zu bytes)", na);
            ob_data = p;
            ob_alloc = na;
        }
    }
    memcpy(ob_data + ob_end, buf + off, rest);
    ob_end += rest;
    if (ob_end - ob_start > st_max_ob)
        st_max_ob = ob_end - ob_start;
    return len;
}

static int dev_read(SpiceCharDeviceInstance *sin, uint8_t *buf, int len)
{
    (void)sin;
    read_called = 1;
    read_blocked = 0;
    last_read = 0;
    if (ep_fd < 0 || len <= 0)
        return 0;
    for (;;) {
        ssize_t n = read(ep_fd, buf, (size_t)len);
        if (n > 0) {
            st_from_ep += (uint64_t)n;
            last_read = (int)n;
            return (int)n;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        ep_close(n == 0 ? "EOF" : strerror(errno));
        return 0;
    }
}

static void dev_event(SpiceCharDeviceInstance *sin, uint8_t event)
{
    (void)sin;
    logv("port event %u from client (ignored)", event);
}

static SpiceCharDeviceInterface char_iface = {
    .base = {
        .type = SPICE_INTERFACE_CHAR_DEVICE,
        .description = "spice_vmc_peer unix-socket device",
        .major_version = SPICE_INTERFACE_CHAR_DEVICE_MAJOR,
        .minor_version = SPICE_INTERFACE_CHAR_DEVICE_MINOR,
    },
    .state = dev_state,
    .write = dev_write,
    .read = dev_read,
    .event = dev_event,
    /* we call spice_server_char_device_wakeup() when we can take data
     * again, so spice-server needs no 100 ms retry timer */
    .flags = SPICE_CHAR_DEVICE_NOTIFY_WRITABLE,
};

/* ------------------------------------------------------------------ */
/* main loop helpers                                                    */
/* ------------------------------------------------------------------ */

static void ep_connected(int fd)
{
    ep_fd = fd;
    ep_lost = 0;
    ep_reconnect_at = 0;
    read_blocked = 0;
    logv("endpoint %s connected", opt.unix_path);
}

/* Device -> client: spicevmc reads one message per wakeup, so wake it
 * repeatedly while the endpoint has data. If a wakeup does not call our read
 * callback, spice-server is not reading (no client, or 1 MiB queued towards
 * the client): stop polling the endpoint for input until it calls read
 * again by itself (it wakes the device when its queue drains). */
#define WAKEUPS_PER_ROUND 64

static void pump_device_to_client(void)
{
    for (int i = 0; i < WAKEUPS_PER_ROUND && ep_fd >= 0; i++) {
        read_called = 0;
        last_read = 0;
        spice_server_char_device_wakeup(&g_sin);
        if (!read_called) {
            read_blocked = 1;
            break;
        }
        if (last_read <= 0)
            break;
    }
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: spice_vmc_peer (--port P | --tls-port T --x509-dir DIR | both) [--addr 127.0.0.1]\n"
        "                      (--password-file F | --disable-ticketing)\n"
        "                      --kind port|usbredir [--port-name NAME] --unix PATH\n"
        "                      [--dev-buffer BYTES] [--connect-timeout MS]\n"
        "                      [--exit-on-endpoint-close] [--die-with-parent] [-v]\n"
        "\n"
        "A libspice-server SPICE server with one spicevmc channel (port or usbredir)\n"
        "whose device side is the unix stream socket PATH (connected as a client).\n"
        "Prints \"listening on ADDR:P\" once ready (ADDR:T with TLS only). SIGTERM/SIGINT: exit 0.\n"
        "  --tls-port T          TLS listener (spice_server_set_tls), certificates from --x509-dir\n"
        "  --x509-dir DIR        QEMU's layout: DIR/ca-cert.pem, server-cert.pem, server-key.pem\n"
        "  --port-name NAME      port channel name (default org.vmcrelay.bench.0)\n"
        "  --dev-buffer BYTES    bound on bytes held for a slow endpoint (default 1048576)\n"
        "  --connect-timeout MS  wait this long for PATH at start-up (default 5000)\n"
        "  --exit-on-endpoint-close  exit 1 when the endpoint closes (default: reconnect)\n"
        "  --die-with-parent     get SIGTERM when the parent process exits (test harnesses)\n"
        "  -v                    log events and counters to stderr\n");
}

static long parse_num(const char *name, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < lo || v > hi)
        die("%s: expected an integer in [%ld, %ld], got \"%s\"", name, lo, hi, s);
    return v;
}

static char *read_password(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        die("--password-file %s: %s", path, strerror(errno));
    static char pw[256];
    if (!fgets(pw, sizeof(pw), f))
        pw[0] = '\0';
    fclose(f);
    pw[strcspn(pw, "\r\n")] = '\0';
    if (pw[0] == '\0')
        die("--password-file %s: empty password", path);
    if (strlen(pw) > 60)
        die("--password-file %s: SPICE passwords are limited to 60 bytes", path);
    return pw;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
#define NEED_ARG() do { if (i + 1 >= argc) die("%s needs an argument", a); } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            exit(0);
        } else if (!strcmp(a, "--port")) {
            NEED_ARG(); opt.port = (int)parse_num(a, argv[++i], 1, 65535);
        } else if (!strcmp(a, "--tls-port")) {
            NEED_ARG(); opt.tls_port = (int)parse_num(a, argv[++i], 1, 65535);
        } else if (!strcmp(a, "--x509-dir")) {
            NEED_ARG(); opt.x509_dir = argv[++i];
        } else if (!strcmp(a, "--addr")) {
            NEED_ARG(); opt.addr = argv[++i];
        } else if (!strcmp(a, "--password-file")) {
            NEED_ARG(); opt.password_file = argv[++i];
        } else if (!strcmp(a, "--disable-ticketing")) {
            opt.disable_ticketing = 1;
        } else if (!strcmp(a, "--kind")) {
            NEED_ARG(); opt.kind = argv[++i];
        } else if (!strcmp(a, "--port-name")) {
            NEED_ARG(); opt.port_name = argv[++i];
        } else if (!strcmp(a, "--unix")) {
            NEED_ARG(); opt.unix_path = argv[++i];
        } else if (!strcmp(a, "--dev-buffer")) {
            NEED_ARG(); opt.dev_buffer = (size_t)parse_num(a, argv[++i], 4096, 1L << 30);
        } else if (!strcmp(a, "--connect-timeout")) {
            NEED_ARG(); opt.connect_timeout_ms = (int)parse_num(a, argv[++i], 0, 3600000);
        } else if (!strcmp(a, "--exit-on-endpoint-close")) {
            opt.exit_on_endpoint_close = 1;
        } else if (!strcmp(a, "--die-with-parent")) {
            opt.die_with_parent = 1;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            opt.verbose = 1;
        } else {
            usage(stderr);
            die("unknown argument \"%s\"", a);
        }
#undef NEED_ARG
    }
    if (!opt.port && !opt.tls_port)
        die("--port or --tls-port is required");
    if (!!opt.tls_port != !!opt.x509_dir)
        die("--tls-port and --x509-dir go together");
    if (!opt.unix_path)
        die("--unix is required");
    if (!opt.kind)
        die("--kind port|usbredir is required");
    if (!strcmp(opt.kind, "port"))
        g_is_port = 1;
    else if (strcmp(opt.kind, "usbredir"))
        die("--kind must be port or usbredir, got \"%s\"", opt.kind);
    if (!!opt.password_file + opt.disable_ticketing != 1)
        die("give exactly one of --password-file F and --disable-ticketing");
    if (g_is_port && opt.port_name[0] == '\0')
        die("--port-name must not be empty");
}

/* ------------------------------------------------------------------ */
/* main                                                                */
/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    parse_args(argc, argv);

    /* signals: blocked except inside ppoll(), so a stop is never missed */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    if (opt.die_with_parent) {
        /* SIGTERM is blocked: it stays pending until the first ppoll() */
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0)
            die("prctl(PR_SET_PDEATHSIG): %s", strerror(errno));
        if (getppid() == 1)
            _exit(0);           /* parent already gone */
    }

    ob_alloc = opt.dev_buffer;
    ob_data = malloc(ob_alloc);
    if (!ob_data)
        die("out of memory");

    /* endpoint first: the channel is announced opened only once it exists */
    uint64_t deadline = now_ms() + (uint64_t)opt.connect_timeout_ms;
    for (;;) {
        int err = 0;
        int fd = ep_try_connect(&err);
        if (fd >= 0) {
            ep_connected(fd);
            break;
        }
        if (now_ms() >= deadline)
            die("cannot connect to endpoint unix socket %s: %s (waited %d ms)",
                opt.unix_path, strerror(err), opt.connect_timeout_ms);
        struct timespec ts = { 0, 20 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        if (g_stop)
            _exit(0);
    }

    g_server = spice_server_new();
    if (!g_server)
        die("spice_server_new failed");
    if (opt.port)
        spice_server_set_port(g_server, opt.port);
    spice_server_set_addr(g_server, opt.addr, 0);
    if (opt.tls_port) {
        /* like QEMU's x509-dir: the three files must exist and load */
        static char ca[PATH_MAX], cert[PATH_MAX], key[PATH_MAX];
        snprintf(ca, sizeof(ca), "%s/ca-cert.pem", opt.x509_dir);
        snprintf(cert, sizeof(cert), "%s/server-cert.pem", opt.x509_dir);
        snprintf(key, sizeof(key), "%s/server-key.pem", opt.x509_dir);
        const char *files[] = { ca, cert, key };
        for (int i = 0; i < 3; i++)
            if (access(files[i], R_OK) != 0)
                die("--x509-dir: %s: %s", files[i], strerror(errno));
        if (spice_server_set_tls(g_server, opt.tls_port, ca, cert, key, NULL, NULL, NULL) != 0)
            die("spice_server_set_tls failed");
    }
    if (opt.disable_ticketing) {
        spice_server_set_noauth(g_server);
    } else {
        if (spice_server_set_ticket(g_server, read_password(opt.password_file), 0, 0, 0) != 0)
            die("spice_server_set_ticket failed");
    }
    if (spice_server_init(g_server, &core_iface) != 0)
        die("spice_server_init failed (is %s:%d already in use? do the --x509-dir files load?)",
            opt.addr, opt.port ? opt.port : opt.tls_port);

    g_sin.base.sif = &char_iface.base;
    g_sin.subtype = g_is_port ? "port" : "usbredir";
    g_sin.portname = g_is_port ? opt.port_name : NULL;
    if (spice_server_add_interface(g_server, &g_sin.base) != 0)
        die("spice_server_add_interface(%s) failed", g_sin.subtype);
    if (g_is_port)
        spice_server_port_event(&g_sin, SPICE_PORT_EVENT_OPENED);
    spice_server_vm_start(g_server);   /* without this no data moves */

    printf("listening on %s:%d\n", opt.addr, opt.port ? opt.port : opt.tls_port);
    fflush(stdout);

    struct pollfd *pfds = NULL;
    struct SpiceWatch **pw = NULL;
    size_t pcap = 0;

    while (!g_stop) {
        /* deferred work from inside spice-server callbacks */
        if (ep_lost) {
            ep_lost = 0;
            if (opt.exit_on_endpoint_close)
                die("endpoint %s closed", opt.unix_path);
            if (g_is_port)
                spice_server_port_event(&g_sin, SPICE_PORT_EVENT_CLOSED);
            ep_reconnect_at = now_ms() + 100;
        }
        if (ep_fd < 0 && ep_reconnect_at && now_ms() >= ep_reconnect_at) {
            int err = 0;
            int fd = ep_try_connect(&err);
            if (fd >= 0) {
                fprintf(stderr, "spice_vmc_peer: endpoint %s reconnected\n", opt.unix_path);
                ep_connected(fd);
                if (g_is_port)
                    spice_server_port_event(&g_sin, SPICE_PORT_EVENT_OPENED);
                need_wakeup = 1;
            } else {
                ep_reconnect_at = now_ms() + 100;
            }
        }
        size_t held = ob_end - ob_start;
        if (write_refused && client_attached && ep_fd >= 0 &&
            (held == 0 || (held <= opt.dev_buffer / 2 && held + refused_len <= opt.dev_buffer))) {
            /* NOTIFY_WRITABLE: the buffer we refused fits now (with some
             * hysteresis, so that a slow endpoint does not cause one
             * refuse/wakeup round per message); let spice-server retry */
            write_refused = 0;
            need_wakeup = 1;
        }
        if (need_wakeup) {
            need_wakeup = 0;
            pump_device_to_client();
            continue;           /* recompute state before sleeping */
        }
        reap();

        /* build the poll set: spice-server watches + the endpoint */
        size_t nw = 0;
        for (struct SpiceWatch *w = g_watches; w; w = w->next)
            nw++;
        if (nw + 1 > pcap) {
            pcap = (nw + 1) * 2;
            pfds = realloc(pfds, pcap * sizeof(*pfds));
            pw = realloc(pw, pcap * sizeof(*pw));
            if (!pfds || !pw)
                die("out of memory");
        }
        size_t n = 0;
        for (struct SpiceWatch *w = g_watches; w; w = w->next) {
            pfds[n].fd = w->fd;
            pfds[n].events = ((w->mask & SPICE_WATCH_EVENT_READ) ? POLLIN : 0) |
                             ((w->mask & SPICE_WATCH_EVENT_WRITE) ? POLLOUT : 0);
            pfds[n].revents = 0;
            pw[n] = w;
            n++;
        }
        size_t ep_idx = n;
        pfds[n].fd = -1;
        pfds[n].events = 0;
        pfds[n].revents = 0;
        if (ep_fd >= 0) {
            short ev = 0;
            if (!read_blocked)
                ev |= POLLIN;
            if (ob_end > ob_start)
                ev |= POLLOUT;
            if (ev) {
                pfds[n].fd = ep_fd;
                pfds[n].events = ev;
            }
        }
        n++;

        /* timeout: nearest timer or reconnect */
        uint64_t now = now_ms();
        int64_t timeout = -1;
        for (struct SpiceTimer *t = g_timers; t; t = t->next) {
            if (!t->active)
                continue;
            int64_t d = t->expires > now ? (int64_t)(t->expires - now) : 0;
            if (timeout < 0 || d < timeout)
                timeout = d;
        }
        if (ep_fd < 0 && ep_reconnect_at) {
            int64_t d = ep_reconnect_at > now ? (int64_t)(ep_reconnect_at - now) : 0;
            if (timeout < 0 || d < timeout)
                timeout = d;
        }
        struct timespec ts, *tsp = NULL;
        if (timeout >= 0) {
            ts.tv_sec = timeout / 1000;
            ts.tv_nsec = (timeout % 1000) * 1000000;
            tsp = &ts;
        }
        int r = ppoll(pfds, n, tsp, &waitmask);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("ppoll: %s", strerror(errno));
        }

        /* timers */
        g_dispatching = 1;
        now = now_ms();
        for (struct SpiceTimer *t = g_timers; t; t = t->next) {
            if (t->active && !t->removed && t->expires <= now) {
                t->active = 0;  /* one-shot; the callback may re-arm */
                t->func(t->opaque);
            }
        }

        /* spice-server watches (snapshot taken before ppoll) */
        for (size_t i = 0; i < ep_idx; i++) {
            struct SpiceWatch *w = pw[i];
            short re = pfds[i].revents;
            if (!re || w->removed)
                continue;
            int ev = 0;
            if (re & (POLLIN | POLLHUP | POLLERR | POLLNVAL))
                ev |= SPICE_WATCH_EVENT_READ;
            if (re & (POLLOUT | POLLHUP | POLLERR | POLLNVAL))
                ev |= SPICE_WATCH_EVENT_WRITE;
            ev &= w->mask;      /* mask may have changed during dispatch */
            if (ev)
                w->func(w->fd, ev, w->opaque);
        }

        /* endpoint */
        short re = pfds[ep_idx].revents;
        if (re && ep_fd >= 0 && pfds[ep_idx].fd == ep_fd) {
            if ((re & (POLLOUT | POLLERR | POLLHUP)) && ob_end > ob_start)
                ob_flush();
            if (ep_fd >= 0 && (re & (POLLIN | POLLHUP | POLLERR)) && !read_blocked)
                pump_device_to_client();
        }
        g_dispatching = 0;
    }

    logv("stopping: to endpoint %llu B, from endpoint %llu B, refused writes %llu, "
         "max held %llu B, dropped %llu B",
         (unsigned long long)st_to_ep, (unsigned long long)st_from_ep,
         (unsigned long long)st_refused, (unsigned long long)st_max_ob,
         (unsigned long long)st_dropped);
    fflush(stdout);
    fflush(stderr);
    /* no spice_server_destroy(): exit promptly and without teardown races */
    _exit(0);
}
