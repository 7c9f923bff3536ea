"""Child processes, /proc readings and ports for scripts/bench and perf/*.

Every child is started in its own session with PR_SET_PDEATHSIG(SIGKILL),
and registered, so `kill_all()` (run on exit and on SIGINT/SIGTERM/SIGHUP)
and the kernel (if this interpreter is killed outright) end them all.
Nothing here waits without a deadline.
"""

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

_children = []  # Popen objects we started
_ports = set()  # ports handed out in this run
_lock = threading.Lock()


class BenchError(Exception):
    """A step failed; the message says which and why."""


def _pdeathsig():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def spawn(argv, log_path=None, stdout=None, env=None, cwd=None):
    """Starts argv in its own session; stderr (and stdout unless given) to log_path."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        p = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_pdeathsig,
            env=env,
            cwd=cwd,
        )
    finally:
        if log_path:
            log.close()
    with _lock:
        _children.append(p)
    return p


def stop(p, timeout=3.0, sig=signal.SIGTERM):
    """SIGTERM (to the process group), then SIGKILL after `timeout`. Returns the exit code."""
    if p is None:
        return None
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    with _lock:
        if p in _children:
            _children.remove(p)
    return p.returncode


def kill_all():
    """Ends every child still registered (process groups, SIGTERM then SIGKILL)."""
    with _lock:
        kids = list(_children)
    for p in kids:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + 2.0
    for p in kids:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    with _lock:
        _children.clear()


def install_cleanup():
    """kill_all() at exit and on SIGINT/SIGTERM/SIGHUP (then exit 130/143/129)."""
    atexit.register(kill_all)

    def handler(signum, _frame):
        kill_all()
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def run(argv, timeout, log_path=None, env=None, cwd=None):
    """Runs argv to completion within `timeout` s (killed after). Returns (rc, stdout text)."""
    p = spawn(argv, log_path=log_path, stdout=subprocess.PIPE, env=env, cwd=cwd)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p, timeout=1.0, sig=signal.SIGKILL)
        raise BenchError(f"{os.path.basename(str(argv[0]))} did not finish within {timeout:.0f} s")
    with _lock:
        if p in _children:
            _children.remove(p)
    return p.returncode, out.decode(errors="replace")


# ---------------------------------------------------------------- ports


def free_port():
    """A TCP port free on 127.0.0.1 right now (and not handed out before in this run)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports:
            _ports.add(port)
            return port
    raise BenchError("no free TCP port found")


def tcp_listening(port):
    """Whether something listens on TCP `port` (IPv4 or IPv6), from /proc/net/tcp*."""
    want = f":{port:04X}"
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(f) as fh:
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def unix_listening(path):
    """Whether a unix stream socket listens on `path`, from /proc/net/unix."""
    try:
        with open("/proc/net/unix") as fh:
            next(fh, None)
            for line in fh:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


def wait_until(cond, timeout, what, proc=None, log_path=None):
    """Polls cond() every 20 ms until true; fails if `proc` exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}{tail(log_path)}")
        time.sleep(0.02)
    raise BenchError(f"{what}: not ready after {timeout:.0f} s{tail(log_path)}")


def tail(path, n=6):
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        lines = fh.read().decode(errors="replace").splitlines()[-n:]
    return "\n    " + "\n    ".join(lines) if lines else ""


# ---------------------------------------------------------------- /proc


def cpu_ticks(pid):
    """utime+stime+cutime+cstime of pid in clock ticks (children count once reaped), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2 :].split()
    # after "pid (comm) ": state=f[0] ... utime=f[11] stime=f[12] cutime=f[13] cstime=f[14]
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])


def tree_cpu_ticks(pid):
    """cpu_ticks over pid and its live descendants: socat's per-connection
    children count while they run, and (via cutime) once reaped."""
    total = None
    for p in tree(pid):
        t = cpu_ticks(p)
        if t is not None:
            total = (total or 0) + t
    return total


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid):
    """Direct children of pid (all threads)."""
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/children") as fh:
                    out.extend(int(x) for x in fh.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree(pid):
    """pid and all its descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children(p))
    return seen


def pss_kib(pid):
    """Proportional set size of pid in KiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pid):
    """Resets VmHWM of pid and its descendants (`echo 5 > clear_refs`, Linux ≥ 4.0)."""
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass


class RssSampler:
    """Largest sum of VmHWM over a process tree, sampled every `period` s.

    One process (vmcrelay, the peer): its VmHWM. socat with `fork`: the
    largest sampled sum of Pss over the parent and every live child, so a
    thousand children count as the memory they hold together (shared
    libraries once).
    """

    def __init__(self, pid, period=0.2):
        self.pid, self.period = pid, period
        self.peak_kib = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        pids = tree(self.pid)
        if len(pids) == 1:
            v = status_kib(self.pid, "VmHWM") or 0
        else:
            # Several processes (socat fork): summing RSS would count the shared
            # libraries once per child; proportional set size counts them once.
            v = sum(pss_kib(p) for p in pids)
        self.peak_kib = max(self.peak_kib, v)

    def _loop(self):
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)
        self._sample()
        return False
