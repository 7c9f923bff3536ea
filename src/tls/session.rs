//! [`Session`]: one TLS connection, server or client, as a bounded
//! bytes-in / bytes-out state machine.
//!
//! # Which rustls API, and why
//!
//! This wraps rustls' **buffered** `ServerConnection` / `ClientConnection`
//! (through `rustls::Connection`), driven over byte slices: `read_tls` from
//! a `&[u8]`, `process_new_packets`, `reader().read` into the caller's
//! buffer, `writer().write`, and `write_tls` straight into the caller's
//! send buffer. Reasons:
//!
//! - rustls keeps the partial record between feeds, so the caller's receive
//!   buffer (an io_uring registered buffer) can be recycled as soon as
//!   [`feed_ciphertext`](Session::feed_ciphertext) returns: nothing stays
//!   pinned across completions, and no per-connection staging buffer of our
//!   own is needed (the unbuffered API wants one that holds a whole record,
//!   ~18 KiB, per connection, plus its own handling of every state).
//! - Key updates, alerts, post-handshake messages, close_notify and the
//!   confidentiality limit are handled by rustls' tested code paths.
//! - Every internal buffer has a bound (below), so memory per connection is
//!   a written sum, not a hope.
//!
//! The cost is copies. `benches/tls_bench.rs` (256 MiB client → server in
//! memory, one thread doing both encryption and decryption, TLS 1.3
//! AES-256-GCM, 64 KiB writes, one "kernel" copy between the ends in both
//! variants; 2-vCPU EPYC VM, 2026-12-02, medians of 3, busy machine):
//!
//! | path | MiB/s | CPU s/GiB (enc + dec) |
//! |---|---|---|
//! | this `Session` (buffered `ServerConnection`/`ClientConnection`) | 793–829 | 1.12 |
//! | rustls `Unbuffered*Connection` driven by hand | 1,203–1,514 | 0.68–0.72 |
//!
//! A relay does one of the two operations per direction, so roughly
//! 0.56 (buffered) vs 0.35 (unbuffered) CPU s per GiB and direction. The
//! interface (feed, take, write, poll) does not expose which API is behind
//! it: if TLS becomes the relay's bottleneck, the unbuffered API (or a
//! kernel-TLS hand-off) can replace the inside without changing callers.
//!
//! # Bounds (per session)
//!
//! - Incoming ciphertext held by rustls: at most one partial record,
//!   18,437 bytes (`MAX_WIRE_SIZE`) in the data phase; up to 64 KiB + one
//!   record while a handshake message is joined (rustls caps handshake
//!   messages at 64 KiB; larger is an error).
//! - Decrypted plaintext not yet taken: rustls stops accepting ciphertext
//!   once more than 16 KiB are waiting, so at most 16 KiB + the records in
//!   one 18 KiB read. [`feed_ciphertext`](Session::feed_ciphertext) then
//!   consumes less than offered: take plaintext, feed the rest again.
//! - Outgoing: [`Limits::tls_output_bytes`] bounds both the plaintext
//!   accepted before the handshake completes and the encrypted records not
//!   yet polled out (rustls `set_buffer_limit`); handshake messages and
//!   alerts come on top (a few KiB: the certificate chain).
//!
//! # Driving it
//!
//! ```text
//! on recv(n bytes):  off = 0; loop { off += feed_ciphertext(&buf[off..n])?;
//!                                    while take_plaintext(plain) > 0 { to SPICE }
//!                                    if off == n { break } }
//! on recv EOF:       feed_eof()?   (then drain take_plaintext; wants_close())
//! to send:           accepted = write_plaintext(bytes)   (keep the rest)
//! before each send:  k = poll_output(send_buf); submit send_buf[..k]
//! after any call:    wants_output() → send; wants_close() → flush, close
//! ```

use std::io::{self, Read as _, Write as _};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use super::verify::VerifyError;

/// Which end of the TLS connection a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We accepted the connection (spice-gtk connects to us).
    Server,
    /// We connected (to QEMU's `tls-port`).
    Client,
}

/// Buffer bounds of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bound on encrypted output waiting for [`Session::poll_output`] (and
    /// on plaintext accepted before the handshake completes); writes beyond
    /// it are refused by [`Session::write_plaintext`] until output is
    /// polled. rustls' default is 64 KiB; must be at least one record's
    /// worth to keep records full-sized.
    pub tls_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { tls_output_bytes: 64 * 1024 }
    }
}

/// How the peer ended its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerClose {
    /// A TLS close_notify alert (neither spice-gtk nor spice-server sends
    /// one).
    CloseNotify,
    /// Transport EOF after the handshake without close_notify: the normal
    /// end of a SPICE channel, not an attack (a truncation can only cut the
    /// stream, never alter it).
    Eof,
}

/// The category of a [`SessionError`], for exit codes and log fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionErrorKind {
    /// The client refused the server's certificate (CA, host, subject,
    /// dates, purpose). `connect` exits with its own code and never
    /// retries.
    Verification,
    /// The peer sent a fatal alert (e.g. spice-gtk refusing our
    /// certificate).
    PeerAlert,
    /// The peer sent bytes that are not valid TLS here (garbage, a
    /// plaintext SPICE link on a TLS port, an oversized message, ...).
    Protocol,
    /// The transport ended before the handshake completed (e.g. a truncated
    /// ClientHello).
    HandshakeEof,
    /// The session could not be set up (e.g. a host that is neither an IP
    /// address nor a DNS name).
    Setup,
}

/// A failed session. After the first error every feed returns it again;
/// flush [`Session::poll_output`] once (rustls queued an alert) and close.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// Server certificate refused by our verifier (client role).
    #[error("TLS certificate verification failed: {0}")]
    Verification(VerifyError),
    /// Fatal alert from the peer.
    #[error("the peer aborted the TLS handshake with alert {alert:?}{hint}")]
    PeerAlert {
        /// The alert received.
        alert: AlertDescription,
        /// What it usually means for SPICE peers (empty if nothing useful).
        hint: &'static str,
    },
    /// Invalid TLS from the peer.
    #[error("TLS protocol error: {0}")]
    Protocol(rustls::Error),
    /// EOF during the handshake.
    #[error("the peer closed the connection during the TLS handshake (truncated handshake)")]
    HandshakeEof,
    /// Could not set up the session.
    #[error("TLS session setup: {0}")]
    Setup(String),
}

impl SessionError {
    /// The category, for exit codes and logs.
    pub fn kind(&self) -> SessionErrorKind {
        match self {
            Self::Verification(_) => SessionErrorKind::Verification,
            Self::PeerAlert { .. } => SessionErrorKind::PeerAlert,
            Self::Protocol(_) => SessionErrorKind::Protocol,
            Self::HandshakeEof => SessionErrorKind::HandshakeEof,
            Self::Setup(_) => SessionErrorKind::Setup,
        }
    }

    fn from_rustls(err: rustls::Error, role: Role) -> Self {
        if let Some(v) = VerifyError::from_rustls(&err) {
            return Self::Verification(v);
        }
        match err {
            rustls::Error::InvalidCertificate(e) if role == Role::Client => {
                // A certificate error that did not come from our verifier
                // (e.g. rustls refusing an empty chain).
                Self::Verification(VerifyError::other(format!("server certificate refused ({e:?}); check --ca-file")))
            }
            rustls::Error::AlertReceived(alert) => Self::PeerAlert { alert, hint: alert_hint(alert, role) },
            other => Self::Protocol(other),
        }
    }
}

fn alert_hint(alert: AlertDescription, role: Role) -> &'static str {
    match (role, alert) {
        (Role::Server, AlertDescription::UnknownCA) => {
            ": the client does not trust our CA (give it ca-cert.pem, e.g. remote-viewer \
             --spice-ca-file)"
        }
        (Role::Server, AlertDescription::InternalError) => {
            ": spice-gtk sends this when its host name or cert-subject check fails (the client \
             connects by a name our certificate does not list, or with a different subject)"
        }
        (
            Role::Server,
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateUnknown,
        ) => {
            ": the client refused our certificate (key too weak, extendedKeyUsage without \
             serverAuth, or a missing intermediate)"
        }
        (_, AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure) => {
            ": no common protocol version, cipher suite or signature scheme"
        }
        _ => "",
    }
}

/// One TLS connection as a sans-IO state machine (see the module docs for
/// the calling sequence and the memory bounds).
#[derive(Debug)]
pub struct Session {
    conn: rustls::Connection,
    role: Role,
    failed: Option<SessionError>,
    peer_closed: Option<PeerClose>,
    /// The transport reported EOF; rustls may not have been told yet
    /// (it refuses reads while its plaintext buffer is full).
    eof_seen: bool,
    /// Plaintext bytes rustls holds for [`take_plaintext`](Self::take_plaintext)
    /// (from the last `process_new_packets`, minus what was taken since).
    plaintext_pending: usize,
}

impl Session {
    /// A server session on `config` (e.g. from [`ServerTls::session`](super::ServerTls::session)).
    /// Fails only for a configuration rustls cannot use at all.
    pub fn server(config: Arc<ServerConfig>, limits: Limits) -> Result<Self, SessionError> {
        let conn = ServerConnection::new(config).map_err(|e| SessionError::Setup(e.to_string()))?;
        Ok(Self::from_conn(conn.into(), Role::Server, limits))
    }

    /// A client session to `host`, checked with spice-gtk's host rule (or
    /// the subject, if the config has one). `host` is the string the user
    /// gave: an IP address or a DNS name. No SNI is sent.
    pub fn client(config: Arc<ClientConfig>, host: &str, limits: Limits) -> Result<Self, SessionError> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| SessionError::Setup(format!("host `{host}` is neither an IP address nor a valid DNS name")))?;
        let conn = ClientConnection::new(config, name).map_err(|e| SessionError::Setup(e.to_string()))?;
        Ok(Self::from_conn(conn.into(), Role::Client, limits))
    }

    fn from_conn(mut conn: rustls::Connection, role: Role, limits: Limits) -> Self {
        conn.set_buffer_limit(Some(limits.tls_output_bytes.max(1)));
        Self { conn, role, failed: None, peer_closed: None, eof_seen: false, plaintext_pending: 0 }
    }

    /// Server or client.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Hands ciphertext received from the transport to TLS. Returns how many
    /// bytes were consumed: fewer than offered when the decrypted plaintext
    /// waiting for [`take_plaintext`](Self::take_plaintext) reached its bound
    /// (take it, then feed the rest again). Whenever it returns `Ok(0)` for
    /// non-empty input, [`plaintext_len`](Self::plaintext_len) is non-zero,
    /// so a caller that drains plaintext always makes progress. After the
    /// peer's close_notify, input is consumed and ignored (RFC 8446 §6.1).
    ///
    /// The caller's buffer is not retained: it can be reused at once.
    pub fn feed_ciphertext(&mut self, input: &[u8]) -> Result<usize, SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.peer_closed.is_some() || self.eof_seen {
            return Ok(input.len());
        }
        let mut rest = input;
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                // read_tls returns 0 for non-empty input only once
                // close_notify was received.
                Ok(0) => {
                    rest = &[];
                    break;
                }
                Ok(_) => self.process()?,
                // Backpressure: the plaintext buffer is over its limit (or
                // the record buffer is full, which processing cleared).
                Err(_) => break,
            }
        }
        let consumed = input.len() - rest.len();
        if consumed == 0 && !input.is_empty() && self.plaintext_pending == 0 {
            // rustls refused input although nothing waits to be taken:
            // cannot happen by its documented contract; fail this
            // connection rather than let the caller spin.
            let err =
                SessionError::Protocol(rustls::Error::General("TLS input refused with no plaintext pending".into()));
            self.failed = Some(err.clone());
            return Err(err);
        }
        Ok(consumed)
    }

    /// The transport reached EOF (recv returned 0 or the peer reset). During
    /// the handshake this is [`SessionError::HandshakeEof`]; afterwards the
    /// remaining plaintext can still be taken, then
    /// [`peer_closed`](Self::peer_closed) reports [`PeerClose::Eof`].
    pub fn feed_eof(&mut self) -> Result<(), SessionError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.eof_seen = true;
        if self.conn.is_handshaking() {
            let err = SessionError::HandshakeEof;
            self.failed = Some(err.clone());
            return Err(err);
        }
        self.tell_rustls_eof();
        if self.plaintext_pending == 0 && self.peer_closed.is_none() {
            self.peer_closed = Some(PeerClose::Eof);
        }
        Ok(())
    }

    fn tell_rustls_eof(&mut self) {
        let mut empty: &[u8] = &[];
        if self.conn.read_tls(&mut empty).is_ok() {
            // Nothing new can be decrypted from an empty read; an error
            // here would be one already reported by the last feed.
            let _ = self.process();
        }
    }

    fn process(&mut self) -> Result<(), SessionError> {
        match self.conn.process_new_packets() {
            Ok(io) => {
                self.plaintext_pending = io.plaintext_bytes_to_read();
                Ok(())
            }
            Err(e) => {
                let err = SessionError::from_rustls(e, self.role);
                self.failed = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Decrypted bytes waiting to be taken (may over-count by what rustls
    /// already discarded at a close; never under-counts).
    pub fn plaintext_len(&self) -> usize {
        self.plaintext_pending
    }

    /// Moves decrypted plaintext into `out`; returns the number of bytes
    /// (0 when none is waiting). When the peer has ended its side and all
    /// plaintext is taken, [`peer_closed`](Self::peer_closed) says how.
    pub fn take_plaintext(&mut self, out: &mut [u8]) -> usize {
        if out.is_empty() {
            return 0;
        }
        match self.conn.reader().read(out) {
            Ok(0) => {
                self.plaintext_pending = 0;
                self.peer_closed.get_or_insert(PeerClose::CloseNotify);
                0
            }
            Ok(n) => {
                self.plaintext_pending = self.plaintext_pending.saturating_sub(n);
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.plaintext_pending = 0;
                if self.eof_seen && self.peer_closed.is_none() {
                    // EOF arrived while rustls' plaintext buffer was full.
                    self.tell_rustls_eof();
                    self.peer_closed = Some(PeerClose::Eof);
                }
                0
            }
            Err(_) => {
                // UnexpectedEof: transport EOF without close_notify.
                self.plaintext_pending = 0;
                self.peer_closed.get_or_insert(PeerClose::Eof);
                0
            }
        }
    }

    /// Offers plaintext to send; returns how much was accepted (possibly 0):
    /// bounded by [`Limits::tls_output_bytes`] of output not yet polled.
    /// Keep the rest and offer it again after [`poll_output`](Self::poll_output).
    /// Before the handshake completes the bytes are held and sent after it.
    /// Nothing is accepted after an error or [`close`](Self::close).
    pub fn write_plaintext(&mut self, data: &[u8]) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        self.conn.writer().write(data).unwrap_or(0)
    }

    /// Writes pending TLS records (handshake, data, alerts) into `out` and
    /// returns the byte count. The bytes are removed from the session: the
    /// caller must send all of `out[..n]`.
    pub fn poll_output(&mut self, out: &mut [u8]) -> usize {
        let mut writer: &mut [u8] = out;
        self.conn.write_tls(&mut writer).unwrap_or(0)
    }

    /// Whether [`poll_output`](Self::poll_output) has bytes to give.
    pub fn wants_output(&self) -> bool {
        self.conn.wants_write()
    }

    /// Whether the handshake is still running (SPICE bytes flow only once it
    /// is done, though plaintext may be written earlier).
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// How the peer ended its side, once all its plaintext was taken.
    pub fn peer_closed(&self) -> Option<PeerClose> {
        self.peer_closed
    }

    /// The error that failed the session, if any.
    pub fn error(&self) -> Option<&SessionError> {
        self.failed.as_ref()
    }

    /// Nothing more will come from the peer (error, close_notify or EOF with
    /// all plaintext taken): flush [`poll_output`](Self::poll_output) (an
    /// alert may be queued) and close the connection.
    pub fn wants_close(&self) -> bool {
        self.failed.is_some() || self.peer_closed.is_some()
    }

    /// Queues a close_notify (SPICE peers neither send nor need one; useful
    /// for a graceful shutdown). Later writes are refused by rustls.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Negotiated protocol and suite, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384`,
    /// once the handshake is done (for the link log line).
    pub fn summary(&self) -> Option<String> {
        let version = self.conn.protocol_version()?;
        let suite = self.conn.negotiated_cipher_suite()?;
        Some(format!("{version:?} {:?}", suite.suite()))
    }
}
