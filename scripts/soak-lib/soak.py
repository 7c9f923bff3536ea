#!/usr/bin/env python3
"""scripts/soak: a mixed, hostile load against `vmcrelay serve`.

See `scripts/soak --help` (HELP below) for what runs, what is checked and
the exit codes. Python 3 standard library only; children are started by
scripts/bench-lib/procs.py (own process group, PDEATHSIG, killed on exit).
"""

import argparse
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench-lib"))

import procs  # noqa: E402
import spice  # noqa: E402

MiB = 1 << 20
PASSWORD = b"soak-Pa55word"

# Source addresses (all of 127.0.0.0/8 is loopback): the throttle and the
# logs are per address, so each hostile kind gets its own and a warning
# from a good client's address is never excused.
GOOD = "127.0.0.1"
WRONG_PW = "127.0.0.9"
GARBAGE = "127.0.0.10"
HALF_OPEN = "127.0.0.11"

# Channels: every load kind has its own, since a new session that links a
# channel another session holds replaces that session (spice-server's rule).
CH_UP, CH_DOWN, CH_ECHO = 128, 129, 130  # ids 0..bulk_conns-1
CH_RR = 131
CH_CHURN = 132  # ids 0..churn-1
CH_KILL = 133
CH_SLOW_CLIENT = 134
CH_SLOW_EP = 135
CH_GARBAGE = 136
CH_FRESH = 137
CH_USBREDIR = 9  # closes with its endpoint, re-announced under a fresh id
RESTART_PORT = "org.example.soak.restart"  # stays linked, PORT_EVENT closed/opened

HELP = """\
A mixed, hostile load against `vmcrelay serve` for N minutes, then health checks.

LOAD (all at once, each on its own channels so they never replace each other)
  bulk-up / bulk-down / bulk-echo
                 `vmcload run` loops, 64 KiB messages, 2..16 MiB per transfer
                 (--bulk-conns connections each). up ends in `vmcload endpoint
                 --mode sink --verify`, down starts at `--mode source`, echo at
                 the relay's echo:. vmcload checks every byte it receives.
  rr             `vmcload run --mode rr --size 64` in 10 s runs (64 B round trips).
  churn          python sessions: link main + a channel, echo 1 B..256 KiB,
                 close (FIN, channel first or main first, or a TCP reset).
  wrong-password python links with wrong passwords (and undecryptable tickets)
                 from 127.0.0.9; each must get PERMISSION_DENIED; the relay's
                 throttle slows them (reported as tries/s).
  garbage        from 127.0.0.10: random bytes, truncated link headers and link
                 messages (held), absurd sizes, bad magic/version/caps, link
                 then hang up, and after a good link: absurd control-message
                 sizes and random messages on main. The relay must close (or
                 refuse) each within --link-timeout-secs + 6 s. A DATA message
                 announcing up to 4 GiB is streamed, not refused: the bytes
                 after it must come back from the echo unaltered.
  half-open      --half-open connections from 127.0.0.11 that send nothing or
                 part of a link header and hold; reopened when the relay times
                 them out (it must, within --link-timeout-secs + 6 s).
  endpoint-restart
                 a `vmcload endpoint --mode echo` behind usbredir:0 and port
                 org.example.soak.restart, SIGKILLed every 8-15 s and restarted
                 1-3 s later. The usbredir client must see its channel close and
                 the channel announced again (fresh id) and relink it (a link
                 refused while the endpoint is down waits for the announcement
                 too, or with --relink-after-refusal retries each second); the port
                 client must stay linked through PORT_EVENT closed/opened.
                 What comes back is checked against what was sent (new seed per
                 endpoint life).
  client-kill    `vmcload run --mode echo` SIGKILLed 0.5-3 s into a 1 GiB transfer.
  slow-client    python reads a `vmcload endpoint --mode source` stream at
                 ~1 MiB/s, with a 3 s stall, and checks every byte.
  slow-endpoint  `vmcload run --mode up` (1-2 MiB) into a python endpoint that
                 reads at ~1 MiB/s (2 s stall) and checks every byte and the total.

CHECKS
  Every completed transfer is verified byte for byte; a deliberately killed
  one is counted as killed, not failed. After the load: the relay is alive and
  a fresh session links and echoes 1 MiB; the up sink saw no wrong byte and
  exactly the bytes the completed uploads sent; after a settle time (up to
  --settle-secs) the relay's open fds are within --fd-bound (16) of the cold
  start (after one warm-up session, before the load) and its RSS (VmRSS)
  within --rss-bound-mib (32) of its value after --warmup-secs (20) of load:
  the buffer arena (2 x 256 KiB per connection) is resident only once used,
  so a cold baseline would count the arena's working set as growth; no
  WARN/ERROR log line other than the expected kinds (throttle lines for
  127.0.0.9, protocol errors of 127.0.0.10, the restarted endpoint gone or
  unavailable); the relay exits 0 on SIGTERM. 32 MiB is what 64 connections'
  worth of lost buffers would hold, or 6 KiB leaked per link over a 5-minute
  run; 16 fds is less than one lost socket per endpoint restart.

OUTPUT
  A progress line every 10 s; at the end a table: transfers ok/failed/killed
  per kind, bytes verified, links/s, wrong-password tries/s, RSS start/peak/
  end, fds start/end, and every failed check. Logs stay in the work directory
  (printed) when a check fails or with --keep.

EXIT CODES
  0 every check held, 1 a check failed (or the relay died), 2 usage error.

EXAMPLES
  scripts/soak --minutes 5
  scripts/soak --minutes 0.5 --half-open 50
  scripts/soak --minutes 30 --half-open 400 --max-conns 1024
"""


# ---------------------------------------------------------------- bookkeeping


class Stats:
    """Counters per load kind; thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds = {}
        self.failures = []  # (t, kind, message)
        self.t0 = time.monotonic()
        self.extra = {}

    def _k(self, kind):
        return self.kinds.setdefault(kind, {"ok": 0, "failed": 0, "killed": 0, "bytes": 0, "links": 0})

    def ok(self, kind, nbytes=0, links=0):
        with self.lock:
            k = self._k(kind)
            k["ok"] += 1
            k["bytes"] += nbytes
            k["links"] += links

    def add(self, kind, nbytes=0, links=0):
        """Verified bytes / links without a transfer count."""
        with self.lock:
            k = self._k(kind)
            k["bytes"] += nbytes
            k["links"] += links

    def killed(self, kind, links=0):
        with self.lock:
            k = self._k(kind)
            k["killed"] += 1
            k["links"] += links

    def fail(self, kind, msg):
        with self.lock:
            self._k(kind)["failed"] += 1
            if len(self.failures) < 200:
                self.failures.append((time.monotonic() - self.t0, kind, msg))
        log(f"FAIL {kind}: {msg}")

    def bump(self, key, n=1):
        with self.lock:
            self.extra[key] = self.extra.get(key, 0) + n

    def snapshot(self):
        with self.lock:
            return {k: dict(v) for k, v in self.kinds.items()}, dict(self.extra)


def log(msg):
    print(f"soak: {msg}", file=sys.stderr, flush=True)


class Ctx:
    """Everything the workers share."""

    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.stats = Stats()
        self.stop = threading.Event()
        self.finished = threading.Event()  # set once the end checks are done
        self.addr = None
        self.relay = None
        self.relay_log = os.path.join(work, "relay.log")
        self.vmcload = args.vmcload
        self.sink_json = os.path.join(work, "sink.json")
        self.restart_sock = os.path.join(work, "restart.sock")
        self.endpoint_kills = []  # monotonic times of restart-endpoint kills
        self.endpoint_up = threading.Event()
        self.slow_ep_results = []  # (bytes, mismatch offset or None)
        self.slow_ep_cv = threading.Condition()
        self.wrong_pw_times = []  # monotonic completion times of wrong-password tries
        self.lock = threading.Lock()

    def sleep(self, s):
        """Sleeps s seconds; True if the soak is stopping."""
        return self.stop.wait(s)

    def spath(self, name):
        return os.path.join(self.work, name)


def guarded(ctx, kind, fn):
    """Runs a worker loop; an exception in the soak's own code is a failure, not a silent stop."""

    def run():
        try:
            fn(ctx)
        except Exception as e:  # noqa: BLE001 - reported as a failure
            ctx.stats.fail(kind, f"worker crashed: {e!r}\n{traceback.format_exc()}")

    t = threading.Thread(target=run, name=kind, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------- vmcload runs


def vmcload_run(ctx, kind, argv, timeout):
    """Runs one `vmcload run`; returns (rc, report dict or None, log tail)."""
    log_path = ctx.spath(f"{kind}.log")
    full = [ctx.vmcload, "run", "--uri", f"spice://{ctx.addr[0]}:{ctx.addr[1]}"]
    full += ["--password-file", ctx.spath("password"), "-q", "--json", "-", "--timeout", str(int(timeout))]
    full += argv
    try:
        rc, out = procs.run(full, timeout=timeout + 15, log_path=log_path)
    except procs.BenchError as e:
        return None, None, str(e)
    report = None
    try:
        report = json.loads(out) if out.strip() else None
    except ValueError:
        pass
    why = procs.tail(log_path, 4)
    if rc != 0 and report:
        # vmcload -q puts its reasons in the report.
        why = f" integrity={report.get('integrity')} mismatch={report.get('mismatch')} " \
              f"errors={report.get('error_messages', [])[:3]} timed_out={report.get('timed_out')}" + why
    return rc, report, why


def w_bulk(mode, channel, conn_index):
    kind = f"bulk-{mode}"

    def loop(ctx):
        a = ctx.args
        while not ctx.stop.is_set():
            nbytes = random.randint(2, a.bulk_max_mib) * MiB
            argv = ["--mode", mode, "--channel", f"{channel}:{conn_index}", "--size", "64K"]
            argv += ["--bytes", str(nbytes), "--seed", str(a.seed)]
            if a.bulk_rate and mode != "down":
                argv += ["--rate", str(a.bulk_rate)]
            rc, rep, tail = vmcload_run(ctx, kind, argv, timeout=120)
            if rc == 0 and rep and rep.get("ok"):
                verified = rep.get("verified_bytes", 0)
                if mode == "up":
                    verified = rep.get("bytes_sent", 0)  # the sink verifies these
                    with ctx.lock:
                        ctx.stats.bump("up_bytes_sent", rep.get("bytes_sent", 0))
                ctx.stats.ok(kind, verified, links=2)
            else:
                ctx.stats.fail(kind, f"vmcload {mode} {nbytes} B on {channel}:{conn_index}: rc={rc}{tail}")
                if mode == "up":
                    ctx.stats.bump("up_failed")
                ctx.sleep(1)
            if a.bulk_pause_ms:
                ctx.sleep(a.bulk_pause_ms / 1000)

    return kind, loop


def w_rr(ctx):
    kind = "rr-64B"
    while not ctx.stop.is_set():
        argv = ["--mode", "rr", "--size", "64", "--channel", f"{CH_RR}:0", "--duration", "10"]
        argv += ["--rate", str(ctx.args.rr_rate), "--seed", str(ctx.args.seed)]
        rc, rep, tail = vmcload_run(ctx, kind, argv, timeout=60)
        if rc == 0 and rep and rep.get("ok"):
            ctx.stats.ok(kind, rep.get("verified_bytes", 0), links=2)
            lat = rep.get("latency_us") or {}
            with ctx.lock:
                ctx.stats.bump("rr_count", lat.get("count", 0))
                ctx.stats.extra["rr_p99_max_us"] = max(ctx.stats.extra.get("rr_p99_max_us", 0), lat.get("p99", 0))
                ctx.stats.extra["rr_max_us"] = max(ctx.stats.extra.get("rr_max_us", 0), lat.get("max", 0))
                ctx.stats.extra.setdefault("rr_p50s", []).append(lat.get("p50", 0))
        else:
            ctx.stats.fail(kind, f"vmcload rr: rc={rc}{tail}")
            ctx.sleep(1)


def w_client_kill(ctx):
    kind = "client-kill"
    log_path = ctx.spath(f"{kind}.log")
    while not ctx.stop.is_set():
        argv = [ctx.vmcload, "run", "--uri", f"spice://{ctx.addr[0]}:{ctx.addr[1]}"]
        argv += ["--password-file", ctx.spath("password"), "-q", "--mode", "echo", "--channel", f"{CH_KILL}:0"]
        argv += ["--bytes", str(1 << 30), "--timeout", "120", "--seed", str(ctx.args.seed)]
        p = procs.spawn(argv, log_path=log_path)
        deadline = time.monotonic() + random.uniform(0.5, 3.0)
        while time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        if p.poll() is None:
            procs.stop(p, timeout=1, sig=signal.SIGKILL)
            ctx.stats.killed(kind, links=2)
        else:
            procs.stop(p)
            if p.returncode == 0:
                ctx.stats.ok(kind, links=2)
            else:
                ctx.stats.fail(kind, f"vmcload echo ended by itself with rc={p.returncode}{procs.tail(log_path, 4)}")
        ctx.sleep(0.3)


# ---------------------------------------------------------------- python clients


def echo_verify(ch, seed, total, chunk=65536, timeout=30.0):
    """Sends `total` pattern bytes on a linked echo channel and checks what
    comes back. Returns None on success, else what went wrong."""
    err = []

    def sender():
        try:
            off = 0
            while off < total:
                n = min(chunk, total - off)
                ch.send_msg(spice.MSG_DATA, spice.pattern(seed, off, n))
                off += n
        except OSError as e:
            err.append(f"send: {e}")

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    got = 0
    ch.sock.settimeout(timeout)
    try:
        while got < total:
            m = ch.recv_msg()
            if m is None:
                return f"EOF after {got} of {total} echoed bytes"
            if m[0] != spice.MSG_DATA:
                continue
            bad = spice.first_mismatch(seed, got, m[1])
            if bad is not None:
                return f"echo mismatch at offset {bad} (seed {seed})"
            got += len(m[1])
    except (OSError, spice.SpiceError) as e:
        return f"after {got} of {total} bytes: {e}"
    t.join(timeout)
    if got != total:
        return f"{got} bytes back, sent {total}"
    return err[0] if err else None


def w_churn(index):
    kind = "churn"

    def loop(ctx):
        period = ctx.args.churn_clients / max(ctx.args.churn_rate, 0.01)
        while not ctx.stop.is_set():
            t0 = time.monotonic()
            seed = random.getrandbits(32)
            total = random.choice([1, 64, 1000, 4096, 65536, 65537, 200000, 262144])
            try:
                s = spice.Session(ctx.addr, PASSWORD, GOOD)
            except spice.SpiceError as e:
                ctx.stats.fail(kind, f"session: {e}")
                ctx.sleep(1)
                continue
            try:
                ch = s.open(CH_CHURN, index)
            except spice.SpiceError as e:
                ctx.stats.fail(kind, f"link {CH_CHURN}:{index}: {e}")
                s.close()
                ctx.sleep(1)
                continue
            why = echo_verify(ch, seed, total)
            how = random.choice(["channel-first", "main-first", "reset"])
            if how == "channel-first":
                ch.close()
                s.close()
            elif how == "main-first":
                s.close()
                ch.close()
            else:
                ch.close(reset=True)
                s.close(reset=True)
            if why:
                ctx.stats.fail(kind, f"{CH_CHURN}:{index} {total} B: {why}")
            else:
                ctx.stats.ok(kind, total, links=2)
            ctx.sleep(max(0.0, period - (time.monotonic() - t0)))

    return kind, loop


def w_wrong_password(ctx):
    kind = "wrong-password"
    while not ctx.stop.is_set():
        undecryptable = random.random() < 0.2
        t0 = time.monotonic()
        try:
            if undecryptable:
                spice.link(ctx.addr, b"", spice.CH_MAIN, 0, 0, WRONG_PW, timeout=30, ticket=os.urandom(128))
            else:
                pw = b"wrong-%d" % random.getrandbits(32)
                spice.Session(ctx.addr, pw, WRONG_PW, timeout=30).close()
            ctx.stats.fail(kind, "a wrong password was accepted")
        except spice.LinkRefused as e:
            if e.code == spice.LINK_ERR_PERMISSION_DENIED:
                ctx.stats.ok(kind, links=1)
                with ctx.lock:
                    ctx.wrong_pw_times.append(time.monotonic())
            else:
                ctx.stats.fail(kind, f"wrong password got {e} instead of PERMISSION_DENIED")
        except spice.SpiceError as e:
            held = time.monotonic() - t0
            if ctx.args.wrong_password_clients > 1 and held >= ctx.args.link_timeout_secs - 0.5:
                # Parallel guessers: the throttle spaces link starts, so a queued
                # connection can outlive the link timeout and is closed unanswered.
                ctx.stats.bump("wrong_pw_link_timeouts")
            else:
                ctx.stats.fail(kind, f"wrong password: no auth error after {held:.1f} s: {e}")
                ctx.sleep(1)


def _expect_close(s, deadline, greedy=True):
    """Reads until the relay closes s or deadline. True if it closed."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            return True  # reset
        if not data:
            return True
        if not greedy:
            return True  # an answer (e.g. a link error reply) is fine too


def w_garbage(index):
    return lambda ctx: _w_garbage(ctx, index)


def _w_garbage(ctx, index):
    kind = "garbage"
    lt = ctx.args.link_timeout_secs
    variants = [
        "random",
        "random",
        "truncated-header",
        "absurd-size",
        "big-size",
        "bad-magic",
        "bad-major",
        "absurd-caps",
        "truncated-mess",
        "reply-then-hangup",
        "unknown-channel",
        "post-link-absurd",
        "post-link-random",
        "post-link-data-absurd",
    ]
    while not ctx.stop.is_set():
        v = random.choice(variants)
        t0 = time.monotonic()
        deadline = t0 + lt + 6
        try:
            ok = _garbage_one(ctx, v, deadline, index)
        except spice.SpiceError as e:
            ctx.stats.fail(kind, f"{v}: {e}")
            ctx.sleep(1)
            continue
        if ok is True:
            ctx.stats.ok(kind, links=1)
            ctx.stats.bump(f"garbage:{v}")
        elif ok is None:
            pass  # stopped
        else:
            what = "the relay kept the connection open" if ok == "not closed" else ok
            ctx.stats.fail(kind, f"{v}: {what} ({time.monotonic() - t0:.1f} s)")


def _garbage_one(ctx, v, deadline, index):
    """One hostile connection; True if the relay dealt with it."""
    if v.startswith("post-link"):
        return _garbage_post_link(ctx, v, deadline, index)
    s = spice.tcp(ctx.addr, GARBAGE, timeout=10)
    try:
        if v == "random":
            s.sendall(os.urandom(random.randint(1, 4096)))
        elif v == "truncated-header":
            s.sendall(spice.link_header(18)[: random.randint(1, 15)])
        elif v == "absurd-size":
            s.sendall(spice.link_header(0xFFFFFFFF) + os.urandom(64))
        elif v == "big-size":
            s.sendall(spice.link_header(100000) + os.urandom(4096))
        elif v == "bad-magic":
            body = spice.link_mess(spice.CH_MAIN, 0)
            s.sendall(spice.link_header(len(body), magic=b"QDER") + body)
        elif v == "bad-major":
            body = spice.link_mess(spice.CH_MAIN, 0)
            s.sendall(spice.link_header(len(body), major=random.choice([0, 1, 3, 0xFFFFFFFF])) + body)
        elif v == "absurd-caps":
            body = struct.pack("<IBBIII", 0, spice.CH_MAIN, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFF00)
            s.sendall(spice.link_header(len(body)) + body)
        elif v == "truncated-mess":
            body = spice.link_mess(spice.CH_MAIN, 0)
            s.sendall(spice.link_header(len(body) + 40) + body)
        elif v == "reply-then-hangup":
            body = spice.link_mess(spice.CH_MAIN, 0)
            s.sendall(spice.link_header(len(body)) + body)
            spice.recv_exact(s, 16)
            return True  # we hang up before the ticket
        elif v == "unknown-channel":
            t, i = random.choice([(250, 0), (CH_CHURN, 200), (spice.CH_PORT, 77)])
            body = spice.link_mess(t, i, connection_id=random.getrandbits(32))
            s.sendall(spice.link_header(len(body)) + body)
            # The relay answers with its key or refuses; either way we then hang up
            # (a ticket here would count as a wrong password for this address).
            return _expect_close(s, deadline, greedy=False) or "no answer"
        closed = _expect_close(s, deadline)
        return True if closed else ("not closed" if not ctx.stop.is_set() else None)
    except OSError:
        return True
    finally:
        s.close()


def _garbage_post_link(ctx, v, deadline, index):
    """A good link from the garbage address (channel CH_GARBAGE:index of
    this garbage client), then hostile messages."""
    try:
        if v == "post-link-data-absurd":
            sess = spice.Session(ctx.addr, PASSWORD, GARBAGE)
            conn = sess.open(CH_GARBAGE, index)
        else:
            sess = None
            conn = spice.link(ctx.addr, PASSWORD, spice.CH_MAIN, 0, 0, GARBAGE)
    except spice.SpiceError as e:
        raise spice.SpiceError(f"good link from the garbage address failed: {e}")
    s = conn.sock
    try:
        hl = 6 if conn.mini else 18
        if v == "post-link-absurd":
            # A control message on main over the 64 KiB bound: the relay must close.
            size = random.choice([0xFFFFFFFF, 0x7FFFFFFF, 200 << 20])
            hdr = struct.pack("<HI", 104, size) if conn.mini else struct.pack("<QHII", 1, 104, size, 0)
            s.sendall(hdr + os.urandom(1024))
            closed = _expect_close(s, deadline)
            return True if closed else ("not closed" if not ctx.stop.is_set() else None)
        if v == "post-link-data-absurd":
            # A DATA message announcing up to 4 GiB: payload is streamed, never
            # buffered whole, so the relay may pass it on; what the echo sends
            # back must be exactly the bytes that followed the header.
            size = random.choice([0xFFFFFFFF, 0x7FFFFFFF, 200 << 20])
            payload = os.urandom(random.randint(1, 65536))
            hdr = struct.pack("<HI", spice.MSG_DATA, size) if conn.mini else struct.pack("<QHII", 1, spice.MSG_DATA, size, 0)
            s.sendall(hdr + payload)
            back = bytearray()
            s.settimeout(1.0)
            end = time.monotonic() + 3
            try:
                while len(back) < len(payload) and time.monotonic() < end:
                    try:
                        m = conn.recv_msg()
                    except socket.timeout:
                        continue
                    if m is None:
                        break
                    if m[0] == spice.MSG_DATA:
                        back += m[1]
            except (OSError, spice.SpiceError):
                pass
            if bytes(back) != payload[: len(back)]:
                return f"the echo of the bytes after an absurd DATA header differs ({len(back)} B back)"
            ctx.stats.bump("garbage_absurd_data_echoed" if len(back) == len(payload) else "garbage_absurd_data_short")
            return True
        # Random bytes parse as messages of random types and sizes: the relay may
        # drop them, wait for a long body, or close; it must not die. Then we close.
        s.sendall(os.urandom(random.randint(hl, 2048)))
        _expect_close(s, min(deadline, time.monotonic() + 2))
        return True
    except OSError:
        return True
    finally:
        conn.close()
        if sess:
            sess.close()


def w_half_open(ctx):
    """Holds --half-open connections that never finish their link."""
    kind = "half-open"
    n_want = ctx.args.half_open
    lt = ctx.args.link_timeout_secs
    sel = selectors.DefaultSelector()
    conns = {}  # fd -> (sock, opened_at)
    last_check = 0.0
    try:
        while not ctx.stop.is_set():
            opened = 0
            while len(conns) < n_want and opened < 50:
                try:
                    s = spice.tcp(ctx.addr, HALF_OPEN, timeout=5)
                    if random.random() < 0.5:
                        s.sendall(spice.link_header(18)[: random.randint(1, 15)])
                    s.setblocking(False)
                except (spice.SpiceError, OSError) as e:
                    ctx.stats.bump("half_open_connect_errors")
                    if ctx.stats.extra.get("half_open_connect_errors", 0) in (1, 100):
                        log(f"half-open connect: {e}")
                    break
                conns[s.fileno()] = (s, time.monotonic())
                sel.register(s, selectors.EVENT_READ)
                opened += 1
            with ctx.lock:
                ctx.stats.extra["half_open_held"] = len(conns)
            for key, _ in sel.select(timeout=0.2):
                s, t_open = conns.pop(key.fd)
                sel.unregister(s)
                try:
                    s.recv(4096)
                except OSError:
                    pass
                s.close()
                held = time.monotonic() - t_open
                ctx.stats.ok(kind)
                with ctx.lock:
                    ctx.stats.extra["half_open_max_held_s"] = max(ctx.stats.extra.get("half_open_max_held_s", 0), held)
            now = time.monotonic()
            if now - last_check > 1:
                last_check = now
                for fd, (s, t_open) in list(conns.items()):
                    if now - t_open > lt + 6:
                        ctx.stats.fail(kind, f"a half-open connection was held {now - t_open:.1f} s (link timeout {lt} s)")
                        sel.unregister(s)
                        s.close()
                        del conns[fd]
            time.sleep(0.05 if opened else 0)
    finally:
        for s, _ in conns.values():
            s.close()
        sel.close()
        with ctx.lock:
            ctx.stats.extra["half_open_held"] = 0


# ---------------------------------------------------------------- endpoint restarts


def start_restart_endpoint(ctx):
    try:
        os.unlink(ctx.restart_sock)
    except FileNotFoundError:
        pass
    p = procs.spawn(
        [ctx.vmcload, "endpoint", "--unix-listen", ctx.restart_sock, "--mode", "echo", "-q"],
        log_path=ctx.spath("restart-endpoint.log"),
    )
    procs.wait_until(lambda: procs.unix_listening(ctx.restart_sock), 10, "restart endpoint", p)
    return p


def w_endpoint_killer(ctx):
    kind = "endpoint-restart"
    p = ctx.restart_ep
    while not ctx.sleep(random.uniform(8, 15)):
        ctx.endpoint_up.clear()
        with ctx.lock:
            ctx.endpoint_kills.append(time.monotonic())
        procs.stop(p, sig=signal.SIGKILL)
        time.sleep(random.uniform(1, 3))  # the endpoint's down time, even at the stop
        try:
            p = start_restart_endpoint(ctx)
        except procs.BenchError as e:
            ctx.stats.fail(kind, f"cannot restart the endpoint: {e}")
            return
        ctx.restart_ep = p
        ctx.endpoint_up.set()
        ctx.stats.bump("endpoint_restarts")
    # PR_SET_PDEATHSIG fires when the *thread* that started a child ends: the
    # endpoint this thread started must live until the end checks are done.
    ctx.finished.wait()


def _endpoint_down_or_just_back(ctx):
    """The restarted endpoint is down, or came back so recently that a refusal may predate it."""
    return not ctx.endpoint_up.is_set() or _recently_killed(ctx, within=6.0)


def _recently_killed(ctx, within=6.0):
    with ctx.lock:
        return bool(ctx.endpoint_kills) and time.monotonic() - ctx.endpoint_kills[-1] < within


class Pump:
    """Sends epoch-seeded pattern chunks at a modest rate; pausable at an epoch change."""

    def __init__(self, ch, rate_bps=2 * MiB, chunk=32768):
        self.ch, self.chunk, self.gap = ch, chunk, chunk / rate_bps
        self.cv = threading.Condition()
        self.seed, self.off, self.on, self.done = None, 0, False, False
        self.error = None
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def start_epoch(self, seed):
        with self.cv:
            self.seed, self.off, self.on = seed, 0, True
            self.cv.notify_all()

    def pause(self):
        with self.cv:  # waits for a send in progress: after this no old byte is sent
            self.on = False

    def finish(self):
        with self.cv:
            self.on, self.done = False, True
            self.cv.notify_all()

    def sent(self):
        with self.cv:
            return self.off

    def _run(self):
        while True:
            with self.cv:
                while not self.on and not self.done:
                    self.cv.wait()
                if self.done:
                    return
                try:
                    self.ch.send_msg(spice.MSG_DATA, spice.pattern(self.seed, self.off, self.chunk))
                    self.off += self.chunk
                except OSError as e:
                    self.error = str(e)
                    self.on = False
                    return
            time.sleep(self.gap)


def w_restart_usbredir(ctx):
    """usbredir:0 behind the restarted endpoint: the channel closes with its
    endpoint, the session's main channel announces it again, we relink it."""
    kind = "endpoint-restart/usbredir"
    while not ctx.stop.is_set():
        try:
            sess = spice.Session(ctx.addr, PASSWORD, GOOD)
        except spice.SpiceError as e:
            ctx.stats.fail(kind, f"session: {e}")
            ctx.sleep(1)
            continue
        ids = sess.ids_of(CH_USBREDIR)
        try:
            _usbredir_session(ctx, kind, sess, ids[0] if ids else None)
        finally:
            sess.close()


def _usbredir_session(ctx, kind, sess, ch_id):
    lives = refusals = 0
    while not ctx.stop.is_set() and lives < 5:
        if ch_id is None:
            t = None
            for _ in range(25):
                try:
                    t, ch_id = sess.announced.get(timeout=1)
                    break
                except queue.Empty:
                    if ctx.stop.is_set():
                        return
            if t is None:
                ctx.stats.fail(kind, "the channel was not announced again within 25 s")
                return
            if t != CH_USBREDIR:
                ch_id = None
                continue
        try:
            ch = sess.open(CH_USBREDIR, ch_id)
        except spice.LinkRefused as e:
            if e.code == spice.LINK_ERR_CHANNEL_NOT_AVAILABLE and _endpoint_down_or_just_back(ctx):
                # Linked while its endpoint is down: refused (9). The relay announces
                # the channel (fresh id) once the endpoint is back, as to a session
                # that had it linked; --relink-after-refusal retries the same id
                # once a second instead.
                ctx.stats.bump("usbredir_refused_while_down")
                refusals += 1
                if not ctx.args.relink_after_refusal:
                    ch_id = None
                elif refusals > 30:
                    ctx.stats.fail(kind, f"usbredir:{ch_id} still refused after 30 s")
                    return
                else:
                    time.sleep(1)
                continue
            ctx.stats.fail(kind, f"link usbredir:{ch_id}: {e}")
            return
        except spice.SpiceError as e:
            ctx.stats.fail(kind, f"link usbredir:{ch_id}: {e}")
            return
        ctx.stats.add(kind, links=1)
        lives += 1
        refusals = 0
        seed = random.getrandbits(32)
        pump = Pump(ch)
        pump.start_epoch(seed)
        got, why = 0, None
        ch.sock.settimeout(1.0)
        last_data = time.monotonic()
        while not ctx.stop.is_set():
            try:
                m = ch.recv_msg()
            except socket.timeout:
                if time.monotonic() - last_data > 15 and ctx.endpoint_up.is_set():
                    why = "no echo for 15 s while the endpoint is up"
                    break
                continue
            except (OSError, spice.SpiceError) as e:
                m = None
                if not _recently_killed(ctx):
                    why = f"channel error while the endpoint was up: {e}"
            if m is None:
                if why is None and not _recently_killed(ctx) and not ctx.stop.is_set():
                    with ctx.lock:
                        ago = [round(time.monotonic() - t, 2) for t in ctx.endpoint_kills[-2:]]
                    why = f"channel closed while the endpoint was up (last kills {ago} s ago)"
                break
            if m[0] != spice.MSG_DATA:
                continue
            bad = spice.first_mismatch(seed, got, m[1])
            if bad is not None:
                why = f"echo mismatch at offset {bad}"
                break
            got += len(m[1])
            last_data = time.monotonic()
        pump.finish()
        ch.close()
        if why:
            ctx.stats.fail(kind, f"usbredir:{ch_id} after {got} B: {why}")
            return
        ctx.stats.ok(kind, got)
        ch_id = None  # closed with its endpoint: wait for the announcement


def w_restart_port(ctx):
    """A port channel behind the restarted endpoint stays linked: PORT_EVENT
    closed, then opened once the endpoint is back; a fresh seed per epoch."""
    kind = "endpoint-restart/port"
    while not ctx.stop.is_set():
        sess = None
        try:
            sess = spice.Session(ctx.addr, PASSWORD, GOOD)
            ids = sess.ids_of(spice.CH_PORT)
            ch = sess.open(spice.CH_PORT, ids[0])
        except spice.LinkRefused as e:
            sess.close()
            # The endpoint is opened at link time: while it is down the link gets 9
            # (README); once linked, the port stays linked through restarts.
            if e.code == spice.LINK_ERR_CHANNEL_NOT_AVAILABLE and _endpoint_down_or_just_back(ctx):
                ctx.stats.bump("port_refused_while_down")
            else:
                ctx.stats.fail(kind, f"link: {e}")
            ctx.sleep(1)
            continue
        except (spice.SpiceError, IndexError) as e:
            if sess:
                sess.close()
            ctx.stats.fail(kind, f"session/link: {e!r}")
            ctx.sleep(1)
            continue
        ctx.stats.add(kind, links=2)
        try:
            _port_session(ctx, kind, ch)
        finally:
            ch.close()
            sess.close()


def _port_session(ctx, kind, ch):
    pump = Pump(ch)
    seed, got, opened = None, 0, None
    ch.sock.settimeout(1.0)
    last_data = time.monotonic()
    started = time.monotonic()
    try:
        while not ctx.stop.is_set() and time.monotonic() - started < 120:
            try:
                m = ch.recv_msg()
            except socket.timeout:
                if opened and time.monotonic() - last_data > 15:
                    ctx.stats.fail(kind, "no echo for 15 s while the port is open")
                    return
                continue
            except (OSError, spice.SpiceError) as e:
                ctx.stats.fail(kind, f"port channel broke: {e}")
                return
            if m is None:
                ctx.stats.fail(kind, "port channel closed (it should stay linked)")
                return
            mtype, body = m
            if mtype == spice.MSG_PORT_INIT or (mtype == spice.MSG_PORT_EVENT and body[:1] == b"\0"):
                is_open = body[8] == 1 if mtype == spice.MSG_PORT_INIT else True
                if is_open and not opened:
                    if seed is not None:
                        ctx.stats.ok(kind, got)
                    seed, got, opened = random.getrandbits(32), 0, True
                    pump.start_epoch(seed)
                    last_data = time.monotonic()
                    ctx.stats.bump("port_opened_events")
                elif not is_open:
                    opened = False
            elif mtype == spice.MSG_PORT_EVENT and body[:1] == b"\1":
                pump.pause()
                opened = False
                ctx.stats.bump("port_closed_events")
            elif mtype == spice.MSG_DATA:
                if seed is None:
                    ctx.stats.fail(kind, "data before the port opened")
                    return
                bad = spice.first_mismatch(seed, got, body)
                if bad is not None:
                    ctx.stats.fail(kind, f"echo mismatch at offset {bad} of this endpoint life "
                                   f"({'open' if opened else 'after PORT_EVENT closed'})")
                    return
                got += len(body)
                last_data = time.monotonic()
        if seed is not None:
            ctx.stats.ok(kind, got)
    finally:
        pump.finish()


# ---------------------------------------------------------------- slow readers


def w_slow_client(ctx):
    """Reads a fast source endpoint slowly (with a stall) and checks every byte."""
    kind = "slow-client"
    src_seed = ctx.args.seed + 7
    while not ctx.stop.is_set():
        total = random.randint(2, 4) * MiB
        stall_at = random.randint(0, total)
        try:
            sess = spice.Session(ctx.addr, PASSWORD, GOOD)
            ch = sess.open(CH_SLOW_CLIENT, 0)
        except spice.SpiceError as e:
            ctx.stats.fail(kind, f"session/link: {e}")
            ctx.sleep(1)
            continue
        got, why = 0, None
        ch.sock.settimeout(20)
        try:
            while got < total and not ctx.stop.is_set():
                m = ch.recv_msg()
                if m is None:
                    why = f"EOF after {got} B"
                    break
                if m[0] != spice.MSG_DATA:
                    continue
                bad = spice.first_mismatch(src_seed, got, m[1])
                if bad is not None:
                    why = f"mismatch at offset {bad}"
                    break
                if got < stall_at <= got + len(m[1]):
                    time.sleep(3)
                got += len(m[1])
                time.sleep(len(m[1]) / MiB)  # ~1 MiB/s
        except (OSError, spice.SpiceError) as e:
            why = f"after {got} B: {e}"
        ch.close()
        sess.close()
        if why:
            ctx.stats.fail(kind, why)
        elif got >= total:
            ctx.stats.ok(kind, got, links=2)


def slow_endpoint_server(ctx, path):
    """A unix endpoint that reads ~1 MiB/s (3 s stall) and checks vmcload's pattern."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    srv.settimeout(0.5)

    def serve(c):
        got, bad = 0, None
        stall_at = random.randint(0, MiB)
        try:
            while True:
                data = c.recv(16384)
                if not data:
                    break
                if bad is None:
                    bad = spice.first_mismatch(ctx.args.seed, got, data)
                if got < stall_at <= got + len(data):
                    time.sleep(2)
                got += len(data)
                time.sleep(len(data) / MiB)
        except OSError:
            pass
        c.close()
        with ctx.slow_ep_cv:
            ctx.slow_ep_results.append((got, bad))
            ctx.slow_ep_cv.notify_all()

    def accept_loop():
        while not ctx.stop.is_set() or ctx.slow_ep_busy:
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.settimeout(60)
            threading.Thread(target=serve, args=(c,), daemon=True).start()
        srv.close()

    ctx.slow_ep_busy = False
    threading.Thread(target=accept_loop, daemon=True).start()


def w_slow_endpoint(ctx):
    kind = "slow-endpoint"
    while not ctx.stop.is_set():
        # vmcload up half-closes, waits at most 10 s for the relay to close the
        # channel, then closes its session (and the relay drops what is still
        # in flight, as spice-server does when main goes): the whole upload must
        # drain into the slow endpoint well within that, at ~1 MiB/s and a 2 s stall.
        nbytes = random.randint(1, 2) * MiB
        with ctx.slow_ep_cv:
            before = len(ctx.slow_ep_results)
        ctx.slow_ep_busy = True
        argv = ["--mode", "up", "--channel", f"{CH_SLOW_EP}:0", "--size", "64K", "--bytes", str(nbytes)]
        argv += ["--seed", str(ctx.args.seed)]
        rc, rep, tail = vmcload_run(ctx, kind, argv, timeout=120)
        if rc != 0 or not rep or not rep.get("ok"):
            ctx.stats.fail(kind, f"vmcload up into the slow endpoint: rc={rc}{tail}")
            ctx.slow_ep_busy = False
            ctx.sleep(1)
            continue
        with ctx.slow_ep_cv:
            ctx.slow_ep_cv.wait_for(lambda: len(ctx.slow_ep_results) > before, timeout=60)
            res = ctx.slow_ep_results[before:]
        ctx.slow_ep_busy = False
        if not res:
            ctx.stats.fail(kind, f"the endpoint did not see the end of a {nbytes} B upload within 60 s")
        elif res[0][1] is not None:
            ctx.stats.fail(kind, f"the slow endpoint saw a wrong byte at offset {res[0][1]}")
        elif res[0][0] != nbytes:
            ctx.stats.fail(kind, f"the slow endpoint got {res[0][0]} B of a completed {nbytes} B upload")
        else:
            ctx.stats.ok(kind, nbytes, links=2)


# ---------------------------------------------------------------- the relay


def relay_config(ctx):
    a = ctx.args
    chans = []
    for i in range(a.bulk_conns):
        chans.append(f"{CH_UP}:{i}=unix:{ctx.spath('sink.sock')}")
        chans.append(f"{CH_DOWN}:{i}=unix:{ctx.spath('source.sock')}")
        chans.append(f"{CH_ECHO}:{i}=echo:")
    chans.append(f"{CH_RR}:0=echo:")
    for i in range(a.churn_clients):
        chans.append(f"{CH_CHURN}:{i}=echo:")
    # One channel per garbage client: two of them linking the same channel
    # in two sessions would replace each other (busy policy), a soak race.
    for i in range(a.garbage_clients):
        chans.append(f"{CH_GARBAGE}:{i}=echo:")
    chans += [
        f"{CH_KILL}:0=echo:",
        f"{CH_SLOW_CLIENT}:0=unix:{ctx.spath('slowsrc.sock')}",
        f"{CH_SLOW_EP}:0=unix:{ctx.spath('slowep.sock')}",
        f"{CH_FRESH}:0=echo:",
        f"usbredir:0=unix:{ctx.restart_sock}",
        f"port:{RESTART_PORT}=unix:{ctx.restart_sock}",
    ]
    argv = [a.vmcrelay, "serve", "--listen", f"{ctx.addr[0]}:{ctx.addr[1]}", "--password-file", ctx.spath("password")]
    argv += ["--workers", str(a.workers), "--max-conns", str(a.max_conns)]
    argv += ["--link-timeout-secs", str(a.link_timeout_secs), "--stats-secs", "0"]
    for c in chans:
        argv += ["--channel", c]
    return argv


def proc_rss_kib(pid):
    return procs.status_kib(pid, "VmRSS")


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fresh_session_check(ctx, total=MiB):
    """A new session links and echoes `total` bytes; None or what failed."""
    try:
        s = spice.Session(ctx.addr, PASSWORD, GOOD, timeout=15)
    except spice.SpiceError as e:
        return f"session: {e}"
    try:
        ch = s.open(CH_FRESH, 0)
    except spice.SpiceError as e:
        s.close()
        return f"link {CH_FRESH}:0: {e}"
    why = echo_verify(ch, random.getrandbits(32), total)
    ch.close()
    s.close()
    return why


# Expected WARN/ERROR lines: (name, pattern over the message, source addresses it may name).
EXPECTED = [
    ("throttle", re.compile(r"^throttle addr=(\S+)"), {WRONG_PW}),
    # The link-stage budget closes the oldest half-open connections of a flooding address.
    ("link-stage evict", re.compile(r"^throttle evict addr=(\S+)"), {HALF_OPEN, GARBAGE, WRONG_PW}),
    ("protocol error", re.compile(r"^peer=(\S+?):\d+ channel=\S+ protocol error: "), {GARBAGE}),
    ("endpoint unavailable", re.compile(r"^endpoint unavailable service=\S+ channel=(?:usbredir:\d+|port:" + re.escape(RESTART_PORT) + r") endpoint=unix:(\S+) "), None),
    ("endpoint gone", re.compile(r"^endpoint gone channel=(?:usbredir:\d+|port:" + re.escape(RESTART_PORT) + r")"), None),
]
LINE_RE = re.compile(r"^\S+ (WARN|ERROR) vmcrelay\[(\w+)\] (.*)$")


def check_log(ctx):
    """(counts of expected kinds, unexpected lines)."""
    counts, unexpected = {}, []
    try:
        with open(ctx.relay_log, errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if " WARN " not in line and " ERROR " not in line and "panicked" not in line:
                    continue
                m = LINE_RE.match(line)
                if not m:
                    unexpected.append(line)
                    continue
                msg = m.group(3)
                for name, pat, sources in EXPECTED:
                    mm = pat.search(msg)
                    if not mm:
                        continue
                    if sources is None:
                        if name == "endpoint unavailable" and mm.group(1) != ctx.restart_sock:
                            continue
                    elif mm.group(1) not in sources:
                        continue
                    counts[name] = counts.get(name, 0) + 1
                    break
                else:
                    unexpected.append(line)
    except OSError as e:
        unexpected.append(f"cannot read the relay log: {e}")
    return counts, unexpected


class Monitor:
    """Samples the relay's RSS and fds every second; a progress line every --progress-secs."""

    def __init__(self, ctx, t_end):
        self.ctx, self.t_end = ctx, t_end
        self.rss_peak = 0
        self.fds_peak = 0
        self.samples = []  # (monotonic time, RSS KiB), one a second
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def trend_mib_per_min(self, t_from, t_to):
        """Least-squares slope of RSS over [t_from, t_to], MiB per minute (None if too few samples)."""
        pts = [(t, r) for t, r in self.samples if t_from <= t <= t_to]
        if len(pts) < 10:
            return None
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        mr = sum(r for _, r in pts) / n
        var = sum((t - mt) ** 2 for t, _ in pts)
        if var == 0:
            return None
        return sum((t - mt) * (r - mr) for t, r in pts) / var * 60 / 1024

    def _run(self):
        ctx = self.ctx
        pid = ctx.relay.pid
        last = time.monotonic()
        t0 = ctx.stats.t0
        while not self.done.wait(1.0):
            rss, fds = proc_rss_kib(pid) or 0, proc_fds(pid) or 0
            self.samples.append((time.monotonic(), rss))
            self.rss_peak = max(self.rss_peak, rss)
            self.fds_peak = max(self.fds_peak, fds)
            now = time.monotonic()
            if now - last >= ctx.args.progress_secs:
                last = now
                kinds, extra = ctx.stats.snapshot()
                ok = sum(k["ok"] for k in kinds.values())
                failed = sum(k["failed"] for k in kinds.values())
                killed = sum(k["killed"] for k in kinds.values())
                vbytes = sum(k["bytes"] for k in kinds.values())
                links = sum(k["links"] for k in kinds.values())
                el = now - t0
                load_el = min(el, self.t_end - t0)
                alive = "alive" if ctx.relay.poll() is None else f"DEAD rc={ctx.relay.returncode}"
                print(
                    f"[{el:6.0f}s/{self.t_end - t0:.0f}s] ok {ok} failed {failed} killed {killed} | "
                    f"verified {vbytes / MiB:,.0f} MiB | links {links / el:.1f}/s | "
                    f"wrong-pw {len(ctx.wrong_pw_times)} | half-open {extra.get('half_open_held', 0)} | "
                    f"restarts {extra.get('endpoint_restarts', 0)} | rss {rss / 1024:.0f} MiB fds {fds} | relay {alive}",
                    flush=True,
                )


# ---------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/soak",
        description="Mixed, hostile soak of `vmcrelay serve`; every completed transfer checked byte for byte.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, required=True, help="how long the load runs (fractions allowed: 0.5)")
    p.add_argument("--vmcrelay", default=os.path.join(ROOT, "target/release/vmcrelay"), help="vmcrelay binary [%(default)s]")
    p.add_argument("--vmcload", default=os.path.join(ROOT, "target/release/vmcload"), help="vmcload binary [%(default)s]")
    p.add_argument("--workers", type=int, default=2, help="relay workers (serve --workers) [%(default)s]")
    p.add_argument("--max-conns", type=int, default=256, help="serve --max-conns (per worker) [%(default)s]")
    p.add_argument("--link-timeout-secs", type=int, default=10, help="serve --link-timeout-secs [%(default)s]")
    p.add_argument("--bulk-conns", type=int, default=2, help="concurrent vmcload loops per bulk kind (up, down, echo) [%(default)s]")
    p.add_argument("--bulk-max-mib", type=int, default=16, help="largest bulk transfer, MiB (each is 2..N) [%(default)s]")
    p.add_argument("--bulk-rate", type=int, default=0, help="64 KiB messages/s per bulk up/echo connection (vmcload --rate; 0: as fast as it goes) [%(default)s]")
    p.add_argument("--bulk-pause-ms", type=int, default=0, help="pause between two bulk transfers of a loop [%(default)s]")
    p.add_argument("--rr-rate", type=int, default=500, help="64 B round trips per second [%(default)s]")
    p.add_argument("--churn-clients", type=int, default=2, help="python session churn threads [%(default)s]")
    p.add_argument("--churn-rate", type=float, default=6.0, help="churn sessions per second, all threads [%(default)s]")
    p.add_argument("--wrong-password-clients", type=int, default=1, help="parallel wrong-password guessers (127.0.0.9); with more than one, a try closed unanswered at the link timeout counts as held, not failed [%(default)s]")
    p.add_argument("--garbage-clients", type=int, default=3, help="parallel garbage connections (127.0.0.10) [%(default)s]")
    p.add_argument("--half-open", type=int, default=200, help="half-open connections held (127.0.0.11) [%(default)s]")
    p.add_argument("--relink-after-refusal", action="store_true",
                   help="a usbredir link refused while its endpoint was down relinks the same id once a second "
                        "instead of waiting for the relay to announce the channel when the endpoint is back")
    p.add_argument("--no-endpoint-restart", action="store_true", help="do not kill and restart the endpoint")
    p.add_argument("--settle-secs", type=float, default=30, help="longest wait for RSS/fds to come back after the load [%(default)s]")
    p.add_argument("--warmup-secs", type=float, default=20, help="load time before the RSS baseline is taken (at most a third of the run) [%(default)s]")
    p.add_argument("--rss-bound-mib", type=float, default=32, help="allowed RSS growth, MiB, from the baseline (after --warmup-secs of load) to the end [%(default)s]")
    p.add_argument("--fd-bound", type=int, default=16, help="allowed open-fd growth, cold start to the end [%(default)s]")
    p.add_argument("--progress-secs", type=float, default=10, help="seconds between progress lines [%(default)s]")
    p.add_argument("--seed", type=int, default=1, help="pattern seed of the vmcload streams [%(default)s]")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) even if everything held")
    p.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    a = p.parse_args(argv)
    if not (a.minutes > 0):
        p.error("--minutes must be > 0")
    for name in ("workers", "max_conns", "link_timeout_secs", "bulk_max_mib"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.bulk_max_mib < 2:
        p.error("--bulk-max-mib must be >= 2")
    for name in ("bulk_conns", "churn_clients", "wrong_password_clients", "garbage_clients", "half_open"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if a.churn_clients > 100 or a.bulk_conns > 100:
        p.error("--churn-clients and --bulk-conns must be <= 100")
    for b in (a.vmcrelay, a.vmcload):
        if not os.access(b, os.X_OK):
            p.error(f"{b} is not an executable (cargo build --release --bins)")
    return a


def main(argv):
    args = parse_args(argv)
    procs.install_cleanup()
    work = tempfile.mkdtemp(prefix="vmcrelay-soak-")
    ctx = Ctx(args, work)
    with open(ctx.spath("password"), "wb") as fh:
        fh.write(PASSWORD + b"\n")
    ctx.addr = (GOOD, procs.free_port())
    checks = []  # (name, ok, detail)

    # Endpoints behind the relay.
    sink = procs.spawn(
        [args.vmcload, "endpoint", "--unix-listen", ctx.spath("sink.sock"), "--mode", "sink", "--verify",
         "--seed", str(args.seed), "--json", ctx.sink_json, "-q"],
        log_path=ctx.spath("sink.log"),
    )
    source = procs.spawn(
        [args.vmcload, "endpoint", "--unix-listen", ctx.spath("source.sock"), "--mode", "source",
         "--seed", str(args.seed), "-q"],
        log_path=ctx.spath("source.log"),
    )
    slowsrc = procs.spawn(
        [args.vmcload, "endpoint", "--unix-listen", ctx.spath("slowsrc.sock"), "--mode", "source",
         "--seed", str(args.seed + 7), "-q"],
        log_path=ctx.spath("slowsrc.log"),
    )
    slow_endpoint_server(ctx, ctx.spath("slowep.sock"))
    ctx.restart_ep = start_restart_endpoint(ctx)
    ctx.endpoint_up.set()
    for p, name in ((sink, "sink.sock"), (source, "source.sock"), (slowsrc, "slowsrc.sock")):
        procs.wait_until(lambda n=name: procs.unix_listening(ctx.spath(n)), 10, f"endpoint {name}", p)

    relay_argv = relay_config(ctx)
    with open(ctx.spath("relay.cmd"), "w") as fh:
        fh.write(" ".join(relay_argv) + "\n")
    ctx.relay = procs.spawn(relay_argv, log_path=ctx.relay_log)
    procs.wait_until(lambda: procs.tcp_listening(ctx.addr[1]), 15, "vmcrelay serve", ctx.relay, ctx.relay_log)

    # Warm-up, then the baseline.
    why = fresh_session_check(ctx)
    if why:
        log(f"the warm-up session failed: {why}{procs.tail(ctx.relay_log)}")
        return 1
    time.sleep(1)
    rss_cold, fds_start = proc_rss_kib(ctx.relay.pid), proc_fds(ctx.relay.pid)
    log(f"relay pid {ctx.relay.pid} on {ctx.addr[0]}:{ctx.addr[1]}, work dir {work}; "
        f"cold RSS {rss_cold / 1024:.1f} MiB, {fds_start} fds; load for {args.minutes:g} min")

    ctx.stats.t0 = time.monotonic()
    t_end = ctx.stats.t0 + args.minutes * 60
    mon = Monitor(ctx, t_end)
    threads = []
    for i in range(args.bulk_conns):
        for mode, ch in (("up", CH_UP), ("down", CH_DOWN), ("echo", CH_ECHO)):
            kind, fn = w_bulk(mode, ch, i)
            threads.append(guarded(ctx, kind, fn))
    threads.append(guarded(ctx, "rr-64B", w_rr))
    for i in range(args.churn_clients):
        kind, fn = w_churn(i)
        threads.append(guarded(ctx, kind, fn))
    for _ in range(args.wrong_password_clients):
        threads.append(guarded(ctx, "wrong-password", w_wrong_password))
    for i in range(args.garbage_clients):
        threads.append(guarded(ctx, "garbage", w_garbage(i)))
    if args.half_open:
        threads.append(guarded(ctx, "half-open", w_half_open))
    if not args.no_endpoint_restart:
        guarded(ctx, "endpoint-restart", w_endpoint_killer)  # lives until ctx.finished
    threads.append(guarded(ctx, "endpoint-restart/usbredir", w_restart_usbredir))
    threads.append(guarded(ctx, "endpoint-restart/port", w_restart_port))
    threads.append(guarded(ctx, "client-kill", w_client_kill))
    threads.append(guarded(ctx, "slow-client", w_slow_client))
    threads.append(guarded(ctx, "slow-endpoint", w_slow_endpoint))

    # The RSS baseline is taken under load, after a warm-up: the relay's buffer
    # arena is resident only once used (buffers are handed out lowest id first,
    # so it reaches its working set early), and a cold figure would count it as
    # growth. Open fds have no such effect: their baseline is the cold one.
    warmup_s = min(args.warmup_secs, args.minutes * 60 / 3)
    rss_warm = None
    relay_died = False
    while time.monotonic() < t_end:
        if rss_warm is None and time.monotonic() >= ctx.stats.t0 + warmup_s:
            rss_warm = proc_rss_kib(ctx.relay.pid)
            log(f"RSS after {warmup_s:.0f} s of load: {rss_warm / 1024:.1f} MiB (the baseline)")
        if ctx.relay.poll() is not None:
            relay_died = True
            break
        time.sleep(0.2)
    load_s = time.monotonic() - ctx.stats.t0
    ctx.load_s = load_s
    rss_start = rss_warm if rss_warm is not None else rss_cold
    ctx.stop.set()
    log("load stopped; waiting for the transfers in flight to finish")
    join_deadline = time.monotonic() + 150
    for t in threads:
        t.join(timeout=max(0.1, join_deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    checks.append(("every load thread ended", not stuck, ", ".join(stuck) if stuck else ""))
    ctx.endpoint_up.wait(10)
    if ctx.restart_ep.poll() is not None:
        try:
            ctx.restart_ep = start_restart_endpoint(ctx)
        except procs.BenchError:
            pass
    ctx.endpoint_up.set()

    alive = ctx.relay.poll() is None and not relay_died
    checks.append(("relay alive", alive, "" if alive else f"exited with {ctx.relay.returncode}{procs.tail(ctx.relay_log)}"))

    # Settle: RSS and fds back near the start.
    rss_end = fds_end = None
    settle_start = time.monotonic()
    if alive:
        while True:
            rss_end, fds_end = proc_rss_kib(ctx.relay.pid), proc_fds(ctx.relay.pid)
            # Wait until the fds are really back (closes are asynchronous), not
            # just within the bound, so the end figure shows any slow leak.
            good = (rss_end - rss_start) <= args.rss_bound_mib * 1024 and fds_end <= fds_start + 2
            if (good and time.monotonic() - settle_start >= 2) or time.monotonic() - settle_start > args.settle_secs:
                break
            time.sleep(0.5)
    settle_s = time.monotonic() - settle_start
    mon.done.set()
    mon.t.join(timeout=3)
    if alive:
        checks.append((f"RSS within +{args.rss_bound_mib:g} MiB of the baseline", (rss_end - rss_start) <= args.rss_bound_mib * 1024,
                       f"{rss_start / 1024:.1f} MiB after {warmup_s:.0f} s of load -> {rss_end / 1024:.1f} MiB after the settle"))
        checks.append((f"open fds within +{args.fd_bound} of the start", (fds_end - fds_start) <= args.fd_bound,
                       f"{fds_start} -> {fds_end}"))
        why = fresh_session_check(ctx)
        checks.append(("a fresh session links and echoes 1 MiB", why is None, why or ""))

    # The up sink: no wrong byte, and exactly what the completed uploads sent.
    procs.stop(sink, timeout=5)
    try:
        with open(ctx.sink_json) as fh:
            sj = json.load(fh)
    except (OSError, ValueError):
        sj = None
    _, extra = ctx.stats.snapshot()
    if sj is None:
        checks.append(("up sink report", args.bulk_conns == 0, "no sink.json"))
    else:
        checks.append(("up sink saw no wrong byte", sj.get("mismatches", 1) == 0 and sink.returncode == 0,
                       f"integrity={sj.get('integrity')} mismatches={sj.get('mismatches')} rc={sink.returncode} first={sj.get('first_mismatch')}"))
        if not extra.get("up_failed"):
            sent = extra.get("up_bytes_sent", 0)
            checks.append(("up sink got every byte of the completed uploads", sj.get("bytes_in") == sent,
                           f"sink {sj.get('bytes_in')} B, uploads {sent} B"))

    # The relay's log, then its exit on SIGTERM.
    rc = procs.stop(ctx.relay, timeout=15) if alive else ctx.relay.returncode
    if alive:
        checks.append(("relay exits 0 on SIGTERM", rc == 0, f"rc={rc}"))
    log_counts, unexpected = check_log(ctx)
    checks.append(("no unexpected WARN/ERROR log line", not unexpected,
                   "\n      ".join(unexpected[:10]) + (f"\n      ... {len(unexpected) - 10} more" if len(unexpected) > 10 else "")))

    kinds, extra = ctx.stats.snapshot()
    t_load_end = ctx.stats.t0 + load_s
    extra["rss_trend_second_half_mib_per_min"] = mon.trend_mib_per_min(ctx.stats.t0 + load_s / 2, t_load_end)
    for k, v in sorted(kinds.items()):
        if v["failed"]:
            checks.append((f"{k}: no failed transfer", False, f"{v['failed']} failed"))
    if ctx.stats.failures:
        checks.append(("load failures", False, "\n      ".join(f"{t:6.1f}s {k}: {m.splitlines()[0]}" for t, k, m in ctx.stats.failures[:15])))

    everything = all(ok for _, ok, _ in checks)
    summary = report(ctx, kinds, extra, checks, load_s, settle_s, rss_cold, rss_start, mon.rss_peak, rss_end, fds_start, mon.fds_peak, fds_end, log_counts)
    print(summary, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"kinds": kinds, "extra": {k: v for k, v in extra.items() if k != "rr_p50s"},
                       "checks": [{"name": n, "ok": o, "detail": d} for n, o, d in checks],
                       "rss_kib": {"cold": rss_cold, "start": rss_start, "peak": mon.rss_peak, "end": rss_end}, "fds": {"start": fds_start, "peak": mon.fds_peak, "end": fds_end},
                       "load_s": load_s, "ok": everything}, fh, indent=1)
    ctx.finished.set()
    procs.kill_all()
    if everything and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs: {work}", flush=True)
    return 0 if everything else 1


def report(ctx, kinds, extra, checks, load_s, settle_s, rss_cold, rss0, rss_peak, rss1, fds0, fds_peak, fds1, log_counts):
    a = ctx.args
    lines = [f"== soak summary: {a.minutes:g} min of load ({load_s:.0f} s), {a.workers} workers, "
             f"{a.half_open} half-open, settle {settle_s:.0f} s"]
    lines.append(f"{'kind':<28}{'ok':>8}{'failed':>8}{'killed':>8}{'verified MiB':>14}{'links':>8}")
    tot = {"ok": 0, "failed": 0, "killed": 0, "bytes": 0, "links": 0}
    for k, v in sorted(kinds.items()):
        lines.append(f"{k:<28}{v['ok']:>8}{v['failed']:>8}{v['killed']:>8}{v['bytes'] / MiB:>14,.1f}{v['links']:>8}")
        for f in tot:
            tot[f] += v[f]
    lines.append(f"{'total':<28}{tot['ok']:>8}{tot['failed']:>8}{tot['killed']:>8}{tot['bytes'] / MiB:>14,.1f}{tot['links']:>8}")
    wp = ctx.wrong_pw_times
    wp_rate = len(wp) / load_s if load_s else 0
    late = [t for t in wp if t >= ctx.stats.t0 + min(30, load_s / 2)]
    late_rate = len(late) / (load_s - min(30, load_s / 2)) if load_s > 1 else 0
    p50s = extra.get("rr_p50s") or [0]
    lines += [
        f"bytes verified      {tot['bytes'] / MiB:,.1f} MiB",
        f"links/s             {tot['links'] / load_s:.1f} (successful links, all clients)",
        f"wrong-password      {len(wp)} refused, {wp_rate:.2f} tries/s overall, {late_rate:.2f} tries/s after the first {min(30, load_s / 2):.0f} s "
        f"({a.wrong_password_clients} parallel guessers from {WRONG_PW}"
        + (f"; {extra.get('wrong_pw_link_timeouts', 0)} held past the link timeout" if a.wrong_password_clients > 1 else "") + ")",
        f"64 B round trips    {extra.get('rr_count', 0)}, median p50 {sorted(p50s)[len(p50s) // 2]} us, worst p99 {extra.get('rr_p99_max_us', 0)} us, max {extra.get('rr_max_us', 0)} us",
        f"half-open           {a.half_open} held, {kinds.get('half-open', {}).get('ok', 0)} timed out by the relay, longest held {extra.get('half_open_max_held_s', 0):.1f} s",
        f"endpoint restarts   {extra.get('endpoint_restarts', 0)} (port closed/opened events {extra.get('port_closed_events', 0)}/{extra.get('port_opened_events', 0)})",
        f"RSS                 cold {rss_cold / 1024:.1f} MiB, start (after the warm-up) {rss0 / 1024:.1f} MiB, peak {rss_peak / 1024:.1f} MiB, end {(rss1 or 0) / 1024:.1f} MiB",
        f"RSS trend           {_fmt_trend(extra.get('rss_trend_second_half_mib_per_min'))} over the second half of the load "
        "(information: a leak climbs steadily, the arena's working set in steps)",
        f"open fds            start {fds0}, peak {fds_peak}, end {fds1}",
        f"expected log lines  " + (", ".join(f"{k} {v}" for k, v in sorted(log_counts.items())) or "none"),
        "checks:",
    ]
    for name, ok, detail in checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""))
    lines.append("RESULT: " + ("PASS" if all(ok for _, ok, _ in checks) else "FAIL"))
    return "\n".join(lines)


def _fmt_trend(v):
    return "n/a" if v is None else f"{v:+.2f} MiB/min"


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except procs.BenchError as e:
        log(f"cannot run: {e}")
        procs.kill_all()
        sys.exit(1)
