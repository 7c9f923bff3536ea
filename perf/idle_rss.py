#!/usr/bin/env python3
"""Relay RSS per idle connection: links VMS sessions x CHANS user channels
(128:0..CHANS-1) against services on consecutive ports BASE.., waits for the
idle reclaim, reads the relay's VmRSS, then proves one idle channel echoes.

  perf/idle_rss.py BASE VMS CHANS RELAY_PID

Start the relay with a config of VMS services (see perf/RESULTS.md,
2026-12-03 "Idle channels"); Python 3 stdlib only (scripts/soak-lib/spice.py).
"""
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts", "soak-lib"))
import spice  # noqa: E402


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def main():
    base, vms, chans, pid = (int(a) for a in sys.argv[1:5])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_kib(pid)
    t0 = time.time()
    sessions, conns = [], []
    for v in range(vms):
        s = spice.Session(("127.0.0.1", base + v), b"")
        sessions.append(s)
        conns.extend(s.open(128, c) for c in range(chans))
    linked = time.time() - t0
    time.sleep(4)  # past --idle-buffer-secs and a tick
    after = rss_kib(pid)
    n = vms * (chans + 1)
    print(f"connections={n} link_s={linked:.2f} rss_before_kib={before} rss_after_kib={after} "
          f"per_connection_kib={(after - before) / n:.1f}")
    c = conns[len(conns) // 2]
    c.send_data(b"x" * 1000)
    got = 0
    while got < 1000:
        m = c.recv_msg()
        if m is None:
            raise SystemExit("idle channel closed")
        if m[0] == 101:
            got += len(m[1])
    print(f"idle channel echoed {got} bytes")


if __name__ == "__main__":
    main()
