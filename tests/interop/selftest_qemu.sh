#!/usr/bin/env bash
# Validate tests/interop/gtk_client.py against QEMU's own spice-server (no vmcrelay involved).
#
# Starts four QEMUs on free loopback ports:
#   A: -machine none, ticket "secret", QMP monitor on spiceport org.qemu.monitor.qmp.0
#   B: -machine pc running a 64-byte echo "BIOS" that copies COM1 RX to TX, COM1 wired to
#      spiceport com.example.echo; qemu-xhci with two usb-redir spicevmc channels; no ticket
#   C: -machine pc -vga qxl with SeaBIOS's boot prompt (ESC opens the menu), ticket "secret",
#      QMP on a spiceport, one usb-redir spicevmc channel
#   D: -machine pc -vga qxl without a boot menu (ESC changes nothing), spice audio; no ticket
# then runs every harness mode against them and prints PASS/FAIL per check.
#
# Usage: tests/interop/selftest_qemu.sh        (KEEP=1 keeps the work directory and logs)
# Exit: 0 all passed, 1 some check failed, 77 prerequisites missing.
# Needs: qemu-system-x86 python3-gi gir1.2-spiceclientglib-2.0 (see README.md).

set -u

HERE=$(cd "$(dirname "$0")" && pwd)
PY=/usr/bin/python3
CLIENT="$HERE/gtk_client.py"
WORK=$(mktemp -d /tmp/vmcrelay-interop-selftest.XXXXXX)
QEMU_PIDS=()
PASSED=0
FAILED=0

cleanup() {
    local pid
    for pid in "${QEMU_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${QEMU_PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

skip() { echo "SKIP: $*"; exit 77; }

command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed"
[ -x "$PY" ] || skip "$PY not found"
"$PY" -c 'import gi; gi.require_version("SpiceClientGLib", "2.0"); from gi.repository import SpiceClientGLib' \
    2>/dev/null || skip "$PY cannot import SpiceClientGLib (apt-get install python3-gi gir1.2-spiceclientglib-2.0)"
command -v timeout >/dev/null || skip "coreutils timeout not found"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_listen PORT PID: up to 5 s for QEMU to listen (it does about 0.1 s after start)
wait_listen() {
    "$PY" - "$1" "$2" <<'EOF'
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("qemu exited")
    # /proc/net/tcp lists listeners without connecting (a probe connection would be a SPICE link)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                sys.exit(0)
    time.sleep(0.05)
sys.exit("port %d not listening after 5 s" % port)
EOF
}

# start_qemu NAME PORTVAR ARGS...: start QEMU with a fresh free port substituted for @PORT@
start_qemu() {
    local name=$1 var=$2 port pid attempt args
    shift 2
    for attempt in 1 2 3; do
        port=$(free_port)
        args=("${@//@PORT@/$port}")
        qemu-system-x86_64 "${args[@]}" >"$WORK/$name.log" 2>&1 &
        pid=$!
        if wait_listen "$port" "$pid"; then
            QEMU_PIDS+=("$pid")
            printf -v "$var" '%s' "$port"
            eval "${name}_PID=$pid"
            return 0
        fi
        kill "$pid" 2>/dev/null
        echo "note: $name did not start on port $port (attempt $attempt):" "$(tail -n 3 "$WORK/$name.log")"
    done
    echo "FAIL start $name: see $WORK/$name.log"
    FAILED=$((FAILED + 1))
    return 1
}

# run NAME ARGS...: run the harness with an outer hard limit; stdout JSON to $WORK/NAME.json
run() {
    local name=$1
    shift
    timeout -k 2 60 "$PY" "$CLIENT" "$@" >"$WORK/$name.json" 2>"$WORK/$name.err"
    RC=$?
}

# bg NAME ARGS...: like run, in the background; wait_bg then sets RC
bg() {
    local name=$1
    shift
    timeout -k 2 60 "$PY" "$CLIENT" "$@" >"$WORK/$name.json" 2>"$WORK/$name.err" &
    BG_PID=$!
}
wait_bg() {
    wait "$BG_PID"
    RC=$?
}

# check NAME EXPECTED_RC PY_EXPR SUMMARY_EXPR: evaluate against the JSON (as d) and rc
check() {
    local name=$1 want_rc=$2 expr=$3 summary=$4 verdict
    verdict=$("$PY" - "$WORK/$name.json" "$RC" "$want_rc" "$expr" "$summary" <<'EOF'
import json, sys
path, rc, want, expr, summary = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
try:
    lines = open(path).read().splitlines()
    d = json.loads(lines[-1]) if lines else {}
except Exception as exc:
    print("FAIL|no JSON result (%s)" % exc); sys.exit()
wanted = [int(x) for x in want.split("|")]
try:
    text = eval(summary, {"d": d, "rc": rc})
except Exception as exc:
    text = "summary error %r" % exc
if rc not in wanted:
    print("FAIL|exit code %d, expected %s; reason: %s" % (rc, want, d.get("reason"))); sys.exit()
try:
    ok = eval(expr, {"d": d, "rc": rc})
except Exception as exc:
    print("FAIL|check raised %r; %s" % (exc, text)); sys.exit()
print(("PASS|" if ok else "FAIL|check %s is false; " % expr) + str(text))
EOF
)
    if [ "${verdict%%|*}" = PASS ]; then
        PASSED=$((PASSED + 1))
    else
        FAILED=$((FAILED + 1))
        [ -s "$WORK/$name.err" ] && verdict="$verdict [stderr: $(tail -n 1 "$WORK/$name.err")]"
    fi
    echo "${verdict%%|*} $name: ${verdict#*|}"
}

# Echo firmware for QEMU B: real-mode code at F000:0000, reached from the reset vector.
#   COM1 init: LCR=0x80, DLL=1, DLM=0, LCR=0x03 (8N1), FCR=0x07 (FIFO on), MCR=0x03
#   rx: in LSR(0x3fd); test 1; jz rx; in RBR(0x3f8) -> ah
#   tx: in LSR; test 0x20; jz tx; out ah -> THR(0x3f8); jmp rx
# QEMU forwards each transmitted byte as its own chardev write, so spice-server sends one
# DATA message per echoed byte: slow (about 45 KiB/s) but a real end-to-end echo.
make_echo_bios() {
    "$PY" - "$1" <<'EOF'
import sys
code = bytes.fromhex(
    "fa" "bafb03b080ee" "baf803b001ee" "4230c0ee" "bafb03b003ee" "bafa03b007ee" "bafc03b003ee"
    "bafd03eca80174f8" "baf803ec88c4" "bafd03eca82074f8" "88e0baf803ee" "ebe2")
image = bytearray(b"\xff" * 65536)      # QEMU wants a BIOS size that is a multiple of 64 KiB
image[:len(code)] = code
image[0xfff0:0xfff5] = bytes.fromhex("ea000000f0")   # reset vector: jmp far F000:0000
open(sys.argv[1], "wb").write(image)
EOF
}

echo "== QEMU A: -machine none, ticket, QMP over spiceport"
if start_qemu qemuA PA -machine none -display none -nodefaults \
        -object secret,id=sec0,data=secret \
        -spice port=@PORT@,addr=127.0.0.1,password-secret=sec0 \
        -chardev spiceport,id=qmp0,name=org.qemu.monitor.qmp.0 -mon chardev=qmp0,mode=control; then
    URI=spice://127.0.0.1:$PA

    run auth-right auth --uri "$URI" --password secret --timeout 5
    check auth-right 0 'd["result"] == "linked"' '"result=%s" % d["result"]'

    run auth-wrong auth --uri "$URI" --password wrong --timeout 5
    check auth-wrong 3 'd["result"] == "auth-error"' '"result=%s reason=%s" % (d["result"], d["reason"])'

    run auth-none auth --uri "$URI" --timeout 5
    check auth-none 3 'd["result"] == "auth-error"' '"no password: result=%s" % d["result"]'

    run list-A list --uri "$URI" --password secret --timeout 5
    check list-A 0 'any(c.get("port_name") == "org.qemu.monitor.qmp.0" for c in d["channels"])' \
        '", ".join("%s/%d%s" % (c["type_name"], c["id"], ":" + c["port_name"] if c.get("port_name") else "") for c in d["channels"])'

    run qmp qmp --uri "$URI" --password secret --commands qmp_capabilities,query-version,query-status --timeout 5
    check qmp 0 'len(d["replies"]) == 3 and d["port_opened_seen"]' \
        '"greeting %dB, replies %s" % (d["greeting"]["bytes"], ", ".join("%s=%dB" % (r["command"], r["bytes"]) for r in d["replies"]))'

    run qmp-tap qmp --uri "$URI" --password secret --commands qmp_capabilities,query-version --timeout 5 --tap
    check qmp-tap 0 'len(d["replies"]) == 2 and any(t["channel_type"] == 10 and t["client_to_server"]["payload_bytes"] > 0 for t in d["tap"])' \
        '"through the wire tap: " + ", ".join("%s c2s=%d s2c=%d payload bytes" % (t["channel_type_name"], t["client_to_server"]["payload_bytes"], t["server_to_client"]["payload_bytes"]) for t in d["tap"] if t["channel_type"] == 10)'

    # Negative check: a QMP monitor is no echo. --linger: spice-server 0.15.1 crashes QEMU when a
    # client leaves while the monitor still holds part of its input (README, "traps").
    run echo-on-qmp port-echo --uri "$URI" --password secret --port-name org.qemu.monitor.qmp.0 --bytes 4096 --timeout 5 --linger 0.5
    check echo-on-qmp 1 'd["result"] in ("mismatch", "unexpected-data")' '"detected: " + d["reason"]'

    run echo-missing-port port-echo --uri "$URI" --password secret --port-name com.example.none --bytes 16 --timeout 5
    check echo-missing-port 1 'd["result"] == "no-such-port"' 'd["reason"]'

    # P13: QEMU 7.2 + spice-server 0.15.1 stop a big reply after 2 x 65568 bytes. The harness
    # must report that as a stall (exit 4), not hang; a server without the bug answers (exit 0).
    run qmp-schema qmp --uri "$URI" --password secret --commands qmp_capabilities,query-qmp-schema --timeout 4
    check qmp-schema '4|0' '(rc == 0 and d["replies"][-1]["bytes"] > 100000) or (rc == 4 and "stall" in d["reason"])' \
        '"reply %d bytes" % d["replies"][-1]["bytes"] if rc == 0 else "stall reported: %s (pending_reply_bytes=%s)" % (d["reason"], d.get("pending_reply_bytes"))'

    run display-none display --uri "$URI" --password secret --timeout 5
    check display-none 1 'd["result"] == "no-display"' 'd["reason"]'
fi

NOPORT=$(free_port)
run refused auth --uri "spice://127.0.0.1:$NOPORT" --timeout 5
check refused 5 'd["result"] == "error-connect"' '"nobody on port: " + d["reason"]'

echo "== QEMU B: -machine pc, echo firmware on COM1 -> spiceport, 2 x usb-redir"
make_echo_bios "$WORK/echo-bios.bin"
if start_qemu qemuB PB -machine pc -accel tcg -m 16 -display none -nodefaults \
        -bios "$WORK/echo-bios.bin" \
        -spice port=@PORT@,addr=127.0.0.1,disable-ticketing=on \
        -chardev spiceport,id=echo0,name=com.example.echo -serial chardev:echo0 \
        -device qemu-xhci,id=xhci \
        -chardev spicevmc,name=usbredir,id=ur0 -device usb-redir,chardev=ur0,id=redir0 \
        -chardev spicevmc,name=usbredir,id=ur1 -device usb-redir,chardev=ur1,id=redir1; then
    URI=spice://127.0.0.1:$PB

    run list-B list --uri "$URI" --timeout 5
    check list-B 0 'sum(c["type"] == 9 for c in d["channels"]) == 2 and any(c.get("port_name") == "com.example.echo" for c in d["channels"])' \
        '", ".join("%s/%d%s" % (c["type_name"], c["id"], ":" + c["port_name"] if c.get("port_name") else "") for c in d["channels"])'

    run port-echo port-echo --uri "$URI" --port-name com.example.echo --bytes 65536 --chunk 16384 --seed 7 --timeout 30
    check port-echo 0 'd["result"] == "echoed" and d["sha256_sent"] == d["sha256_received"] and d["port_opened_seen"]' \
        '"%d bytes echoed in %.2f s (%.3f MiB/s), sha256 %s..., port-events %s" % (d["bytes_received"], d["seconds"], d["mib_per_s"], d["sha256_received"][:16], d["port_events"])'

    run port-echo-tap port-echo --uri "$URI" --port-name com.example.echo --bytes 20000 --chunk 3000 --timeout 30 --tap
    check port-echo-tap 0 '[(t["client_to_server"]["payload_bytes"], t["server_to_client"]["payload_bytes"]) for t in d["tap"] if t["channel_type"] == 10] == [(20000, 20000)]' \
        '"; ".join("port c2s %d payload bytes in %d messages, s2c %d in %d messages" % (t["client_to_server"]["payload_bytes"], t["client_to_server"]["messages"], t["server_to_client"]["payload_bytes"], t["server_to_client"]["messages"]) for t in d["tap"] if t["channel_type"] == 10)'

    run usbredir usbredir --uri "$URI" --expect-hello --timeout 10
    check usbredir 0 'len(d["usbredir"]) == 2 and all(u["hello"]["version"].startswith("qemu usb-redir guest") and u["client_hello"]["version"].startswith("spice-gtk") for u in d["usbredir"])' \
        '"; ".join("ch%d server->client %d payload B (%r), client->server %d payload B (%r), total-read-bytes %d" % (u["id"], u["server_payload_bytes"], u["hello"]["version"], u["client_payload_bytes"], u["client_hello"]["version"], u["total_read_bytes"]) for u in d["usbredir"])'

    # Both hellos announce 64-bit ids, so after them a usbredir packet header is 16 bytes.
    # A second hello is harmless and QEMU logs it even at the default debug level.
    HELLO=$("$PY" -c 'import struct; b = b"vmcrelay-selftest".ljust(64, b"\0") + struct.pack("<I", 0); print((struct.pack("<IIQ", 0, len(b), 0) + b).hex())')
    run usbredir-send usbredir --uri "$URI" --expect-hello --send-hex "$HELLO" --channel-id 0 --timeout 10
    check usbredir-send 0 '[u["injected_bytes"] for u in d["usbredir"]] == [84, 0]' \
        '"injected %s bytes on channel 0" % d["usbredir"][0]["injected_bytes"]'
    for _ in $(seq 20); do
        grep -q "Received second hello message" "$WORK/qemuB.log" && break
        sleep 0.1
    done
    if grep -q "Received second hello message" "$WORK/qemuB.log"; then
        PASSED=$((PASSED + 1))
        echo "PASS usbredir-send-reached-qemu: QEMU log: $(grep -m1 "Received second hello message" "$WORK/qemuB.log")"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL usbredir-send-reached-qemu: QEMU never logged the injected hello"
    fi
fi

echo "== QEMU C: -machine pc -vga qxl, SeaBIOS boot prompt, ticket, QMP over spiceport, usb-redir"
# SeaBIOS draws a 720x400 text screen; splash-time keeps "Press ESC for boot menu." up for 65 s
# and ESC opens the menu; reboot-timeout retries the boot (and the prompt) forever.
if start_qemu qemuC PC -machine pc -accel tcg -m 64 -vga qxl -display none -nodefaults \
        -boot menu=on,splash-time=65000,reboot-timeout=1000 \
        -object secret,id=sec0,data=secret \
        -spice port=@PORT@,addr=127.0.0.1,password-secret=sec0 \
        -chardev spiceport,id=qmp0,name=org.qemu.monitor.qmp.0 -mon chardev=qmp0,mode=control \
        -device qemu-xhci,id=xhci \
        -chardev spicevmc,name=usbredir,id=ur0 -device usb-redir,chardev=ur0,id=redir0; then
    URI=spice://127.0.0.1:$PC

    # first, while SeaBIOS still shows its prompt
    run display display --uri "$URI" --password secret --expect-size 720x400 --press-key esc \
        --qmp-command query-status --expect-usbredir-hello --save-png "$WORK/display.png" --timeout 10
    check display 0 'd["drawn"] and d["changed_after_key"] and d["qmp"]["replies"][-1]["return"]["status"] == "running" and all(u["hello"] for u in d["usbredir"])' \
        '"%dx%d %s, %d invalidates, %d non-background px; ESC: %d px changed after %.3f s; query-status %s; usbredir hello %s" % (d["width"], d["height"], d["format_name"], d["invalidates"], d["nonblank_pixels"], d["changed_pixels_after_key"], d["key_change_s"], d["qmp"]["replies"][-1]["return"]["status"], [u["server_payload_bytes"] for u in d["usbredir"]])'

    # A wrong password must not kick the current client; a right one does (spice-server serves
    # one client at a time). --hold keeps the first session and fails it if any channel closes.
    bg display-hold display --uri "$URI" --password secret --expect-size 720x400 --hold 3 --timeout 5
    sleep 1.5
    run display-auth display --uri "$URI" --password wrong --expect-size 720x400 --timeout 5
    check display-auth 3 'd["result"] == "auth-error"' '"wrong password: result=%s" % d["result"]'
    wait_bg
    check display-hold 0 'd["result"] == "displayed" and d["held_s"] >= 3' \
        '"first client held %.1f s while a wrong password was refused" % d["held_s"]'

    bg display-kicked display --uri "$URI" --password secret --expect-size 720x400 --hold 3 --timeout 5
    sleep 1.5
    run display-kicker auth --uri "$URI" --password secret --timeout 5
    wait_bg
    check display-kicked 1 'd["result"] == "lost-during-hold"' '"a second client with the right password: " + d["reason"]'

    run display-size display --uri "$URI" --password secret --expect-size 640x480 --timeout 3
    check display-size 1 'd["result"] == "wrong-size" and not d["size_ok"]' 'd["reason"]'
fi

echo "== QEMU D: -machine pc -vga qxl, no boot menu (ESC does nothing), audio, no ticket"
if start_qemu qemuD PD -machine pc -accel tcg -m 64 -vga qxl -display none -nodefaults \
        -spice port=@PORT@,addr=127.0.0.1,disable-ticketing=on \
        -audiodev spice,id=snd0 -device intel-hda -device hda-duplex,audiodev=snd0; then
    URI=spice://127.0.0.1:$PD

    run display-unchanged display --uri "$URI" --expect-size 720x400 --press-key esc --key-timeout 2 --timeout 8
    check display-unchanged 1 'd["result"] == "unchanged-after-key" and d["drawn"] and d["changed_after_key"] is False and all(c["state"] == "opened" for c in d["channels"])' \
        '"%s; channels %s" % (d["reason"], ", ".join("%s/%d" % (c["type_name"], c["id"]) for c in d["channels"]))'
fi

for var in qemuA_PID qemuB_PID qemuC_PID qemuD_PID; do
    pid=${!var:-}
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
        FAILED=$((FAILED + 1))
        echo "FAIL ${var%_PID}-alive: QEMU exited during the tests (see log)"
    fi
done

echo "== $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
