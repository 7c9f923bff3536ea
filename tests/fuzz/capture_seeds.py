#!/usr/bin/env python3
"""Cuts fuzz seeds out of the real spice-gtk <-> QEMU capture.

    python3 tests/fuzz/capture_seeds.py [CAPTURE] [CORPUS_DIR]

Needs tshark. Reads tests/data/qemu72-spicegtk042-main-port-inputs.pcapng
(three connections: main, port, inputs; mini headers; no password) and
writes `capture-*` seeds into tests/fuzz/corpus/<target>/, each prefixed
with the control bytes its target expects (see the targets' doc comments).
The link-stage seeds that should reach `Linked` carry a ticket for the fuzz
key, which only Rust can make: those come from examples/gen_corpus.rs
instead. Output is deterministic; seeds stay under 2 KB each.
"""

import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTURE = os.path.join(HERE, "..", "data", "qemu72-spicegtk042-main-port-inputs.pcapng")
MAX_SEED = 2048


def streams(capture):
    """(client bytes, server bytes) of every TCP connection, in order."""
    out = []
    for n in range(64):
        text = subprocess.run(
            ["tshark", "-r", capture, "-q", "-z", f"follow,tcp,raw,{n}"],
            capture_output=True, text=True, check=True,
        ).stdout
        client, server = b"", b""
        for line in text.splitlines():
            if not line.strip() or line.startswith(("=", "Follow", "Filter", "Node")):
                continue
            if line.startswith("\t"):
                server += bytes.fromhex(line.strip())
            else:
                client += bytes.fromhex(line.strip())
        if not client and not server:
            break
        out.append((client, server))
    return out


def link_stage(client, server):
    """Splits both directions into (link stage, data stage)."""
    link_len = 16 + struct.unpack_from("<I", client, 12)[0]
    # AUTH_SELECTION: mechanism (4) then ticket (128).
    c_end = link_len + 4 + 128
    s_end = 16 + struct.unpack_from("<I", server, 12)[0] + 4
    return client[:c_end], client[c_end:], server[:s_end], server[s_end:]


def whole_mini_messages(data, limit):
    """The longest prefix of complete mini-header messages within `limit`
    bytes, plus (if it fits) the start of the next one, cut short."""
    pos = 0
    while pos + 6 <= len(data):
        size = struct.unpack_from("<I", data, pos + 2)[0]
        if pos + 6 + size > limit:
            break
        pos += 6 + size
    return data[:pos], data[:min(len(data), limit)]


def write(corpus, target, name, data):
    assert len(data) <= MAX_SEED + 16, (name, len(data))
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "capture-" + name), "wb") as f:
        f.write(data)


def main():
    capture = sys.argv[1] if len(sys.argv) > 1 else CAPTURE
    corpus = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "corpus")
    conns = streams(capture)
    names = {1: "main", 10: "port", 3: "inputs"}
    no_splits = b"\x00"
    some_splits = bytes([4, 6, 1, 200, 0])
    for client, server in conns:
        channel_type = client[20]
        name = names[channel_type]
        c_link, c_data, s_link, s_data = link_stage(client, server)

        # server_link: [config][decision][caps u32][drain][splits][stream]
        # Mini header, no password, Accept with channel caps LZ4. The
        # ticket was made for QEMU's key: the link ends TicketUndecryptable.
        write(corpus, "server_link", f"{name}-link",
              bytes([4, 0, 1, 0, 0, 0, 0]) + no_splits + c_link)
        # client_link: [flags][reply caps][channel type][password len][drain]
        # [splits][stream]: the server's real reply (QEMU's DER key) + OK.
        write(corpus, "client_link", f"{name}-reply",
              bytes([1, 0, channel_type, 0, 0]) + some_splits + s_link)

        # deframer: [flags][splits][stream]; mini header.
        _, cut = whole_mini_messages(s_data, MAX_SEED)
        write(corpus, "deframer", f"{name}-server", bytes([1]) + some_splits + cut)
        # messages: [flags][channel type][lz4 limit][lz4 size u32][splits]
        # [stream]; bit 0 mini, bit 1 server -> client.
        whole, _ = whole_mini_messages(s_data, MAX_SEED)
        if whole:
            write(corpus, "messages", f"{name}-server",
                  bytes([3, channel_type, 50]) + struct.pack("<I", 64) + no_splits + whole)
        whole, _ = whole_mini_messages(c_data, MAX_SEED)
        if whole:
            write(corpus, "messages", f"{name}-client",
                  bytes([1, channel_type, 50]) + struct.pack("<I", 64) + no_splits + whole)
    print(f"capture seeds written to {corpus}")


if __name__ == "__main__":
    main()
