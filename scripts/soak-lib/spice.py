"""A small blocking SPICE client for scripts/soak (Python 3 stdlib only).

Enough of the protocol to be a hostile or a well-behaved client of
`vmcrelay serve`: the link stage (header, link message, reply, RSA-OAEP
ticket), mini or full data headers, the main channel (MAIN_INIT,
ATTACH_CHANNELS, CHANNELS_LIST, PING/PONG, SET_ACK/ACK) and spicevmc DATA
both ways. The ticket is encrypted here (RSA-1024, OAEP with SHA-1 and
MGF1-SHA-1, as spice-gtk): encryption needs only the public key and
`pow`, so no crypto library is needed.

The seeded pattern is vmcload's (src/load/pattern.rs): byte p of a stream
is fixed by (seed, p), so either end checks any offset without storing
the stream, and a python client can check what `vmcload endpoint` sends.
"""

import functools
import hashlib
import os
import queue
import socket
import struct
import threading

# ---------------------------------------------------------------- constants

CH_MAIN, CH_PORT = 1, 10
CAP_AUTH_SELECTION, CAP_AUTH_SPICE, CAP_MINI_HEADER = 0, 1, 3

MSG_SET_ACK, MSG_PING = 3, 4
MSGC_ACK_SYNC, MSGC_ACK, MSGC_PONG = 1, 2, 3
MSG_MAIN_INIT, MSG_MAIN_CHANNELS_LIST = 103, 104
MSGC_MAIN_ATTACH_CHANNELS = 104
MSG_DATA = 101  # SPICEVMC_DATA, both directions
MSG_PORT_INIT, MSG_PORT_EVENT = 201, 202
PORT_OPENED, PORT_CLOSED = 0, 1

LINK_ERR_PERMISSION_DENIED = 7
LINK_ERR_CHANNEL_NOT_AVAILABLE = 9
LINK_ERRORS = {
    1: "ERROR",
    2: "INVALID_MAGIC",
    3: "INVALID_DATA",
    4: "VERSION_MISMATCH",
    5: "NEED_SECURED",
    6: "NEED_UNSECURED",
    7: "PERMISSION_DENIED",
    8: "BAD_CONNECTION_ID",
    9: "CHANNEL_NOT_AVAILABLE",
}


class SpiceError(Exception):
    """The peer broke the protocol, closed early, or an I/O step failed."""


class LinkRefused(SpiceError):
    """The server answered the link with an error code."""

    def __init__(self, code):
        super().__init__(f"link refused: {LINK_ERRORS.get(code, code)}")
        self.code = code


# ---------------------------------------------------------------- pattern

_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_PAGE = 4096


def _splitmix(seed, index):
    z = (seed + (index + 1) * _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=4096)  # 16 MiB at most
def _page(seed, p):
    key = _splitmix(seed, p)
    words = [(key + j * _GOLDEN) & _M64 for j in range(512)]
    return struct.pack("<512Q", *[v ^ (v >> 29) for v in words])


def pattern(seed, offset, n):
    """Bytes offset..offset+n of vmcload's stream for `seed`."""
    out = bytearray()
    end = offset + n
    while offset < end:
        p, o = divmod(offset, _PAGE)
        take = min(_PAGE - o, end - offset)
        out += _page(seed, p)[o : o + take]
        offset += take
    return bytes(out)


def first_mismatch(seed, offset, data):
    """None if `data` is the stream at `offset`, else the stream offset of its first wrong byte."""
    want = pattern(seed, offset, len(data))
    if want == data:
        return None
    for i, (a, b) in enumerate(zip(want, data)):
        if a != b:
            return offset + i
    return offset + min(len(want), len(data))


# ---------------------------------------------------------------- RSA-OAEP


def _der(buf, pos):
    """(tag, value start, value end) of the DER element at pos."""
    tag, n = buf[pos], buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[pos : pos + k], "big")
        pos += k
    if pos + n > len(buf):
        raise SpiceError("public key: DER element runs past the end")
    return tag, pos, pos + n


def rsa_public_key(spki):
    """(n, e) of a DER SubjectPublicKeyInfo holding an RSA key."""
    tag, s, _ = _der(spki, 0)  # SEQUENCE
    tag1, s1, e1 = _der(spki, s)  # AlgorithmIdentifier
    tag2, s2, e2 = _der(spki, e1)  # BIT STRING
    if (tag, tag1, tag2) != (0x30, 0x30, 0x03):
        raise SpiceError("public key is not a SubjectPublicKeyInfo")
    inner = spki[s2 + 1 : e2]  # skip the unused-bits byte
    _, s3, _ = _der(inner, 0)  # RSAPublicKey SEQUENCE
    tn, sn, en = _der(inner, s3)
    te, se, ee = _der(inner, en)
    if (tn, te) != (0x02, 0x02):
        raise SpiceError("public key: no modulus/exponent")
    return int.from_bytes(inner[sn:en], "big"), int.from_bytes(inner[se:ee], "big")


def _mgf1(seed, n):
    out = b""
    c = 0
    while len(out) < n:
        out += hashlib.sha1(seed + c.to_bytes(4, "big")).digest()
        c += 1
    return out[:n]


def oaep_encrypt(spki, message):
    """RSA-OAEP (SHA-1, MGF1-SHA-1, empty label) of message for the key in spki."""
    n, e = rsa_public_key(spki)
    k = (n.bit_length() + 7) // 8
    h = 20
    if len(message) > k - 2 * h - 2:
        raise SpiceError("ticket too long for the key")
    db = hashlib.sha1(b"").digest() + b"\0" * (k - len(message) - 2 * h - 2) + b"\1" + message
    seed = os.urandom(h)
    masked_db = bytes(a ^ b for a, b in zip(db, _mgf1(seed, k - h - 1)))
    masked_seed = bytes(a ^ b for a, b in zip(seed, _mgf1(masked_db, h)))
    m = int.from_bytes(b"\0" + masked_seed + masked_db, "big")
    return pow(m, e, n).to_bytes(k, "big")


# ---------------------------------------------------------------- sockets


def tcp(addr, source=None, timeout=20.0):
    """A connected TCP socket to addr=(host, port), from source address `source`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:
        s.close()
        raise SpiceError(f"connect: {e}") from None
    return s


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except socket.timeout:
            raise SpiceError(f"timed out after {len(buf)} of {n} bytes")
        except OSError as e:
            raise SpiceError(f"recv: {e}")
        if not chunk:
            raise SpiceError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def reset_close(s):
    """Closes with a TCP reset (SO_LINGER 0) instead of a FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # shutdown(SHUT_RD) wakes a recv blocked in another thread without sending a FIN,
        # so the close below is the socket's last reference and sends the reset.
        s.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    s.close()


def link_header(size, major=2, minor=2, magic=b"REDQ"):
    return magic + struct.pack("<III", major, minor, size)


def link_mess(channel_type, channel_id, connection_id=0, common_caps=None, channel_caps=()):
    if common_caps is None:
        common_caps = [(1 << CAP_AUTH_SELECTION) | (1 << CAP_AUTH_SPICE) | (1 << CAP_MINI_HEADER)]
    body = struct.pack(
        "<IBBIII", connection_id, channel_type, channel_id, len(common_caps), len(channel_caps), 18
    )
    for w in list(common_caps) + list(channel_caps):
        body += struct.pack("<I", w)
    return body


def link(addr, password, channel_type, channel_id, connection_id=0, source=None, timeout=20.0, ticket=None):
    """Links one channel; returns a Conn. Raises LinkRefused or SpiceError.

    `ticket`: 128 raw bytes sent instead of the encrypted password (an
    undecryptable ticket)."""
    s = tcp(addr, source, timeout)
    try:
        body = link_mess(channel_type, channel_id, connection_id)
        s.sendall(link_header(len(body)) + body)
        magic, major, _minor, size = struct.unpack("<4sIII", recv_exact(s, 16))
        if magic != b"REDQ":
            raise SpiceError(f"link reply magic {magic!r}")
        if major != 2:
            raise SpiceError(f"link reply major version {major}")
        if size > 4096:
            raise SpiceError(f"link reply of {size} bytes")
        reply = recv_exact(s, size)
        (err,) = struct.unpack_from("<I", reply, 0)
        if err:
            raise LinkRefused(err)
        if len(reply) < 178:
            raise SpiceError(f"short link reply ({len(reply)} bytes)")
        spki = reply[4:166]
        ncommon, _nchan, caps_off = struct.unpack_from("<III", reply, 166)
        server_common = struct.unpack_from("<I", reply, caps_off)[0] if ncommon else 0
        out = b""
        if server_common & (1 << CAP_AUTH_SELECTION):
            out += struct.pack("<I", CAP_AUTH_SPICE)
        out += ticket if ticket is not None else oaep_encrypt(spki, password + b"\0")
        s.sendall(out)
        (result,) = struct.unpack("<I", recv_exact(s, 4))
        if result:
            raise LinkRefused(result)
        return Conn(s, mini=bool(server_common & (1 << CAP_MINI_HEADER)))
    except OSError as e:
        s.close()
        raise SpiceError(f"link: {e}") from None
    except BaseException:
        s.close()
        raise


class Conn:
    """A linked channel: whole messages in and out. PING, SET_ACK and ACKs
    are answered inside recv_msg(); sends are serialised by a lock so a
    reader thread may answer while another thread sends data."""

    def __init__(self, sock, mini):
        self.sock, self.mini = sock, mini
        self.buf = bytearray()
        self.serial = 0
        self.ack_window = 0
        self.unacked = 0
        self.lock = threading.Lock()

    def send_msg(self, mtype, body=b""):
        with self.lock:
            if self.mini:
                hdr = struct.pack("<HI", mtype, len(body))
            else:
                self.serial += 1
                hdr = struct.pack("<QHII", self.serial, mtype, len(body), 0)
            self.sock.sendall(hdr + body)

    def send_data(self, payload, chunk=65536):
        for i in range(0, len(payload), chunk):
            self.send_msg(MSG_DATA, payload[i : i + chunk])

    def _fill(self, want):
        while len(self.buf) < want:
            chunk = self.sock.recv(262144)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_msg(self):
        """(type, body) of the next message the caller cares about, or None at EOF.
        Raises socket.timeout / OSError from the socket."""
        while True:
            hl = 6 if self.mini else 18
            if not self._fill(hl):
                return None
            if self.mini:
                mtype, size = struct.unpack_from("<HI", self.buf, 0)
            else:
                _, mtype, size, _ = struct.unpack_from("<QHII", self.buf, 0)
            if size > 16 << 20:
                raise SpiceError(f"message of {size} bytes")
            if not self._fill(hl + size):
                return None
            body = bytes(self.buf[hl : hl + size])
            del self.buf[: hl + size]
            if self.ack_window:
                self.unacked += 1
                if self.unacked >= self.ack_window:
                    self.unacked = 0
                    self.send_msg(MSGC_ACK)
            if mtype == MSG_PING:
                self.send_msg(MSGC_PONG, body[:12])
            elif mtype == MSG_SET_ACK:
                gen, window = struct.unpack_from("<II", body, 0)
                self.ack_window, self.unacked = window, 0
                self.send_msg(MSGC_ACK_SYNC, struct.pack("<I", gen))
            elif mtype in (5, 6, 7):  # WAIT_FOR_CHANNELS, DISCONNECTING, NOTIFY
                pass
            else:
                return mtype, body

    def close(self, reset=False):
        """Closes now, even while another thread is blocked in recv on the socket
        (a bare close() would leave the connection open until that recv returns)."""
        if reset:
            reset_close(self.sock)
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def parse_channels_list(body):
    (n,) = struct.unpack_from("<I", body, 0)
    return [(body[4 + 2 * i], body[5 + 2 * i]) for i in range(min(n, (len(body) - 4) // 2))]


class Session:
    """A main channel and what it announced. A reader thread answers
    PINGs and queues later CHANNELS_LIST entries (a channel announced
    again under a fresh id once its endpoint is back)."""

    def __init__(self, addr, password, source=None, timeout=20.0):
        self.addr, self.password, self.source, self.timeout = addr, password, source, timeout
        self.main = link(addr, password, CH_MAIN, 0, 0, source, timeout)
        self.session_id = None
        self.channels = None
        self.announced = queue.Queue()
        self.closed = threading.Event()
        try:
            while self.channels is None:
                m = self.main.recv_msg()
                if m is None:
                    raise SpiceError("main channel closed before CHANNELS_LIST")
                mtype, body = m
                if mtype == MSG_MAIN_INIT:
                    (self.session_id,) = struct.unpack_from("<I", body, 0)
                    self.main.send_msg(MSGC_MAIN_ATTACH_CHANNELS)
                elif mtype == MSG_MAIN_CHANNELS_LIST:
                    self.channels = parse_channels_list(body)
        except (OSError, socket.timeout) as e:
            self.main.close()
            raise SpiceError(f"main channel: {e}")
        except BaseException:
            self.main.close()
            raise
        self.main.sock.settimeout(None)
        threading.Thread(target=self._read_main, daemon=True).start()

    def _read_main(self):
        try:
            while True:
                m = self.main.recv_msg()
                if m is None:
                    break
                if m[0] == MSG_MAIN_CHANNELS_LIST:
                    for c in parse_channels_list(m[1]):
                        self.announced.put(c)
        except (OSError, SpiceError, struct.error):
            pass
        self.closed.set()

    def open(self, channel_type, channel_id, timeout=None):
        c = link(
            self.addr,
            self.password,
            channel_type,
            channel_id,
            self.session_id,
            self.source,
            timeout or self.timeout,
        )
        return c

    def ids_of(self, channel_type):
        return [i for t, i in self.channels if t == channel_type]

    def close(self, reset=False):
        self.main.close(reset)
