#!/usr/bin/env python3
"""scripts/bench: vmcrelay against the peers people use today, side by side.

Same client (vmcload run), same endpoint (vmcload endpoint), same run.
See perf/README.md for the method; `scripts/bench --help` for the knobs.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import procs  # noqa: E402
import report  # noqa: E402
import tlsbench  # noqa: E402
import flood  # noqa: E402
from procs import BenchError  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MIB = 1024 * 1024
GIB = 1024 * MIB

# The three bulk/latency workloads share one set of endpoints.
WORKLOADS = {
    "W1": dict(title="bulk 64 KiB messages client → endpoint, 1 channel", mode="up", size="64K", ep="sink"),
    "W2": dict(title="bulk 64 KiB messages endpoint → client, 1 channel", mode="down", size="64K", ep="source"),
    "W3": dict(title="64 B request/response round trips (closed loop), 1 channel", mode="rr", size="64", ep="echo"),
}
# T1/T2: W1/W2 over TLS (scripts/bench-lib/tlsbench.py), same phase code.
WORKLOADS.update(tlsbench.TLS_WORKLOADS)
ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "H1", "T1", "T2", "TH")
W4_TITLE = "many channels at a moderate rate each, 64 KiB messages client → endpoint"
W5_TITLE = "link set-up with a ticket (session + channel)"
H1_TITLE = ("half-open flood: 10,000 connections (--quick: 2,000; 250 per source address, half silent, half 8 bytes of a link header) "
            "re-opened as the relay closes them, a healthy channel and 10 fresh sessions meanwhile (default limits)")
W6_TITLE = "idle scale: V VMs × C idle `echo:` channels (+ V mains) linked and held open; relay RSS per idle channel"
# W6 sizes: (VMs, user channels per VM); connections = VMs × (channels + 1).
W6_SIZES = {"small": (40, 24), "large": (400, 24)}
# W6 stops linking (SIGINT to vmcload) when MemAvailable falls below this, so a
# relay that needs more memory than the machine has is measured up to there,
# not killed by the OOM killer with everything else on the machine.
W6_MEM_RESERVE_GIB = 6.0
# max-conns-per-worker for W6 at most: the relay's default (connections hold
# no registered buffer of their own since 2026-12-03; before, 8192 was the
# most it could start with: 2 per connection, 16384 per io_uring).
W6_MAX_CONNS_PER_WORKER = 16384
# RLIMIT_NOFILE the bench asks for (soft and hard, when allowed): the relay
# uses ≈4.2 descriptors per `echo:` channel connection (client socket, the
# endpoint's socket pair, ...), so 10,000 connections need ≈42,000; with this
# machine's default hard limit of 20,000 W6 large stopped at 4,796 with EMFILE
# (2026-12-07). The relay's default max-conns (16384 per worker × 2 fds) then
# fits too.
W6_NOFILE = 65536 + 1024
# vmcrelay's channels for W1–W3: one per endpoint mode.
RELAY_CHANNEL = {"sink": "usbredir:0", "source": "usbredir:1", "echo": "usbredir:2"}
# Offered aggregate load in W4, bytes/s, above what the best contender carries
# with one channel, so the figure is capacity with many channels, not pacing.
W4_OFFERED = 4096 * 1024 * 1024  # 4 GiB/s in total, 4 MiB/s per channel at N = 1000
W4_SIZE = 64 * 1024
# W4 clients join in batches, one vmcload process and channel type 128+k each.
W4_BATCH = 100


def log(msg):
    el = time.monotonic() - T0
    print(f"[{el:6.1f} s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


# ---------------------------------------------------------------- endpoints


class Endpoint:
    """A `vmcload endpoint --unix-listen` (sink verifies the pattern)."""

    def __init__(self, ctx, name, mode, verify):
        self.ctx, self.mode = ctx, mode
        self.path = os.path.join(ctx.work, f"{name}.sock")
        self.json_path = os.path.join(ctx.work, f"{name}.ep.json")
        self.log = os.path.join(ctx.logs, f"{name}.ep.log")
        argv = [ctx.vmcload, "endpoint", "--unix-listen", self.path, "--mode", mode, "--json", self.json_path, "-q"]
        if verify:
            argv.append("--verify")
        if mode == "source":
            argv += ["--size", "64K"]
        self.proc = procs.spawn(argv, log_path=self.log)
        procs.wait_until(lambda: procs.unix_listening(self.path), 10, f"endpoint {name}", self.proc, self.log)

    def figures(self):
        try:
            with open(self.json_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def closed(self):
        return self.figures().get("connections_closed", 0)

    def mismatches(self):
        return self.figures().get("mismatches", 0)

    def wait_closed(self, n, timeout=3.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.closed() < n:
            time.sleep(0.05)

    def stop(self):
        procs.stop(self.proc)


# ---------------------------------------------------------------- contenders


class Contender:
    key = ""
    name = ""
    kind = ""
    pid = None  # the process whose CPU and RSS are measured (None: no relay)

    def start(self, ctx, eps):
        """Starts what lives through W1–W3 (eps: endpoint mode → Endpoint)."""

    def target(self, ctx, wl, ep):
        """(vmcload target args, measured pid) for one run; may start a process."""
        raise NotImplementedError

    def after_run(self):
        """Called after each run (the peer stops here)."""

    def stop(self):
        pass


class Relay(Contender):
    kind = "vmcrelay"

    def __init__(self, data_path, workers, nproc):
        self.data_path, self.workers = data_path, workers
        wname = "1w" if workers == 1 else "all" if workers == nproc else f"{workers}w"
        self.key = f"relay-{data_path}-{wname}"
        self.name = f"vmcrelay {data_path} {'1 worker' if workers == 1 else f'{workers} workers'}"
        self.proc = None
        self.extra = ()

    def launch(self, ctx, channels, tag, password_file=None, max_conns=None, config=None, extra=()):
        """Starts `vmcrelay serve`; channels: list of KIND[:ID]=ENDPOINT, or a
        config file (whose service listens on self.port) plus flag overrides."""
        if not config:
            self.port = procs.free_port()
        self.log = os.path.join(ctx.logs, f"{self.key}.{tag}.log")
        argv = [ctx.vmcrelay, "serve", "--workers", self.workers, "--data-path", self.data_path, *extra, *self.extra]
        if config:
            argv += ["--config", config]
        else:
            argv += ["--listen", f"127.0.0.1:{self.port}", "--name", self.key]
            argv += ["--password-file", password_file] if password_file else ["--disable-ticketing"]
        if max_conns:
            argv += ["--max-conns", max_conns]
        for c in channels:
            argv += ["--channel", c]
        self.proc = procs.spawn(argv, log_path=self.log)
        ready = lambda: procs.tcp_listening(self.port) and b"ready workers=" in _read(self.log)  # noqa: E731
        procs.wait_until(ready, 30, f"{self.name} ({tag})", self.proc, self.log)
        self.pid = self.proc.pid

    def start(self, ctx, eps):
        chans = [f"{RELAY_CHANNEL[m]}=unix:{ep.path}" for m, ep in eps.items()]
        self.launch(ctx, chans, "w123")

    def target(self, ctx, wl, ep):
        return ["--uri", f"spice://127.0.0.1:{self.port}", "--channel", RELAY_CHANNEL[ep.mode]], self.pid

    def stop(self):
        if self.proc:
            procs.stop(self.proc, timeout=5)
            self.proc = None


class Peer(Contender):
    """benches/peers/spice_vmc_peer (libspice-server), fresh for every run:
    it keeps one endpoint connection across clients, and the endpoint checks
    the pattern from offset 0 per connection."""

    key, name, kind = "libspice", "libspice-server 0.15.1 (peer)", "peer"

    def launch(self, ctx, ep, tag, password_file=None):
        self.port = procs.free_port()
        self.log = os.path.join(ctx.logs, f"libspice.{tag}.log")
        argv = [ctx.peer, "--port", self.port, "--kind", "usbredir", "--unix", ep.path, "--die-with-parent"]
        argv += ["--password-file", password_file] if password_file else ["--disable-ticketing"]
        self.proc = procs.spawn(argv, log_path=self.log)
        procs.wait_until(lambda: procs.tcp_listening(self.port), 10, f"peer ({tag})", self.proc, self.log)
        self.pid = self.proc.pid

    def target(self, ctx, wl, ep):
        self.launch(ctx, ep, wl)
        return ["--uri", f"spice://127.0.0.1:{self.port}", "--channel", "usbredir:0"], self.pid

    def after_run(self):
        self.stop()

    def stop(self):
        if getattr(self, "proc", None):
            procs.stop(self.proc)
            self.proc = None


class Socat(Contender):
    """socat -b 65536 TCP-LISTEN,fork ↔ UNIX-CONNECT: raw bytes, no SPICE."""

    key, name, kind = "socat", "socat -b 65536 (raw TCP↔unix)", "socat"

    def launch(self, ctx, ep, tag):
        port = procs.free_port()
        log = os.path.join(ctx.logs, f"socat.{tag}.log")
        argv = ["socat", "-b", "65536", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"]
        argv.append(f"UNIX-CONNECT:{ep.path}")
        p = procs.spawn(argv, log_path=log)
        procs.wait_until(lambda: procs.tcp_listening(port), 10, f"socat ({tag})", p, log)
        return port, p

    def start(self, ctx, eps):
        self.by_mode = {m: self.launch(ctx, ep, m) for m, ep in eps.items()}

    def target(self, ctx, wl, ep):
        port, p = self.by_mode[ep.mode]
        self.pid = p.pid
        return ["--raw-tcp", f"127.0.0.1:{port}"], p.pid

    def stop(self):
        for _, p in getattr(self, "by_mode", {}).values():
            procs.stop(p)
        self.by_mode = {}


class Direct(Contender):
    key, name, kind = "direct", "direct (no relay: client → unix endpoint)", "direct"

    def target(self, ctx, wl, ep):
        return ["--raw-unix", ep.path], None


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


# ---------------------------------------------------------------- one run


def load_run(ctx, target_args, mode, size, extra, tag, timeout):
    """Runs `vmcload run`; returns its JSON report (or raises)."""
    jpath = os.path.join(ctx.work, f"run.{tag}.json")
    if os.path.exists(jpath):
        os.remove(jpath)
    argv = [ctx.vmcload, "run", *target_args, "--mode", mode, "--size", size, "--json", jpath, "-q", *extra]
    rc, out = procs.run(argv, timeout=timeout, log_path=os.path.join(ctx.logs, f"run.{tag}.log"))
    try:
        with open(jpath) as fh:
            rep = json.load(fh)
    except (OSError, ValueError):
        raise BenchError(f"vmcload run exited {rc} without a JSON report{procs.tail(os.path.join(ctx.logs, f'run.{tag}.log'))}")
    rep["_rc"] = rc
    return rep


def measure(ctx, pid, fn, settle_children=False, rss_period=0.2):
    """Runs fn() while measuring pid: CPU ticks before/after, peak RSS (VmHWM reset first)."""
    t0 = c0 = None
    if pid:
        procs.reset_hwm(pid)
        c0 = procs.tree_cpu_ticks(pid)
    sampler = procs.RssSampler(pid, rss_period) if pid else None
    if sampler:
        sampler.__enter__()
    try:
        t0 = time.monotonic()
        rep = fn()
        wall = time.monotonic() - t0
        if pid and settle_children:
            # socat's per-connection children: their CPU is in cutime/cstime once reaped.
            deadline = time.monotonic() + 3.0
            while procs.children(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    cpu_s = rss_mib = None
    if pid:
        c1 = procs.tree_cpu_ticks(pid)
        if c0 is not None and c1 is not None:
            cpu_s = (c1 - c0) / procs.CLK_TCK
        rss_mib = round(sampler.peak_kib / 1024, 1)
    return rep, cpu_s, rss_mib, wall


def moved_bytes(rep):
    mode = rep["params"]["mode"]
    if mode == "up":
        return rep["bytes_sent"]
    if mode == "down":
        return rep["bytes_received"]
    return rep["bytes_sent"] + rep["bytes_received"]


def summarize_run(rep, cpu_s, rss_mib, ep=None, ep_closed_before=None):
    moved = moved_bytes(rep)
    rec = {
        "ok": bool(rep.get("ok")) and rep.get("_rc") == 0,
        "throughput_mib_s": rep.get("throughput_mib_s"),
        "msgs_per_s": rep.get("msgs_per_s"),
        "bytes_moved": moved,
        "elapsed_s": rep.get("elapsed_s"),
        "cpu_s": cpu_s,
        "cpu_s_per_gib": round(cpu_s / (moved / GIB), 4) if cpu_s is not None and moved else None,
        "rss_mib": rss_mib,
        "latency_us": rep.get("latency_us"),
        "setup_us": rep.get("setup_us"),
        "connections_ok": rep.get("connections_ok"),
        "errors": rep.get("errors"),
        "integrity": rep.get("integrity"),
        "error_messages": rep.get("error_messages", [])[:3],
    }
    lat = rep.get("latency_us")
    if cpu_s is not None and lat and lat.get("count"):
        rec["cpu_us_per_round_trip"] = round(cpu_s * 1e6 / lat["count"], 2)
    if ep is not None and ep.mode == "sink":
        ep.wait_closed((ep_closed_before or 0) + rep.get("connections_ok", 1))
        bad = ep.mismatches()
        rec["endpoint_mismatches"] = bad
        if bad:
            rec["ok"] = False
            rec["error_messages"].append(f"endpoint saw {bad} mismatching connection(s)")
        if rec["integrity"] == "sender-only" and rec["ok"]:
            rec["integrity"] = "ok (endpoint verified)"
    return rec


def median_of(runs):
    """Median of every numeric figure over the runs that succeeded."""
    good = [r for r in runs if r.get("ok")] or runs
    out = {"runs": len(runs), "ok_runs": sum(1 for r in runs if r.get("ok"))}

    def med(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return round(statistics.median(vals), 4) if vals else None

    for k in ("throughput_mib_s", "msgs_per_s", "cpu_s_per_gib", "cpu_us_per_round_trip", "rss_mib", "elapsed_s"):
        out[k] = med([r.get(k) for r in good])
    tp = [r.get("throughput_mib_s") for r in good if isinstance(r.get("throughput_mib_s"), (int, float))]
    if tp:
        out["throughput_min_max"] = [min(tp), max(tp)]
    lats = [r["latency_us"] for r in good if r.get("latency_us")]
    if lats:
        out["latency_us"] = {k: med([l[k] for l in lats]) for k in ("min", "mean", "p50", "p90", "p99", "p999", "max")}
        out["latency_us"]["count"] = sum(l["count"] for l in lats)
    sets = [r["setup_us"] for r in good if r.get("setup_us") and r["setup_us"].get("count")]
    if sets:
        out["setup_us"] = {k: med([s[k] for s in sets]) for k in ("p50", "p99", "max")}
    errs = [m for r in runs for m in r.get("error_messages", [])]
    if errs:
        out["errors"] = errs[:3]
    return out


# ---------------------------------------------------------------- phases


class Budget:
    def __init__(self, seconds):
        self.deadline = time.monotonic() + seconds

    def left(self):
        return self.deadline - time.monotonic()

    def allows(self, est):
        return self.left() > est


def phase_w123(ctx, contenders, wls, results, budget):
    """W1–W3: every contender against the same three endpoints, interleaved."""
    eps = {}
    modes = sorted({WORKLOADS[w]["ep"] for w in wls})
    for m in modes:
        eps[m] = Endpoint(ctx, f"w123-{m}", m, verify=(m == "sink"))
    started = []
    try:
        for c in contenders:
            try:
                c.start(ctx, eps)
                started.append(c)
            except BenchError as e:
                log(f"{c.name}: cannot start: {e}")
                for w in wls:
                    results[w][c.key] = {"runs": [], "skipped": f"start failed: {e}"}
        secs = ctx.seconds
        for r in range(ctx.runs):
            for w in wls:
                spec = WORKLOADS[w]
                ep = eps[spec["ep"]]
                order = started[r % len(started) :] + started[: r % len(started)] if started else []
                for c in order:
                    cell = results[w].setdefault(c.key, {"runs": []})
                    if not budget.allows(secs + 4):
                        cell.setdefault("skipped", "time budget")
                        continue
                    tag = f"{w}.{c.key}.{r}"
                    try:
                        targs, pid = c.target(ctx, w, ep)
                        before = ep.closed()
                        fn = lambda: load_run(  # noqa: E731
                            ctx, targs, spec["mode"], spec["size"], ["--duration", f"{secs}s"], tag, secs + 40
                        )
                        rep, cpu_s, rss, _ = measure(ctx, pid, fn, settle_children=(c.kind == "socat"))
                        rec = summarize_run(rep, cpu_s, rss, ep, before)
                    except BenchError as e:
                        rec = {"ok": False, "error_messages": [str(e)]}
                    finally:
                        c.after_run()
                    cell["runs"].append(rec)
                    log(f"{w} {c.name} run {r + 1}/{ctx.runs}: {report.brief(w, rec)}")
    finally:
        for c in contenders:
            c.stop()
        for ep in eps.values():
            ep.stop()
    for w in wls:
        for key, cell in results[w].items():
            if cell.get("runs"):
                cell["median"] = median_of(cell["runs"])


class _Done(Exception):
    """Ends a W4 step early with its record already made."""


def _w4_toml(ctx, c, specs, ep):
    """A config file for W4: 1000 channels, and a link timeout long enough for
    the single RSA key thread to serve a batch of new clients."""
    path = os.path.join(ctx.work, f"w4-{c.key}.toml")
    with open(path, "w") as fh:
        fh.write("[relay]\nlink-timeout-secs = 120\n\n[[service]]\n")
        fh.write(f'name = "{c.key}"\nlisten = ["127.0.0.1:{c.port}"]\ndisable-ticketing = true\nchannels = [\n')
        for t, i in specs:
            fh.write(f'  "{t}:{i}=unix:{ep.path}",\n')
        fh.write("]\n")
    return path


def _threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _tcp_rx(port):
    """Sum of bytes_received over established TCP sockets with local port `port`
    (the relay's side of every client connection), from `ss -tin`."""
    rc, out = procs.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], timeout=20)
    total = 0
    for tok in out.split():
        if tok.startswith("bytes_received:"):
            total += int(tok.split(":", 1)[1])
    return total


def _sent_by_json(loads):
    """Sum of bytes_sent and of per-batch MiB/s from the batches' JSON reports."""
    total, rate = 0, 0.0
    for _, jpath in loads:
        try:
            with open(jpath) as fh:
                j = json.load(fh)
            total += j.get("bytes_sent", 0)
            rate += j.get("sent_mib_s", 0.0)
        except (OSError, ValueError):
            pass
    return total, rate


def phase_w4(ctx, contenders, results, budget):
    """W4: N channels at a paced rate each. Clients join in batches of W4_BATCH
    (one vmcload process per batch, each on its own channel type 128+k), so
    every link finishes within vmcload's fixed 10 s channel-link timeout
    while vmcrelay's one key thread makes ~2N RSA keys. Once all N stream,
    the window: bytes the relay's TCP sockets received (`ss -tin`
    bytes_received, summed) per second, relay CPU over the window; peak RSS
    over the whole phase. direct has no relay socket and nothing to link:
    one vmcload with all N connections, its own aggregate MiB/s."""
    n = ctx.w4_conns
    batch = min(W4_BATCH, n)
    nb = (n + batch - 1) // batch
    rate = round(W4_OFFERED / n / W4_SIZE, 3)
    win = ctx.w4_seconds
    results["W4_params"] = {"connections": n, "batch": batch, "size": W4_SIZE, "rate_per_connection": rate,
                            "window_s": win, "offered_mib_s": round(n * rate * W4_SIZE / MIB, 1)}
    specs = [(128 + k, i) for k in range(nb) for i in range(min(batch, n - k * batch))]
    for c in contenders:
        cell = results["W4"].setdefault(c.key, {"runs": []})
        if c.kind == "peer":
            cell["skipped"] = "n/a: spice-server serves one client and the peer one channel"
            continue
        # vmcrelay links at one RSA key per link (~15-25 ms each here): 2N keys.
        est = win + 10 + (2 * n * 0.03 if c.kind == "vmcrelay" else nb * 0.5)
        if not budget.allows(est):
            cell["skipped"] = "time budget"
            log(f"W4 {c.name}: skipped (time budget)")
            continue
        ep = Endpoint(ctx, f"w4-{c.key}", "sink", verify=True)
        proc, loads = None, []
        rec = {"ok": False, "error_messages": []}
        try:
            pid = None
            if c.kind == "vmcrelay":
                c.port = procs.free_port()
                cfg = _w4_toml(ctx, c, specs, ep)
                # A batch links 100 sessions at once, all from 127.0.0.1: above
                # the default per-address link-stage cap, which would evict them.
                c.launch(ctx, [], "w4", max_conns=2 * n + 64, config=cfg, extra=W5_BURST_EXTRA)
                pid = c.pid
            elif c.kind == "socat":
                port, proc = c.launch(ctx, ep, "w4")
                pid = proc.pid
            sampler = procs.RssSampler(pid, 0.5) if pid else None
            if sampler:
                procs.reset_hwm(pid)
                sampler.__enter__()
            t_ramp = time.monotonic()
            base = _threads(ep.proc.pid)
            if c.kind == "direct":
                # No relay, nothing to link: one vmcload with every connection,
                # its own aggregate MiB/s over the run is the figure.
                extra = ["--connections", n, "--rate", rate, "--duration", f"{win}s", "--connect-timeout", 60]
                rep = load_run(ctx, ["--raw-unix", ep.path], "up", W4_SIZE, [str(x) for x in extra],
                               f"W4.{c.key}", win + 120)
                rec = summarize_run(rep, None, None, ep, 0)
                rec.update({"linked": (rep.get("setup_us") or {}).get("count"), "ramp_s": None, "window_s": rep.get("elapsed_s"),
                            "measured_by": "vmcload's aggregate over one run of every connection",
                            "offered_mib_s": results["W4_params"]["offered_mib_s"]})
                nb = 0  # skip the batches below
            for k in range(nb):
                m = min(batch, n - k * batch)
                if c.kind == "vmcrelay":
                    targs = ["--uri", f"spice://127.0.0.1:{c.port}", "--channel", f"{128 + k}:0-{m - 1}"]
                elif c.kind == "socat":
                    targs = ["--raw-tcp", f"127.0.0.1:{port}"]
                else:
                    targs = ["--raw-unix", ep.path]
                jpath = os.path.join(ctx.work, f"run.W4.{c.key}.{k}.json")
                argv = [ctx.vmcload, "run", *targs, "--connections", m, "--mode", "up", "--size", W4_SIZE,
                        "--rate", rate, "--duration", "900s", "--connect-timeout", 60, "--json", jpath, "-q"]
                p = procs.spawn(argv, log_path=os.path.join(ctx.logs, f"run.W4.{c.key}.{k}.log"))
                loads.append((p, jpath))
                want = base + sum(min(batch, n - j * batch) for j in range(k + 1))
                procs.wait_until(lambda: _threads(ep.proc.pid) >= want, 120,
                                 f"W4 {c.name}: batch {k + 1}/{nb} linked ({_threads(ep.proc.pid) - base} of {want - base} "
                                 "endpoint connections)", p, os.path.join(ctx.logs, f"run.W4.{c.key}.{k}.log"))
            ramp_s = time.monotonic() - t_ramp
            if c.kind == "direct":
                raise _Done()
            time.sleep(1.0)  # the last batch's gate opens once all its links are up
            lport = c.port if c.kind == "vmcrelay" else port if c.kind == "socat" else None
            c0 = procs.tree_cpu_ticks(pid) if pid else None
            r0, t0 = (_tcp_rx(lport) if lport else 0), time.monotonic()
            time.sleep(win)
            r1, t1 = (_tcp_rx(lport) if lport else 0), time.monotonic()
            c1 = procs.tree_cpu_ticks(pid) if pid else None
            for p, _ in loads:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGINT)
            for p, _ in loads:
                try:
                    p.wait(timeout=15)
                except Exception:  # noqa: BLE001
                    procs.stop(p, sig=signal.SIGKILL)
            if sampler:
                sampler.__exit__(None, None, None)
            moved, window = r1 - r0, t1 - t0
            if not lport:
                moved, mib_s = _sent_by_json(loads)
                window = moved / MIB / mib_s if mib_s else window
            cpu_s = (c1 - c0) / procs.CLK_TCK if c0 is not None and c1 is not None else None
            errs, linked, stopped_late = [], 0, 0
            for k, (p, jpath) in enumerate(loads):
                try:
                    with open(jpath) as fh:
                        j = json.load(fh)
                    linked += (j.get("setup_us") or {}).get("count", 0)
                    msgs = j.get("error_messages", [])
                    # After SIGINT vmcload gives its threads 2 s; a sender blocked in
                    # write() behind megabytes of socket buffer (the offered load is
                    # above capacity) needs longer. Its bytes still arrive and are
                    # verified by the endpoint: a late stop, not a failure.
                    late = [m for m in msgs if "did not finish" in m]
                    for m in late:
                        try:
                            stopped_late += int(m.split()[0])
                        except ValueError:
                            stopped_late += 1
                    real = [m for m in msgs if m not in late]
                    if real or j.get("mismatch") or j.get("timed_out"):
                        errs += [f"batch {k}: {e}" for e in real[:2]] or [f"batch {k}: mismatch or timeout"]
                except (OSError, ValueError):
                    errs.append(f"batch {k}: no JSON report (exit {p.returncode})")
            # Connections still draining at the stop are missing from vmcload's
            # set-up figures; the endpoint saw all n before the window opened.
            linked = n
            rec = {
                "ok": not errs,
                "stopped_late": stopped_late,
                "throughput_mib_s": round(moved / MIB / window, 1) if window else None,
                "bytes_moved": moved,
                "window_s": round(window, 2),
                "measured_by": "ss -tin bytes_received on the relay's port" if lport else "sum of the batches' sent MiB/s",
                "ramp_s": round(ramp_s, 1),
                "linked": linked,
                "cpu_s": cpu_s,
                "cpu_s_per_gib": round(cpu_s / (moved / GIB), 4) if cpu_s is not None and moved else None,
                "rss_mib": round(sampler.peak_kib / 1024, 1) if sampler else None,
                "offered_mib_s": results["W4_params"]["offered_mib_s"],
                "error_messages": errs[:4],
            }
        except _Done:
            pass
        except BenchError as e:
            rec["error_messages"].append(str(e))
            if c.kind == "vmcrelay":
                rec["error_messages"].append("relay log: " + procs.tail(c.log, 4))
        finally:
            for p, _ in loads:
                procs.stop(p, timeout=2)
            if c.kind == "vmcrelay":
                c.stop()
            if proc:
                procs.stop(proc)
            ep.stop()
        if rec.get("throughput_mib_s") is not None:
            bad = ep.mismatches()
            if bad:
                rec["ok"] = False
                rec["error_messages"].append(f"endpoint saw {bad} mismatching connection(s)")
            rec["integrity"] = "ok (endpoint verified)" if not bad else "MISMATCH"
        cell["runs"].append(rec)
        cell["median"] = median_of(cell["runs"])
        cell["median"]["linked"] = rec.get("linked")
        cell["median"]["ramp_s"] = rec.get("ramp_s")
        log(f"W4 {c.name}: {report.brief('W4', rec)}; linked {rec.get('linked')} in {rec.get('ramp_s')} s")


def phase_w5(ctx, contenders, results, budget):
    """Link set-up with a ticket: a tight loop of one-connection runs (same method
    for every SPICE server), plus K concurrent connections for vmcrelay."""
    pw = os.path.join(ctx.work, "ticket.pass")
    with open(pw, "w") as fh:
        fh.write("bench-secret\n")
    secs, k = ctx.w5_seconds, ctx.w5_conc
    results["W5_params"] = {"loop_seconds": secs, "concurrent_connections": k}
    for c in contenders:
        cell = results["W5"].setdefault(c.key, {"runs": []})
        if c.kind in ("socat", "direct"):
            cell["skipped"] = "n/a: no SPICE link, no ticket"
            continue
        if not budget.allows(secs + 6):
            cell["skipped"] = "time budget"
            continue
        ep = Endpoint(ctx, f"w5-{c.key}", "echo", verify=False)
        try:
            if c.kind == "vmcrelay":
                chans = [f"usbredir:0=unix:{ep.path}"] + [f"128:{i}=unix:{ep.path}" for i in range(k)]
                c.launch(ctx, chans, "w5", password_file=pw, max_conns=2 * k + 64)
                targs = ["--uri", f"spice://127.0.0.1:{c.port}", "--channel", "usbredir:0"]
            else:
                c.launch(ctx, ep, "w5", password_file=pw)
                targs = ["--uri", f"spice://127.0.0.1:{c.port}", "--channel", "usbredir:0"]
            pid = c.pid
            extra = ["--password-file", pw, "--bytes", "64", "--connect-timeout", "10", "--timeout", "20"]
            loop = {"ok": 0, "failed": 0, "setup_p50_us": []}

            def seq():
                end = time.monotonic() + secs
                i = 0
                while time.monotonic() < end:
                    try:
                        rep = load_run(ctx, targs, "rr", "64", extra, f"W5.{c.key}.{i % 4}", 30)
                        if rep.get("ok") and rep.get("_rc") == 0:
                            loop["ok"] += 1
                            loop["setup_p50_us"].append(rep["setup_us"]["p50"])
                        else:
                            loop["failed"] += 1
                            loop.setdefault("errors", rep.get("error_messages", [])[:2])
                    except BenchError as e:
                        loop["failed"] += 1
                        loop.setdefault("errors", [str(e)])
                    i += 1

            _, cpu_s, rss, wall = measure(ctx, pid, seq)
            rec = {
                "ok": loop["ok"] > 0 and loop["failed"] == 0,
                "links_per_s": round(loop["ok"] / wall, 2),
                "connections": loop["ok"],
                "failed": loop["failed"],
                "setup_p50_ms": round(statistics.median(loop["setup_p50_us"]) / 1000, 2) if loop["ok"] else None,
                "cpu_ms_per_link": round(cpu_s * 1000 / loop["ok"], 2) if cpu_s is not None and loop["ok"] else None,
                "rss_mib": rss,
                "error_messages": loop.get("errors", []),
            }
            if c.kind == "vmcrelay" and k > 0 and budget.allows(k * 0.06 + 5):
                time.sleep(1.0)  # let the key pool refill, as between bursts in real life
                targs_k = ["--uri", f"spice://127.0.0.1:{c.port}", "--channel", f"128:0-{k - 1}"]
                extra_k = ["--connections", str(k), "--password-file", pw, "--bytes", "64",
                           "--connect-timeout", "60", "--timeout", "120"]
                try:
                    rep, cpu_k, _, _ = measure(ctx, pid, lambda: load_run(ctx, targs_k, "rr", "64", extra_k, f"W5k.{c.key}", 180))
                    st = rep.get("setup_us") or {}
                    if st.get("count"):
                        rec["concurrent"] = {
                            "connections": k,
                            "linked": st["count"],
                            "links_per_s": round(st["count"] / (st["max"] / 1e6), 1),
                            "setup_p50_ms": round(st["p50"] / 1000, 1),
                            "setup_max_ms": round(st["max"] / 1000, 1),
                            "cpu_ms_per_link": round(cpu_k * 1000 / st["count"], 2) if cpu_k is not None else None,
                            "ok": bool(rep.get("ok")),
                        }
                except BenchError as e:
                    rec["concurrent"] = {"ok": False, "error": str(e)}
        except BenchError as e:
            rec = {"ok": False, "error_messages": [str(e)]}
        finally:
            c.stop()
            ep.stop()
        cell["runs"].append(rec)
        cell["median"] = rec
        log(f"W5 {c.name}: {report.brief('W5', rec)}")
    # The burst row: the default relay (all workers, copy), after the loops.
    bc = next((c for c in contenders if c.kind == "vmcrelay" and c.workers == ctx.nproc and not c.extra
               and c.data_path == "copy"), None) or next((c for c in contenders if c.kind == "vmcrelay" and not c.extra), None)
    if bc is not None:
        if budget.allows(30):
            results["W5_burst"] = w5_burst(ctx, bc, pw, budget)
            lp = ((results["W5"].get("libspice") or {}).get("median") or {}).get("links_per_s")
            b = results["W5_burst"]
            if lp and b.get("sessions_per_s"):
                b["x_libspice_loop"] = round(b["sessions_per_s"] / lp, 1)
            log(f"W5 burst: {report.brief('W5_burst', b)}")
        else:
            results["W5_burst"] = {"ok": False, "skipped": "time budget"}


W5_BURST_SESSIONS = 100
W5_BURST_RUNS = 3
# 100 sessions from 127.0.0.1 at once: over the default per-address link-stage
# cap (32 per worker; vmcload run cannot bind other source addresses), so the
# burst row raises it and says so.
W5_BURST_EXTRA = ("--max-link-stage-per-addr", "256")


def _key_pool(port):
    m = flood.fetch_metrics(port)
    keys = [v for k, v in m.items() if k.startswith("vmcrelay_key_pool_keys{")]
    return keys, m.get("vmcrelay_key_pool_capacity")


def w5_burst(ctx, c, pw, budget):
    """100 sessions (main + one `128:N=echo:` channel each = 200 ticketed links)
    at once against a relay whose key pool is full (waited for via /metrics
    before each burst): burst links/s = 200 / slowest set-up."""
    n = W5_BURST_SESSIONS
    mport = procs.free_port()
    chans = [f"128:{i}=echo:" for i in range(n)]
    extra = (*W5_BURST_EXTRA, "--metrics", f"127.0.0.1:{mport}")
    rec = {"ok": False, "sessions": n, "links_wanted": 2 * n, "contender": c.key,
           "knobs": " ".join(W5_BURST_EXTRA) + " (else defaults: --key-pool 128 per worker, --key-threads one per core)",
           "runs": [], "error_messages": []}
    try:
        c.launch(ctx, chans, "w5burst", password_file=pw, extra=extra)
        pid = c.pid
        targs = ["--uri", f"spice://127.0.0.1:{c.port}", "--channel", f"128:0-{n - 1}"]
        largs = ["--connections", str(n), "--password-file", pw, "--bytes", "64",
                 "--connect-timeout", "30", "--timeout", "90"]
        rec["command"] = (f"vmcrelay serve --workers {c.workers} --password-file F {' '.join(W5_BURST_EXTRA)} "
                          f"--channel 128:0=echo: ... --channel 128:{n - 1}=echo:; then vmcload run --uri "
                          f"spice://127.0.0.1:PORT --channel 128:0-{n - 1} --connections {n} --mode rr --size 64 "
                          f"--bytes 64 --password-file F")
        for i in range(W5_BURST_RUNS):
            if not budget.allows(20):
                rec["error_messages"].append("time budget")
                break
            t0 = time.monotonic()
            keys, cap = [], None
            while time.monotonic() - t0 < 60:
                try:
                    keys, cap = _key_pool(mport)
                except OSError:
                    keys, cap = [], None
                if keys and cap and all(k >= cap for k in keys):
                    break
                time.sleep(0.2)
            run = {"pool_wait_s": round(time.monotonic() - t0, 2), "pool_keys_before": keys, "pool_capacity": cap}
            before = flood.fetch_metrics(mport)
            rep, cpu_s, _, _ = measure(ctx, pid, lambda: load_run(ctx, targs, "rr", "64", largs, f"W5b.{i}", 120))
            after = flood.fetch_metrics(mport)

            def delta(fam, res):
                k = f'{fam}{{service="{c.key}",channel="main",result="{res}"}}'
                return int(after.get(k, 0) - before.get(k, 0))

            chan_ok = sum(int(v - before.get(k, 0)) for k, v in after.items()
                          if k.startswith("vmcrelay_links_total{") and 'result="ok"' in k and 'channel="main"' not in k)
            st = rep.get("setup_us") or {}
            run.update({
                "ok": bool(rep.get("ok")) and rep.get("_rc") == 0 and st.get("count") == n,
                "sessions_linked": st.get("count"),
                "relay_main_links_ok": delta("vmcrelay_links_total", "ok"),
                "relay_channel_links_ok": chan_ok,
                "setup_p50_ms": round(st["p50"] / 1000, 1) if st.get("count") else None,
                "setup_max_ms": round(st["max"] / 1000, 1) if st.get("count") else None,
                "links_per_s": round(2 * st["count"] / (st["max"] / 1e6), 1) if st.get("count") else None,
                "sessions_per_s": round(st["count"] / (st["max"] / 1e6), 1) if st.get("count") else None,
                "relay_cpu_ms_per_link": round(cpu_s * 1000 / (2 * st["count"]), 2) if cpu_s is not None and st.get("count") else None,
                "pool_keys_after": [v for k, v in after.items() if k.startswith("vmcrelay_key_pool_keys{")],
                "evicted": int(sum(v - before.get(k, 0) for k, v in after.items()
                                   if k.startswith("vmcrelay_worker_links_evicted_total"))),
                "errors": rep.get("error_messages", [])[:3],
            })
            rec["runs"].append(run)
            log(f"W5 burst {i + 1}: {run['sessions_linked']} sessions, set-up p50 {run['setup_p50_ms']} ms "
                f"max {run['setup_max_ms']} ms = {run['links_per_s']} links/s; pool {keys} of {cap} before "
                f"(waited {run['pool_wait_s']} s), {run['pool_keys_after']} after; relay saw {run['relay_main_links_ok']} "
                f"main + {run['relay_channel_links_ok']} channel links")
    except BenchError as e:
        rec["error_messages"].append(str(e))
    finally:
        c.stop()
    good = [r for r in rec["runs"] if r.get("ok")]
    if good:
        med = sorted(good, key=lambda r: r["setup_max_ms"])[len(good) // 2]
        rec.update({k: med[k] for k in ("setup_p50_ms", "setup_max_ms", "links_per_s", "sessions_per_s",
                                        "relay_cpu_ms_per_link")})
        rec["ok"] = len(good) == len(rec["runs"])
    return rec


def phase_iperf(ctx, results, budget):
    if not budget.allows(ctx.seconds + 4):
        results["iperf3"] = {"skipped": "time budget"}
        return
    port = procs.free_port()
    log_path = os.path.join(ctx.logs, "iperf3.log")
    srv = procs.spawn(["iperf3", "-s", "-1", "-p", port, "-B", "127.0.0.1"], log_path=log_path)
    try:
        procs.wait_until(lambda: procs.tcp_listening(port), 10, "iperf3 -s", srv, log_path)
        secs = max(2, int(round(ctx.seconds)))
        rc, out = procs.run(["iperf3", "-c", "127.0.0.1", "-p", port, "-t", secs, "-J"], timeout=secs + 20)
        j = json.loads(out)
        bps = j["end"]["sum_received"]["bits_per_second"]
        results["iperf3"] = {"ok": rc == 0, "throughput_mib_s": round(bps / 8 / MIB, 1), "gbit_s": round(bps / 1e9, 2),
                             "seconds": secs}
        log(f"iperf3: {bps / 8 / MIB:.0f} MiB/s")
    except (BenchError, ValueError, KeyError) as e:
        results["iperf3"] = {"ok": False, "error": str(e)}
    finally:
        procs.stop(srv)


# ---------------------------------------------------------------- W6


def _meminfo_kib(field):
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _nofile_limit(pid):
    """(soft, hard) 'Max open files' of pid, from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    f = line.split()
                    return [int(x) if x.isdigit() else x for x in f[3:5]]
    except OSError:
        pass
    return None


def _fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _snapshot(pid):
    """What the relay holds right now: VmRSS and its parts, page tables, threads, fds."""
    snap = {k: procs.status_kib(pid, f) for k, f in (("rss_kib", "VmRSS"), ("rss_anon_kib", "RssAnon"),
                                                      ("rss_file_kib", "RssFile"), ("pte_kib", "VmPTE"),
                                                      ("hwm_kib", "VmHWM"), ("threads", "Threads"))}
    snap["fds"] = _fd_count(pid)
    snap["mem_available_kib"] = _meminfo_kib("MemAvailable")
    snap["t"] = round(time.monotonic() - T0, 2)
    return snap


def _smaps_top(pid, top=6):
    """Resident memory by mapping shape: groups of (size, name) summed over
    /proc/PID/smaps, largest Rss first (thread stacks, the buffer arena and
    the heap each show up as their own group)."""
    groups = {}
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            cur = None
            for line in fh:
                parts = line.split()
                if not parts:
                    continue
                if "-" in parts[0] and not parts[0].endswith(":"):
                    name = parts[5] if len(parts) > 5 else "[anon]"
                    cur = [name, 0, 0]
                elif parts[0] == "Size:" and cur is not None:
                    cur[1] = int(parts[1])
                elif parts[0] == "Rss:" and cur is not None:
                    key = (cur[1], os.path.basename(cur[0]))
                    g = groups.setdefault(key, [0, 0])
                    g[0] += 1
                    g[1] += int(parts[1])
    except OSError:
        return []
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"mappings": n, "size_kib_each": size, "name": name, "rss_mib": round(rss / 1024, 1)}
            for (size, name), (n, rss) in rows]


# What stops a relay from holding more: log needles → a short name.
_W6_LOG_NEEDLES = [
    ("EMFILE", ("Too many open files", "os error 24")),
    ("ENFILE", ("os error 23",)),
    ("ENOMEM", ("Cannot allocate memory", "os error 12", "out of memory")),
    ("connection table full", ("connection table full",)),
    ("EAGAIN (threads?)", ("Resource temporarily unavailable", "os error 11")),
]


def _relay_log_problems(path, keep=8):
    """The relay's WARN/ERROR lines grouped by message (digits folded, so one
    line per kind), in order of first appearance, with counts; and which
    resource each kind ran out of. Streams the file: a relay that spins on
    an error can write hundreds of MB."""
    import re

    digits = re.compile(r"[0-9]+")
    kinds = {}
    total = 0
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                if b" WARN " not in raw and b" ERROR " not in raw:
                    continue
                total += 1
                line = raw.decode(errors="replace").strip()
                msg = line.split(" ", 1)[-1]
                key = digits.sub("#", msg)[:160]
                k = kinds.get(key)
                if k is None:
                    if len(kinds) >= 200:
                        continue
                    res = next((n for n, needles in _W6_LOG_NEEDLES if any(x in line for x in needles)), None)
                    k = kinds[key] = {"count": 0, "first": line[:300], "exhausted": res}
                k["count"] += 1
    except OSError:
        pass
    groups = list(kinds.values())
    return {"warn_lines": total, "kinds": groups[:keep],
            "exhausted": [g for g in groups if g["exhausted"]][:keep]}


def _w6_toml(ctx, key, ports, channels, max_conns, endpoint="echo:"):
    path = os.path.join(ctx.work, f"w6-{key}-{len(ports)}.toml")
    chans = ", ".join(f'"128:{i}={endpoint}"' for i in range(channels))
    with open(path, "w") as fh:
        fh.write(f"[relay]\nmax-conns-per-worker = {max_conns}\n" if max_conns else "[relay]\n")
        for v, port in enumerate(ports):
            fh.write(f'\n[[service]]\nname = "vm{v}"\nlisten = ["127.0.0.1:{port}"]\ndisable-ticketing = true\n'
                     f"channels = [{chans}]\n")
    return path


def _read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def w6_size(ctx, c, label, vms, channels, budget):
    """One W6 size: V services (VMs) with C `echo:` channels each, one
    `vmcload idle` session per VM. RSS/fds/threads of the relay before
    linking, once every link is made (vmcload's `holding` report) and at the
    end of the hold; per idle connection = (linked − before) / connections
    held. A memory guard stops linking (SIGINT to vmcload) if MemAvailable
    drops under the reserve; what the relay logged about running out of
    fds, memory or slots is reported as the reason it could not hold more."""
    conns = vms * (channels + 1)
    # Default settings: the relay's own max-conns (16384 per worker) holds both
    # sizes; only a bigger W6 would need the knob.
    max_conns = None if conns + 64 <= W6_MAX_CONNS_PER_WORKER else W6_MAX_CONNS_PER_WORKER
    rec = {"ok": False, "label": label, "vms": vms, "channels_per_vm": channels, "connections_wanted": conns,
           "channels_wanted": vms * channels, "max_conns_per_worker": max_conns, "hold_s": ctx.w6_hold,
           "concurrency": ctx.w6_conc, "error_messages": []}
    if max_conns is not None and max_conns < conns + 64:
        rec["note"] = (f"max-conns-per-worker capped at {max_conns}; "
                       f"{c.workers} workers share the connections by SO_REUSEPORT")
    reserve_kib = int(ctx.w6_reserve_gib * 1024 * 1024)
    ports = [procs.free_port() for _ in range(vms)]
    ep = None
    if ctx.w6_endpoint == "unix":
        # One `vmcload endpoint --mode echo` process for every channel (a thread
        # per connection there): the relay's side of each endpoint is one socket.
        ep = Endpoint(ctx, f"w6-{label}-echo", "echo", verify=False)
        rec["endpoint"] = f"unix:{ep.path} (vmcload endpoint --mode echo)"
        cfg = _w6_toml(ctx, c.key, ports, channels, max_conns, f"unix:{ep.path}")
    else:
        rec["endpoint"] = "echo: (built in)"
        cfg = _w6_toml(ctx, c.key, ports, channels, max_conns)
    c.port = ports[0]
    jpath = os.path.join(ctx.work, f"w6-{label}.json")
    llog = os.path.join(ctx.logs, f"w6-{label}.vmcload.log")
    load = None
    try:
        try:
            c.launch(ctx, [], f"w6-{label}", config=cfg)
        except BenchError as e:
            rec["error_messages"].append(f"relay did not start: {e}")
            rec["stopped_by"] = "relay start"
            return rec
        pid = c.pid
        # The last service's listener too (workers bind in turn).
        procs.wait_until(lambda: procs.tcp_listening(ports[-1]), 30, f"W6 {label}: relay listening on all ports",
                         c.proc, c.log)
        time.sleep(0.5)
        rec["relay_nofile"] = _nofile_limit(pid)
        before = _snapshot(pid)
        rec["before"] = before
        argv = [ctx.vmcload, "idle", "--target", ",".join(f"127.0.0.1:{p}" for p in ports), "--channels", channels,
                "--concurrency", ctx.w6_conc, "--hold", ctx.w6_hold, "--max-failed", ctx.w6_max_failed,
                "--echo-sample", 64, "--json", jpath]
        rec["command"] = "vmcload idle --target 127.0.0.1:P1,...,P%d --channels %d --concurrency %s --hold %s " \
                         "--max-failed %s --echo-sample 64" % (vms, channels, ctx.w6_conc, ctx.w6_hold, ctx.w6_max_failed)
        t_link = time.monotonic()
        load = procs.spawn(argv, log_path=llog)
        rec["vmcload_pid"] = load.pid
        peak = dict(before)
        linked = None
        guard = None
        deadline = time.monotonic() + ctx.w6_timeout
        rep = None
        while True:
            if load.poll() is not None:
                break
            if time.monotonic() > deadline:
                rec["error_messages"].append(f"vmcload idle did not finish within {ctx.w6_timeout:.0f} s")
                procs.stop(load, timeout=5, sig=signal.SIGINT)
                break
            if c.proc.poll() is not None:
                rec["error_messages"].append(f"relay exited with {c.proc.returncode} while linking/holding")
                rec["stopped_by"] = f"relay exited ({c.proc.returncode}){procs.tail(c.log, 3)}"
                break
            snap = _snapshot(pid)
            if (snap.get("rss_kib") or 0) > (peak.get("rss_kib") or 0):
                peak = snap
            j = _read_json(jpath)
            if linked is None and j and j.get("phase") == "holding":
                linked = snap
                linked["link_wall_s"] = round(time.monotonic() - t_link, 2)
                rec["smaps_top_linked"] = _smaps_top(pid)
                log(f"W6 {label}: linked {j.get('links_ok')}/{j.get('links_wanted')} in {j.get('link_elapsed_s')} s; "
                    f"relay RSS {(snap.get('rss_kib') or 0) / 1024:,.0f} MiB, {snap.get('fds')} fds, "
                    f"{snap.get('threads')} threads; holding {ctx.w6_hold} s")
            if linked is None and guard is None and (snap.get("mem_available_kib") or reserve_kib) < reserve_kib:
                guard = snap
                rec["stopped_by"] = (f"bench memory guard: MemAvailable {snap['mem_available_kib'] / 1048576:.1f} GiB "
                                     f"< reserve {ctx.w6_reserve_gib} GiB with relay RSS "
                                     f"{(snap.get('rss_kib') or 0) / 1048576:.1f} GiB; linking stopped (SIGINT to vmcload)")
                log(f"W6 {label}: {rec['stopped_by']}")
                try:
                    os.kill(load.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            if linked is not None and "after_hold" not in rec and \
                    time.monotonic() - t_link - linked["link_wall_s"] >= max(0.0, float(ctx.w6_hold) - 0.5):
                rec["after_hold"] = snap
            time.sleep(0.2)
        try:
            load.wait(timeout=60)
        except Exception:  # noqa: BLE001
            procs.stop(load, timeout=2)
        rec["vmcload_rc"] = load.returncode
        rep = _read_json(jpath)
        rec["peak"] = peak
        rec["linked"] = linked or guard
        if rep is None:
            rec["error_messages"].append(f"vmcload idle exited {load.returncode} without a report{procs.tail(llog)}")
        else:
            held = rep.get("links_ok") or 0
            rec.update({
                "phase": rep.get("phase"),
                "links_ok": held, "links_failed": rep.get("links_failed"), "links_wanted": rep.get("links_wanted"),
                "channels_linked": rep.get("channels_linked"), "sessions_linked": rep.get("sessions_linked"),
                "link_elapsed_s": rep.get("link_elapsed_s"), "links_per_s": rep.get("links_per_s"),
                "session_link_ms": {k: round((rep.get("session_link_us") or {}).get(k, 0) / 1000, 1)
                                    for k in ("p50", "p99", "max")},
                "held_s": rep.get("held_s"), "sessions_closed": rep.get("sessions_closed"),
                "channels_closed": rep.get("channels_closed"), "echo": {k: (rep.get("echo") or {}).get(k)
                                                                        for k in ("sampled", "ok", "failed", "errors")},
                "interrupted": rep.get("interrupted"), "gave_up": rep.get("gave_up"),
                "client_fd_limit": (rep.get("fd_limit") or {}).get("note"),
                "link_errors": (rep.get("errors") or [])[:5],
            })
            at = rec["linked"]
            if at and before.get("rss_kib") is not None and at.get("rss_kib") is not None and held:
                d = at["rss_kib"] - before["rss_kib"]
                rec["rss_delta_mib"] = round(d / 1024, 1)
                rec["rss_kib_per_connection"] = round(d / held, 1)
                if rep.get("channels_linked"):
                    rec["rss_kib_per_channel"] = round(d / rep["channels_linked"], 1)
                if at.get("fds") is not None and before.get("fds") is not None:
                    rec["fds_per_connection"] = round((at["fds"] - before["fds"]) / held, 2)
                if at.get("threads") is not None and before.get("threads") is not None:
                    rec["threads_per_connection"] = round((at["threads"] - before["threads"]) / held, 2)
            ah = rec.get("after_hold")
            if ah and before.get("rss_kib") is not None and held:
                rec["rss_kib_per_connection_after_hold"] = round((ah["rss_kib"] - before["rss_kib"]) / held, 1)
                if rep.get("channels_linked"):
                    rec["rss_kib_per_channel_after_hold"] = round((ah["rss_kib"] - before["rss_kib"]) / rep["channels_linked"], 1)
            rec["ok"] = bool(rep.get("ok")) and load.returncode == 0 and not rec.get("stopped_by")
            if not rep.get("ok"):
                rec["error_messages"] += (rep.get("errors") or [])[:3] + ((rep.get("echo") or {}).get("errors") or [])[:2]
        # The log is complete once the relay is gone (and may keep growing until then).
        c.stop()
        problems = _relay_log_problems(c.log)
        rec["relay_log"] = problems
        if not rec.get("stopped_by") and rec.get("links_ok") is not None and rec["links_ok"] < conns:
            ex = problems["exhausted"]
            if ex:
                rec["stopped_by"] = "relay: " + "; then ".join(
                    f"{g['exhausted']} ×{g['count']:,} (first: {g['first'].split(' ', 1)[-1][:160]})" for g in ex[:3])
            elif rec.get("link_errors"):
                rec["stopped_by"] = f"client: {rec['link_errors'][0]}"
            else:
                rec["stopped_by"] = "unknown (see the relay log and vmcload log)"
        return rec
    except BenchError as e:
        rec["error_messages"].append(str(e))
        return rec
    finally:
        if load is not None and load.poll() is None:
            procs.stop(load, timeout=5, sig=signal.SIGINT)
        c.stop()
        if ep is not None:
            ep.stop()


def phase_w6(ctx, results, budget, nproc):
    """W6: idle scale with the relay's default settings (all workers, copy
    path), max-conns-per-worker raised to hold every connection."""
    c = Relay("copy", nproc, nproc)
    sizes = ["small"] if ctx.quick else ["small", "large"]
    if ctx.w6_sizes:
        sizes = ctx.w6_sizes
    results["W6_params"] = {"sizes": {s: {"vms": W6_SIZES[s][0], "channels_per_vm": W6_SIZES[s][1],
                                          "connections": W6_SIZES[s][0] * (W6_SIZES[s][1] + 1)} for s in sizes},
                            "hold_s": ctx.w6_hold, "concurrency": ctx.w6_conc, "endpoint": ctx.w6_endpoint, "mem_reserve_gib": ctx.w6_reserve_gib,
                            "bench_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
                            "mem_total_kib": _meminfo_kib("MemTotal"), "contender": c.key}
    cell = results["W6"].setdefault(c.key, {"runs": []})
    for label in sizes:
        vms, ch = W6_SIZES[label]
        est = 10 + ctx.w6_hold + vms * (ch + 1) / 100.0
        if not budget.allows(est):
            cell["runs"].append({"ok": False, "label": label, "skipped": "time budget"})
            log(f"W6 {label}: skipped (time budget)")
            continue
        log(f"W6 {label}: {vms} VMs × {ch} channels + {vms} mains = {vms * (ch + 1)} connections")
        rec = w6_size(ctx, c, label, vms, ch, budget)
        cell["runs"].append(rec)
        log(f"W6 {label}: {report.brief('W6', rec)}")
    cell["median"] = {"runs": len(cell["runs"]), "ok_runs": sum(1 for r in cell["runs"] if r.get("ok"))}
def phase_h1(ctx, results, budget, nproc):
    """H1: scripts/bench-lib/flood.py (issue 12's half-open flood at 10,000)."""
    cell = results["H1"].setdefault("relay-copy-all", {"runs": []})
    if not budget.allows(40):
        cell["skipped"] = "time budget"
        return
    n = 2000 if ctx.quick else 10000
    log(f"H1: {n} half-open connections from {n // 250} source addresses, healthy channel, 10 fresh sessions")
    try:
        rec = flood.run(ctx.vmcrelay, connections=n, per_addr=250, hold=3.0 if ctx.quick else 8.0, fresh=10,
                        reopen_rate=2000, workers=nproc, workdir=ctx.work, log=log)
    except Exception as e:  # noqa: BLE001
        rec = {"ok": False, "error": f"{type(e).__name__}: {e}", "error_messages": [str(e)]}
    rec["command"] = f"scripts/flood --connections {n} --workers {nproc}" + (" --hold 3" if ctx.quick else "")
    cell["runs"].append(rec)
    cell["median"] = rec
    log(f"H1: {flood.brief(rec)}")


def phase_tls(ctx, wls, keys, nproc, results, budget):
    """T1/T2 (W1/W2 over TLS, P-256 certificate) and TH (handshakes + link replies, P-256 and
    RSA-3072). Returns {key: name} of the TLS contenders and TH rows."""
    log("making certificates (openssl): P-256 and RSA-3072, QEMU x509-dir layout")
    p256 = tlsbench.make_x509(ctx, "p256", "p256")
    rsa = tlsbench.make_x509(ctx, "rsa3072", "rsa3072") if "TH" in wls else None
    want = (lambda k: k in keys) if keys else (lambda k: True)  # noqa: E731
    names = {}
    t12 = [w for w in ("T1", "T2") if w in wls]
    if t12:
        cs = [tlsbench.TlsRelay(1, nproc, p256)]
        if nproc > 1 and not ctx.quick:
            cs.append(tlsbench.TlsRelay(nproc, nproc, p256))
        cs.append(tlsbench.TlsPeer(p256))
        if ctx.stunnel:
            cs.append(tlsbench.Stunnel(p256))
        else:
            for w in t12:
                results[w]["stunnel"] = {"runs": [], "skipped": "stunnel not installed (scripts/install-peers)"}
        cs = [c for c in cs if want(c.key)]
        names.update({c.key: c.name for c in cs})
        names.setdefault("stunnel", tlsbench.Stunnel.name)
        phase_w123(ctx, cs, t12, results, budget)
    if "TH" in wls:
        pw = os.path.join(ctx.work, "th-ticket.pass")
        with open(pw, "w") as fh:
            fh.write("bench-secret\n")
        rows = []
        relay_ok, peer_ok = want("relay-tls-all") or want("relay-tls-1w"), want("libspice-tls")
        for cert, x509 in (("P-256", p256), ("RSA-3072", rsa)):
            for ticket in (False, True):
                if ticket and ctx.quick:
                    continue
                group = f"{cert}, {'password' if ticket else 'no ticket'}"
                tag = cert.lower().replace("-", "") + ("-pw" if ticket else "")
                pwf = pw if ticket else None
                if relay_ok:
                    rows.append((f"relay-tls-all-{tag}", f"vmcrelay TLS {nproc} workers",
                                 tlsbench.TlsRelay(nproc, nproc, x509, key=f"relay-tls-all-{tag}", password_file=pwf),
                                 x509, group))
                if peer_ok:
                    rows.append((f"libspice-tls-{tag}", "libspice-server 0.15.1 TLS (peer)",
                                 tlsbench.TlsPeer(x509, key=f"libspice-tls-{tag}", password_file=pwf), x509, group))
        names.update({k: f"{n} [{g}]" for k, n, _, _, g in rows})
        tlsbench.phase_th(ctx, rows, results, budget, log)
    return names


# ---------------------------------------------------------------- main


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rc, rev = procs.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], timeout=10)
    rc2, dirty = procs.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "src", "Cargo.toml"], timeout=10)
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "loadavg_start": os.getloadavg(),
        "revision": rev.strip() + ("+dirty" if dirty.strip() else ""),
        "pinning": "none: relay, vmcload client and endpoint share all vCPUs (scheduler decides)",
    }


def build(ctx, no_build):
    if not no_build:
        log("cargo build --release --bins")
        rc, out = procs.run(["cargo", "build", "--release", "--bins", "--quiet"], timeout=900, cwd=ROOT,
                            log_path=os.path.join(ctx.logs, "build.log"))
        if rc != 0:
            raise BenchError(f"cargo build failed{procs.tail(os.path.join(ctx.logs, 'build.log'), 15)}")
    # The libspice-server peer is not a cargo binary: built when missing or
    # older than its source, --no-build or not.
    src = os.path.join(ROOT, "benches/peers/spice_vmc_peer.c")
    if not os.path.exists(ctx.peer) or os.path.getmtime(ctx.peer) < os.path.getmtime(src):
        log("benches/peers/build.sh")
        rc, out = procs.run([os.path.join(ROOT, "benches/peers/build.sh")], timeout=300,
                            log_path=os.path.join(ctx.logs, "build.log"))
        if rc != 0:
            raise BenchError(f"benches/peers/build.sh failed{procs.tail(os.path.join(ctx.logs, 'build.log'), 15)}")
    for b in (ctx.vmcrelay, ctx.vmcload):
        if not os.access(b, os.X_OK):
            raise BenchError(f"{b} missing: run cargo build --release --bins")


def main():
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="vmcrelay vs libspice-server, socat, direct and iperf3: same client, same endpoint, same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Workloads: W1 up 64 KiB, W2 down 64 KiB, W3 64 B rr, W4 many channels, W5 link rate with a ticket,\n"
        "W6 idle scale (RSS per idle channel at 1,000 and 10,000 connections; --quick: 1,000 only),\n"
        "H1 half-open flood (10,000 connections re-opened as the relay closes them, from 127.0.0.2-41; a healthy\n"
        "channel from 127.0.0.100 and 10 fresh sessions from 127.0.0.101 meanwhile; also scripts/flood; --quick: 2,000),\n"
        "T1/T2 W1/W2 over TLS, TH TLS handshakes + link replies per second (P-256 and RSA-3072).\n"
        "Contenders: relay-copy-1w relay-copy-all relay-splice-1w relay-splice-all libspice socat direct iperf3;\n"
        "TLS: relay-tls-1w relay-tls-all libspice-tls stunnel.\n"
        "Method: perf/README.md. Results history: perf/RESULTS.md.",
    )
    ap.add_argument("--quick", action="store_true", help="1 run per cell, short runs, fewer W4 channels (< 2.5 min)")
    ap.add_argument("--json", metavar="FILE", help="write every figure (runs, medians, machine) as JSON")
    ap.add_argument("--only", metavar="W1,W3", help="workloads to run (default: all)")
    ap.add_argument("--contenders", metavar="K1,K2", help="contender keys to run (default: all)")
    ap.add_argument("--runs", type=int, help="runs per W1–W3 cell (median reported); default 3, quick 1")
    ap.add_argument("--seconds", type=float, help="seconds per W1–W3 run; default 5, quick 1.5")
    ap.add_argument("--w4-connections", type=int, help="W4 channels; default 1000, quick 100")
    ap.add_argument("--w6-sizes", metavar="small,large", help="W6 sizes (small: 40 VMs × 24, large: 400 × 24); "
                    "default both, quick small")
    ap.add_argument("--w6-hold", type=float, help="W6 seconds to hold the idle channels; default 10, quick 3")
    ap.add_argument("--w6-endpoint", choices=("echo", "unix"), default="echo",
                    help="W6 channels' endpoint: the relay's built-in echo: (default) or unix: to one vmcload echo endpoint")
    ap.add_argument("--w6-concurrency", type=int, default=8, help="W6 sessions linking at once (default 8)")
    ap.add_argument("--w6-mem-reserve-gib", type=float, default=W6_MEM_RESERVE_GIB,
                    help=f"W6 stops linking when MemAvailable drops below this (default {W6_MEM_RESERVE_GIB})")
    ap.add_argument("--budget", type=float, help="give up starting new steps after S seconds (default 960, quick 150)")
    ap.add_argument("--tls-budget", type=float,
                    help="the TLS rows' own budget, after the others (default 480, quick 60)")
    ap.add_argument("--th-seconds", type=float, help="seconds per TH loop; default 5, quick 1.5")
    ap.add_argument("--th-concurrency", type=int, default=4, help="concurrent client loops in TH (default 4)")
    ap.add_argument("--nofile", type=int, default=W6_NOFILE,
                    help=f"raise this process's RLIMIT_NOFILE, soft and hard, to N when allowed (root: as systemd's "
                    f"LimitNOFILE=), inherited by the relay and vmcload; W6 large needs ≈4.2 relay fds per connection "
                    f"(default {W6_NOFILE}; 0: leave it)")
    ap.add_argument("--no-build", action="store_true", help="use target/release binaries as they are")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, JSON of every run)")
    args = ap.parse_args()

    procs.install_cleanup()
    nproc = os.cpu_count() or 1
    nofile_before = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile_note = "left as it was"
    if args.nofile and args.nofile > nofile_before[1]:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
            nofile_note = f"raised from {nofile_before[0]}/{nofile_before[1]} to {args.nofile}/{args.nofile} (soft/hard)"
        except (ValueError, OSError) as e:
            nofile_note = f"could not raise from {nofile_before[0]}/{nofile_before[1]} to {args.nofile}: {e}"
    elif args.nofile and args.nofile > nofile_before[0]:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, nofile_before[1]))
        nofile_note = f"soft raised from {nofile_before[0]} to {args.nofile} (hard {nofile_before[1]})"

    class Ctx:
        pass

    ctx = Ctx()
    ctx.quick = args.quick
    ctx.nproc = nproc
    ctx.runs = args.runs or (1 if args.quick else 3)
    ctx.seconds = args.seconds or (1.5 if args.quick else 5.0)
    ctx.w4_conns = args.w4_connections or (100 if args.quick else 1000)
    ctx.w4_seconds = 3.0 if args.quick else 10.0
    ctx.w5_seconds = 2.0 if args.quick else 6.0
    ctx.w5_conc = 32 if args.quick else 100
    ctx.w6_hold = int(args.w6_hold) if args.w6_hold is not None else (3 if args.quick else 10)
    ctx.w6_conc = args.w6_concurrency
    ctx.w6_endpoint = args.w6_endpoint
    ctx.w6_reserve_gib = args.w6_mem_reserve_gib
    ctx.w6_max_failed = 48
    ctx.w6_timeout = 900
    ctx.w6_sizes = [x.strip() for x in args.w6_sizes.split(",") if x.strip()] if args.w6_sizes else None
    for x in ctx.w6_sizes or []:
        if x not in W6_SIZES:
            ap.error(f"unknown W6 size {x} (small, large)")
    ctx.th_seconds = args.th_seconds or (1.5 if args.quick else 5.0)
    ctx.th_conc = max(1, args.th_concurrency)
    budget = Budget(args.budget or (150 if args.quick else 960))
    import tempfile

    ctx.work = tempfile.mkdtemp(prefix="vmcbench.", dir="/tmp")
    ctx.logs = os.path.join(ctx.work, "logs")
    os.makedirs(ctx.logs)
    ctx.vmcrelay = os.path.join(ROOT, "target/release/vmcrelay")
    ctx.vmcload = os.path.join(ROOT, "target/release/vmcload")
    ctx.peer = os.path.join(ROOT, "target/peers/spice_vmc_peer")

    wls = [w.strip().upper() for w in (args.only or ",".join(ALL_WORKLOADS)).split(",") if w.strip()]
    for w in wls:
        if w not in ALL_WORKLOADS:
            ap.error(f"unknown workload {w}")
    ctx.stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    ctx.endpoint_cls = Endpoint

    all_c = [Relay("copy", 1, nproc), Relay("copy", nproc, nproc), Relay("splice", 1, nproc),
             Relay("splice", nproc, nproc), Peer(), Socat(), Direct()]
    if nproc == 1:
        all_c = [c for c in all_c if not (c.kind == "vmcrelay" and c.key.endswith("-all"))]
    keys = [k.strip() for k in args.contenders.split(",")] if args.contenders else None
    tls_keys = {"relay-tls-1w", "relay-tls-all", "libspice-tls", "stunnel"}
    if keys:
        unknown = set(keys) - {c.key for c in all_c} - {"iperf3"} - tls_keys
        if unknown:
            ap.error(f"unknown contender(s) {', '.join(sorted(unknown))}")
        contenders = [c for c in all_c if c.key in keys]
    else:
        contenders = all_c
    want_iperf = keys is None or "iperf3" in keys

    started = datetime.datetime.now().astimezone()
    res = {w: {} for w in ALL_WORKLOADS}
    tls_names = {}
    meta = {}
    rc = 0
    try:
        build(ctx, args.no_build)
        meta = machine()
        meta.update({"date": started.isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
                     "runs": ctx.runs, "seconds": ctx.seconds, "workdir": ctx.work,
                     "command": "scripts/bench " + " ".join(sys.argv[1:]), "nofile": nofile_note})
        log(f"RLIMIT_NOFILE {nofile_note}")
        log(f"work dir {ctx.work}; {meta['pinning']}")
        w123 = [w for w in ("W1", "W2", "W3") if w in wls]
        if w123:
            phase_w123(ctx, contenders, w123, res, budget)
        if "W1" in wls and want_iperf:
            phase_iperf(ctx, res, budget)
        if "W4" in wls:
            w4c = contenders
            if args.quick and not keys:
                w4c = [c for c in contenders if c.key in ("relay-copy-1w", "relay-copy-all", "socat", "direct")]
            phase_w4(ctx, w4c, res, budget)
        if "W5" in wls:
            w5c = list(contenders)
            if args.quick and not keys:
                w5c = [c for c in contenders if c.key in ("relay-copy-1w", "relay-copy-all", "libspice")]
            elif not keys:
                # Not a default: one RSA key serves 16 links (serve --key-reuse, trusted networks only).
                kr = Relay("copy", nproc, nproc)
                kr.key, kr.name, kr.extra = "relay-keyreuse16", f"vmcrelay copy {nproc} workers --key-reuse 16 (not default)", ("--key-reuse", "16")
                all_c.append(kr)
                w5c = w5c + [kr]
            phase_w5(ctx, w5c, res, budget)
        if "W6" in wls:
            phase_w6(ctx, res, budget, nproc)
        if "H1" in wls:
            phase_h1(ctx, res, budget, nproc)
        if any(w in wls for w in ("T1", "T2", "TH")):
            # Their own budget: a slow W4 on a busy machine must not skip them all.
            tls_budget = Budget(args.tls_budget or (60 if args.quick else 480))
            tls_names = phase_tls(ctx, wls, keys, nproc, res, tls_budget)
    except BenchError as e:
        log(f"error: {e}")
        rc = 1
    finally:
        procs.kill_all()
    meta["loadavg_end"] = os.getloadavg()
    meta["total_s"] = round(time.monotonic() - T0, 1)
    out = {"meta": meta, "contenders": {**{c.key: c.name for c in all_c}, **tls_names}, "titles": {
        **{w: WORKLOADS[w]["title"] for w in WORKLOADS}, "W4": W4_TITLE, "W5": W5_TITLE, "W6": W6_TITLE, "H1": H1_TITLE, "TH": tlsbench.TH_TITLE},
        "results": res}
    out["targets"] = report.targets(out)
    out["tls_targets"] = tlsbench.targets(res)
    md = report.markdown(out, [c.key for c in all_c])
    tls_md = tlsbench.markdown(out)
    if tls_md:
        md += "\n" + tls_md
    out["markdown"] = md
    print(md)
    outdir = os.path.join(ROOT, "perf", "out")
    os.makedirs(outdir, exist_ok=True)
    last = os.path.join(outdir, f"bench-{meta.get('mode', 'run')}.json")
    for path in [last] + ([args.json] if args.json else []):
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
    log(f"JSON written to {last}" + (f" and {args.json}" if args.json else ""))
    if res["W3"]:
        svg = os.path.join(outdir, f"latency-w3-{meta.get('mode', 'run')}.svg")
        try:
            rc_plot, _ = procs.run([sys.executable, os.path.join(ROOT, "perf", "plot"), last, "--out", svg], timeout=60)
            if rc_plot == 0:
                log(f"W3 latency plot: {svg}")
        except BenchError as e:
            log(f"perf/plot: {e}")
    if args.keep:
        log(f"kept {ctx.work}")
    else:

        shutil.rmtree(ctx.work, ignore_errors=True)
    bad = [f"{w} {k}" for w in ALL_WORKLOADS for k, cell in res[w].items()
           if cell.get("runs") and not all(r.get("ok") for r in cell["runs"])]
    if res.get("W5_burst") and not res["W5_burst"].get("ok"):
        bad.append("W5 burst")
    if bad:
        log(f"runs with errors: {', '.join(bad)}")
        rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
