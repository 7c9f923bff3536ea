//! TLS under a connection: the sans-IO [`crate::tls::Session`] between the
//! socket and the SPICE code. Ciphertext is read into a per-connection
//! vector; plaintext is taken straight into `rx`, where the link stages and
//! the deframer find it exactly as if it had been read from a plain socket.
//! Outgoing plaintext (`tx`, or an owned vector) is handed to the session,
//! and the write's completion is reported to the SPICE code only once its
//! records are on the wire: one plaintext write in flight per connection,
//! the same back-pressure as the plain path. No splice under TLS.
//!
//! Every SPICE message toward the peer ends a TLS record (the next one
//! starts a new record). spice-gtk needs this: after each message it reads
//! on only while the *socket* is readable, never asking OpenSSL whether
//! decrypted bytes of the record it holds are still waiting, so the start
//! of a message that shares a record with the end of the previous one
//! sits unseen until more bytes arrive (at the end of a transfer: never).
//! spice-server writes each message part with its own `SSL_write`, which
//! gives the same cut.
//!
//! The handshake runs inside the link stage: its deadline (the link
//! timeout) covers it, and a peer that sends garbage, a truncated
//! ClientHello or a plaintext SPICE link is a logged close of that
//! connection only.

use super::*;
use crate::proto::framing::{Deframer, Event};
use crate::tls::{Session, SessionError, SessionErrorKind};

/// Ciphertext read per op: four full TLS records.
const CIN_BYTES: usize = 4 * (16 * 1024 + 256);
/// Ciphertext written per op at most (one batch of polled records).
const COUT_BYTES: usize = 64 * 1024 + 4 * 256;

#[derive(Debug)]
pub(super) struct TlsConn {
    pub(super) sess: Session,
    /// Ciphertext read from the socket; `None` while the ring holds it.
    cin: Option<Vec<u8>>,
    cin_pos: usize,
    cin_len: usize,
    /// Ciphertext being written; `None` while the ring holds it.
    cout: Option<Vec<u8>>,
    cout_len: usize,
    cout_done: usize,
    /// A ciphertext write is in flight.
    writing: bool,
    /// A plaintext write the session accepted: (bytes, owned vector),
    /// reported as the client write's completion once its records are sent.
    done: Option<(usize, Option<Vec<u8>>)>,
    /// The socket reached EOF.
    eof: bool,
    /// The handshake result was logged.
    logged: bool,
    /// Message boundaries in the plaintext sent so far (data stage).
    cut: Option<Deframer>,
    /// The waiting plaintext write is the proxy pair's (whole-VM mode):
    /// its completion goes to the pair, not to this connection's output.
    for_pair: bool,
    /// The proxy pair has bytes for this session but found it busy with
    /// this connection's own output (the tail of its link): it pulls again
    /// once that is sent.
    pair_waiting: bool,
}

/// Plaintext a proxy pair hands to a TLS connection: a range of its fixed
/// read buffer, or bytes it produced itself (the rewritten main channel).
pub(super) enum PairBytes<'a> {
    Fixed(BufId, std::ops::Range<usize>),
    Slice(&'a [u8]),
}

impl TlsConn {
    pub(super) fn new(sess: Session) -> Box<Self> {
        Box::new(Self {
            sess,
            cin: Some(vec![0; CIN_BYTES]),
            cin_pos: 0,
            cin_len: 0,
            cout: Some(vec![0; COUT_BYTES]),
            cout_len: 0,
            cout_done: 0,
            writing: false,
            done: None,
            eof: false,
            logged: false,
            cut: None,
            for_pair: false,
            pair_waiting: false,
        })
    }
}

impl Worker {
    /// A server session for a connection accepted on a TLS listener.
    pub(super) fn tls_accepted(&mut self, service: usize, peer: &str) -> Option<Box<TlsConn>> {
        let tls = self.live.server_tls.get(service).and_then(Option::as_ref)?;
        match tls.session() {
            Ok(s) => Some(TlsConn::new(s)),
            Err(e) => {
                warn!(self.who, "peer={peer} cannot start a TLS session: {e}");
                None
            }
        }
    }

    /// Client side: wants more plaintext. Delivers what TLS already holds,
    /// else reads ciphertext.
    pub(super) fn tls_read(&mut self, slot: u32, conn: &mut Conn) {
        if self.tls_deliver(slot, conn) {
            return;
        }
        // Plaintext the session held is delivered: a flushing channel ends here.
        if self.take_flush_close(slot, conn) {
            return;
        }
        let Some(t) = conn.tls.as_mut() else { return };
        if t.eof {
            return;
        }
        let Some(buf) = t.cin.take() else { return };
        let tok = self.tok(Op::TlsRead, slot);
        let r = self.ring.read_owned(conn.fd.as_raw_fd(), buf, tok);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    pub(super) fn on_tls_read(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.c2e_busy = false;
        let Some(t) = conn.tls.as_mut() else { return };
        t.cin = owned.or_else(|| Some(vec![0; CIN_BYTES]));
        if res < 0 {
            if self.draining.is_some() && res == -libc::ECANCELED {
                return self.maybe_drained(slot, conn);
            }
            return self.on_client_read(slot, conn, res);
        }
        if res == 0 {
            t.eof = true;
            if let Err(e) = t.sess.feed_eof() {
                return self.tls_failed(slot, conn, &e);
            }
        } else {
            t.cin_pos = 0;
            t.cin_len = usize::try_from(res).unwrap_or(0);
            conn.last_rx = Instant::now();
        }
        self.tls_read(slot, conn);
    }

    /// Feeds buffered ciphertext, sends what the handshake wants sent, and
    /// moves plaintext into `rx` for the SPICE code. Returns whether the
    /// connection went on (plaintext delivered, EOF handled, or closed).
    fn tls_deliver(&mut self, slot: u32, conn: &mut Conn) -> bool {
        if conn.tls.is_none() {
            return true;
        }
        let Some(rxb) = self.take_rx(slot, conn) else { return true };
        let Some(t) = conn.tls.as_mut() else { return true };
        let Some(rx) = self.ring.arena_mut().get_mut(rxb) else { return true };
        let mut filled = 0;
        let mut failed: Option<SessionError> = None;
        loop {
            if t.sess.plaintext_len() > 0 && filled < rx.len() {
                let n = t.sess.take_plaintext(&mut rx[filled..]);
                filled += n;
                if n > 0 {
                    continue;
                }
            }
            if filled == rx.len() || t.cin_pos >= t.cin_len {
                break;
            }
            let Some(cin) = t.cin.as_ref() else { break };
            match t.sess.feed_ciphertext(&cin[t.cin_pos..t.cin_len]) {
                Ok(n) => {
                    t.cin_pos += n;
                    if n == 0 && t.sess.plaintext_len() == 0 {
                        break;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.tls_failed(slot, conn, &e);
            return true;
        }
        if filled > 0 {
            // Published before the flush: a write completion it reports
            // may run the SPICE code, which must see these bytes.
            conn.rx_len = filled;
            conn.rx_pos = 0;
        }
        self.tls_log_handshake(conn);
        self.tls_flush(slot, conn);
        if conn.closing.is_some() {
            return true;
        }
        if filled > 0 {
            self.pump_in(slot, conn);
            return true;
        }
        let Some(t) = conn.tls.as_ref() else { return true };
        if t.eof || t.sess.peer_closed().is_some() {
            // All plaintext is taken: the peer's end of the channel.
            if let Some(t) = conn.tls.as_mut() {
                t.eof = true;
            }
            self.on_client_read(slot, conn, 0);
            return true;
        }
        false
    }

    fn tls_log_handshake(&mut self, conn: &mut Conn) {
        let Some(t) = conn.tls.as_mut() else { return };
        if t.logged || t.sess.is_handshaking() {
            return;
        }
        t.logged = true;
        let summary = t.sess.summary().unwrap_or_default();
        debug!(self.who, "tls peer={} handshake done {summary}", conn.peer);
    }

    /// The session failed: send its alert (best effort, without waiting)
    /// and close this connection only.
    fn tls_failed(&mut self, slot: u32, conn: &mut Conn, e: &SessionError) {
        if let Some(t) = conn.tls.as_mut()
            && !t.writing
            && let Some(out) = t.cout.as_mut()
        {
            let n = t.sess.poll_output(out);
            let _ = nix::sys::socket::send(
                conn.fd.as_raw_fd(),
                &out[..n],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
        }
        let what = match e.kind() {
            SessionErrorKind::Verification => "certificate verification",
            SessionErrorKind::PeerAlert => "peer alert",
            SessionErrorKind::Protocol => "protocol",
            SessionErrorKind::HandshakeEof => "handshake eof",
            SessionErrorKind::Setup => "setup",
        };
        self.stats().tls_errors.fetch_add(1, Ordering::Relaxed);
        if conn.client_role {
            self.ctl_tls_failed(slot, conn, e);
        } else if matches!(conn.stage, Stage::ULink { .. }) {
            return self.proxy_tls_failed(slot, conn, e);
        } else {
            info!(self.who, "tls peer={} result=failed kind=\"{what}\" error=\"{e}\"", conn.peer);
        }
        self.close(slot, conn, &format!("TLS {what}: {e}"));
    }

    /// A ciphertext read of this TLS connection is in flight.
    pub(super) fn tls_reading(&self, conn: &Conn) -> bool {
        conn.tls.as_ref().is_some_and(|t| t.cin.is_none())
    }

    /// Marks that the proxy pair waits for this session to be free.
    pub(super) fn tls_pair_waits(conn: &mut Conn) {
        if let Some(t) = conn.tls.as_mut() {
            t.pair_waiting = true;
        }
    }

    /// Sends plaintext `tx[tx_done..tx_len]` (or `owned[tx_done..]`)
    /// through TLS, one SPICE message at a time so that each ends a record
    /// (module docs); the client write completes once its records are sent.
    pub(super) fn tls_write(&mut self, slot: u32, conn: &mut Conn, owned: Option<Vec<u8>>) {
        let Some(t) = conn.tls.as_mut() else { return };
        let data = match &owned {
            Some(v) => v.get(conn.tx_done..),
            None => conn.tx.and_then(|b| self.ring.arena().get(b)).and_then(|b| b.get(conn.tx_done..conn.tx_len)),
        };
        let accepted = match data {
            None => 0,
            // Link bytes are not framed and go out alone (`pump_out`).
            Some(b) if conn.tx_raw => t.sess.write_plaintext(b),
            Some(b) => {
                let cut = t.cut.get_or_insert_with(|| Deframer::new(conn.enc.kind()));
                write_messages(&mut t.sess, cut, b)
            }
        };
        if accepted == 0 && !t.sess.wants_output() && !t.writing {
            // Nothing accepted and nothing to flush: the session refuses
            // (failed or closed); waiting would never end.
            return self.close(slot, conn, "TLS session refused output");
        }
        t.done = Some((accepted, owned));
        conn.tx_busy = true;
        self.tls_flush(slot, conn);
    }

    /// Whole-VM proxy data stage: plaintext the pair read goes out through
    /// this connection's session (message by message, as `tls_write`);
    /// `proxy_tls_written` reports the bytes taken once their records are
    /// sent. Returns false if the session takes nothing and never will.
    pub(super) fn tls_send_for_pair(&mut self, slot: u32, conn: &mut Conn, src: PairBytes<'_>) -> bool {
        let Some(t) = conn.tls.as_mut() else { return false };
        if t.done.is_some() {
            return false;
        }
        let data = match src {
            PairBytes::Fixed(buf, range) => self.ring.arena().get(buf).and_then(|b| b.get(range)).unwrap_or_default(),
            PairBytes::Slice(b) => b,
        };
        let cut = t.cut.get_or_insert_with(|| Deframer::new(conn.enc.kind()));
        let accepted = write_messages(&mut t.sess, cut, data);
        if accepted == 0 && !t.sess.wants_output() && !t.writing {
            self.close(slot, conn, "TLS session refused output");
            return false;
        }
        t.done = Some((accepted, None));
        t.for_pair = true;
        conn.tx_busy = true;
        self.tls_flush(slot, conn);
        true
    }

    /// Writes pending records; once none are left, reports a waiting
    /// plaintext write as complete.
    fn tls_flush(&mut self, slot: u32, conn: &mut Conn) {
        let Some(t) = conn.tls.as_mut() else { return };
        if t.writing {
            return;
        }
        if t.sess.wants_output()
            && let Some(mut out) = t.cout.take()
        {
            let mut n = 0;
            while n < out.len() && t.sess.wants_output() {
                let k = t.sess.poll_output(&mut out[n..]);
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n > 0 {
                t.cout_len = n;
                t.cout_done = 0;
                t.writing = true;
                out.truncate(n);
                let tok = self.tok(Op::TlsWrite, slot);
                let r = self.ring.write_owned(conn.fd.as_raw_fd(), out, 0, tok);
                self.pushed(slot, conn, r);
                return;
            }
            t.cout = Some(out);
        }
        if let Some((n, owned)) = t.done.take() {
            if std::mem::take(&mut t.for_pair) {
                return self.proxy_tls_written(slot, conn, n);
            }
            let waiting = std::mem::take(&mut t.pair_waiting);
            let res = i32::try_from(n).unwrap_or(i32::MAX);
            self.on_client_write(slot, conn, res, owned);
            if waiting {
                self.proxy_tls_resume(slot, conn);
            }
        }
    }

    pub(super) fn on_tls_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        let Some(t) = conn.tls.as_mut() else { return };
        t.writing = false;
        let mut out = owned.unwrap_or_default();
        if res < 0 {
            let done = t.done.take();
            t.cout = Some(out);
            conn.tx_busy = false;
            if let (Some((_, Some(v))), Stage::Chan(ch)) = (done, &mut conn.stage) {
                ch.lz4_tx = Some(v);
            }
            return self.close(slot, conn, &errno_reason("client write", res));
        }
        t.cout_done += usize::try_from(res).unwrap_or(0);
        if t.cout_done < t.cout_len {
            let off = t.cout_done;
            t.writing = true;
            let tok = self.tok(Op::TlsWrite, slot);
            let r = self.ring.write_owned(conn.fd.as_raw_fd(), out, off, tok);
            self.pushed(slot, conn, r);
            return;
        }
        out.resize(COUT_BYTES, 0);
        t.cout = Some(out);
        self.tls_flush(slot, conn);
    }
}

/// Hands `data` to the session message by message: each `write_plaintext`
/// call ends its last record, so a record never holds the end of one
/// message and the start of the next. `cut` tracks where messages end
/// across calls (a write may stop inside a message). Returns the bytes the
/// session accepted.
fn write_messages(sess: &mut Session, cut: &mut Deframer, data: &[u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        let mut probe = cut.clone();
        let piece = to_message_end(&mut probe, &data[done..]);
        let k = sess.write_plaintext(&data[done..done + piece]);
        if k == piece {
            *cut = probe;
        } else {
            // Stopped inside this message: its end lies beyond `k`.
            to_message_end(cut, &data[done..done + k]);
        }
        done += k;
        if k < piece {
            break;
        }
    }
    done
}

/// Advances `d` over `data` up to the first message end; returns the bytes
/// consumed (all of `data` if the current message ends later).
fn to_message_end(d: &mut Deframer, data: &[u8]) -> usize {
    let mut i = 0;
    loop {
        let (used, ev) = d.advance(&data[i..]);
        i += used;
        match ev {
            Some(Event::Body { last: true, .. }) => return i,
            None if used == 0 => return i,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::framing::{Encoder, HeaderKind};

    fn framed(kind: HeaderKind, sizes: &[u32]) -> Vec<u8> {
        let mut enc = Encoder::new(kind);
        let mut out = Vec::new();
        for &n in sizes {
            let mut h = [0u8; 18];
            let hl = enc.header(101, n, &mut h).unwrap();
            out.extend_from_slice(&h[..hl]);
            out.extend(std::iter::repeat_n(7u8, n as usize));
        }
        out
    }

    #[test]
    fn message_ends_are_found_in_any_split() {
        for kind in [HeaderKind::Mini, HeaderKind::Full] {
            let sizes = [5, 0, 70_000, 1, 0, 0, 16_384];
            let bytes = framed(kind, &sizes);
            let mut want = Vec::new();
            let mut off = 0;
            for &n in &sizes {
                off += kind.len() + n as usize;
                want.push(off);
            }
            for step in [1, 3, 6, 7, 18, 4096, bytes.len()] {
                let mut d = Deframer::new(kind);
                let mut ends = Vec::new();
                let mut pos = 0;
                for chunk in bytes.chunks(step) {
                    let mut i = 0;
                    while i < chunk.len() {
                        let mut probe = d.clone();
                        let k = to_message_end(&mut probe, &chunk[i..]);
                        assert!(k > 0);
                        let ended = probe.at_boundary();
                        d = probe;
                        i += k;
                        if ended {
                            ends.push(pos + i);
                        }
                    }
                    pos += chunk.len();
                }
                assert_eq!(ends, want, "kind {kind:?} step {step}");
            }
        }
    }
}
