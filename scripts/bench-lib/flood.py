#!/usr/bin/env python3
"""H1: half-open flood at 10,000 connections against `vmcrelay serve` (issue 12).

Goal: with 10,000 half-open connections held, a fresh session links and
echoes within 1 s, <= 16 KiB relay RSS per half-open connection, no healthy
channel stalls > 1 s, default limits.

One relay, `vmcrelay serve --workers 2 --config F` with default limits and
two services that differ only in their port (the flood's and the healthy
channel's: a fresh session replaces the old session of its service as a
whole, as spice-server, so the healthy session lives on its own service;
both share the workers and their link-stage tables):
  flood   127.0.0.1:A  disable-ticketing, channels ["128:0=echo:"]
  steady  127.0.0.1:B  disable-ticketing, channels ["128:0=echo:"]

Processes (each its own, so that none is slowed by another's GIL):
  flood    N connections to A spread over source addresses 127.0.0.2 ...
           (N / per-addr of them), half send nothing, half the first 8 bytes
           of a SPICE link header ("REDQ" + major 2); every connection the relay
           closes is opened again (at most --reopen-rate per second), so ~N are
           held or being attempted all the time
  healthy  a session + channel 128:0 on B from 127.0.0.100, a 64 B echo
           round trip every 50 ms; max stall = longest gap between two
           completed round trips
  fresh    10 sessions on A from 127.0.0.101, one after the other: main link,
           channel 128:0, 64 KiB echoed back byte-exact; time from connect to
           the last echoed byte
Relay VmRSS before the flood (healthy linked) and during it (sampled every
0.2 s; per half-open from the median while held, before the fresh sessions,
whose echoes borrow data buffers); link-stage connections the relay
holds from /metrics (`vmcrelay_connections{stage="link"}`).

Python 3 stdlib only. Standalone: scripts/flood [--connections N] [--json F];
from scripts/bench as row H1 (--only H1).
"""

import argparse
import errno
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts", "soak-lib"))
import spice  # noqa: E402

HALF_HEADER = b"REDQ" + struct.pack("<I", 2)  # 8 of the 16 link header bytes


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fetch_metrics(port, timeout=2.0):
    """The relay's /metrics as {"family{labels}": value}; raises OSError."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            try:
                out[name] = float(val)
            except ValueError:
                pass
    return out


def metrics(port):
    """As fetch_metrics, {} when the relay does not answer."""
    try:
        return fetch_metrics(port)
    except OSError:
        return {}


def msum(m, prefix, must=""):
    return int(sum(v for k, v in m.items() if k.startswith(prefix) and must in k))


# ---------------------------------------------------------------- flood


def flood_proc(port, n, per_addr, first_addr, reopen_rate, stats, stop):
    """stats: mp.Array('q', 8): [connected_now, attempting_now, opened, closed_by_relay,
    connect_errors, peak_connected, ready(1 once all N were started), eaddr]"""
    raise_nofile()
    ep = select.epoll()
    socks = {}  # fd -> [sock, index, state] state 0 connecting, 1 connected
    never = list(range(n - 1, -1, -1))  # indexes not opened yet (first pass: as fast as possible)
    pending = []  # indexes the relay closed, re-opened at most reopen_rate per second
    nsrc = (n + per_addr - 1) // per_addr
    srcs = [f"127.0.0.{first_addr + i}" for i in range(nsrc)]
    connected = attempting = opened = closed = errors = peak = 0
    budget, last = 0.0, time.monotonic()
    started_all = False

    def open_one(i):
        nonlocal attempting, opened, errors
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((srcs[i // per_addr], 0))
            rc = s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            errors += 1
            return False
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            errors += 1
            return False
        socks[s.fileno()] = [s, i, 0]
        ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)
        attempting += 1
        opened += 1
        return True

    def drop(fd, was_connected):
        nonlocal connected, attempting, closed
        s, i, _ = socks.pop(fd)
        try:
            ep.unregister(fd)
        except OSError:
            pass
        s.close()
        if was_connected:
            connected -= 1
            closed += 1
        else:
            attempting -= 1
        pending.append(i)

    while not stop.is_set():
        now = time.monotonic()
        budget = min(float(reopen_rate) / 10, budget + (now - last) * reopen_rate)
        last = now
        k = 0
        while never and k < 500:
            i = never.pop()
            if not open_one(i):
                never.append(i)
                break
            k += 1
        if not never:
            started_all = True
        while pending and budget >= 1 and k < 500:
            i = pending.pop(0)
            if not open_one(i):
                pending.insert(0, i)
                break
            k += 1
            budget -= 1
        for fd, ev in ep.poll(0.02, 2048):
            ent = socks.get(fd)
            if ent is None:
                continue
            s, i, st = ent
            if st == 0:
                if ev & (select.EPOLLERR | select.EPOLLHUP):
                    errors += 1
                    drop(fd, False)
                    continue
                if ev & select.EPOLLOUT:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        errors += 1
                        drop(fd, False)
                        continue
                    ent[2] = 1
                    attempting -= 1
                    connected += 1
                    peak = max(peak, connected)
                    if i % 2:
                        try:
                            s.send(HALF_HEADER)
                        except OSError:
                            pass
                    ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                    continue
            if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    drop(fd, ent[2] == 1)
        stats[0], stats[1], stats[2], stats[3], stats[4], stats[5] = connected, attempting, opened, closed, errors, peak
        stats[6] = 1 if started_all else 0
    for fd in list(socks):
        socks[fd][0].close()


# ---------------------------------------------------------------- healthy channel


def healthy_proc(port, source, period, q, stop):
    out = {"ok": False, "round_trips": 0, "failures": 0, "max_stall_ms": None, "max_rtt_ms": None}
    try:
        sess = spice.Session(("127.0.0.1", port), b"", source=source, timeout=10)
        ch = sess.open(128, 0)
    except (spice.SpiceError, OSError) as e:
        out["error"] = f"link: {e}"
        q.put(out)
        return
    q.put({"linked": True})
    ch.sock.settimeout(5)
    rtts, last_ok, max_stall, seq = [], time.monotonic(), 0.0, 0
    while not stop.is_set():
        t0 = time.monotonic()
        payload = spice.pattern(7, seq * 64, 64)
        try:
            ch.send_data(payload)
            got = b""
            while len(got) < 64:
                m = ch.recv_msg()
                if m is None:
                    raise spice.SpiceError("channel closed")
                if m[0] == spice.MSG_DATA:
                    got += m[1]
            if got != payload:
                raise spice.SpiceError("echo mismatch")
            t1 = time.monotonic()
            rtts.append(t1 - t0)
            max_stall = max(max_stall, t1 - last_ok)
            last_ok = t1
            out["round_trips"] += 1
        except (OSError, spice.SpiceError) as e:
            out["failures"] += 1
            out.setdefault("errors", []).append(str(e))
            break
        seq += 1
        time.sleep(max(0.0, period - (time.monotonic() - t0)))
    max_stall = max(max_stall, time.monotonic() - last_ok) if out["failures"] else max_stall
    out.update({"ok": out["failures"] == 0 and out["round_trips"] > 0,
                "max_stall_ms": round(max_stall * 1000, 1),
                "max_rtt_ms": round(max(rtts) * 1000, 1) if rtts else None,
                "p50_rtt_ms": round(statistics.median(rtts) * 1000, 2) if rtts else None})
    ch.close()
    sess.close()
    q.put(out)


# ---------------------------------------------------------------- fresh sessions


def fresh_proc(port, source, count, size, gap, q):
    res = []
    for k in range(count):
        t0 = time.monotonic()
        r = {"ok": False}
        try:
            sess = spice.Session(("127.0.0.1", port), b"", source=source, timeout=10)
            try:
                ch = sess.open(128, 0, timeout=10)
                t_link = time.monotonic()
                ch.sock.settimeout(10)
                payload = spice.pattern(11 + k, 0, size)
                ch.send_data(payload)
                got = bytearray()
                while len(got) < size:
                    m = ch.recv_msg()
                    if m is None:
                        raise spice.SpiceError(f"channel closed after {len(got)} echoed bytes")
                    if m[0] == spice.MSG_DATA:
                        got += m[1]
                t1 = time.monotonic()
                r = {"ok": bytes(got) == payload, "link_ms": round((t_link - t0) * 1000, 1),
                     "total_ms": round((t1 - t0) * 1000, 1)}
                if not r["ok"]:
                    r["error"] = "echo mismatch"
                ch.close()
            finally:
                sess.close()
        except (OSError, spice.SpiceError) as e:
            r = {"ok": False, "error": str(e), "total_ms": round((time.monotonic() - t0) * 1000, 1)}
        res.append(r)
        time.sleep(gap)
    q.put(res)


# ---------------------------------------------------------------- driver


def run(vmcrelay, connections=10000, per_addr=250, hold=8.0, fresh=10, reopen_rate=2000, workers=2,
        workdir=None, log=print):
    raise_nofile()
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="vmcflood.")
    pa, pb, pm = free_port(), free_port(), free_port()
    cfg = os.path.join(workdir, "h1.toml")
    with open(cfg, "w") as fh:
        fh.write(f'[relay]\nmetrics = "127.0.0.1:{pm}"\n\n'
                 f'[[service]]\nname = "flood"\nlisten = ["127.0.0.1:{pa}"]\ndisable-ticketing = true\n'
                 'channels = ["128:0=echo:"]\n\n'
                 f'[[service]]\nname = "steady"\nlisten = ["127.0.0.1:{pb}"]\ndisable-ticketing = true\n'
                 'channels = ["128:0=echo:"]\n')
    rlog = os.path.join(workdir, "h1.relay.log")
    argv = [vmcrelay, "serve", "--workers", str(workers), "--config", cfg]
    rec = {"ok": False, "connections": connections, "per_addr": per_addr,
           "sources": f"127.0.0.2-127.0.0.{1 + (connections + per_addr - 1) // per_addr}",
           "command": " ".join(argv[1:3] + ["--config", "F"]) + " (services flood + steady, each "
           "disable-ticketing and 128:0=echo:; default limits)",
           "hold_s": hold, "reopen_rate_per_s": reopen_rate, "client_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}
    relay = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(rlog, "w"), start_new_session=True)
    stop = mp.Event()
    procs = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            try:
                socket.create_connection(("127.0.0.1", pb), timeout=1).close()
                if metrics(pm):
                    break
            except OSError:
                pass
            if relay.poll() is not None:
                raise RuntimeError(f"relay exited {relay.returncode}: {open(rlog).read()[-800:]}")
            time.sleep(0.1)
        pid = relay.pid
        hq = mp.Queue()
        h = mp.Process(target=healthy_proc, args=(pb, "127.0.0.100", 0.05, hq, stop), daemon=True)
        h.start()
        procs.append(h)
        first = hq.get(timeout=20)
        if not first.get("linked"):
            raise RuntimeError(f"healthy channel did not link: {first}")
        time.sleep(2.5)  # past the idle-buffer reclaim of the probes
        rec["relay_rss_before_kib"] = rss_kib(pid)
        rec["relay_fds_before"] = fd_count(pid)
        stats = mp.Array("q", 8, lock=False)
        f = mp.Process(target=flood_proc, args=(pa, connections, per_addr, 2, reopen_rate, stats, stop), daemon=True)
        f.start()
        procs.append(f)
        t_flood = time.monotonic()
        samples = []

        def sample():
            m = metrics(pm)
            s = {"t": round(time.monotonic() - t_flood, 2), "rss_kib": rss_kib(pid), "fds": fd_count(pid),
                 "client_connected": stats[0], "client_attempting": stats[1], "client_opened": stats[2],
                 "closed_by_relay": stats[3], "connect_errors": stats[4],
                 "relay_link_stage": msum(m, "vmcrelay_connections{", 'stage="link"'),
                 "relay_worker_connections": msum(m, "vmcrelay_worker_connections{"),
                 "relay_evicted": msum(m, "vmcrelay_worker_links_evicted_total{"),
                 "relay_rejected": msum(m, "vmcrelay_rejected_total{"),
                 "relay_link_timeouts": msum(m, "vmcrelay_rejected_total{", 'reason="link_timeout"')}
            samples.append(s)
            return s

        while not stats[6] and time.monotonic() - t_flood < 60:
            sample()
            time.sleep(0.2)
        rec["flood_all_started_s"] = round(time.monotonic() - t_flood, 2)
        s = sample()
        log(f"H1: {connections} flood connections started in {rec['flood_all_started_s']} s; client holds "
            f"{s['client_connected']} (+{s['client_attempting']} connecting), relay link stage {s['relay_link_stage']}, "
            f"RSS {s['rss_kib']} KiB")
        t_end = time.monotonic() + hold
        while time.monotonic() < t_end:
            sample()
            time.sleep(0.2)
        fq = mp.Queue()
        fr = mp.Process(target=fresh_proc, args=(pa, "127.0.0.101", fresh, 64 * 1024, 0.2, fq), daemon=True)
        t_fresh = time.monotonic()
        fr.start()
        procs.append(fr)
        fresh_res = None
        while fresh_res is None and time.monotonic() - t_fresh < 10 * fresh + 30:
            sample()
            try:
                fresh_res = fq.get(timeout=0.2)
            except Exception:  # noqa: BLE001 (queue.Empty)
                pass
        rec["fresh_started_s"] = round(t_fresh - t_flood, 2)
        for _ in range(5):
            sample()
            time.sleep(0.2)
        stop.set()
        hres = None
        try:
            hres = hq.get(timeout=10)
        except Exception:  # noqa: BLE001
            hres = {"ok": False, "error": "no report from the healthy channel"}
        f.join(10)
        rec["flood_s"] = round(time.monotonic() - t_flood, 1)
        time.sleep(3.0)  # flood gone: what stays resident (allocator high-water) vs what it held
        rec["relay_rss_after_kib"] = rss_kib(pid)
        held = [x for x in samples if x["t"] >= rec["flood_all_started_s"]]
        rss = [x["rss_kib"] for x in held if x["rss_kib"]]
        # Before the fresh sessions: their 64 KiB echoes borrow data buffers (256 KiB each).
        quiet = [x["rss_kib"] for x in held if x["rss_kib"] and x["t"] < rec["fresh_started_s"]]
        rec.update({
            "relay_rss_during_max_kib": max(rss) if rss else None,
            "relay_rss_during_median_kib": int(statistics.median(rss)) if rss else None,
            "relay_rss_held_kib": int(statistics.median(quiet)) if quiet else None,
            "client_held_median": int(statistics.median(x["client_connected"] for x in held)) if held else None,
            "client_held_min": min(x["client_connected"] for x in held) if held else None,
            "client_attempting_median": int(statistics.median(x["client_attempting"] for x in held)) if held else None,
            "client_opened_total": samples[-1]["client_opened"],
            "closed_by_relay_total": samples[-1]["closed_by_relay"],
            "connect_errors_total": samples[-1]["connect_errors"],
            "relay_link_stage_median": int(statistics.median(x["relay_link_stage"] for x in held)) if held else None,
            "relay_link_stage_max": max(x["relay_link_stage"] for x in held) if held else None,
            "relay_connections_max": max(x["relay_worker_connections"] for x in held) if held else None,
            "relay_fds_max": max((x["fds"] or 0) for x in held) if held else None,
            "relay_evicted_total": samples[-1]["relay_evicted"],
            "relay_rejected_total": samples[-1]["relay_rejected"],
            "relay_link_timeouts_total": samples[-1]["relay_link_timeouts"],
        })
        # RSS per half-open: the median while the flood is held, before the fresh sessions.
        d = (rec["relay_rss_held_kib"] or 0) - (rec["relay_rss_before_kib"] or 0)
        rec["relay_rss_delta_kib"] = d
        rec["relay_rss_delta_max_kib"] = (rec["relay_rss_during_max_kib"] or 0) - (rec["relay_rss_before_kib"] or 0)
        if rec["client_held_median"]:
            rec["rss_kib_per_client_held"] = round(d / rec["client_held_median"], 2)
        rec["rss_kib_per_attempted"] = round(d / connections, 2)
        if rec["relay_link_stage_median"]:
            rec["rss_kib_per_relay_held"] = round(d / rec["relay_link_stage_median"], 2)
        rec["healthy"] = hres
        ok_f = [x for x in (fresh_res or []) if x.get("ok")]
        tot = [x["total_ms"] for x in ok_f]
        rec["fresh"] = {"count": fresh, "ok": len(ok_f), "median_ms": round(statistics.median(tot), 1) if tot else None,
                        "max_ms": max(tot) if tot else None,
                        "link_median_ms": round(statistics.median(x["link_ms"] for x in ok_f), 1) if ok_f else None,
                        "runs": fresh_res}
        rec["samples"] = samples[::5]
        with open(rlog) as fh:
            lines = fh.read().splitlines()
        rec["relay_log_warnings"] = [ln for ln in lines if " WARN " in ln or " ERROR " in ln][:12]
        rec["relay_log_warning_count"] = sum(1 for ln in lines if " WARN " in ln or " ERROR " in ln)
        rec["relay_alive"] = relay.poll() is None
        rec["goals"] = {
            f"fresh session links + echoes 64 KiB within 1 s (all {fresh})": bool(tot) and len(ok_f) == fresh and max(tot) <= 1000,
            "<= 16 KiB relay RSS per half-open connection (client-held)": rec.get("rss_kib_per_client_held") is not None
            and rec["rss_kib_per_client_held"] <= 16,
            "healthy channel max stall <= 1 s": bool(hres and hres.get("ok")) and (hres.get("max_stall_ms") or 1e9) <= 1000,
            f"client holds >= 95 % of {connections} (median)": (rec.get("client_held_median") or 0) >= 0.95 * connections,
        }
        rec["ok"] = rec["relay_alive"] and bool(hres and hres.get("ok")) and len(ok_f) == fresh
        return rec
    finally:
        stop.set()
        for p in procs:
            p.join(3)
            if p.is_alive():
                p.kill()
        if relay.poll() is None:
            relay.terminate()
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
        rec["relay_log"] = rlog
        if own_dir:
            rec["workdir"] = workdir


def brief(rec):
    if not rec.get("relay_rss_before_kib"):
        return f"FAILED: {rec.get('error')}"
    fr, h = rec.get("fresh") or {}, rec.get("healthy") or {}
    return (f"client held {rec.get('client_held_median')} (min {rec.get('client_held_min')}, +{rec.get('client_attempting_median')} "
            f"connecting), relay link stage {rec.get('relay_link_stage_median')} (max {rec.get('relay_link_stage_max')}); "
            f"relay RSS {rec['relay_rss_before_kib'] / 1024:.1f} → {(rec.get('relay_rss_held_kib') or 0) / 1024:.1f} MiB held "
            f"(max {(rec.get('relay_rss_during_max_kib') or 0) / 1024:.1f} with the fresh sessions) = "
            f"{rec.get('rss_kib_per_client_held')} KiB per client-held connection ({rec.get('rss_kib_per_relay_held')} per relay-held, "
            f"{rec.get('rss_kib_per_attempted')} per flood connection attempted), {(rec.get('relay_rss_after_kib') or 0) / 1024:.1f} MiB 3 s after; "
            f"fresh sessions {fr.get('ok')}/{fr.get('count')} ok, median {fr.get('median_ms')} ms max {fr.get('max_ms')} ms; "
            f"healthy channel {h.get('round_trips')} round trips, max stall {h.get('max_stall_ms')} ms, max rtt {h.get('max_rtt_ms')} ms; "
            f"{rec.get('client_opened_total')} opened, {rec.get('closed_by_relay_total')} closed by the relay, "
            f"{rec.get('connect_errors_total')} connect errors")


def main():
    ap = argparse.ArgumentParser(prog="scripts/flood", description=__doc__.split("\n\n")[0],
                                 epilog="Method: perf/README.md (H1).")
    ap.add_argument("--vmcrelay", default=os.path.join(ROOT, "target/release/vmcrelay"))
    ap.add_argument("--connections", type=int, default=10000, help="half-open connections (default 10000)")
    ap.add_argument("--per-addr", type=int, default=250, help="connections per source address 127.0.0.2... (default 250)")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds the flood is held before the fresh sessions (default 8)")
    ap.add_argument("--fresh", type=int, default=10, help="fresh sessions, one after the other (default 10)")
    ap.add_argument("--reopen-rate", type=int, default=2000,
                    help="most re-opens per second of connections the relay closed (default 2000)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    rec = run(a.vmcrelay, a.connections, a.per_addr, a.hold, a.fresh, a.reopen_rate, a.workers,
              log=lambda m: print(m, file=sys.stderr))
    print(brief(rec))
    for k, v in rec.get("goals", {}).items():
        print(f"  {'MET    ' if v else 'NOT MET'} {k}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rec, fh, indent=1)
    return 0 if rec.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
