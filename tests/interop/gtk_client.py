#!/usr/bin/python3
"""Drive a real SPICE client (spice-gtk, through PyGObject) against a SPICE server.

Interop harness for vmcrelay: the tests run this against `vmcrelay serve`, and
tests/interop/selftest_qemu.sh validates it against QEMU's own spice-server.
See tests/interop/README.md for the modes, the traps and measured figures.

Contract, for every mode:
  * stdout carries exactly one line: a JSON object with the results
    (spice-gtk/GLib chatter is moved to stderr before anything else runs);
  * on failure a one-line reason is printed on stderr ("gtk_client: FAIL ...");
  * exit codes: 0 success, 1 check failed, 2 usage or environment error,
    3 authentication refused, 4 timeout or stall, 5 could not connect or link;
  * it never hangs: a GLib timeout ends the run after --timeout seconds, a
    SIGALRM handler a few seconds later, and faulthandler's C watchdog after that.

Needs /usr/bin/python3 with python3-gi and gir1.2-spiceclientglib-2.0 (Debian 12).
Stdlib + gi only.
"""

import argparse
import collections
import ctypes
import faulthandler
import hashlib
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from urllib.parse import parse_qs, urlsplit

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_TIMEOUT = 4
EXIT_CONNECT = 5

# Seconds granted after --timeout before the SIGALRM handler, then faulthandler, end the process.
ALARM_GRACE_S = 5
WATCHDOG_GRACE_S = 12

# SPICE constants used by the wire tap (see /work/shared/spice-protocol.md).
SPICE_MAGIC = b"REDQ"
LINK_HEADER_BYTES = 16
LINK_MESS_FIXED_BYTES = 18
LINK_REPLY_FIXED_BYTES = 178
TICKET_BYTES = 128
CAP_AUTH_SELECTION = 0
CAP_AUTH_SPICE = 1
CAP_MINI_HEADER = 3
MINI_HEADER_BYTES = 6
FULL_HEADER_BYTES = 18
MSG_SPICEVMC_DATA = 101
MSG_SPICEVMC_COMPRESSED_DATA = 102
SPICEVMC_CHANNEL_TYPES = (8, 9, 10, 11)  # smartcard, usbredir, port, webdav
CHANNEL_TYPE_NAMES = {1: "main", 2: "display", 3: "inputs", 4: "cursor", 5: "playback",
                      6: "record", 7: "tunnel", 8: "smartcard", 9: "usbredir",
                      10: "port", 11: "webdav"}
# Bounded capture of the first server->client payload bytes per tapped channel.
CAPTURE_PAYLOAD_BYTES = 512
TAP_READ_BYTES = 256 * 1024
TAP_MAX_QUEUED_BYTES = 4 * 1024 * 1024
MAX_TIMELINE_ENTRIES = 200
POOL_BYTES = 16 * 1048576          # port-echo random pool

_json_fd = None          # duplicate of the original stdout, reserved for the final JSON line
_emitted = threading.Lock()
_started_at = time.monotonic()


def _now():
    return round(time.monotonic() - _started_at, 4)


def emit_and_exit(result, code, reason=None):
    """Print the one JSON line (and the one-line reason), then leave at once.

    os._exit skips interpreter teardown: spice-gtk coroutines and GLib sources must
    not get a chance to run (or hang) after the verdict.
    """
    if not _emitted.acquire(blocking=False):
        return
    result = dict(result)
    result["ok"] = code == EXIT_OK
    result["exit_code"] = code
    result["reason"] = reason
    result["elapsed_s"] = _now()
    line = json.dumps(result, sort_keys=False, default=str) + "\n"
    if code != EXIT_OK:
        mode = result.get("mode", "?")
        sys.stderr.write("gtk_client: FAIL %s: %s\n" % (mode, reason))
    sys.stderr.flush()
    fd = _json_fd if _json_fd is not None else 1
    os.write(fd, line.encode())
    os._exit(code)


def hide_library_stdout():
    """Keep stdout for our JSON only: GLib prints debug logs (SPICE_DEBUG=1) on stdout."""
    global _json_fd
    sys.stdout.flush()
    _json_fd = os.dup(1)
    os.dup2(2, 1)


# --------------------------------------------------------------------------
# URI handling


def parse_spice_uri(uri):
    """Return (host, port) from spice://host:port or spice://host?port=P."""
    parts = urlsplit(uri)
    if parts.scheme != "spice":
        raise ValueError("only plain spice:// URIs are supported here, got %r" % uri)
    query = parse_qs(parts.query)
    if "tls-port" in query:
        raise ValueError("tls-port is not supported by this harness")
    host = parts.hostname or "127.0.0.1"
    port = parts.port
    if port is None and "port" in query:
        port = int(query["port"][0])
    if port is None:
        raise ValueError("no port in %r" % uri)
    return host, port


# --------------------------------------------------------------------------
# Wire tap: a loopback TCP relay between spice-gtk and the server that follows
# the SPICE framing, counts payload bytes per channel and direction, captures
# the first server payload bytes and can inject extra DATA messages toward the
# server. It never changes the bytes spice-gtk and the server exchange.


def _caps_has(words, bit):
    index = bit // 32
    return index < len(words) and bool(words[index] & (1 << (bit % 32)))


class _Direction:
    """Incremental parser of one direction of one SPICE connection."""

    def __init__(self, conn, from_client):
        self.conn = conn
        self.from_client = from_client
        self.state = "link-header"
        self.need = LINK_HEADER_BYTES
        self.buf = bytearray()
        self.raw_bytes = 0
        self.messages = 0
        self.types = {}
        self.payload_bytes = 0            # uncompressed spicevmc payload
        self.compressed_messages = 0
        self.compressed_wire_bytes = 0
        self.body_left = 0
        self.body_type = None
        self.body_prefix = bytearray()    # first bytes of a compressed body (type + size)
        self.capture = bytearray()

    def at_message_boundary(self):
        return self.state == "data-header" and not self.buf

    def feed(self, data):
        self.raw_bytes += len(data)
        view = memoryview(data)
        while view:
            if self.state == "opaque":
                return
            if self.state == "auth-pending":
                # The client sends its auth bytes only after reading the server's reply, which
                # this tap has parsed before forwarding it: the server caps are known now.
                if not self.conn.reply_seen:
                    self._opaque("client auth bytes before the server reply")
                    return
                if self.conn.auth_selection():
                    self.state, self.need = "auth", 4
                else:
                    self.state, self.need = "ticket", TICKET_BYTES
            if self.state == "data-body":
                take = min(self.body_left, len(view))
                self._body(view[:take])
                view = view[take:]
                self.body_left -= take
                if self.body_left == 0:
                    self._end_body()
                continue
            take = min(self.need - len(self.buf), len(view))
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == self.need:
                block = bytes(self.buf)
                self.buf.clear()
                self._complete(block)
        return

    def _complete(self, block):
        conn = self.conn
        if self.state == "link-header":
            magic, major, _minor, size = struct.unpack("<4sIII", block)
            if magic != SPICE_MAGIC or major != 2:
                self._opaque("bad link header")
                return
            self.state = "link-body"
            self.need = size
            if size == 0:
                self._opaque("empty link body")
        elif self.state == "link-body":
            if self.from_client:
                conn.on_link_mess(block)
                self.state = "auth-pending"
                self.need = 1
            else:
                conn.on_link_reply(block)
                if conn.link_error:
                    self._opaque("link error %d" % conn.link_error)
                    return
                self.state = "link-result"
                self.need = 4
        elif self.state == "auth":
            (mechanism,) = struct.unpack("<I", block)
            conn.auth_mechanism = mechanism
            if mechanism != CAP_AUTH_SPICE:
                conn.notes.append("SASL or unknown auth mechanism %d: framing not followed" % mechanism)
                self._opaque("sasl")
                conn.s2c._opaque("sasl")
                return
            self.state = "ticket"
            self.need = TICKET_BYTES
        elif self.state == "ticket":
            self.state = "data-header"
            self.need = conn.header_bytes()
        elif self.state == "link-result":
            (result,) = struct.unpack("<I", block)
            conn.link_result = result
            if result != 0:
                self._opaque("link result %d" % result)
                return
            self.state = "data-header"
            self.need = conn.header_bytes()
        elif self.state == "data-header":
            if self.need == MINI_HEADER_BYTES:
                msg_type, size = struct.unpack("<HI", block)
            else:
                _serial, msg_type, size, _sub = struct.unpack("<QHII", block)
            self.messages += 1
            self.types[msg_type] = self.types.get(msg_type, 0) + 1
            self.body_type = msg_type
            self.body_left = size
            self.body_prefix.clear()
            if size == 0:
                self._end_body()
            else:
                self.state = "data-body"

    def _is_vmc_data(self):
        return self.conn.channel_type in SPICEVMC_CHANNEL_TYPES

    def _body(self, chunk):
        if not self._is_vmc_data():
            return
        if self.body_type == MSG_SPICEVMC_DATA:
            self.payload_bytes += len(chunk)
            if len(self.capture) < CAPTURE_PAYLOAD_BYTES:
                self.capture += chunk[:CAPTURE_PAYLOAD_BYTES - len(self.capture)]
        elif self.body_type == MSG_SPICEVMC_COMPRESSED_DATA:
            self.compressed_wire_bytes += len(chunk)
            if len(self.body_prefix) < 5:
                self.body_prefix += chunk[:5 - len(self.body_prefix)]

    def _end_body(self):
        if self._is_vmc_data() and self.body_type == MSG_SPICEVMC_COMPRESSED_DATA:
            self.compressed_messages += 1
            if len(self.body_prefix) == 5:
                _kind, uncompressed = struct.unpack("<BI", bytes(self.body_prefix))
                self.payload_bytes += uncompressed
                self.compressed_wire_bytes -= 5
        self.state = "data-header"
        self.need = self.conn.header_bytes()

    def _opaque(self, why):
        if self.state != "opaque":
            self.state = "opaque"
            self.conn.notes.append("%s: %s" % ("c2s" if self.from_client else "s2c", why))

    def report(self):
        out = {"raw_bytes": self.raw_bytes, "messages": self.messages,
               "message_types": {str(k): v for k, v in sorted(self.types.items())},
               "payload_bytes": self.payload_bytes}
        if self.compressed_messages:
            out["lz4_messages"] = self.compressed_messages
            out["lz4_wire_bytes"] = self.compressed_wire_bytes
        return out


class _TapConnection:
    def __init__(self, tap, client_sock, server_sock):
        self.tap = tap
        self.client_sock = client_sock
        self.server_sock = server_sock
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.client_eof = False
        self.server_eof = False
        self.closed = False
        self.channel_type = None
        self.channel_id = None
        self.connection_id = None
        self.client_caps = ([], [])
        self.server_caps = ([], [])
        self.link_error = 0
        self.link_result = None
        self.reply_seen = False
        self.auth_mechanism = None
        self.notes = []
        self.injected = []                 # list of bytes objects already sent
        self.inject_pending = []
        self.opened_at = _now()
        self.c2s = _Direction(self, True)
        self.s2c = _Direction(self, False)

    # link-stage callbacks from the parsers
    def on_link_mess(self, body):
        if len(body) < LINK_MESS_FIXED_BYTES:
            return
        conn_id, ctype, cid, ncommon, nchannel, offset = struct.unpack_from("<IBBIII", body)
        self.connection_id, self.channel_type, self.channel_id = conn_id, ctype, cid
        self.client_caps = self._caps(body, offset, ncommon, nchannel)
        self.inject_pending = list(self.tap.inject_for(ctype, cid))

    def on_link_reply(self, body):
        self.reply_seen = True
        if len(body) < LINK_REPLY_FIXED_BYTES:
            self.link_error = -1
            return
        (self.link_error,) = struct.unpack_from("<I", body)
        ncommon, nchannel, offset = struct.unpack_from("<III", body, 166)
        if not self.link_error:
            self.server_caps = self._caps(body, offset, ncommon, nchannel)

    @staticmethod
    def _caps(body, offset, ncommon, nchannel):
        words = []
        for i in range(ncommon + nchannel):
            pos = offset + 4 * i
            if pos + 4 > len(body):
                break
            words.append(struct.unpack_from("<I", body, pos)[0])
        return words[:ncommon], words[ncommon:]

    def auth_selection(self):
        return (_caps_has(self.client_caps[0], CAP_AUTH_SELECTION)
                and _caps_has(self.server_caps[0], CAP_AUTH_SELECTION))

    def mini_header(self):
        return (_caps_has(self.client_caps[0], CAP_MINI_HEADER)
                and _caps_has(self.server_caps[0], CAP_MINI_HEADER))

    def header_bytes(self):
        return MINI_HEADER_BYTES if self.mini_header() else FULL_HEADER_BYTES

    def try_inject(self):
        """Send queued DATA messages toward the server, only between two client messages.

        Waits until both peers have sent payload of their own (for usbredir: both hellos),
        so injected bytes never take the place of the client's first packet.
        """
        if not self.inject_pending or self.link_result != 0:
            return
        if self.c2s.payload_bytes == 0 or self.s2c.payload_bytes == 0:
            return
        if not self.c2s.at_message_boundary() or self.s2c.state == "opaque":
            return
        while self.inject_pending:
            payload = self.inject_pending.pop(0)
            if self.mini_header():
                header = struct.pack("<HI", MSG_SPICEVMC_DATA, len(payload))
            else:
                header = struct.pack("<QHII", 0, MSG_SPICEVMC_DATA, len(payload), 0)
            self.to_server += header + payload
            self.injected.append(payload)
        self.tap.want_write(self)

    def report(self):
        out = {"channel_type": self.channel_type,
               "channel_type_name": CHANNEL_TYPE_NAMES.get(self.channel_type, str(self.channel_type)),
               "channel_id": self.channel_id, "connection_id": self.connection_id,
               "link_error": self.link_error, "link_result": self.link_result,
               "mini_header": self.mini_header() if self.link_result == 0 else None,
               "client_caps": {"common": self.client_caps[0], "channel": self.client_caps[1]},
               "server_caps": {"common": self.server_caps[0], "channel": self.server_caps[1]},
               "client_to_server": self.c2s.report(), "server_to_client": self.s2c.report(),
               "server_payload_head_hex": bytes(self.s2c.capture).hex(),
               "client_payload_head_hex": bytes(self.c2s.capture).hex(),
               "injected_bytes": sum(len(p) for p in self.injected),
               "closed": self.closed, "opened_at_s": self.opened_at}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


class WireTap(threading.Thread):
    """Loopback relay in its own thread (the GLib main loop keeps spice-gtk's thread)."""

    def __init__(self, upstream_host, upstream_port, inject=None):
        super().__init__(name="wire-tap", daemon=True)
        self.upstream = (upstream_host, upstream_port)
        self.inject = inject or {}            # {(type, id or None): [payload bytes, ...]}
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.connections = []
        self.lock = threading.Lock()
        self.errors = []
        self.stop_flag = False

    def inject_for(self, ctype, cid):
        return self.inject.get((ctype, cid), []) + self.inject.get((ctype, None), [])

    def snapshot(self):
        with self.lock:
            return [c.report() for c in self.connections]

    def find(self, ctype, cid):
        """Latest tapped connection for a channel (spice-gtk may reconnect)."""
        with self.lock:
            for conn in reversed(self.connections):
                if conn.channel_type == ctype and conn.channel_id == cid:
                    return conn
        return None

    def want_write(self, conn):
        self._update(conn)

    def _update(self, conn):
        if conn.closed:
            return
        for sock, out, peer_out, eof in ((conn.client_sock, conn.to_client, conn.to_server, conn.client_eof),
                                         (conn.server_sock, conn.to_server, conn.to_client, conn.server_eof)):
            events = 0
            if not eof and len(peer_out) < TAP_MAX_QUEUED_BYTES:
                events |= selectors.EVENT_READ
            if out:
                events |= selectors.EVENT_WRITE
            key = self.selector.get_map().get(sock.fileno())
            if events == 0:
                if key is not None:
                    self.selector.unregister(sock)
            elif key is None:
                self.selector.register(sock, events, ("conn", conn))
            elif key.events != events:
                self.selector.modify(sock, events, ("conn", conn))

    def _close(self, conn):
        if conn.closed:
            return
        for sock in (conn.client_sock, conn.server_sock):
            try:
                self.selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        conn.closed = True

    def _accept(self):
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError as exc:
            self.errors.append("tap: cannot connect to %s:%d: %s" % (self.upstream + (exc,)))
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _TapConnection(self, client, server)
        with self.lock:
            self.connections.append(conn)
        self._update(conn)

    def _service(self, sock, conn, mask):
        from_client = sock is conn.client_sock
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(TAP_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                if from_client:
                    conn.client_eof = True
                else:
                    conn.server_eof = True
                other = conn.server_sock if from_client else conn.client_sock
                pending = conn.to_server if from_client else conn.to_client
                if not pending:
                    try:
                        other.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
            elif data:
                with self.lock:
                    if from_client:
                        conn.c2s.feed(data)
                        conn.to_server += data
                    else:
                        conn.s2c.feed(data)
                        conn.to_client += data
                    conn.try_inject()
        if mask & selectors.EVENT_WRITE:
            out = conn.to_client if sock is conn.client_sock else conn.to_server
            try:
                sent = sock.send(out)
                del out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(conn)
                return
            peer_eof = conn.server_eof if sock is conn.client_sock else conn.client_eof
            if not out and peer_eof:
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if conn.client_eof and conn.server_eof and not conn.to_client and not conn.to_server:
            self._close(conn)
            return
        self._update(conn)

    def run(self):
        try:
            while not self.stop_flag:
                for key, mask in self.selector.select(timeout=0.1):
                    kind, conn = key.data
                    if kind == "accept":
                        self._accept()
                    elif not conn.closed:
                        self._service(key.fileobj, conn, mask)
        except Exception as exc:  # a tap bug must surface as a reason, not a hang
            self.errors.append("tap thread crashed: %r" % (exc,))


# --------------------------------------------------------------------------
# spice-gtk driver


def load_gi():
    try:
        import gi
        gi.require_version("SpiceClientGLib", "2.0")
        from gi.repository import GLib, GObject
        from gi.repository import SpiceClientGLib as Spice
    except (ImportError, ValueError) as exc:
        emit_and_exit({"mode": "?"}, EXIT_USAGE,
                      "cannot import spice-gtk through gi (%s); run with /usr/bin/python3 and install "
                      "python3-gi gir1.2-spiceclientglib-2.0" % exc)
    return GLib, GObject, Spice


class Client:
    """One spice-gtk session plus the bookkeeping common to every mode."""

    def __init__(self, args, mode):
        self.GLib, self.GObject, self.Spice = load_gi()
        self.args = args
        self.mode = mode
        self.result = {"mode": mode, "uri": args.uri}
        self.timeline = []
        self.channels = {}        # (type, id) -> info dict
        self.channel_objs = {}    # (type, id) -> SpiceChannel
        self.main_opened = False
        self.tap = None
        self.finishing = False
        self.loop = self.GLib.MainLoop()
        self.session = self.Spice.Session()
        uri = args.uri
        if getattr(args, "tap", False):
            try:
                host, port = parse_spice_uri(args.uri)
            except ValueError as exc:
                self.fail(EXIT_USAGE, str(exc))
            self.tap = WireTap(host, port, inject=getattr(args, "inject", None))
            self.tap.start()
            uri = "spice://127.0.0.1:%d" % self.tap.port
            self.result["tap_port"] = self.tap.port
        self.session.set_property("uri", uri)
        if getattr(args, "ca_file", None):
            self.session.set_property("ca-file", args.ca_file)
        if getattr(args, "cert_subject", None):
            self.session.set_property("cert-subject", args.cert_subject)
        if getattr(args, "secure_channels", None):
            self.session.set_property("secure-channels", args.secure_channels.split(","))
        if args.password is not None:
            self.session.set_property("password", args.password)
        self.on(self.session, "channel-new", self._channel_new)
        self.on(self.session, "disconnected", lambda _s: self.note("session disconnected"))

    # gotcha 1: SpiceSession/SpiceChannel.connect() hide GObject's connect()
    def on(self, obj, signal_name, callback):
        return self.GObject.Object.connect(obj, signal_name, callback)

    def note(self, text):
        if len(self.timeline) < MAX_TIMELINE_ENTRIES:
            self.timeline.append("%.4f %s" % (_now(), text))

    @staticmethod
    def key(ch):
        return (ch.get_property("channel-type"), ch.get_property("channel-id"))

    def wants_channel(self, ctype):
        """Which secondary channels this mode connects (gotcha 2: nobody else does)."""
        return False

    def _channel_new(self, _session, ch):
        ctype, cid = self.key(ch)
        info = {"type": ctype, "type_name": CHANNEL_TYPE_NAMES.get(ctype, str(ctype)), "id": cid,
                "state": "announced"}
        self.channels[(ctype, cid)] = info
        self.channel_objs[(ctype, cid)] = ch
        self.note("channel-new %s %d" % (info["type_name"], cid))
        self.on(ch, "channel-event", self._channel_event)
        if ctype == 1:
            pass    # Session.connect() connects the main channel itself
        elif self.wants_channel(ctype):
            info["state"] = "connecting"
            self.on_channel_created(ch, info)
            ch.connect()
        self.after_channel_new(ch, info)

    def on_channel_created(self, ch, info):
        pass

    def after_channel_new(self, ch, info):
        pass

    def _channel_event(self, ch, event):
        ctype, cid = self.key(ch)
        info = self.channels.get((ctype, cid), {})
        nick = event.value_nick
        err = ch.get_error()
        self.note("channel-event %s %d %s%s" % (CHANNEL_TYPE_NAMES.get(ctype, ctype), cid, nick,
                                                ("" if err is None else " (%s)" % err.message)))
        info["state"] = nick
        if err is not None:
            info["error"] = err.message
        Event = self.Spice.ChannelEvent
        if ctype == 1 and event == Event.OPENED:
            self.main_opened = True
        self.on_channel_event(ch, info, event)
        if event == Event.ERROR_AUTH:
            self.fail(EXIT_AUTH, "%s channel %d: authentication refused (%s)"
                      % (info.get("type_name"), cid, err.message if err else "SPICE_CHANNEL_ERROR_AUTH"),
                      result="auth-error")
        elif event in (Event.ERROR_CONNECT, Event.ERROR_TLS, Event.ERROR_LINK) and self.essential(ch, info):
            self.fail(EXIT_CONNECT, "%s channel %d: %s (%s)"
                      % (info.get("type_name"), cid, nick, err.message if err else "no detail"),
                      result=nick)
        elif event == Event.ERROR_IO or (event == Event.CLOSED and ctype == 1):
            self.on_channel_lost(ch, info, nick)

    def on_channel_event(self, ch, info, event):
        pass

    def essential(self, ch, info):
        """Does a link/connect error on this channel end the run?"""
        return True

    def on_channel_lost(self, ch, info, nick):
        self.fail(EXIT_CHECK_FAILED, "%s channel %d closed unexpectedly (%s)" % (info.get("type_name"), info.get("id"), nick),
                  result="channel-lost")

    # verdicts
    def fill_result(self):
        self.result["channels"] = sorted(self.channels.values(), key=lambda i: (i["type"], i["id"]))
        for (ctype, cid), ch in self.channel_objs.items():
            try:
                self.channels[(ctype, cid)]["total_read_bytes"] = ch.get_property("total-read-bytes")
            except Exception:
                pass
        if self.tap is not None:
            self.result["tap"] = self.tap.snapshot()
            if self.tap.errors:
                self.result["tap_errors"] = list(self.tap.errors)
        self.result["timeline"] = self.timeline

    def fail(self, code, reason, result=None):
        self.result.setdefault("result", result or "failed")
        self.finish(code, reason)

    def succeed(self, result="ok"):
        self.result["result"] = result
        self.finish(EXIT_OK, None)

    def finish(self, code, reason):
        if self.finishing:          # events fired while disconnecting must not re-enter
            return
        self.finishing = True
        self.fill_result()
        # freeze the verdict: handlers keep mutating these dicts while channels close
        self.result = json.loads(json.dumps(self.result, default=str))
        self.disconnect_gracefully()
        emit_and_exit(self.result, code, reason)

    def disconnect_gracefully(self):
        """Linger, then close channels politely, all bounded in time.

        Lingering lets the server's device consume what we wrote: spice-server 0.15.1
        crashes QEMU when a client leaves while a device still holds a partly written
        client message (see README). The close itself avoids abrupt kills (P14).
        """
        try:
            ctx = self.GLib.MainContext.default()
            for seconds, action in ((self.args.linger, None), (0.3, self.session.disconnect)):
                if action is not None:
                    action()
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    if not ctx.iteration(False):
                        time.sleep(0.01)
        except Exception:
            pass

    def on_timeout(self):
        self.fail(EXIT_TIMEOUT, "timeout after %.1f s: %s" % (self.args.timeout, self.timeout_detail()),
                  result="timeout")
        return False

    def timeout_detail(self):
        if not self.main_opened:
            return "main channel never opened"
        return "mode did not complete"

    def start(self):
        self.GLib.timeout_add(int(self.args.timeout * 1000), self.on_timeout)
        if self.tap is not None:
            self.GLib.timeout_add(200, self._check_tap)
        self.before_connect()
        self.note("connect")
        if not self.session.connect():
            self.fail(EXIT_CONNECT, "spice_session_connect() refused to start (bad URI?)")
        self.loop.run()
        self.fail(EXIT_CHECK_FAILED, "main loop ended without a verdict")

    def _check_tap(self):
        if self.tap.errors:
            self.fail(EXIT_CONNECT, self.tap.errors[0])
        return True

    def before_connect(self):
        pass


# --------------------------------------------------------------------------
# Port channels (port-echo, qmp, list)


class PortState:
    def __init__(self, ch):
        self.ch = ch
        self.name = None
        self.opened_seen = False
        self.events = []
        self.received = 0
        self.first_data_at = None


class PortClient(Client):
    """Connects every port channel, since a port's name is known only after its link."""

    def __init__(self, args, mode):
        super().__init__(args, mode)
        self.ports = {}   # (type, id) -> PortState
        self.target = None
        self.target_name = getattr(args, "port_name", None)
        self.target_ready = False

    def wants_channel(self, ctype):
        return ctype in (10, 11)

    def on_channel_created(self, ch, info):
        state = PortState(ch)
        self.ports[self.key(ch)] = state
        self.on(ch, "notify::port-name", lambda c, _p: self._port_name(c, state, info))
        self.on(ch, "notify::port-opened", lambda c, _p: self._port_opened(c, state))
        self.on(ch, "port-event", lambda c, ev: self._port_event(c, state, ev))
        # gotcha 4: data is an int address, valid only during the handler
        self.on(ch, "port-data", lambda c, ptr, size: self._port_data(state, ctypes.string_at(ptr, size)))

    def _port_name(self, ch, state, info):
        state.name = ch.get_property("port-name")
        info["port_name"] = state.name
        self.note("port-name %s" % state.name)
        if state.name == self.target_name and self.target is None:
            self.target = state
            self.result["port_name"] = state.name
        self._maybe_ready()
        self.after_port_name(state)

    def after_port_name(self, state):
        self._check_target_missing()

    def _check_target_missing(self):
        """Fail fast when every announced port is named and none is the target."""
        if self.target is not None or self.target_name is None:
            return
        ports = [c for c in self.channels.values() if c["type"] in (10, 11)]
        if not ports or not all("port_name" in c or c["state"].startswith("error") for c in ports):
            return
        names = [c.get("port_name") for c in ports]
        self.fail(EXIT_CHECK_FAILED, "no port channel named %r (server announced %s)" % (self.target_name, names),
                  result="no-such-port")

    def _port_opened(self, ch, state):
        if ch.get_property("port-opened"):
            state.opened_seen = True
        self.note("port-opened=%s on %s" % (ch.get_property("port-opened"), state.name))
        self._maybe_ready()

    def _port_event(self, ch, state, event):
        state.events.append(event)
        self.note("port-event %d on %s" % (event, state.name))
        if event == 0:
            state.opened_seen = True
        self._maybe_ready()

    def _maybe_ready(self):
        # gotcha 6: writes fail until port-opened; port-opened may flip before port-name is known
        t = self.target
        if t is None or self.target_ready:
            return
        if t.ch.get_property("port-opened"):
            t.opened_seen = True
            self.target_ready = True
            self.note("target port ready")
            self.on_target_ready()

    def _port_data(self, state, data):
        if state.first_data_at is None:
            state.first_data_at = _now()
        state.received += len(data)
        if state is self.target or (self.target is None and state.name == self.target_name):
            self.on_target_data(data)

    def on_target_ready(self):
        pass

    def on_target_data(self, data):
        pass

    def _no_ports_check(self):
        if self.target_name is not None and not any(c["type"] in (10, 11) for c in self.channels.values()):
            self.fail(EXIT_CHECK_FAILED, "server announced no port channel (looking for %r)" % self.target_name,
                      result="no-such-port")
        return False

    def on_channel_event(self, ch, info, event):
        if info.get("type") in (10, 11) and event != self.Spice.ChannelEvent.OPENED:
            self._check_target_missing()
        if info.get("type") == 1 and event == self.Spice.ChannelEvent.OPENED:
            self.GLib.timeout_add(int(max(self.args.settle, 1.0) * 1000), self._no_ports_check)

    def essential(self, ch, info):
        state = self.ports.get(self.key(ch))
        return info.get("type") == 1 or (state is not None and state is self.target)

    def on_channel_lost(self, ch, info, nick):
        state = self.ports.get(self.key(ch))
        if info.get("type") == 1 or (state is not None and state is self.target):
            super().on_channel_lost(ch, info, nick)

    def write(self, data, done):
        """write_async with the buffer kept alive until write_finish (gotcha 3)."""
        target = self.target.ch
        keep = {"data": data}

        def finished(ch, res, _user=None):
            try:
                written = ch.write_finish(res)
            except Exception as exc:  # GLib.Error
                self.fail(EXIT_CHECK_FAILED, "port write failed: %s" % exc, result="write-error")
                return
            keep.clear()
            done(written)

        target.write_async(data, None, finished, None)
        return keep

    def port_report(self, state):
        if state is None:
            return {"port_opened_seen": False, "port_events": []}
        return {"port_opened_seen": state.opened_seen, "port_events": list(state.events)}


class PortEcho(PortClient):
    def __init__(self, args):
        super().__init__(args, "port-echo")
        self.total = args.bytes
        self.rng = random.Random(args.seed)
        # Chunks are slices of a seeded random pool at seeded random offsets: deterministic,
        # never periodic at chunk granularity, and ~20x cheaper than randbytes per chunk
        # (randbytes alone capped the harness near 500 MiB/s of one core).
        self.pool = self.rng.randbytes(min(POOL_BYTES, max(self.total, 1)))
        self.sha_sent = hashlib.sha256()
        self.sha_recv = hashlib.sha256()
        self.sent_submitted = 0
        self.sent_done = 0
        self.inflight = 0
        self.received = 0
        self.unverified = bytearray()     # sent bytes not yet echoed, for the first-mismatch offset
        self.verify_limit = args.verify_window
        self.verify_offset = 0            # stream offset of unverified[0]
        self.verify_disabled = False
        self.mismatch_at = None
        self.t_first_write = None
        self.t_last_rx = None
        self.last_progress = time.monotonic()
        self.result.update({"bytes": self.total, "chunk": args.chunk, "inflight_max": args.inflight,
                            "seed": args.seed})

    def on_target_ready(self):
        self.t_first_write = time.monotonic()
        if self.total == 0:
            self._done_check()
            return
        self._pump()

    def _pump(self):
        while self.inflight < self.args.inflight and self.sent_submitted < self.total:
            size = min(self.args.chunk, self.total - self.sent_submitted)
            if size <= len(self.pool):
                offset = self.rng.randrange(0, len(self.pool) - size + 1)
                data = self.pool[offset:offset + size]
            else:
                data = self.rng.randbytes(size)
            self.sha_sent.update(data)
            if not self.verify_disabled:
                if len(self.unverified) + size > self.verify_limit:
                    self.verify_disabled = True     # SHA-256 still decides; no mismatch offset
                    self.unverified.clear()
                else:
                    self.unverified += data
            self.sent_submitted += size
            self.inflight += 1
            self.write(data, self._written)

    def _written(self, written):
        self.inflight -= 1
        self.sent_done += written
        self.last_progress = time.monotonic()
        self._pump()
        self._done_check()

    def on_target_data(self, data):
        self.last_progress = self.t_last_rx = time.monotonic()
        if self.mismatch_at is None and not self.verify_disabled:
            start = self.received - self.verify_offset
            if start >= 0 and start < len(self.unverified):
                expect = self.unverified[start:start + len(data)]
                if expect != data[:len(expect)]:
                    for i, (a, b) in enumerate(zip(expect, data)):
                        if a != b:
                            self.mismatch_at = self.received + i
                            break
                    else:
                        self.mismatch_at = self.received + len(expect)
                # drop verified bytes, keeping offsets straight
                consumed = min(start + len(data), len(self.unverified))
                del self.unverified[:consumed]
                self.verify_offset += consumed
        self.received += len(data)
        self.sha_recv.update(data)
        if self.mismatch_at is not None:
            self.fail(EXIT_CHECK_FAILED, "echo differs from what was sent, first difference at byte %d "
                      "(received %d of %d bytes)" % (self.mismatch_at, self.received, self.total),
                      result="mismatch")
        if self.t_first_write is None:
            self.fail(EXIT_CHECK_FAILED, "port sent %d bytes before anything was written (not an echo port?)"
                      % len(data), result="unexpected-data")
        self._done_check()

    def _done_check(self):
        if self.received > self.total:
            self.fail(EXIT_CHECK_FAILED, "received %d bytes, more than the %d sent" % (self.received, self.total),
                      result="extra-data")
        if self.received == self.total and self.sent_done == self.total:
            if self.sha_recv.hexdigest() == self.sha_sent.hexdigest():
                self.succeed("echoed")
            self.fail(EXIT_CHECK_FAILED, "sha256 of echoed bytes differs from sent", result="mismatch")

    def fill_result(self):
        super().fill_result()
        end = self.t_last_rx or time.monotonic()
        seconds = (end - self.t_first_write) if self.t_first_write else None
        self.result.update({
            "bytes_sent": self.sent_done, "bytes_submitted": self.sent_submitted,
            "bytes_received": self.received,
            "seconds": round(seconds, 6) if seconds is not None else None,
            "mib_per_s": round(self.received / 1048576 / seconds, 3) if seconds else None,
            "sha256_sent": self.sha_sent.hexdigest(), "sha256_received": self.sha_recv.hexdigest(),
            "first_mismatch_offset": self.mismatch_at,
        })
        self.result.update(self.port_report(self.target))

    def timeout_detail(self):
        if self.target is None:
            return "port %r not found or not linked (main opened: %s)" % (self.target_name, self.main_opened)
        if not self.target_ready:
            return "port %r never reported port-opened" % self.target_name
        idle = time.monotonic() - self.last_progress
        return ("stalled: sent %d/%d, received %d/%d bytes, no progress for %.1f s"
                % (self.sent_done, self.total, self.received, self.total, idle))


class Qmp(PortClient):
    # Include each reply's "return" value in `replies` when the line is at most this long
    # (0: never; the qmp mode keeps its replies small, a schema is 200 KB).
    keep_return_bytes = 0

    def __init__(self, args, mode="qmp", commands=None):
        super().__init__(args, mode)
        self.commands = commands if commands is not None else [c for c in args.commands.split(",") if c]
        self.buf = bytearray()
        self.greeting = None
        self.index = -1
        self.replies = []
        self.events = 0
        self.t_sent = None
        self.keep = []
        self.last_rx = time.monotonic()
        self.rx_bytes = 0

    def on_target_ready(self):
        self.note("qmp port ready, waiting for greeting")

    def on_target_data(self, data):
        self.rx_bytes += len(data)
        self.last_rx = time.monotonic()
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self.buf[:nl + 1])
            del self.buf[:nl + 1]
            self._line(line)

    def _line(self, line):
        text = line.strip()
        if not text:
            return
        try:
            obj = json.loads(text)
        except ValueError:
            self.fail(EXIT_CHECK_FAILED, "QMP sent a line that is not JSON: %r" % text[:120], result="bad-json")
        if "QMP" in obj:
            self.greeting = {"bytes": len(line), "version": obj["QMP"].get("version", {}).get("qemu")}
            self.note("qmp greeting")
            self._send_next()
        elif "event" in obj:
            self.events += 1
        elif "return" in obj or "error" in obj:
            if self.index < 0 or self.index >= len(self.commands):
                self.fail(EXIT_CHECK_FAILED, "unsolicited QMP reply %r" % text[:120], result="protocol")
            cmd = self.commands[self.index]
            reply = {"command": cmd, "bytes": len(line),
                     "seconds": round(time.monotonic() - self.t_sent, 6)}
            if "error" in obj:
                reply["error"] = obj["error"]
            elif len(line) <= self.keep_return_bytes:
                reply["return"] = obj["return"]
            self.replies.append(reply)
            self.note("qmp reply to %s (%d bytes)" % (cmd, len(line)))
            if "error" in obj:
                self.fail(EXIT_CHECK_FAILED, "QMP command %s failed: %s" % (cmd, obj["error"].get("desc")),
                          result="qmp-error")
            self._send_next()
        else:
            self.fail(EXIT_CHECK_FAILED, "unexpected QMP line %r" % text[:120], result="protocol")

    def _send_next(self):
        self.index += 1
        if self.index >= len(self.commands):
            self.on_commands_done()
            return
        cmd = self.commands[self.index]
        data = json.dumps({"execute": cmd}).encode() + b"\r\n"
        self.t_sent = time.monotonic()
        self.keep.append(self.write(data, lambda _n: None))

    def on_commands_done(self):
        self.succeed("replied")

    def qmp_done(self):
        return self.index >= len(self.commands)

    def qmp_report(self):
        out = {"greeting": self.greeting, "replies": self.replies, "events_skipped": self.events,
               "bytes_received": self.rx_bytes}
        if 0 <= self.index < len(self.commands) and len(self.replies) <= self.index:
            out["pending_command"] = self.commands[self.index]
            out["pending_reply_bytes"] = len(self.buf)
        out.update(self.port_report(self.target))
        return out

    def fill_result(self):
        super().fill_result()
        self.result.update(self.qmp_report())

    def timeout_detail(self):
        return self.qmp_detail()

    def qmp_detail(self):
        if self.target is None:
            return "port %r not found or not linked (main opened: %s)" % (self.target_name, self.main_opened)
        if self.greeting is None:
            return "no QMP greeting (port-opened: %s, %d bytes received)" % (self.target_ready, self.rx_bytes)
        cmd = self.commands[self.index] if self.index < len(self.commands) else "?"
        return ("stall: reply to %s incomplete, %d bytes of it received, nothing new for %.1f s"
                % (cmd, len(self.buf), time.monotonic() - self.last_rx))


class ListChannels(PortClient):
    def __init__(self, args):
        super().__init__(args, "list")
        self.pending = None
        self.settled = False

    def wants_channel(self, ctype):
        return self.args.port_names and ctype in (10, 11)

    def after_channel_new(self, ch, info):
        self._arm()

    def on_channel_event(self, ch, info, event):
        if info.get("type") == 1 and event == self.Spice.ChannelEvent.OPENED:
            self._arm()
        self._check_done()

    def after_port_name(self, state):
        self._check_done()

    def on_channel_lost(self, ch, info, nick):
        if info.get("type") == 1:
            super().on_channel_lost(ch, info, nick)

    def _arm(self):
        """CHANNELS_LIST arrives as a burst of channel-new: wait --settle after the last one."""
        if self.pending is not None:
            self.GLib.source_remove(self.pending)
        self.pending = self.GLib.timeout_add(int(self.args.settle * 1000), self._settled)

    def _settled(self):
        self.pending = None
        self.settled = True
        self._check_done()
        return False

    def _check_done(self):
        if not self.settled:
            return
        for info in self.channels.values():
            if self.wants_channel(info["type"]) and "port_name" not in info and not info["state"].startswith("error"):
                return
        self.succeed("listed")

    def timeout_detail(self):
        missing = [i["id"] for i in self.channels.values() if i["type"] in (10, 11) and "port_name" not in i]
        return "main opened: %s; port channels without a name yet: %s" % (self.main_opened, missing)


# --------------------------------------------------------------------------
# auth


class Auth(Client):
    def __init__(self, args):
        super().__init__(args, "auth")

    def on_channel_event(self, ch, info, event):
        if info.get("type") == 1 and event == self.Spice.ChannelEvent.OPENED:
            self.succeed("linked")


# --------------------------------------------------------------------------
# usbredir


def parse_usbredir_hello(head):
    """Decode the usbredir hello at the start of a stream (12-byte header, 32-bit ids)."""
    if len(head) < 12:
        return None
    ptype, length, _id = struct.unpack_from("<III", head)
    if ptype != 0 or length < 64:
        return {"type": ptype, "length": length, "is_hello": False}
    out = {"type": 0, "length": length, "is_hello": True, "packet_bytes": 12 + length}
    if len(head) >= 12 + 64:
        out["version"] = head[12:76].split(b"\0", 1)[0].decode("ascii", "replace")
    caps = []
    for pos in range(76, min(12 + length, len(head)) - 3, 4):
        caps.append(struct.unpack_from("<I", head, pos)[0])
    out["caps"] = caps
    return out


class Usbredir(Client):
    def __init__(self, args):
        super().__init__(args, "usbredir")
        self.usb_manager = None
        self.opened = set()
        self.settle_timer = None
        self.result.update({"expect_hello": args.expect_hello, "send_hex": args.send_hex})

    def before_connect(self):
        # gotcha 5: without a device manager every usbredir channel logs a critical assertion.
        # The manager also connects the usbredir channels itself (measured with spice-gtk 0.42).
        try:
            self.usb_manager = self.Spice.UsbDeviceManager.get(self.session)
        except Exception as exc:
            self.fail(EXIT_USAGE, "UsbDeviceManager.get failed: %s" % exc)
        self.GLib.timeout_add(100, self._poll)

    def wants_channel(self, ctype):
        return False

    def after_channel_new(self, ch, info):
        if info["type"] == 9:
            # If the manager has not started this channel after a grace period, start it ourselves.
            self.GLib.timeout_add(1000, lambda: self._kick(ch, info))

    def _kick(self, ch, info):
        if info["state"] == "announced":
            self.note("usbredir %d not started by the USB manager, connecting it" % info["id"])
            info["state"] = "connecting"
            ch.connect()
        return False

    def on_channel_event(self, ch, info, event):
        if info.get("type") == 9 and event == self.Spice.ChannelEvent.OPENED:
            self.opened.add(info["id"])

    def on_channel_lost(self, ch, info, nick):
        self.fail(EXIT_CHECK_FAILED, "%s channel %d closed (%s)" % (info.get("type_name"), info.get("id"), nick),
                  result="channel-lost")

    def _usb_channels(self):
        return sorted(i["id"] for i in self.channels.values() if i["type"] == 9)

    def _channel_ok(self, cid):
        """(done, detail) for one usbredir channel."""
        if cid not in self.opened:
            return False, "not opened"
        if self.tap is None:
            read = self.channel_objs[(9, cid)].get_property("total-read-bytes")
            return read > 0, "total-read-bytes %d" % read
        conn = self.tap.find(9, cid)
        if conn is None:
            return False, "no tapped connection"
        head = bytes(conn.s2c.capture)
        if self.args.expect_hello:
            hello = parse_usbredir_hello(head)
            if hello is None or not hello.get("is_hello") or len(head) < hello["packet_bytes"]:
                return False, "no complete usbredir hello (%d payload bytes)" % conn.s2c.payload_bytes
        elif conn.s2c.payload_bytes == 0:
            return False, "no payload from server"
        inject_here = self.args.channel_id is None or self.args.channel_id == cid
        if self.args.send_hex and inject_here and sum(len(p) for p in conn.injected) == 0:
            return False, "injection pending"
        return True, "ok"

    def _poll(self):
        ids = self._usb_channels()
        if not ids:
            return True
        status = {cid: self._channel_ok(cid) for cid in ids}
        self.status = {cid: detail for cid, (_ok, detail) in status.items()}
        if all(ok for ok, _ in status.values()) and self.settle_timer is None:
            self.note("all usbredir channels done; settling %.1f s" % self.args.settle)
            self.settle_timer = self.GLib.timeout_add(int(self.args.settle * 1000), self._settled)
        return True

    def _settled(self):
        self.succeed("usbredir-ok")
        return False

    def fill_result(self):
        super().fill_result()
        per = []
        for cid in self._usb_channels():
            entry = {"id": cid, "opened": cid in self.opened,
                     "total_read_bytes": self.channel_objs[(9, cid)].get_property("total-read-bytes")}
            if self.tap is not None:
                conn = self.tap.find(9, cid)
                if conn is not None:
                    with self.tap.lock:
                        entry["server_payload_bytes"] = conn.s2c.payload_bytes
                        entry["client_payload_bytes"] = conn.c2s.payload_bytes
                        entry["injected_bytes"] = sum(len(p) for p in conn.injected)
                        entry["server_raw_bytes"] = conn.s2c.raw_bytes
                        entry["client_raw_bytes"] = conn.c2s.raw_bytes
                        head = bytes(conn.s2c.capture)
                        client_head = bytes(conn.c2s.capture)
                    entry["hello"] = parse_usbredir_hello(head)
                    entry["client_hello"] = parse_usbredir_hello(client_head)
                    entry["server_payload_head_hex"] = head[:160].hex()
                    entry["client_payload_head_hex"] = client_head[:160].hex()
            per.append(entry)
        self.result["usbredir"] = per
        if getattr(self, "status", None):
            self.result["status"] = {str(k): v for k, v in self.status.items()}

    def timeout_detail(self):
        if not self.main_opened:
            return "main channel never opened"
        if not self._usb_channels():
            return "server announced no usbredir channel"
        return "usbredir channels not done: %s" % {cid: self._channel_ok(cid)[1] for cid in self._usb_channels()}


# --------------------------------------------------------------------------
# display: main, display, inputs, cursor and the rest, like a viewer without a window

SURFACE_FORMATS = {1: "1_A", 8: "8_A", 16: "16_555", 32: "32_xRGB", 80: "16_565", 96: "32_ARGB"}
SURFACE_BYTES_PER_PIXEL = {8: 1, 16: 2, 32: 4, 80: 2, 96: 4}
# PC XT (set 1) scancodes as SpiceInputsChannel.key_press takes them; 0x100 | code is an
# 0xe0-prefixed (extended) key in spice-gtk.
KEY_SCANCODES = {"esc": 0x01, "enter": 0x1c, "space": 0x39, "tab": 0x0f, "backspace": 0x0e,
                 "f1": 0x3b, "f2": 0x3c, "f10": 0x44, "f11": 0x57, "f12": 0x58,
                 "1": 0x02, "2": 0x03, "3": 0x04, "up": 0x148, "down": 0x150, "left": 0x14b, "right": 0x14d}
# A usbredir hello seen without the tap: 6-byte mini header + 80-byte hello after OPENED.
USBREDIR_HELLO_WIRE_BYTES = 86


class Frame:
    """One copy of the primary surface, with the figures the display mode reports."""

    def __init__(self, surface):
        fmt, width, height, stride = surface["format"], surface["width"], surface["height"], surface["stride"]
        bpp = SURFACE_BYTES_PER_PIXEL[fmt]
        row = width * bpp
        step = abs(stride)
        raw = ctypes.string_at(surface["ptr"], step * height)
        if step != row:
            raw = b"".join(raw[y * step:y * step + row] for y in range(height))
        pixels = bytearray(raw)
        if fmt == 32:
            pixels[3::4] = bytes(len(pixels) // 4)            # the x byte of xRGB is undefined
        elif fmt == 16:
            pixels[1::2] = pixels[1::2].translate(bytes(b & 0x7f for b in range(256)))
        self.bpp = bpp
        self.width, self.height = width, height
        self.pixels = bytes(pixels)
        self.sha256 = hashlib.sha256(self.pixels).hexdigest()
        self._counts = None

    def _stats(self):
        # about 25 ms for 720x400: computed only for frames that are reported or compared
        if self._counts is None:
            self._counts = collections.Counter(self.values())
        return self._counts

    @property
    def background(self):
        counts = self._stats()
        return counts.most_common(1)[0][0] if counts else 0

    @property
    def nonblank(self):
        """Pixels not of the most common colour (the background)."""
        counts = self._stats()
        return self.width * self.height - (counts.most_common(1)[0][1] if counts else 0)

    @property
    def nonzero(self):
        return self.width * self.height - self._stats().get(0, 0)

    @property
    def colors(self):
        return len(self._stats())

    def values(self):
        return memoryview(self.pixels).cast({4: "I", 2: "H", 1: "B"}[self.bpp])

    def changed_pixels(self, other):
        if other.sha256 == self.sha256:
            return 0
        if len(other.pixels) != len(self.pixels):
            return self.width * self.height
        return sum(1 for a, b in zip(self.values(), other.values()) if a != b)

    def report(self, suffix=""):
        return {"fb_sha256" + suffix: self.sha256, "nonblank_pixels" + suffix: self.nonblank,
                "nonzero_pixels" + suffix: self.nonzero, "background" + suffix: "%0*x" % (2 * self.bpp, self.background),
                "distinct_colors" + suffix: self.colors}

    def write_png(self, path):
        """RGB PNG with zlib only. 32-bit formats are B,G,R,X in memory."""
        if self.bpp != 4:
            raise ValueError("PNG only for 32-bit surfaces")
        rgb = bytearray(self.width * self.height * 3)
        rgb[0::3] = self.pixels[2::4]
        rgb[1::3] = self.pixels[1::4]
        rgb[2::3] = self.pixels[0::4]
        row = self.width * 3
        raw = b"".join(b"\0" + bytes(rgb[y * row:(y + 1) * row]) for y in range(self.height))

        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
        with open(path, "wb") as f:
            f.write(png)


class Display(Qmp):
    """Connect every channel but usbredir (unless asked), prove the display, optionally press a key.

    Reuses Qmp for --qmp-command (the same session links the QMP port) and the tap or
    total-read-bytes for --expect-usbredir-hello.
    """

    keep_return_bytes = 4096

    def __init__(self, args):
        self.qmp_wanted = args.qmp_command is not None or args.qmp_port_name is not None
        commands = []
        if self.qmp_wanted:
            commands = [c for c in (args.qmp_command or "query-status").split(",") if c]
            if "qmp_capabilities" not in commands:
                commands.insert(0, "qmp_capabilities")
        super().__init__(args, "display", commands=commands)
        self.target_name = (args.qmp_port_name or "org.qemu.monitor.qmp.0") if self.qmp_wanted else None
        self.want_usbredir = args.usbredir or args.expect_usbredir_hello
        self.usb_manager = None
        self.usb_opened = {}          # usbredir id -> total-read-bytes at OPENED
        self.surface = None           # latest primary surface
        self.surfaces_created = 0
        self.invalidates = 0
        self.invalidated_pixels = 0
        self.large_invalidates = 0
        self.settle_timer = None
        self.first = None             # first settled frame
        self.baseline = None          # settled, right size, not blank: "drawn"
        self.settled_at = None
        self.key_scancode = args.key_scancode
        self.key_state = None         # None, "waiting-inputs", "sent", "done"
        self.key_sent_at = None
        self.key_invalidates_at_send = 0
        self.key_frame = None
        self.key_changed_pixels = None
        self.key_change_s = None
        self.changed_after_key = None
        self.final_frame = None
        self.display_done = False
        self.hold_started = None
        self.held_s = None
        self.result.update({"expect_size": args.expect_size, "key_scancode": self.key_scancode,
                            "qmp_requested": self.qmp_wanted, "usbredir_requested": self.want_usbredir,
                            "expect_usbredir_hello": args.expect_usbredir_hello})

    # which channels
    def before_connect(self):
        if self.want_usbredir:
            # gotcha 5: a usbredir channel that links without a device manager logs criticals;
            # with one, the manager connects every usbredir channel itself.
            try:
                self.usb_manager = self.Spice.UsbDeviceManager.get(self.session)
            except Exception as exc:
                self.fail(EXIT_USAGE, "UsbDeviceManager.get failed: %s" % exc)
            self.GLib.timeout_add(100, self._poll_usb)

    def wants_channel(self, ctype):
        return ctype != 9

    def after_channel_new(self, ch, info):
        if info["type"] == 9 and self.want_usbredir:
            self.GLib.timeout_add(1000, lambda: self._kick(ch, info))

    def _kick(self, ch, info):
        if info["state"] == "announced" and not self.finishing:
            self.note("usbredir %d not started by the USB manager, connecting it" % info["id"])
            info["state"] = "connecting"
            ch.connect()
        return False

    def on_channel_created(self, ch, info):
        ctype = info["type"]
        if ctype in (10, 11):
            super().on_channel_created(ch, info)
        elif ctype == 2:
            self.on(ch, "display-primary-create", self._primary_create)
            self.on(ch, "display-primary-destroy", self._primary_destroy)
            self.on(ch, "display-invalidate", self._invalidate)

    def essential(self, ch, info):
        ctype = info.get("type")
        if ctype in (1, 2):
            return True
        if ctype == 3:
            return self.key_scancode is not None
        if ctype == 9:
            return self.args.expect_usbredir_hello
        state = self.ports.get(self.key(ch))
        return state is not None and state is self.target

    def on_channel_lost(self, ch, info, nick):
        if self.essential(ch, info):
            Client.on_channel_lost(self, ch, info, nick)

    def on_channel_event(self, ch, info, event):
        super().on_channel_event(ch, info, event)
        Event = self.Spice.ChannelEvent
        if self.hold_started is not None and event != Event.OPENED:
            self.fail(EXIT_CHECK_FAILED, "%s channel %d: %s %.2f s into --hold (kicked by another client?)"
                      % (info.get("type_name"), info.get("id"), event.value_nick,
                         time.monotonic() - self.hold_started), result="lost-during-hold")
        if event != Event.OPENED:
            return
        if info.get("type") == 9:
            self.usb_opened[info["id"]] = ch.get_property("total-read-bytes")
        elif info.get("type") == 3 and self.key_state == "waiting-inputs":
            self._send_key()
        elif info.get("type") == 1:
            self.GLib.timeout_add(int(max(self.args.settle, 1.0) * 1000), self._announced_check)

    def _announced_check(self):
        types = {i["type"] for i in self.channels.values()}
        if 2 not in types:
            self.fail(EXIT_CHECK_FAILED, "server announced no display channel (%s)" % self._type_list(),
                      result="no-display")
        if self.key_scancode is not None and 3 not in types:
            self.fail(EXIT_CHECK_FAILED, "server announced no inputs channel (%s)" % self._type_list(),
                      result="no-inputs")
        if self.args.expect_usbredir_hello and 9 not in types:
            self.fail(EXIT_CHECK_FAILED, "server announced no usbredir channel (%s)" % self._type_list(),
                      result="no-usbredir")
        return False

    def _type_list(self):
        return ", ".join("%s/%d" % (i["type_name"], i["id"]) for i in sorted(self.channels.values(),
                                                                             key=lambda i: (i["type"], i["id"])))

    # display signals
    def _primary_create(self, ch, fmt, width, height, stride, shmid, ptr):
        self.surfaces_created += 1
        self.surface = {"format": fmt, "width": width, "height": height, "stride": stride, "shmid": shmid,
                        "ptr": ptr, "created_at_s": _now(), "channel_id": ch.get_property("channel-id")}
        self.note("display-primary-create %dx%d format %s stride %d" % (width, height,
                                                                        SURFACE_FORMATS.get(fmt, fmt), stride))
        if fmt not in SURFACE_BYTES_PER_PIXEL:
            self.fail(EXIT_CHECK_FAILED, "primary surface format %s is not supported by the harness" % fmt,
                      result="unsupported-format")
        self._arm_settle()

    def _primary_destroy(self, ch):
        self.note("display-primary-destroy")
        if self.surface is not None:
            self.surface["ptr"] = None      # the pixels are gone: never read them again

    def _invalidate(self, ch, x, y, w, h):
        self.invalidates += 1
        area = w * h
        self.invalidated_pixels += area
        if self.invalidates == 1:
            self.note("first display-invalidate %d,%d %dx%d" % (x, y, w, h))
        if area > self.args.tiny_invalidate:
            # a blinking text cursor is a stream of 9x2 invalidates: they do not delay settling
            self.large_invalidates += 1
            if self.key_state != "sent":
                self._arm_settle()

    def _frame(self):
        s = self.surface
        if s is None or not s["ptr"]:
            return None
        return Frame(s)

    def _arm_settle(self):
        if self.settle_timer is not None:
            self.GLib.source_remove(self.settle_timer)
        self.settle_timer = self.GLib.timeout_add(int(self.args.settle * 1000), self._settled)

    def _size_ok(self):
        want = self.args.expect_size
        return want is None or (self.surface["width"], self.surface["height"]) == want

    def _settled(self):
        self.settle_timer = None
        if self.finishing or self.display_done:
            return False
        frame = self._frame()
        if frame is None or self.invalidates == 0:
            return False
        if self.first is None:
            self.first = frame
        if self.baseline is not None and self.key_state is None:
            return False
        if not self._size_ok():
            self.note("settled at %dx%d, expected %dx%d: waiting for another surface"
                      % ((self.surface["width"], self.surface["height"]) + self.args.expect_size))
            return False
        if frame.nonblank < self.args.min_nonblank:
            self.note("settled but blank (%d non-background pixels)" % frame.nonblank)
            return False
        if self.baseline is None:
            self.baseline = frame
            self.settled_at = _now()
            self.note("display settled: %d non-background pixels, sha256 %s" % (frame.nonblank, frame.sha256[:16]))
            if self.key_scancode is None:
                self.final_frame = frame
                self.display_done = True
                self._check_done()
            else:
                self._send_key()
        elif self.key_state == "changed":
            self.final_frame = frame       # the screen after the key, settled
            self.key_state = "done"
            self.display_done = True
            self._check_done()
        return False

    # the key
    def _inputs(self):
        for (ctype, _cid), ch in sorted(self.channel_objs.items(), key=lambda kv: kv[0]):
            if ctype == 3 and self.channels[(ctype, _cid)]["state"] == "opened":
                return ch
        return None

    def _send_key(self):
        inputs = self._inputs()
        if inputs is None:
            self.key_state = "waiting-inputs"
            self.note("display settled, waiting for the inputs channel")
            return
        self.key_state = "sent"
        self.key_sent_at = time.monotonic()
        self.key_invalidates_at_send = self.invalidates
        inputs.key_press(self.key_scancode)
        inputs.key_release(self.key_scancode)
        self.note("key 0x%x pressed and released" % self.key_scancode)
        self.GLib.timeout_add(50, self._poll_key)

    def _poll_key(self):
        if self.finishing or self.key_state != "sent":
            return False
        elapsed = time.monotonic() - self.key_sent_at
        frame = self._frame()
        if frame is not None and frame.sha256 != self.baseline.sha256:
            changed = frame.changed_pixels(self.baseline)
            self.key_changed_pixels = changed
            if changed >= self.args.min_changed_pixels:
                self.key_frame = frame
                self.key_change_s = round(elapsed, 4)
                self.changed_after_key = True
                self.key_state = "changed"
                self.note("screen changed %.3f s after the key: %d pixels" % (elapsed, changed))
                self._arm_settle()
                return False
        if elapsed >= self.args.key_timeout:
            self.changed_after_key = False
            self.key_state = "done"
            self.final_frame = frame
            self.fail(EXIT_CHECK_FAILED, "screen unchanged %.1f s after key 0x%x (%s pixels changed, %d needed)"
                      % (self.args.key_timeout, self.key_scancode, self.key_changed_pixels or 0,
                         self.args.min_changed_pixels), result="unchanged-after-key")
        return True

    # usbredir
    def _usb_ids(self):
        return sorted(i["id"] for i in self.channels.values() if i["type"] == 9)

    def _usb_status(self, cid):
        """(hello seen, detail) for one usbredir channel."""
        if cid not in self.usb_opened:
            return False, "not opened"
        if self.tap is None:
            after = self.channel_objs[(9, cid)].get_property("total-read-bytes") - self.usb_opened[cid]
            return after >= USBREDIR_HELLO_WIRE_BYTES, "%d bytes received after OPENED" % after
        conn = self.tap.find(9, cid)
        if conn is None:
            return False, "no tapped connection"
        with self.tap.lock:
            head = bytes(conn.s2c.capture)
            payload = conn.s2c.payload_bytes
        hello = parse_usbredir_hello(head)
        if hello is None or not hello.get("is_hello") or len(head) < hello["packet_bytes"]:
            return False, "no complete usbredir hello (%d payload bytes)" % payload
        return True, "hello %d bytes" % hello["packet_bytes"]

    def _usb_done(self):
        if not self.args.expect_usbredir_hello:
            return True
        ids = self._usb_ids()
        return bool(ids) and all(self._usb_status(cid)[0] for cid in ids)

    def _poll_usb(self):
        if self.finishing:
            return False
        self._check_done()
        return True

    # verdict
    def on_commands_done(self):
        self.note("qmp commands done")
        self._check_done()

    def _check_done(self):
        if self.finishing or not self.display_done:
            return
        if self.qmp_wanted and not self.qmp_done():
            return
        if not self._usb_done():
            return
        if self.args.hold > 0:
            if self.hold_started is None:
                self.hold_started = time.monotonic()
                self.note("all checks passed; holding the session %.1f s" % self.args.hold)
                self.GLib.timeout_add(int(self.args.hold * 1000), self._held)
            return
        self.succeed("displayed")

    def _held(self):
        self.held_s = round(time.monotonic() - self.hold_started, 3)
        self.succeed("displayed")
        return False

    def on_timeout(self):
        if self.hold_started is not None:
            return False        # the checks passed in time; the hold has its own timer
        detail = self.timeout_detail()
        s = self.surface
        if s is not None and self.baseline is None and self.invalidates and not self._size_ok():
            self.fail(EXIT_CHECK_FAILED, "primary surface is %dx%d, expected %dx%d"
                      % ((s["width"], s["height"]) + self.args.expect_size), result="wrong-size")
        if self.first is not None and self.baseline is None and self._size_ok():
            self.fail(EXIT_CHECK_FAILED, "display stayed blank: %d non-background pixels, %d needed"
                      % (self.first.nonblank, self.args.min_nonblank), result="blank")
        self.fail(EXIT_TIMEOUT, "timeout after %.1f s: %s" % (self.args.timeout, detail), result="timeout")
        return False

    def timeout_detail(self):
        missing = []
        if not self.main_opened:
            return "main channel never opened"
        if self.surface is None:
            states = ", ".join(i["state"] for i in self.channels.values() if i["type"] == 2)
            missing.append("no primary surface (display channel: %s)" % (states or "not announced"))
        elif self.invalidates == 0:
            missing.append("primary surface never drawn (no display-invalidate)")
        elif self.baseline is None:
            missing.append("display did not settle (%d invalidates, %d large)" % (self.invalidates,
                                                                                   self.large_invalidates))
        elif self.key_state == "waiting-inputs":
            missing.append("inputs channel never opened")
        elif self.key_state in ("sent", "changed"):
            missing.append("screen after the key did not settle")
        if self.qmp_wanted and not self.qmp_done():
            missing.append("qmp: " + self.qmp_detail())
        if self.args.expect_usbredir_hello and not self._usb_done():
            ids = self._usb_ids()
            missing.append("usbredir: " + (str({cid: self._usb_status(cid)[1] for cid in ids}) if ids
                                           else "no usbredir channel announced"))
        return "; ".join(missing) or "mode did not complete"

    def fill_result(self):
        Client.fill_result(self)
        self.result.pop("port_name", None)      # PortClient's; the QMP port is under "qmp"
        s = self.surface or {}
        self.result.update({
            "width": s.get("width"), "height": s.get("height"), "format": s.get("format"),
            "format_name": SURFACE_FORMATS.get(s.get("format")), "stride": s.get("stride"),
            "shmid": s.get("shmid"), "display_channel_id": s.get("channel_id"),
            "surface_created_at_s": s.get("created_at_s"), "primary_surfaces": self.surfaces_created,
            "size_ok": (self._size_ok() if s else False),
            "invalidates": self.invalidates, "invalidated_pixels": self.invalidated_pixels,
            "large_invalidates": self.large_invalidates,
            "drawn": self.baseline is not None, "settled_at_s": self.settled_at,
        })
        if self.args.hold > 0:
            self.result["held_s"] = (self.held_s if self.held_s is not None else
                                     round(time.monotonic() - self.hold_started, 3) if self.hold_started else None)
        shown = self.baseline or self.first
        if shown is not None:
            self.result.update(shown.report())
        else:
            self.result.update({"fb_sha256": None, "nonblank_pixels": 0, "nonzero_pixels": 0})
        if self.key_scancode is not None:
            self.result.update({
                "key_sent_at_s": (round(self.key_sent_at - _started_at, 4) if self.key_sent_at else None),
                "changed_after_key": self.changed_after_key, "changed_pixels_after_key": self.key_changed_pixels,
                "key_change_s": self.key_change_s,
                "invalidates_after_key": (self.invalidates - self.key_invalidates_at_send
                                          if self.key_sent_at else None)})
            after = self.final_frame if self.key_state == "done" else self.key_frame
            if after is not None and after is not self.baseline:
                self.result.update(after.report("_after_key"))
        if self.qmp_wanted:
            self.result["qmp"] = dict(self.qmp_report(), port_name=self.target_name,
                                      done=self.qmp_done() if self.index >= 0 else False)
        if self.want_usbredir:
            per = []
            for cid in self._usb_ids():
                ch = self.channel_objs[(9, cid)]
                seen, detail = self._usb_status(cid)
                entry = {"id": cid, "opened": cid in self.usb_opened, "hello": seen, "detail": detail,
                         "method": "tap" if self.tap is not None else "total-read-bytes",
                         "total_read_bytes": ch.get_property("total-read-bytes")}
                if cid in self.usb_opened:
                    entry["bytes_after_opened"] = entry["total_read_bytes"] - self.usb_opened[cid]
                if self.tap is not None:
                    conn = self.tap.find(9, cid)
                    if conn is not None:
                        with self.tap.lock:
                            head = bytes(conn.s2c.capture)
                            entry["server_payload_bytes"] = conn.s2c.payload_bytes
                            entry["client_payload_bytes"] = conn.c2s.payload_bytes
                        entry["hello_decoded"] = parse_usbredir_hello(head)
                per.append(entry)
            self.result["usbredir"] = per
        if self.args.save_png:
            frame = None
            try:
                frame = self._frame() or self.final_frame or self.baseline or self.first
            except Exception as exc:
                self.result["png_error"] = "cannot read the surface: %s" % exc
            self._write_png(frame, self.args.save_png, "png")
        if self.args.save_png_before:
            self._write_png(self.baseline or self.first, self.args.save_png_before, "png_before")

    def _write_png(self, frame, path, field):
        if frame is None:
            self.result.setdefault(field + "_error", "no framebuffer to save")
            return
        try:
            frame.write_png(path)
            self.result[field] = path
        except (OSError, ValueError) as exc:
            self.result[field + "_error"] = str(exc)


# --------------------------------------------------------------------------
# CLI


def parse_size(text):
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, got %r" % text)
    return width, height


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--uri", required=True, help="spice://HOST:PORT (or spice://HOST?port=PORT)")
    common.add_argument("--password", default=None, help="SPICE ticket")
    common.add_argument("--ca-file", default=None,
                        help="TLS: CA file (spice-gtk ca-file); use with spice://HOST?port=P&tls-port=T or spice+tls://")
    common.add_argument("--cert-subject", default=None, help="TLS: expected certificate subject (spice-gtk cert-subject)")
    common.add_argument("--secure-channels", default=None,
                        help="TLS: comma-separated channel names spice-gtk must open over TLS (or 'all')")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up (default 10)")
    common.add_argument("--settle", type=float, default=0.5,
                        help="seconds to wait for late events (channel list, replies) (default 0.5)")
    common.add_argument("--linger", type=float, default=0.0,
                        help="seconds to keep running after the verdict, before disconnecting (default 0)")
    common.add_argument("--tap", action="store_true",
                        help="relay through an in-process wire tap that counts SPICE payload bytes per channel")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)

    p = sub.add_parser("port-echo", parents=[common], help="write random bytes to a port, expect them echoed")
    p.add_argument("--port-name", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--chunk", type=int, default=65536, help="bytes per write (one DATA message each)")
    p.add_argument("--inflight", type=int, default=4, help="writes in flight at once (default 4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verify-window", type=int, default=64 * 1048576,
                   help="sent bytes kept to locate the first mismatch (default 64 MiB)")

    p = sub.add_parser("qmp", parents=[common], help="run QMP commands over a port channel")
    p.add_argument("--port-name", default="org.qemu.monitor.qmp.0")
    p.add_argument("--commands", default="qmp_capabilities,query-version")

    p = sub.add_parser("usbredir", parents=[common], help="open the usbredir channels, count bytes both ways")
    p.add_argument("--expect-hello", action="store_true", help="require a complete usbredir hello from the server")
    p.add_argument("--send-hex", default=None,
                   help="inject these bytes (hex) as one SPICEVMC_DATA message toward the server on each "
                        "usbredir channel (needs the tap)")
    p.add_argument("--channel-id", type=int, default=None, help="inject on this usbredir channel id only")
    p.add_argument("--no-tap", action="store_true", help="count with total-read-bytes only (no payload counts)")

    p = sub.add_parser("display", parents=[common],
                       help="connect every channel (usbredir only if asked), prove the primary surface is drawn")
    p.add_argument("--expect-size", type=parse_size, default=None, metavar="WxH",
                   help="required primary surface size, e.g. 720x400 (default: any)")
    p.add_argument("--min-nonblank", type=int, default=1,
                   help="pixels that must differ from the most common colour for the screen to count as drawn")
    p.add_argument("--tiny-invalidate", type=int, default=64,
                   help="invalidates of at most this many pixels (a blinking cursor) do not delay settling")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--press-key", choices=sorted(KEY_SCANCODES), default=None,
                     help="after the screen settles, press and release this key on the inputs channel")
    key.add_argument("--key-scancode", type=lambda v: int(v, 0), default=None,
                     help="the same with a PC XT scancode (ESC = 1; 0x100|code for 0xe0 keys)")
    p.add_argument("--key-timeout", type=float, default=3.0,
                   help="seconds for the screen to change after the key (default 3)")
    p.add_argument("--min-changed-pixels", type=int, default=100,
                   help="pixels that must change after the key (a text cursor blink is 18) (default 100)")
    p.add_argument("--qmp-port-name", default=None,
                   help="also link this QMP port (default org.qemu.monitor.qmp.0 with --qmp-command)")
    p.add_argument("--qmp-command", default=None,
                   help="QMP command(s), comma-separated, run on that port (qmp_capabilities is sent first)")
    p.add_argument("--usbredir", action="store_true",
                   help="connect the usbredir channels too (creates spice-gtk's USB device manager)")
    p.add_argument("--expect-usbredir-hello", action="store_true",
                   help="connect the usbredir channels and require the server's usbredir hello on each "
                        "(through the tap for spice://, unless --no-tap)")
    p.add_argument("--no-tap", action="store_true",
                   help="with --expect-usbredir-hello: count total-read-bytes instead of using the tap")
    p.add_argument("--hold", type=float, default=0.0,
                   help="after every check passed, keep the session S more seconds; any channel that "
                        "closes or fails meanwhile fails the run (lost-during-hold); not counted in --timeout")
    p.add_argument("--save-png", default=None, metavar="PATH",
                   help="write the last framebuffer seen as a PNG (also on failure)")
    p.add_argument("--save-png-before", default=None, metavar="PATH",
                   help="write the settled framebuffer from before the key as a PNG")

    sub.add_parser("auth", parents=[common], help="link the main channel only: linked (0) or auth-error (3)")

    p = sub.add_parser("list", parents=[common], help="print the channels the server announced")
    p.add_argument("--no-port-names", dest="port_names", action="store_false",
                   help="do not connect port channels to learn their names")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    hide_library_stdout()
    base = {"mode": args.mode, "uri": args.uri}
    if args.timeout <= 0:
        emit_and_exit(base, EXIT_USAGE, "--timeout must be positive")

    # Hard limits (gotcha 7): the GLib timeout normally wins; these catch a wedged loop.
    def on_alarm(_sig, _frame):
        emit_and_exit(dict(base, result="hard-timeout"), EXIT_TIMEOUT,
                      "hard time limit: main loop did not end %d s after --timeout" % ALARM_GRACE_S)
    signal.signal(signal.SIGALRM, on_alarm)
    hold = max(getattr(args, "hold", 0.0), 0.0)
    signal.alarm(int(args.timeout + hold) + ALARM_GRACE_S)
    faulthandler.dump_traceback_later(args.timeout + hold + WATCHDOG_GRACE_S, exit=True)

    if args.mode == "usbredir":
        args.tap = args.tap or not args.no_tap
        if args.send_hex and not args.tap:
            emit_and_exit(base, EXIT_USAGE, "--send-hex needs the tap (drop --no-tap)")
        args.inject = {}
        if args.send_hex:
            try:
                payload = bytes.fromhex(args.send_hex)
            except ValueError:
                emit_and_exit(base, EXIT_USAGE, "--send-hex is not valid hex")
            if not payload:
                emit_and_exit(base, EXIT_USAGE, "--send-hex is empty")
            args.inject = {(9, args.channel_id): [payload]}
    if args.mode == "display":
        if args.press_key is not None:
            args.key_scancode = KEY_SCANCODES[args.press_key]
        if (args.expect_usbredir_hello and not args.no_tap and urlsplit(args.uri).scheme == "spice"
                and "tls-port" not in parse_qs(urlsplit(args.uri).query)):
            args.tap = True     # exact hello check; spice+unix:// and TLS fall back to total-read-bytes
        if args.settle <= 0 or args.key_timeout <= 0:
            emit_and_exit(base, EXIT_USAGE, "--settle and --key-timeout must be positive")
    if args.mode == "port-echo":
        if args.bytes < 0 or args.chunk <= 0 or args.inflight <= 0:
            emit_and_exit(base, EXIT_USAGE, "--bytes must be >= 0, --chunk and --inflight > 0")
    if args.tap:
        try:
            parse_spice_uri(args.uri)
        except ValueError as exc:
            emit_and_exit(base, EXIT_USAGE, str(exc))

    modes = {"port-echo": PortEcho, "qmp": Qmp, "usbredir": Usbredir, "auth": Auth, "list": ListChannels,
             "display": Display}
    client = modes[args.mode](args)
    client.start()


if __name__ == "__main__":
    main()
