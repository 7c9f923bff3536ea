#!/usr/bin/python3
"""Smoke test and echo benchmark for target/peers/spice_vmc_peer.

Starts a unix-socket echo endpoint, starts the libspice-server peer on a free
loopback port, connects spice-gtk (python gi) to its port channel, pushes
random data through it and checks the SHA-256 of what comes back.

Run with /usr/bin/python3 (only that interpreter has gi):

    /usr/bin/python3 benches/peers/smoke.py                 # 16 MiB echo
    /usr/bin/python3 benches/peers/smoke.py --size-mib 64 --json
    /usr/bin/python3 benches/peers/smoke.py --ticket        # password path
    /usr/bin/python3 benches/peers/smoke.py --disconnect-test

Exit status 0 on success, 1 on any failure. Never hangs: every wait has a
deadline, and SIGALRM kills the whole run after --timeout + 30 s.
"""
import argparse
import ctypes
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import gi

gi.require_version("SpiceClientGLib", "2.0")
from gi.repository import GLib, GObject  # noqa: E402
from gi.repository import SpiceClientGLib as Spice  # noqa: E402

on = GObject.Object.connect  # Spice's connect() shadows GObject's (gotcha 1)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1024 * 1024
GiB = 1024 * MiB


class Failure(Exception):
    pass


def log(*a):
    print("smoke:", *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# endpoint: unix-socket echo server (python threads) with a mode switch
# --------------------------------------------------------------------------
class EchoEndpoint:
    """Unix-socket echo server in a separate process (this script with
    --serve-echo), so that it does not share the GIL with the spice-gtk client.
    mode 'echo' echoes, 'pause' stops reading (a stalled device); switched
    with SIGUSR1 (pause) / SIGUSR2 (echo)."""

    def __init__(self, path):
        self.path = path
        self._mode = "echo"
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                      "--serve-echo", path], start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise Failure("echo endpoint did not start")
            time.sleep(0.01)

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, m):
        self._mode = m
        self.proc.send_signal(signal.SIGUSR1 if m == "pause" else signal.SIGUSR2)

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


def serve_echo(path):
    """--serve-echo PATH: the echo endpoint process (threads per connection)."""
    try:  # die with the parent (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception:
        pass
    paused = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *a: paused.set())
    signal.signal(signal.SIGUSR2, lambda *a: paused.clear())
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)

    def serve(c):
        buf = bytearray(256 * 1024)
        mv = memoryview(buf)
        try:
            while True:
                if paused.is_set():
                    time.sleep(0.01)
                    continue
                n = c.recv_into(buf)
                if n == 0:
                    return
                c.sendall(mv[:n])
        except OSError:
            pass
        finally:
            c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


class SocatEndpoint:
    def __init__(self, path):
        if not shutil.which("socat"):
            raise Failure("socat not found (apt-get install socat)")
        # own process group: close() must also end the forked children.
        # -b must stay <= 64 KiB: socat writes a whole block with a blocking
        # write; with -b 262144 socat (blocked writing into cat) and cat
        # (blocked writing back into socat) deadlock under a sustained echo.
        self.proc = subprocess.Popen(
            ["socat", "-b", "65536", "UNIX-LISTEN:%s,fork" % path, "EXEC:cat"],
            start_new_session=True)
        deadline = time.monotonic() + 5
        while not os.path.exists(path):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise Failure("socat endpoint did not start")
            time.sleep(0.01)

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


# --------------------------------------------------------------------------
# the peer process
# --------------------------------------------------------------------------
class Peer:
    def __init__(self, exe, port, unix_path, port_name, password_file=None, verbose=False,
                 extra=(), kind="port"):
        cmd = [exe, "--port", str(port), "--addr", "127.0.0.1", "--kind", kind,
               "--unix", unix_path]
        if kind == "port":
            cmd += ["--port-name", port_name]
        cmd += ["--password-file", password_file] if password_file else ["--disable-ticketing"]
        cmd.append("--die-with-parent")
        cmd += list(extra)
        if verbose:
            cmd.append("-v")
        self.cmd = cmd
        log("peer:", " ".join(cmd))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        line = b""
        deadline = time.monotonic() + 10
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise Failure("peer did not print 'listening on' (exit %r)" % self.proc.poll())
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                ch = os.read(self.proc.stdout.fileno(), 1)
                if not ch:
                    raise Failure("peer closed stdout before it was ready")
                line += ch
        expect = "listening on 127.0.0.1:%d" % port
        if line.decode().strip() != expect:
            raise Failure("peer printed %r, expected %r" % (line, expect))

    def cpu(self):
        """(utime+stime seconds from /proc/PID/stat, on-CPU ns from schedstat)"""
        with open("/proc/%d/stat" % self.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        try:
            with open("/proc/%d/schedstat" % self.pid) as f:
                ns = int(f.read().split()[0])
        except OSError:
            ns = None
        return ticks / CLK_TCK, ns

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise Failure("peer ignored SIGTERM for 5 s")
        return self.proc.returncode


# --------------------------------------------------------------------------
# spice-gtk client
# --------------------------------------------------------------------------
def run_until(pred, timeout, what):
    ctx = GLib.MainContext.default()
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise Failure("timeout after %.0f s waiting for %s" % (timeout, what))
        ctx.iteration(True)  # a 50 ms tick source bounds each sleep


class Client:
    def __init__(self, port, port_name, password=None, keep_rx=False):
        self.port_name = port_name
        self.session = Spice.Session()
        self.session.set_property("uri", "spice://127.0.0.1?port=%d" % port)
        if password is not None:
            self.session.set_property("password", password)
        Spice.UsbDeviceManager.get(self.session)  # gotcha 5: before connecting
        self.chan = None
        self.opened = False
        self.errors = []
        self.events = []
        self.rx_bytes = 0
        self.rx_hash = hashlib.sha256()
        self.keep_rx = keep_rx
        self.rx = bytearray()
        self.pending = {}  # gotcha 3: write buffers stay referenced until finish
        self.seq = 0
        self.tx_off = 0
        self.tx_done = 0
        self.closing = False
        on(self.session, "channel-new", self._channel_new)

    def connect(self):
        if not self.session.connect():
            raise Failure("spice_session_connect failed")

    def disconnect(self):
        self.closing = True  # no new writes from pending write callbacks
        self.session.disconnect()

    def _channel_new(self, session, ch):
        on(ch, "channel-event", self._channel_event)
        if isinstance(ch, Spice.MainChannel):
            return
        if isinstance(ch, Spice.PortChannel):
            on(ch, "port-data", self._port_data)
            on(ch, "port-event", self._port_event)
            on(ch, "notify::port-opened", self._notify_opened)
            self.chan = ch
        ch.connect()  # gotcha 2: secondary channels are not opened by themselves

    def _channel_event(self, ch, ev):
        self.events.append(ev)
        if ev in (Spice.ChannelEvent.ERROR_AUTH, Spice.ChannelEvent.ERROR_CONNECT,
                  Spice.ChannelEvent.ERROR_IO, Spice.ChannelEvent.ERROR_LINK,
                  Spice.ChannelEvent.ERROR_TLS):
            self.errors.append("%s: %s" % (type(ch).__name__, ev.value_nick))

    def _check_open(self, ch):
        if ch.get_property("port-opened") and ch.get_property("port-name") == self.port_name:
            self.opened = True

    def _notify_opened(self, ch, pspec):
        self._check_open(ch)

    def _port_event(self, ch, ev):
        self._check_open(ch)

    def _port_data(self, ch, ptr, size):
        data = ctypes.string_at(ptr, size)  # gotcha 4: ptr is an int address
        self.rx_bytes += size
        self.rx_hash.update(data)
        if self.keep_rx:
            self.rx += data
        if self.window is not None and hasattr(self, "tx"):
            self._fill()

    # sending: `inflight` writes of `chunk` bytes outstanding at any time
    # sending: at most `inflight` writes of `chunk` bytes outstanding, and at
    # most `window` bytes sent but not yet echoed back (see README: spice-gtk
    # does not read a channel while a write to it is blocked, so an echo loop
    # whose unechoed bytes exceed the buffering along the loop deadlocks)
    def start_send(self, data, chunk, inflight, window=None):
        self.tx = memoryview(data)
        self.chunk = chunk
        self.inflight = inflight
        self.window = window
        self._fill()

    def _fill(self):
        while len(self.pending) < self.inflight and self._send_next():
            pass

    def _send_next(self):
        if self.closing or self.tx_off >= len(self.tx):
            return False
        if self.window is not None and self.tx_off - self.rx_bytes >= self.window:
            return False  # resumed from _port_data
        buf = bytes(self.tx[self.tx_off:self.tx_off + self.chunk])
        self.tx_off += len(buf)
        key = self.seq
        self.seq += 1
        self.pending[key] = buf
        self.chan.write_async(buf, None, self._written, key)
        return True

    def _written(self, ch, res, key):
        try:
            n = ch.write_finish(res)
            if n != len(self.pending[key]):
                self.errors.append("short write_finish %d" % n)
            self.tx_done += n
        except GLib.Error as e:
            if not self.closing:
                self.errors.append("write: %s" % e.message)
        del self.pending[key]
        self._fill()

    def fail_if_errors(self):
        if self.errors:
            raise Failure("client errors: " + "; ".join(self.errors))


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def echo_transfer(peer, args, port, password):
    total = args.size_mib * MiB
    data = os.urandom(total)
    want = hashlib.sha256(data).hexdigest()
    cl = Client(port, args.port_name, password)
    cl.connect()
    run_until(lambda: cl.opened or cl.errors, 10, "port-opened")  # gotcha 6
    cl.fail_if_errors()
    cpu0, ns0 = peer.cpu()
    self0 = os.times()
    t0 = time.monotonic()
    cl.start_send(data, args.chunk, args.inflight, args.window_kib * 1024)
    run_until(lambda: cl.rx_bytes >= total or cl.errors or not peer.alive(),
              args.timeout, "%d echoed bytes (got %d)" % (total, cl.rx_bytes))
    t1 = time.monotonic()
    cpu1, ns1 = peer.cpu()
    self1 = os.times()
    cl.fail_if_errors()
    if not peer.alive():
        raise Failure("peer died during the transfer (exit %r)" % peer.proc.returncode)
    got = cl.rx_hash.hexdigest()
    cl.disconnect()
    if cl.rx_bytes != total or got != want:
        raise Failure("echo mismatch: %d bytes, sha256 %s, expected %d bytes, %s"
                      % (cl.rx_bytes, got, total, want))
    secs = t1 - t0
    cpu = cpu1 - cpu0
    res = {
        "bytes": total,
        "chunk": args.chunk,
        "inflight": args.inflight,
        "window": args.window_kib * 1024,
        "endpoint": args.endpoint,
        "seconds": round(secs, 4),
        "mib_per_s": round(total / MiB / secs, 1),
        "peer_cpu_s": round(cpu, 3),
        "peer_cpu_s_per_gib": round(cpu / (total / GiB), 3),
        "sha256": got,
    }
    client_cpu = (self1.user + self1.system) - (self0.user + self0.system)
    res["client_cpu_s_per_gib"] = round(client_cpu / (total / GiB), 3)
    res["client_cpu_share"] = round(client_cpu / secs, 2)  # 1.0 = one core busy
    if ns0 is not None:
        res["peer_cpu_s_per_gib_schedstat"] = round((ns1 - ns0) / 1e9 / (total / GiB), 3)
    return res


def wrong_password(args, port):
    cl = Client(port, args.port_name, "not-the-password")
    cl.connect()
    run_until(lambda: cl.errors or cl.opened, 10, "auth failure with a wrong password")
    if cl.opened or not any("auth" in e for e in cl.errors):
        raise Failure("wrong password was not refused: %r" % cl.errors)
    cl.disconnect()
    log("wrong password refused:", cl.errors[0])


def disconnect_test(peer, ep, args, port, password):
    """Client disconnects while spice-server holds write buffers the device
    refused (stalled endpoint); the peer must survive (spice-server 0.15.1
    crashes if such a buffer completes after the client is gone)."""
    ep.mode = "pause"
    cl = Client(port, args.port_name, password)
    cl.connect()
    run_until(lambda: cl.opened or cl.errors, 10, "port-opened")
    cl.fail_if_errors()
    blob = os.urandom(16 * MiB)
    cl.start_send(blob, 64 * 1024, 256)
    time.sleep(0)  # let the loop run below
    t_end = time.monotonic() + 1.5
    run_until(lambda: time.monotonic() > t_end, 5, "stall")
    log("stalled endpoint: client wrote %d bytes, %d writes pending" % (cl.tx_done, len(cl.pending)))
    cl.disconnect()
    t_end = time.monotonic() + 0.5
    run_until(lambda: time.monotonic() > t_end, 5, "disconnect")
    ep.mode = "echo"  # device drains now, while no client is attached
    time.sleep(1.0)
    if not peer.alive():
        raise Failure("peer died after a client disconnect with pending writes (exit %r)"
                      % peer.proc.returncode)
    # a new client works; data the old client had queued comes first
    payload = os.urandom(1 * MiB)
    cl2 = Client(port, args.port_name, password, keep_rx=True)
    cl2.connect()
    run_until(lambda: cl2.opened or cl2.errors, 10, "port-opened (2nd client)")
    cl2.fail_if_errors()
    cl2.start_send(payload, 64 * 1024, 8)
    run_until(lambda: (cl2.rx_bytes >= len(payload) and cl2.rx.endswith(payload))
              or cl2.errors or not peer.alive(), 30, "echo on the 2nd client")
    cl2.fail_if_errors()
    if not peer.alive():
        raise Failure("peer died on the 2nd client")
    cl2.disconnect()
    log("disconnect test ok: 2nd client got its 1 MiB echo after %d stale bytes"
        % (cl2.rx_bytes - len(payload)))


def _gspice_log(domain, level, message, _data):
    if "spice_session_get_read_only" not in message:
        print("(%s) %s" % (domain, message), file=sys.stderr, flush=True)


def usbredir_check(args, unix_path):
    """A usbredir peer starts and spice-gtk opens its usbredir channel (no data:
    spice-gtk only sends usbredir traffic for a redirected USB device)."""
    port = free_port()
    peer = Peer(args.peer, port, unix_path, None, None, args.verbose, args.peer_arg,
                kind="usbredir")
    try:
        cl = Client(port, None)
        opened = []
        on(cl.session, "channel-new", lambda s, ch: isinstance(ch, Spice.UsbredirChannel) and
           on(ch, "channel-event",
              lambda c, ev: ev == Spice.ChannelEvent.OPENED and opened.append(c)))
        cl.connect()
        run_until(lambda: opened or cl.errors, 10, "usbredir channel OPENED")
        cl.fail_if_errors()
        cl.disconnect()
        if not peer.alive():
            raise Failure("usbredir peer died")
        code = peer.stop()
        if code != 0:
            raise Failure("usbredir peer exited %d on SIGTERM" % code)
        log("usbredir check ok: UsbredirChannel opened")
    finally:
        if peer.alive():
            peer.proc.kill()
            peer.proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", default=os.path.join(ROOT, "target/peers/spice_vmc_peer"))
    ap.add_argument("--build", action="store_true", help="run build.sh first")
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64 * 1024, help="bytes per client write")
    ap.add_argument("--inflight", type=int, default=8, help="client writes outstanding")
    ap.add_argument("--window-kib", type=int, default=4096,
                    help="max bytes sent but not yet echoed (KiB)")
    ap.add_argument("--endpoint", choices=["python", "socat"], default="python")
    ap.add_argument("--port-name", default="org.vmcrelay.bench.0")
    ap.add_argument("--ticket", action="store_true",
                    help="use --password-file (and check a wrong password is refused)")
    ap.add_argument("--disconnect-test", action="store_true",
                    help="also disconnect a client while the device stalls")
    ap.add_argument("--usbredir-check", action="store_true",
                    help="also start a --kind usbredir peer and open its channel")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    ap.add_argument("-v", "--verbose", action="store_true", help="peer logs to stderr")
    ap.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the peer (repeatable), e.g. --peer-arg=--dev-buffer=...")
    ap.add_argument("--serve-echo", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0

    cleanup = []  # run on the hard timeout too

    def hard_timeout(*_):
        log("FAIL: hard timeout")
        for fn in cleanup:
            try:
                fn()
            except Exception:
                pass
        os._exit(1)

    signal.signal(signal.SIGALRM, hard_timeout)
    signal.alarm(int(args.timeout) + 30 + (30 if args.disconnect_test else 0))
    GLib.timeout_add(50, lambda: True)  # bounds every main-loop sleep
    # spice-gtk logs one critical per write still pending when a session is
    # torn down (spice_session_get_read_only); expected in the disconnect test
    GLib.log_set_handler("GSpice", GLib.LogLevelFlags.LEVEL_CRITICAL, _gspice_log, None)

    if args.build or not os.path.exists(args.peer):
        subprocess.run([os.path.join(HERE, "build.sh")], check=True)

    tmp = tempfile.mkdtemp(prefix="spice_vmc_peer.")
    ep = peer = None
    rc = 1
    try:
        unix_path = os.path.join(tmp, "ep.sock")
        ep = SocatEndpoint(unix_path) if args.endpoint == "socat" else EchoEndpoint(unix_path)
        cleanup.append(ep.close)
        password = None
        pwfile = None
        if args.ticket:
            password = "pw-%d" % os.getpid()
            pwfile = os.path.join(tmp, "password")
            with open(pwfile, "w") as f:
                f.write(password + "\n")
        port = free_port()
        peer = Peer(args.peer, port, unix_path, args.port_name, pwfile, args.verbose,
                    args.peer_arg)
        cleanup.insert(0, peer.proc.kill)
        if args.ticket:
            wrong_password(args, port)
        res = echo_transfer(peer, args, port, password)
        log("echo ok: %d MiB in %.3f s = %.1f MiB/s, peer CPU %.3f s/GiB"
            % (args.size_mib, res["seconds"], res["mib_per_s"], res["peer_cpu_s_per_gib"]))
        if args.disconnect_test:
            if args.endpoint != "python":
                raise Failure("--disconnect-test needs --endpoint python")
            disconnect_test(peer, ep, args, port, password)
        code = peer.stop()
        if code != 0:
            raise Failure("peer exited %d on SIGTERM, expected 0" % code)
        if args.usbredir_check:
            usbredir_check(args, unix_path)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            print("%.1f MiB/s" % res["mib_per_s"], flush=True)
        rc = 0
    except Failure as e:
        log("FAIL:", e)
    finally:
        if peer is not None and peer.alive():
            peer.proc.kill()
            peer.proc.wait()
        if ep is not None:
            ep.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
