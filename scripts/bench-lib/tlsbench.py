"""TLS rows of scripts/bench: T1/T2 (W1/W2 over TLS) and TH (handshakes + link replies).

Contenders in front of the same endpoints, same run:
- vmcrelay serve --tls-listen --x509-dir (copy data path, 1 worker / all workers);
- benches/peers/spice_vmc_peer --tls-port --x509-dir (libspice-server 0.15.1, OpenSSL 3);
- stunnel (OpenSSL 3) TLS → the endpoint's unix socket: raw TLS relaying, no SPICE.
The client is vmcload (rustls 0.23, ring): `vmcload run --uri spice+tls://` or `--raw-tls` for
T1/T2, `vmcload handshake` for TH.

Certificates are made at bench time with the openssl CLI, in QEMU's x509-dir layout.
Python 3 stdlib only.
"""

import os
import time

import procs
from procs import BenchError

TLS_WORKLOADS = {
    "T1": dict(title="W1 over TLS: bulk 64 KiB messages client → endpoint, 1 channel", mode="up", size="64K", ep="sink"),
    "T2": dict(title="W2 over TLS: bulk 64 KiB messages endpoint → client, 1 channel", mode="down", size="64K", ep="source"),
}
TH_TITLE = "TLS handshake + SPICE link reply per second (fresh TCP connection, full handshake each time)"
RELAY_CHANNEL = {"sink": "usbredir:0", "source": "usbredir:1", "echo": "usbredir:2"}


# ---------------------------------------------------------------- certificates


def _openssl(args, cwd, log):
    rc, out = procs.run(["openssl", *args], timeout=60, cwd=cwd, log_path=log)
    if rc != 0:
        raise BenchError(f"openssl {' '.join(args[:3])} failed{procs.tail(log)}")


def make_x509(ctx, name, alg):
    """A CA and a server certificate for 127.0.0.1 (SAN IP), both of `alg`
    ("p256" or "rsa3072"), in QEMU's layout: DIR/ca-cert.pem, server-cert.pem, server-key.pem."""
    d = os.path.join(ctx.work, f"x509-{name}")
    os.makedirs(d, exist_ok=True)
    log = os.path.join(ctx.logs, f"openssl-{name}.log")
    if alg == "p256":
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    elif alg == "rsa3072":
        newkey = ["-newkey", "rsa:3072"]
    else:
        raise ValueError(alg)
    _openssl(["req", "-x509", *newkey, "-nodes", "-sha256", "-days", "2", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
              "-subj", f"/CN=vmcrelay bench CA {name}", "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d, log)
    _openssl(["req", *newkey, "-nodes", "-keyout", "server-key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1"], d, log)
    with open(os.path.join(d, "ext.cnf"), "w") as fh:
        fh.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n")
    _openssl(["x509", "-req", "-sha256", "-days", "2", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
              "-CAcreateserial", "-extfile", "ext.cnf", "-out", "server-cert.pem"], d, log)
    return d


def ca_of(x509):
    return os.path.join(x509, "ca-cert.pem")


# ---------------------------------------------------------------- contenders


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


class TlsRelay:
    """vmcrelay serve --tls-listen 127.0.0.1:P --x509-dir DIR (no plain listener)."""

    kind = "vmcrelay"

    def __init__(self, workers, nproc, x509, key=None, name=None, extra=(), password_file=None):
        self.workers, self.x509, self.extra, self.password_file = workers, x509, tuple(extra), password_file
        wname = "1w" if workers == 1 else "all" if workers == nproc else f"{workers}w"
        self.key = key or f"relay-tls-{wname}"
        self.name = name or f"vmcrelay TLS copy {'1 worker' if workers == 1 else f'{workers} workers'}"
        self.proc = self.pid = None

    def launch(self, ctx, channels, tag):
        self.port = procs.free_port()
        self.log = os.path.join(ctx.logs, f"{self.key}.{tag}.log")
        argv = [ctx.vmcrelay, "serve", "--workers", self.workers, "--data-path", "copy",
                "--tls-listen", f"127.0.0.1:{self.port}", "--x509-dir", self.x509, "--name", self.key, *self.extra]
        argv += ["--password-file", self.password_file] if self.password_file else ["--disable-ticketing"]
        for c in channels:
            argv += ["--channel", c]
        self.proc = procs.spawn(argv, log_path=self.log)
        ready = lambda: procs.tcp_listening(self.port) and b"ready workers=" in _read(self.log)  # noqa: E731
        procs.wait_until(ready, 30, f"{self.name} ({tag})", self.proc, self.log)
        self.pid = self.proc.pid

    def start(self, ctx, eps):
        self.launch(ctx, [f"{RELAY_CHANNEL[m]}=unix:{ep.path}" for m, ep in eps.items()], "t12")

    def target(self, ctx, wl, ep):
        return ["--uri", f"spice+tls://127.0.0.1:{self.port}", "--ca-file", ca_of(self.x509),
                "--channel", RELAY_CHANNEL[ep.mode]], self.pid

    def after_run(self):
        pass

    def stop(self):
        if self.proc:
            procs.stop(self.proc, timeout=5)
            self.proc = None


class TlsPeer:
    """spice_vmc_peer --tls-port T --x509-dir DIR (libspice-server with OpenSSL), fresh per run."""

    kind = "peer"

    def __init__(self, x509, key="libspice-tls", name="libspice-server 0.15.1 TLS (peer)", password_file=None):
        self.x509, self.key, self.name, self.password_file = x509, key, name, password_file
        self.proc = self.pid = None

    def launch(self, ctx, ep, tag):
        self.port = procs.free_port()
        self.log = os.path.join(ctx.logs, f"{self.key}.{tag}.log")
        argv = [ctx.peer, "--tls-port", self.port, "--x509-dir", self.x509, "--kind", "usbredir", "--unix", ep.path,
                "--die-with-parent"]
        argv += ["--password-file", self.password_file] if self.password_file else ["--disable-ticketing"]
        self.proc = procs.spawn(argv, log_path=self.log)
        procs.wait_until(lambda: procs.tcp_listening(self.port), 10, f"peer TLS ({tag})", self.proc, self.log)
        self.pid = self.proc.pid

    def start(self, ctx, eps):
        pass

    def target(self, ctx, wl, ep):
        self.launch(ctx, ep, wl)
        return ["--uri", f"spice+tls://127.0.0.1:{self.port}", "--ca-file", ca_of(self.x509),
                "--channel", "usbredir:0"], self.pid

    def after_run(self):
        self.stop()

    def stop(self):
        if self.proc:
            procs.stop(self.proc)
            self.proc = None


class Stunnel:
    """stunnel (OpenSSL) accept TLS on 127.0.0.1:P, connect to the endpoint's unix socket:
    raw bytes, no SPICE framing. One process with a thread per connection."""

    key, name, kind = "stunnel", "stunnel (TLS → unix, no SPICE)", "stunnel"

    def __init__(self, x509):
        self.x509 = x509
        self.by_mode = {}
        self.pid = None

    def launch(self, ctx, ep, tag):
        port = procs.free_port()
        conf = os.path.join(ctx.work, f"stunnel.{tag}.conf")
        log = os.path.join(ctx.logs, f"stunnel.{tag}.log")
        with open(conf, "w") as fh:
            fh.write("foreground = yes\npid =\ndebug = 4\n"
                     f"[bench-{tag}]\naccept = 127.0.0.1:{port}\nconnect = {ep.path}\n"
                     f"cert = {os.path.join(self.x509, 'server-cert.pem')}\n"
                     f"key = {os.path.join(self.x509, 'server-key.pem')}\n")
        p = procs.spawn([ctx.stunnel, conf], log_path=log)
        procs.wait_until(lambda: procs.tcp_listening(port), 10, f"stunnel ({tag})", p, log)
        return port, p

    def start(self, ctx, eps):
        self.by_mode = {m: self.launch(ctx, ep, m) for m, ep in eps.items()}

    def target(self, ctx, wl, ep):
        port, p = self.by_mode[ep.mode]
        self.pid = p.pid
        return ["--raw-tls", f"127.0.0.1:{port}", "--ca-file", ca_of(self.x509)], p.pid

    def after_run(self):
        pass

    def stop(self):
        for _, p in self.by_mode.values():
            procs.stop(p)
        self.by_mode = {}


# ---------------------------------------------------------------- TH: handshakes + link replies


def handshake_loop(ctx, ca_file, port, seconds, concurrency):
    """`vmcload handshake`: `concurrency` client threads (Rust, rustls, resumption off), each one
    link after the other for `seconds`: TCP connect, full TLS handshake, SpiceLinkMess, the whole
    SpiceLinkReply (error 0), close. Returns ok, failed, wall seconds, first errors, negotiated
    suites, client CPU seconds, set-up p50 ms."""
    import json
    import subprocess

    argv = [ctx.vmcload, "handshake", "--uri", f"spice+tls://127.0.0.1:{port}", "--ca-file", ca_file,
            "-k", str(concurrency), "--duration", f"{seconds}s", "--json", "-", "-q"]
    p = procs.spawn(argv, stdout=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=seconds + 60)
        r = json.loads(out.decode().strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        raise BenchError(f"vmcload handshake: {type(e).__name__}: {e}") from e
    finally:
        procs.stop(p, timeout=1)
    return (r["ok"], r["failed"], r["wall"], r["errors"], sorted(r["suites"]), r["client_cpu"], r["p50_ms"])


def phase_th(ctx, rows, results, budget, log):
    """rows: (key, name, contender, x509, group label: certificate and ticketing). `ctx.runs` rounds, rows rotated per
    round; each server is started fresh, gets a short warm-up (one client), then
    `ctx.th_seconds` of `ctx.th_conc` concurrent client loops; server CPU (all threads,
    from /proc/PID/stat) over the measured loop."""
    Endpoint = ctx.endpoint_cls  # noqa: N806 (bench.Endpoint; bench imports this module)
    secs, conc = ctx.th_seconds, ctx.th_conc
    results["TH_params"] = {"seconds": secs, "concurrency": conc, "runs": ctx.runs,
                            "client": f"vmcload handshake (rustls 0.23, ring), {conc} threads in one process, one "
                                      "fresh TCP + TLS connection per link, no session resumption"}
    for r in range(ctx.runs):
        order = rows[r % len(rows):] + rows[:r % len(rows)] if rows else []
        for key, name, c, x509, cert in order:
            cell = results["TH"].setdefault(key, {"runs": [], "name": name, "cert": cert})
            if not budget.allows(secs + 8):
                cell.setdefault("skipped", "time budget")
                continue
            ep = Endpoint(ctx, f"th-{key}-{r}", "echo", verify=False)
            rec = {"ok": False}
            try:
                if c.kind == "vmcrelay":
                    c.launch(ctx, [f"usbredir:0=unix:{ep.path}"], f"th{r}")
                else:
                    c.launch(ctx, ep, f"th{r}")
                handshake_loop(ctx, ca_of(x509), c.port, min(0.5, secs / 3), 1)  # warm-up
                c0 = procs.tree_cpu_ticks(c.pid)
                ok, failed, wall, errs, suites, client_cpu, p50 = handshake_loop(ctx, ca_of(x509), c.port, secs, conc)
                c1 = procs.tree_cpu_ticks(c.pid)
                cpu = (c1 - c0) / procs.CLK_TCK if c0 is not None and c1 is not None else None
                rec = {"ok": ok > 0 and failed == 0, "links_per_s": round(ok / wall, 1), "links": ok,
                       "failed": failed, "wall_s": round(wall, 2), "cpu_s": cpu,
                       "cpu_ms_per_link": round(cpu * 1000 / ok, 2) if cpu is not None and ok else None,
                       "relay_cpu_share": round(cpu / wall, 2) if cpu is not None and wall else None,
                       "client_cpu_share": round(client_cpu / wall, 2) if wall else None,
                       "setup_p50_ms": p50,
                       "suites": suites, "error_messages": errs}
            except BenchError as e:
                rec = {"ok": False, "error_messages": [str(e)]}
            finally:
                c.stop()
                ep.stop()
            cell["runs"].append(rec)
            log(f"TH {name} run {r + 1}/{ctx.runs}: {rec.get('links_per_s')} links/s, "
                f"cpu {rec.get('cpu_ms_per_link')} ms/link, {rec.get('failed')} failed "
                f"{rec.get('error_messages') or ''} {rec.get('suites') or ''}")
    for cell in results["TH"].values():
        if cell.get("runs"):
            cell["median"] = median_th(cell)


def median_th(cell):
    import statistics

    good = [r for r in cell.get("runs", []) if r.get("ok")] or cell.get("runs", [])
    out = {"runs": len(cell.get("runs", [])), "ok_runs": sum(1 for r in cell.get("runs", []) if r.get("ok"))}
    for k in ("links_per_s", "cpu_ms_per_link", "relay_cpu_share", "client_cpu_share"):
        vals = [r[k] for r in good if isinstance(r.get(k), (int, float))]
        out[k] = round(statistics.median(vals), 2) if vals else None
        if vals:
            out[k + "_min_max"] = [min(vals), max(vals)]
    out["suites"] = sorted({s for r in good for s in r.get("suites", [])})
    errs = [m for r in cell.get("runs", []) for m in r.get("error_messages", [])]
    if errs:
        out["errors"] = errs[:3]
    return out


# ---------------------------------------------------------------- report


def _f(v, nd=0):
    if v is None:
        return "–"
    if nd == 0:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def _ratio(a, b, nd=2):
    return f"{a / b:.{nd}f}×" if a is not None and b else "–"


def _med(cell, k):
    return ((cell or {}).get("median") or {}).get(k)


def _runs_ok(cell):
    if not cell:
        return "not run"
    if cell.get("skipped") and not cell.get("runs"):
        return cell["skipped"]
    m = cell.get("median") or {}
    s = f"{m.get('ok_runs', 0)}/{m.get('runs', 0)}"
    if m.get("errors"):
        s += " (" + "; ".join(m["errors"])[:160] + ")"
    return s


def th_pairs(th):
    """(vmcrelay key, libspice key) with the same certificate, for the ratios."""
    out = []
    for k, c in th.items():
        if k.startswith("relay-") and "keyreuse" not in k:
            peer = next((pk for pk, pc in th.items() if pk.startswith("libspice") and pc.get("cert") == c.get("cert")), None)
            if peer is None:
                continue
            out.append((k, peer))
    return out


def targets(res):
    """The issue's TLS targets: T1 ≥ 1.5× libspice-server TLS and ≥ stunnel; handshake (+ link
    reply) rate ≥ 20× libspice-server's TLS link rate, same certificate."""
    rows = []
    t1 = res.get("T1", {})
    for k in t1:
        if not k.startswith("relay-"):
            continue
        tp = _med(t1[k], "throughput_mib_s")
        for name, other, want in (("T1 ≥ 1.5× libspice-server TLS", "libspice-tls", 1.5), ("T1 ≥ stunnel", "stunnel", 1.0)):
            b = _med(t1.get(other), "throughput_mib_s")
            ratio = tp / b if tp is not None and b else None
            rows.append({"variant": k, "target": name, "ratio": round(ratio, 3) if ratio else None,
                         "met": (ratio >= want) if ratio else None})
    th = res.get("TH", {})
    for k, pk in th_pairs(th):
        a, b = _med(th[k], "links_per_s"), _med(th.get(pk), "links_per_s")
        ratio = a / b if a is not None and b else None
        rows.append({"variant": k, "target": f"TH ≥ 20× libspice-server TLS link rate ({th[k].get('cert')})",
                     "ratio": round(ratio, 3) if ratio else None, "met": (ratio >= 20) if ratio else None})
    return rows


def markdown(out):
    r, names = out["results"], out["contenders"]
    L = []
    for w in ("T1", "T2"):
        cells = r.get(w) or {}
        if not cells:
            continue
        L.append(f"### {w}: {out['titles'][w]}")
        L.append("")
        L.append("Client `vmcload run` (rustls 0.23, ring) with `--uri spice+tls://` (SPICE servers) or `--raw-tls` "
                 "(stunnel); P-256 server certificate; endpoint as in W1/W2.")
        L.append("")
        L.append("| contender | MiB/s | min–max | × libspice TLS | × stunnel | relay CPU s/GiB | CPU × libspice TLS | "
                 "CPU × stunnel | peak RSS MiB | runs ok |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        ptp, stp = _med(cells.get("libspice-tls"), "throughput_mib_s"), _med(cells.get("stunnel"), "throughput_mib_s")
        pcpu, scpu = _med(cells.get("libspice-tls"), "cpu_s_per_gib"), _med(cells.get("stunnel"), "cpu_s_per_gib")
        for k, c in cells.items():
            tp, cpu = _med(c, "throughput_mib_s"), _med(c, "cpu_s_per_gib")
            mm = (c.get("median") or {}).get("throughput_min_max")
            L.append(f"| {names.get(k, k)} | {_f(tp)} | {f'{mm[0]:,.0f}–{mm[1]:,.0f}' if mm else '–'} | "
                     f"{_ratio(tp, ptp)} | {_ratio(tp, stp)} | {_f(cpu, 3)} | {_ratio(cpu, pcpu)} | {_ratio(cpu, scpu)} | "
                     f"{_f(_med(c, 'rss_mib'), 1)} | {_runs_ok(c)} |")
        L.append("")
    th = r.get("TH") or {}
    if th:
        p = r.get("TH_params", {})
        L.append(f"### TH: {out['titles']['TH']}")
        L.append("")
        L.append(f"Each link: TCP connect, full TLS handshake (no resumption), SpiceLinkMess for the main channel, the "
                 f"whole SpiceLinkReply read and checked (error 0, with its 162-byte RSA-1024 ticket key), close (no ticket "
                 f"sent). Ticket keys: spice-server makes a fresh RSA-1024 key for every link, with or without a password; "
                 f"vmcrelay makes one per link on its key thread with a password, and without ticketing (`--disable-ticketing`) "
                 f"one per worker, reused. {p.get('concurrency')} "
                 f"concurrent client loops for {p.get('seconds')} s per run, {p.get('runs')} run(s) per row, rows "
                 f"interleaved, median shown; client: {p.get('client')}. Server CPU = utime+stime of all its threads "
                 "over the loop (vmcrelay: workers + the RSA ticket-key thread).")
        L.append("")
        L.append("Server CPU share and client CPU share are CPU-seconds per second of the loop (2 vCPUs in all): a "
                 "server well under 1 with the client near 1 means the client loop, not the server, set the rate.")
        L.append("")
        L.append("| server | certificate, ticket | links/s | min–max | × libspice TLS (same row kind) | server CPU ms/link | "
                 "server CPU share | client CPU share | negotiated | runs ok |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
        for k, c in th.items():
            m = c.get("median") or {}
            pk = next((pk for pk, pc in th.items() if pk.startswith("libspice") and pc.get("cert") == c.get("cert")), None)
            mm = m.get("links_per_s_min_max")
            ratio = _ratio(m.get("links_per_s"), _med(th.get(pk), "links_per_s"), 1) if pk and pk != k else "–"
            L.append(f"| {c.get('name', k)} | {c.get('cert')} | {_f(m.get('links_per_s'), 1)} | "
                     f"{f'{mm[0]:,.1f}–{mm[1]:,.1f}' if mm else '–'} | {ratio} | {_f(m.get('cpu_ms_per_link'), 2)} | "
                     f"{_f(m.get('relay_cpu_share'), 2)} | {_f(m.get('client_cpu_share'), 2)} | {', '.join(m.get('suites') or []) or '–'} | {_runs_ok(c)} |")
        L.append("")
    ts = out.get("tls_targets") or []
    if ts:
        L.append("### TLS targets from issue 10 (ratio; ✓ met, ✗ not met, – not measured)")
        L.append("")
        L.append("| target | variant | ratio |")
        L.append("|---|---|---:|")
        for t in ts:
            cell = "–" if t["ratio"] is None else f"{t['ratio']:.2f}× {'✓' if t['met'] else '✗'}"
            L.append(f"| {t['target']} | {names.get(t['variant'], t['variant'])} | {cell} |")
        L.append("")
    return "\n".join(L)
