"""Markdown tables and target checks for scripts/bench (input: its JSON object)."""


def _f(v, nd=0, dash="–"):
    if v is None:
        return dash
    if isinstance(v, float) and nd == 0:
        return f"{v:,.0f}"
    return f"{v:,.{nd}f}"


def _ratio(a, b, nd=2):
    if a is None or b is None or not b:
        return "–"
    return f"{a / b:.{nd}f}×"


def _med(cell, key):
    m = (cell or {}).get("median") or {}
    return m.get(key)


def _lat(cell, key):
    m = (cell or {}).get("median") or {}
    return (m.get("latency_us") or {}).get(key)


def brief(w, rec):
    """One progress line for a run."""
    if not rec.get("ok") and rec.get("error_messages"):
        return "FAILED: " + "; ".join(str(e) for e in rec["error_messages"])[:300]
    if w == "W3":
        l = rec.get("latency_us") or {}
        return f"p50 {l.get('p50')} µs p99 {l.get('p99')} µs p99.9 {l.get('p999')} µs, cpu {rec.get('cpu_us_per_round_trip')} µs/rt"
    if w == "W6":
        if rec.get("skipped"):
            return f"skipped: {rec['skipped']}"
        s = (f"{rec.get('links_ok')}/{rec.get('connections_wanted')} connections held, "
             f"relay RSS {_f(rec.get('rss_kib_per_connection'), 1)} KiB per connection "
             f"({_f(rec.get('rss_kib_per_channel'), 1)} KiB per user channel), "
             f"{_f(rec.get('fds_per_connection'), 2)} fds and {_f(rec.get('threads_per_connection'), 2)} threads per connection; "
             f"linked in {_f(rec.get('link_elapsed_s'), 1)} s ({_f(rec.get('links_per_s'), 0)} links/s)")
        if rec.get("stopped_by"):
            s += f"; STOPPED BY {rec['stopped_by']}"
        elif not rec.get("ok"):
            s += "; FAILED: " + "; ".join(str(e) for e in rec.get("error_messages", []))[:300]
        return s
    if w == "W5_burst":
        if rec.get("skipped"):
            return f"skipped: {rec['skipped']}"
        s = (f"{rec.get('sessions')} sessions ({rec.get('links_wanted')} ticketed links) at once, key pool full: "
             f"{rec.get('links_per_s')} links/s (200 / max set-up), set-up p50 {rec.get('setup_p50_ms')} ms "
             f"max {rec.get('setup_max_ms')} ms (median of {len(rec.get('runs', []))} bursts), "
             f"{rec.get('x_libspice_loop')}× libspice-server's loop")
        if not rec.get("ok"):
            s += "; FAILED: " + "; ".join(str(e) for e in rec.get("error_messages", []) +
                                           [e for r in rec.get("runs", []) for e in r.get("errors", [])])[:300]
        return s
    if w == "W5":
        s = f"{rec.get('links_per_s')} links/s (loop), set-up p50 {rec.get('setup_p50_ms')} ms, cpu {rec.get('cpu_ms_per_link')} ms/link"
        if rec.get("concurrent"):
            k = rec["concurrent"]
            s += f"; {k.get('linked')} concurrent: {k.get('links_per_s')} links/s"
        return s
    return (f"{_f(rec.get('throughput_mib_s'), 1)} MiB/s, cpu {_f(rec.get('cpu_s_per_gib'), 3)} s/GiB, "
            f"rss {_f(rec.get('rss_mib'), 1)} MiB, {rec.get('integrity')}")


def _runs_ok(cell):
    if not cell:
        return "not run"
    if cell.get("skipped") and not cell.get("runs"):
        return cell["skipped"]
    m = cell.get("median") or {}
    s = f"{m.get('ok_runs', 0)}/{m.get('runs', 0)}"
    if cell.get("skipped"):
        s += f" ({cell['skipped']})"
    return s


def _late(cell):
    n = sum(r.get("stopped_late") or 0 for r in (cell or {}).get("runs", []))
    return f" ({n} stopped > 2 s after SIGINT)" if n else ""


def targets(out):
    """The issue's targets, checked for every vmcrelay variant that ran."""
    r = out["results"]
    peer, socat = "libspice", "socat"
    rows = []
    for key in out["contenders"]:
        if not key.startswith("relay-"):
            continue
        t = {}

        def tp(w, k=key):
            return _med(r[w].get(k), "throughput_mib_s")

        for w in ("W1", "W2"):
            t[f"{w} ≥ 3× libspice-server"] = (tp(w), tp(w, peer), 3.0, "ge")
            t[f"{w} ≥ 1.5× socat"] = (tp(w), tp(w, socat), 1.5, "ge")
        t["W1 relay CPU/GiB ≤ 0.5× socat"] = (_med(r["W1"].get(key), "cpu_s_per_gib"),
                                             _med(r["W1"].get(socat), "cpu_s_per_gib"), 0.5, "le")
        t["W2 relay CPU/GiB ≤ 0.5× socat"] = (_med(r["W2"].get(key), "cpu_s_per_gib"),
                                             _med(r["W2"].get(socat), "cpu_s_per_gib"), 0.5, "le")
        t["W3 p99 ≤ socat's"] = (_lat(r["W3"].get(key), "p99"), _lat(r["W3"].get(socat), "p99"), 1.0, "le")
        t["W4 aggregate ≥ 0.9× W1"] = (tp("W4"), tp("W1"), 0.9, "ge")
        w5 = (r["W5"].get(key) or {}).get("median") or {}
        w5p = (r["W5"].get(peer) or {}).get("median") or {}
        t["W5 ≥ 20× libspice-server (same loop)"] = (w5.get("links_per_s"), w5p.get("links_per_s"), 20.0, "ge")
        t["W5 concurrent ≥ 20× libspice-server loop"] = ((w5.get("concurrent") or {}).get("links_per_s"),
                                                       w5p.get("links_per_s"), 20.0, "ge")
        for x in ((r.get("W6") or {}).get(key) or {}).get("runs", []):
            if x.get("rss_kib_per_channel_after_hold") is not None:
                t[f"W6 {x.get('label')} ({_f(x.get('links_ok'))} held) ≤ 8 KiB relay RSS per idle channel (after the hold)"] = (
                    x["rss_kib_per_channel_after_hold"], 8.0, 1.0, "le")
        h1 = ((r.get("H1") or {}).get(key) or {}).get("median") or {}
        if h1.get("relay_rss_before_kib"):
            t["H1 fresh session link + 64 KiB echo ≤ 1 s (max of 10, flood held)"] = (
                (h1.get("fresh") or {}).get("max_ms") if (h1.get("fresh") or {}).get("ok") == (h1.get("fresh") or {}).get("count") else None,
                1000.0, 1.0, "le")
            t["H1 ≤ 16 KiB relay RSS per half-open connection (client-held)"] = (h1.get("rss_kib_per_client_held"), 16.0, 1.0, "le")
            t["H1 healthy channel max stall ≤ 1 s"] = ((h1.get("healthy") or {}).get("max_stall_ms"), 1000.0, 1.0, "le")
        bu = r.get("W5_burst") or {}
        if bu.get("contender") == key:
            # sessions/s against the loop's sessions/s (each loop run = one session + channel).
            t["W5 burst (100 sessions, 200 links, pool full) ≥ 20× libspice-server loop"] = (
                bu.get("sessions_per_s"), w5p.get("links_per_s"), 20.0, "ge")
        for name, (a, b, want, op) in t.items():
            if a is None or b is None or not b:
                rows.append({"variant": key, "target": name, "ratio": None, "met": None})
                continue
            ratio = a / b
            met = ratio >= want if op == "ge" else ratio <= want
            rows.append({"variant": key, "target": name, "ratio": round(ratio, 3), "met": met})
    return rows


def markdown(out, order):
    r, meta, names = out["results"], out["meta"], out["contenders"]
    L = []
    L.append(f"## scripts/bench — {meta.get('date', '?')} ({meta.get('mode', '?')})")
    L.append("")
    L.append(f"- machine: {meta.get('nproc')} vCPUs, {meta.get('cpu')}, kernel {meta.get('kernel')}; "
             f"load average at start {', '.join(f'{x:.2f}' for x in meta.get('loadavg_start', ()))}, "
             f"at end {', '.join(f'{x:.2f}' for x in meta.get('loadavg_end', ()))}")
    L.append(f"- **no CPU pinning**: {meta.get('pinning', 'none')}")
    L.append(f"- revision {meta.get('revision')}; command `{meta.get('command')}`; "
             f"{meta.get('runs')} run(s) per W1–W3 cell of {meta.get('seconds')} s, median shown; total {meta.get('total_s')} s")
    L.append("- same client (`vmcload run`), same endpoint (`vmcload endpoint`, sink verifies the pattern) for all; "
             "relay CPU = utime+stime(+children) of the relay process over the run, from /proc/PID/stat; "
             "peak RSS = VmHWM (reset before each run; socat with its per-connection children: largest sampled sum of Pss)")
    L.append("")
    for w in ("W1", "W2"):
        cells = r[w]
        if not cells:
            continue
        L.append(f"### {w}: {out['titles'][w]}")
        L.append("")
        L.append("| contender | MiB/s | min–max | × libspice | × socat | relay CPU s/GiB | CPU × socat | peak RSS MiB | runs ok |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        peer_tp, soc_tp = _med(cells.get("libspice"), "throughput_mib_s"), _med(cells.get("socat"), "throughput_mib_s")
        soc_cpu = _med(cells.get("socat"), "cpu_s_per_gib")
        for k in order:
            c = cells.get(k)
            if c is None:
                continue
            tp, cpu = _med(c, "throughput_mib_s"), _med(c, "cpu_s_per_gib")
            mm = (c.get("median") or {}).get("throughput_min_max")
            L.append(f"| {names[k]} | {_f(tp)} | {f'{mm[0]:,.0f}–{mm[1]:,.0f}' if mm else '–'} | {_ratio(tp, peer_tp)} | "
                     f"{_ratio(tp, soc_tp)} | {_f(cpu, 3)} | {_ratio(cpu, soc_cpu)} | {_f(_med(c, 'rss_mib'), 1)} | {_runs_ok(c)} |")
        if w == "W1" and r.get("iperf3"):
            ip = r["iperf3"]
            if ip.get("throughput_mib_s"):
                L.append(f"| iperf3 TCP loopback, 1 stream (scale only) | {_f(ip['throughput_mib_s'])} | – | "
                         f"{_ratio(ip['throughput_mib_s'], peer_tp)} | {_ratio(ip['throughput_mib_s'], soc_tp)} | – | – | – | "
                         f"{'1/1' if ip.get('ok') else 'failed'} |")
        L.append("")
    if r["W3"]:
        cells = r["W3"]
        L.append(f"### W3: {out['titles']['W3']}")
        L.append("")
        L.append("| contender | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | round trips/s | p99 × libspice | p99 × socat | relay CPU µs/round trip | peak RSS MiB | runs ok |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        pp, sp = _lat(cells.get("libspice"), "p99"), _lat(cells.get("socat"), "p99")
        for k in order:
            c = cells.get(k)
            if c is None:
                continue
            L.append(f"| {names[k]} | {_f(_lat(c, 'p50'))} | {_f(_lat(c, 'p90'))} | {_f(_lat(c, 'p99'))} | "
                     f"{_f(_lat(c, 'p999'))} | {_f(_lat(c, 'max'))} | {_f(_med(c, 'msgs_per_s'))} | "
                     f"{_ratio(_lat(c, 'p99'), pp)} | {_ratio(_lat(c, 'p99'), sp)} | {_f(_med(c, 'cpu_us_per_round_trip'), 1)} | "
                     f"{_f(_med(c, 'rss_mib'), 1)} | {_runs_ok(c)} |")
        L.append("")
    if r["W4"]:
        p = r.get("W4_params", {})
        L.append(f"### W4: {out['titles']['W4']}")
        L.append("")
        L.append(f"{p.get('connections')} client sessions (main + channel each: {2 * (p.get('connections') or 0)} TCP "
                 f"connections to a SPICE relay) join in batches of {p.get('batch')} (one vmcload process per batch), then all "
                 f"send 64 KiB messages at {p.get('rate_per_connection')} msgs/s each (offered {p.get('offered_mib_s')} MiB/s "
                 f"in total); MiB/s = bytes the relay's TCP sockets received (`ss -tin` bytes_received, summed) over a "
                 f"{p.get('window_s')} s window with every connection streaming (direct, which has no relay socket and nothing "
                 "to link: one vmcload run with all connections, its aggregate MiB/s); relay CPU over the same window; peak RSS over the whole phase; one vmcload thread per "
                 "connection and one endpoint thread per channel, all on the same vCPUs.")
        L.append("")
        L.append("| contender | MiB/s | × W1 (same contender) | × socat | relay CPU s/GiB | peak RSS MiB | linked | join time s | ok |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        soc = _med(r["W4"].get("socat"), "throughput_mib_s")
        for k in order:
            c = r["W4"].get(k)
            if c is None:
                continue
            tp = _med(c, "throughput_mib_s")
            L.append(f"| {names[k]} | {_f(tp)} | {_ratio(tp, _med(r['W1'].get(k), 'throughput_mib_s'))} | {_ratio(tp, soc)} | "
                     f"{_f(_med(c, 'cpu_s_per_gib'), 3)} | {_f(_med(c, 'rss_mib'), 1)} | {_f(_med(c, 'linked'))} | "
                     f"{_f(_med(c, 'ramp_s'), 1)} | {_runs_ok(c)}{_late(c)} |")
        L.append("")
    if r["W5"]:
        p = r.get("W5_params", {})
        L.append(f"### W5: {out['titles']['W5']}")
        L.append("")
        L.append(f"Loop: `vmcload run --connections 1 --mode rr --size 64 --bytes 64 --password-file F` again and again for "
                 f"{p.get('loop_seconds')} s (each run = a probe session + session + channel, process start included); "
                 f"links/s = runs that linked and echoed per second. Concurrent (vmcrelay only; spice-server serves one "
                 f"client at a time): {p.get('concurrent_connections')} connections at once, links/s = linked / slowest set-up.")
        L.append("")
        L.append("| contender | links/s (loop) | × libspice | set-up p50 ms | relay CPU ms/link | concurrent links/s | concurrent × libspice loop | concurrent set-up p50 / max ms | peak RSS MiB | ok |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        pl = ((r["W5"].get("libspice") or {}).get("median") or {}).get("links_per_s")
        for k in order:
            c = r["W5"].get(k)
            if c is None:
                continue
            m = c.get("median") or {}
            cc = m.get("concurrent") or {}
            ok = "skipped: " + c["skipped"] if c.get("skipped") else ("yes" if m.get("ok") else "errors: " + "; ".join(m.get("error_messages", []))[:120])
            L.append(f"| {names[k]} | {_f(m.get('links_per_s'), 1)} | {_ratio(m.get('links_per_s'), pl, 1)} | "
                     f"{_f(m.get('setup_p50_ms'), 1)} | {_f(m.get('cpu_ms_per_link'), 2)} | {_f(cc.get('links_per_s'), 1)} | "
                     f"{_ratio(cc.get('links_per_s'), pl, 1)} | "
                     f"{(_f(cc.get('setup_p50_ms'), 1) + ' / ' + _f(cc.get('setup_max_ms'), 1)) if cc else '–'} | "
                     f"{_f(m.get('rss_mib'), 1)} | {ok} |")
        L.append("")
    bu = r.get("W5_burst")
    if bu:
        L.append("#### W5 burst: 100 sessions at once with a password, key pool full")
        L.append("")
        L.append(f"`{bu.get('command', '?')}`. Before each burst the bench waits until /metrics shows every worker's "
                 "`vmcrelay_key_pool_keys` at `vmcrelay_key_pool_capacity`. Each of the 100 connections is its own "
                 "session (main link + channel link, fresh RSA key each: 200 ticketed links); "
                 "links/s = 200 / slowest set-up; × libspice = sessions/s against libspice-server's loop sessions/s "
                 f"(same run). Knob set: {bu.get('knobs', '?')}.")
        L.append("")
        L.append("| burst | sessions linked | relay main + channel links ok | pool before (per worker / capacity) | set-up p50 ms | set-up max ms | links/s | relay CPU ms/link | evicted | ok |")
        L.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
        for i, x in enumerate(bu.get("runs", []), 1):
            L.append(f"| {i} | {x.get('sessions_linked')} | {x.get('relay_main_links_ok')} + {x.get('relay_channel_links_ok')} | "
                     f"{'/'.join(str(int(k)) for k in x.get('pool_keys_before') or [])} / {_f(x.get('pool_capacity'))} | "
                     f"{_f(x.get('setup_p50_ms'), 1)} | {_f(x.get('setup_max_ms'), 1)} | {_f(x.get('links_per_s'), 1)} | "
                     f"{_f(x.get('relay_cpu_ms_per_link'), 2)} | {x.get('evicted')} | {'yes' if x.get('ok') else 'no: ' + '; '.join(x.get('errors', []))[:100]} |")
        pl = ((r["W5"].get("libspice") or {}).get("median") or {}).get("links_per_s")
        L.append("")
        L.append(f"Median burst: **{_f(bu.get('links_per_s'), 1)} links/s** ({_f(bu.get('sessions_per_s'), 1)} sessions/s), "
                 f"set-up p50 {_f(bu.get('setup_p50_ms'), 1)} ms, max {_f(bu.get('setup_max_ms'), 1)} ms; "
                 f"libspice-server loop {_f(pl, 1)} sessions/s ({_f(2 * pl if pl else None, 1)} links/s): "
                 f"**{_f(bu.get('x_libspice_loop'), 1)}×** (goal ≥ 20×).")
        L.append("")
    if r.get("W6"):
        p = r.get("W6_params", {})
        L.append(f"### W6: {out['titles']['W6']}")
        L.append("")
        epd = ("`128:i=echo:` channels each (the relay's built-in echo)" if p.get("endpoint", "echo") == "echo" else
               "`128:i=unix:PATH` channels each, all to one `vmcload endpoint --mode echo`")
        L.append("One relay (`vmcrelay serve --config`, all workers, default settings: `max-conns-per-worker` the default "
                 f"16384; RLIMIT_NOFILE of the bench and its children {meta.get('nofile', '?')}), V `[[service]]`s on their own 127.0.0.1 ports with C {epd}; "
                 "one `vmcload idle` session per VM links its main and C channels "
                 f"({p.get('concurrency')} sessions at once), holds them {p.get('hold_s')} s with no traffic, then checks "
                 "every session and channel is still open and 64 sampled channels echo 64 B. Relay VmRSS, fds and threads "
                 "from /proc/PID before linking and once every link is made; per connection = increase / connections "
                 "held (mains included), per channel = increase / user channels. Linking stops early if MemAvailable "
                 f"falls below {p.get('mem_reserve_gib')} GiB (bench guard) or after 48 failed links.")
        L.append("")
        L.append("| size | connections held / wanted | relay RSS before → linked MiB | KiB per connection | KiB per channel | "
                 "after hold KiB/conn (/channel) | relay fds before → linked (limit) | fds / conn | threads / conn | link time s | "
                 "links/s | session link p50 / p99 ms | echo ok | stopped by |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for c in (r["W6"].values()):
            for x in c.get("runs", []):
                if x.get("skipped"):
                    L.append(f"| {x.get('label')} | – | – | – | – | – | – | – | – | – | – | – | – | skipped: {x['skipped']} |")
                    continue
                b, l = x.get("before") or {}, x.get("linked") or {}
                lim = x.get("relay_nofile") or ["?", "?"]
                sl = x.get("session_link_ms") or {}
                e = x.get("echo") or {}
                kib = lambda v: _f(v / 1024 if isinstance(v, (int, float)) else None)  # noqa: E731
                L.append(f"| {x.get('label')} ({x.get('vms')} VMs × {x.get('channels_per_vm')}) | "
                         f"{_f(x.get('links_ok'))} / {_f(x.get('connections_wanted'))} | "
                         f"{kib(b.get('rss_kib'))} → {kib(l.get('rss_kib'))} | {_f(x.get('rss_kib_per_connection'), 1)} | "
                         f"{_f(x.get('rss_kib_per_channel'), 1)} | {_f(x.get('rss_kib_per_connection_after_hold'), 1)} ({_f(x.get('rss_kib_per_channel_after_hold'), 1)}) | "
                         f"{_f(b.get('fds'))} → {_f(l.get('fds'))} ({lim[0]}/{lim[1]}) | {_f(x.get('fds_per_connection'), 2)} | "
                         f"{_f(x.get('threads_per_connection'), 2)} | {_f(x.get('link_elapsed_s'), 1)} | "
                         f"{_f(x.get('links_per_s'))} | {_f(sl.get('p50'), 1)} / {_f(sl.get('p99'), 1)} | "
                         f"{e.get('ok', '–')}/{e.get('sampled', '–')} | {x.get('stopped_by') or ('–' if x.get('ok') else 'FAILED')} |")
        L.append("")
        for c in (r["W6"].values()):
            for x in c.get("runs", []):
                top = x.get("smaps_top_linked") or []
                if top:
                    L.append(f"W6 {x.get('label')}, relay resident memory by mapping once linked (largest first): " + "; ".join(
                        f"{g['mappings']}× {g['size_kib_each']:,} KiB {g['name']}: {g['rss_mib']:,} MiB" for g in top))
                    L.append("")
    h1c = (r.get("H1") or {}).get("relay-copy-all") or {}
    if h1c.get("runs"):
        L.append(f"### H1: {out['titles'].get('H1', 'half-open flood')}")
        L.append("")
        L.append("`scripts/bench-lib/flood.py` (also `scripts/flood`): `vmcrelay serve --workers N --config F` with default "
                 "limits and two services (flood, steady; each `disable-ticketing`, `128:0=echo:`): the healthy session "
                 "has its own service because a fresh session replaces its service's old session as a whole. Flood: "
                 "N connections, 250 per source address from 127.0.0.2, odd ones send `REDQ` + major 2 (8 bytes), even "
                 "ones nothing; each one the relay closes is opened again (≤ 2,000/s). Healthy: a 64 B echo every 50 ms "
                 "on `steady` from 127.0.0.100 (stall = longest gap between completed round trips). Fresh: 10 sessions "
                 "on `flood` from 127.0.0.101 one after the other, main + channel + 64 KiB echoed byte-exact, timed "
                 "from connect. RSS per half-open = (relay VmRSS median while the flood is held, before the fresh sessions − "
                 "before the flood) / connections the client holds.")
        L.append("")
        L.append("| flood conns | client holds (median, min) | relay link stage (median / max) | opened / closed by relay | "
                 "relay RSS before → held → max (fresh sessions) → 3 s after MiB | KiB per client-held | KiB per attempted | fresh ok | fresh median / max ms | "
                 "healthy round trips | healthy max stall ms | relay warnings | ok |")
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for x in h1c["runs"]:
            if not x.get("relay_rss_before_kib"):
                L.append(f"| {x.get('connections', '?')} | FAILED: {x.get('error', '?')} |" + " |" * 11)
                continue
            fr, h = x.get("fresh") or {}, x.get("healthy") or {}
            mib = lambda v: _f(v / 1024 if isinstance(v, (int, float)) else None, 1)  # noqa: E731
            L.append(f"| {_f(x.get('connections'))} | {_f(x.get('client_held_median'))}, {_f(x.get('client_held_min'))} | "
                     f"{_f(x.get('relay_link_stage_median'))} / {_f(x.get('relay_link_stage_max'))} | "
                     f"{_f(x.get('client_opened_total'))} / {_f(x.get('closed_by_relay_total'))} | "
                     f"{mib(x.get('relay_rss_before_kib'))} → {mib(x.get('relay_rss_held_kib'))} → {mib(x.get('relay_rss_during_max_kib'))} → {mib(x.get('relay_rss_after_kib'))} | "
                     f"{_f(x.get('rss_kib_per_client_held'), 1)} | {_f(x.get('rss_kib_per_attempted'), 2)} | "
                     f"{fr.get('ok')}/{fr.get('count')} | {_f(fr.get('median_ms'), 1)} / {_f(fr.get('max_ms'), 1)} | "
                     f"{h.get('round_trips')} | {_f(h.get('max_stall_ms'), 1)} | {x.get('relay_log_warning_count')} | "
                     f"{'yes' if x.get('ok') else 'no'} |")
        L.append("")
    # summary
    L.append("### Summary (medians)")
    L.append("")
    L.append("| contender | W1 MiB/s | W2 MiB/s | W3 p99 µs | W4 MiB/s | W5 links/s | W1 CPU s/GiB | W2 CPU s/GiB | W1 RSS MiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in order:
        if not any(k in r[w] for w in ("W1", "W2", "W3", "W4", "W5")):
            continue
        w5 = ((r["W5"].get(k) or {}).get("median") or {}).get("links_per_s")
        L.append(f"| {names[k]} | {_f(_med(r['W1'].get(k), 'throughput_mib_s'))} | {_f(_med(r['W2'].get(k), 'throughput_mib_s'))} | "
                 f"{_f(_lat(r['W3'].get(k), 'p99'))} | {_f(_med(r['W4'].get(k), 'throughput_mib_s'))} | {_f(w5, 1)} | "
                 f"{_f(_med(r['W1'].get(k), 'cpu_s_per_gib'), 3)} | {_f(_med(r['W2'].get(k), 'cpu_s_per_gib'), 3)} | "
                 f"{_f(_med(r['W1'].get(k), 'rss_mib'), 1)} |")
    L.append("")
    ts = out.get("targets") or []
    if ts:
        variants = [k for k in order if any(t["variant"] == k for t in ts)]
        L.append("### Targets from issue 5 (ratio; ✓ met, ✗ not met, – not measured)")
        L.append("")
        L.append("| target | " + " | ".join(names[v] for v in variants) + " |")
        L.append("|---|" + "---:|" * len(variants))
        for tname in dict.fromkeys(t["target"] for t in ts):
            cells = []
            for v in variants:
                t = next((x for x in ts if x["variant"] == v and x["target"] == tname), None)
                if not t or t["ratio"] is None:
                    cells.append("–")
                else:
                    cells.append(f"{t['ratio']:.2f}× {'✓' if t['met'] else '✗'}")
            L.append(f"| {tname} | " + " | ".join(cells) + " |")
        L.append("")
    return "\n".join(L)
