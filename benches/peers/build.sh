#!/bin/sh
# Build the libspice-server reference peer into target/peers/spice_vmc_peer.
# Needs (Debian 12): apt-get install libspice-server-dev pkg-config gcc
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out_dir="$root/target/peers"
cc=${CC:-gcc}

if ! command -v pkg-config >/dev/null 2>&1; then
    echo "build.sh: pkg-config not found; install it: apt-get install pkg-config" >&2
    exit 1
fi
if ! pkg-config --exists spice-server; then
    echo "build.sh: pkg-config cannot find spice-server; install the apt package libspice-server-dev" >&2
    echo "          (apt-get install --no-install-recommends libspice-server-dev)" >&2
    exit 1
fi
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "build.sh: C compiler '$cc' not found; install it: apt-get install gcc" >&2
    exit 1
fi

mkdir -p "$out_dir"
# shellcheck disable=SC2046
"$cc" -O2 -Wall -Wextra -o "$out_dir/spice_vmc_peer" "$here/spice_vmc_peer.c" \
    $(pkg-config --cflags --libs spice-server)
echo "built $out_dir/spice_vmc_peer (libspice-server $(pkg-config --modversion spice-server))"
