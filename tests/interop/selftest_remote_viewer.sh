#!/usr/bin/env bash
# Validate scripts/remote-viewer-shot against QEMU's own spice-server (no vmcrelay involved).
#
# Starts two QEMUs on free loopback ports:
#   S: -machine pc -vga qxl, SeaBIOS's boot prompt, ticket "secret"
#   N: -machine none (no display channel: remote-viewer shows "Connected to graphic server")
# and checks: a screenshot of SeaBIOS (exit 0, PNG written), wrong password (3),
# no display (1), nobody listening (5).
#
# Usage: tests/interop/selftest_remote_viewer.sh   (KEEP=1 keeps the PNGs and logs)
# Exit: 0 all passed, 1 some check failed, 77 prerequisites missing.

set -u

HERE=$(cd "$(dirname "$0")" && pwd)
SHOT="$HERE/../../scripts/remote-viewer-shot"
PY=/usr/bin/python3
WORK=$(mktemp -d /tmp/vmcrelay-rv-selftest.XXXXXX)
QEMU_PIDS=()
PASSED=0
FAILED=0

cleanup() {
    local pid
    for pid in "${QEMU_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${QEMU_PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
    done
    if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

skip() { echo "SKIP: $*"; exit 77; }
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed"
[ -x "$PY" ] || skip "$PY not found"
if ! command -v remote-viewer >/dev/null || ! command -v Xvfb >/dev/null || ! command -v import >/dev/null; then
    [ "$(id -u)" -eq 0 ] || skip "remote-viewer, Xvfb or ImageMagick missing (apt-get install virt-viewer xvfb x11-apps imagemagick)"
fi

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_qemu NAME PORTVAR ARGS...: @PORT@ is replaced by a free port; waits until it listens
start_qemu() {
    local name=$1 var=$2 port pid
    shift 2
    port=$(free_port)
    qemu-system-x86_64 "${@//@PORT@/$port}" >"$WORK/$name.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        if awk -v p="$(printf '%04X' "$port")" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 3) == p { f = 1 } END { exit !f }' /proc/net/tcp; then
            QEMU_PIDS+=("$pid")
            printf -v "$var" '%s' "$port"
            return 0
        fi
        sleep 0.1
    done
    echo "FAIL start $name: $(tail -n 3 "$WORK/$name.log")"
    FAILED=$((FAILED + 1))
    return 1
}

# shot NAME WANT_RC ARGS...: run the script with an outer bound, compare the exit code
shot() {
    local name=$1 want=$2 rc
    shift 2
    timeout -k 2 90 "$SHOT" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
    rc=$?
    if [ "$rc" = "$want" ]; then
        PASSED=$((PASSED + 1))
        echo "PASS $name: exit $rc $(head -n 1 "$WORK/$name.err")"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL $name: exit $rc, expected $want: $(head -n 3 "$WORK/$name.err")"
    fi
}

echo secret >"$WORK/password"
echo wrong >"$WORK/wrong"

if start_qemu qemuS PS -machine pc -accel tcg -m 64 -vga qxl -display none -nodefaults \
        -boot menu=on,splash-time=65000,reboot-timeout=1000 \
        -object secret,id=sec0,data=secret -spice port=@PORT@,addr=127.0.0.1,password-secret=sec0; then
    shot seabios 0 -v --password-file "$WORK/password" "spice://127.0.0.1:$PS" "$WORK/seabios.png"
    # the window: the 720x400 guest plus remote-viewer's header bar and frame
    if "$PY" -c 'import struct, sys; d = open(sys.argv[1], "rb").read(24); w, h = struct.unpack(">II", d[16:24]); sys.exit(not (d[:8] == b"\x89PNG\r\n\x1a\n" and 720 < w < 800 and 400 < h < 520))' "$WORK/seabios.png" 2>/dev/null; then
        PASSED=$((PASSED + 1))
        echo "PASS seabios-png: $(file -b "$WORK/seabios.png")"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL seabios-png: $(file -b "$WORK/seabios.png" 2>&1)"
    fi
    shot seabios-display 0 -v --crop display --password-file "$WORK/password" "spice://127.0.0.1:$PS" "$WORK/display.png"
    shot wrong-password 3 --password-file "$WORK/wrong" "spice://127.0.0.1:$PS" "$WORK/wrong.png"
fi

if start_qemu qemuN PN -machine none -display none -nodefaults \
        -spice port=@PORT@,addr=127.0.0.1,disable-ticketing=on; then
    shot no-display 1 --timeout 8 "spice://127.0.0.1:$PN" "$WORK/nodisplay.png"
fi

shot refused 5 --timeout 10 "spice://127.0.0.1:$(free_port)" "$WORK/refused.png"

echo "== $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
