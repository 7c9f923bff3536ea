//! [`TlsStream`]: a blocking `Read + Write` over a std `TcpStream` and a
//! client [`Session`], for the synchronous SPICE client
//! (`relay::sync_client`) and `vmcload`. Not the relay's data path (the
//! workers drive [`Session`] over io_uring buffers themselves).
//!
//! Clones share one session, so one thread may read while another writes
//! (the sync client reads a channel on one thread and writes it on
//! another). Socket reads take no lock; the session lock is held only while
//! bytes are fed, taken or polled; socket writes are ordered by a second
//! lock taken *before* the session lock, so records leave in the order the
//! session produced them.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustls::ClientConfig;

use super::session::{Limits, Session, SessionError};

/// Ciphertext read from the socket per `read` call.
const RECV_BYTES: usize = 64 * 1024;
/// Encrypted output polled per socket write.
const SEND_BYTES: usize = 128 * 1024;
/// Pending encrypted output the session may hold: above one 64 KiB SPICE
/// message plus its header, so a message is encrypted in one go.
const OUTPUT_LIMIT: usize = 256 * 1024;

#[derive(Debug)]
struct Inner {
    session: Session,
    /// Ciphertext read from the socket that the session did not take yet
    /// (its plaintext buffer was full). Shared, so that whichever clone
    /// reads next feeds it first: bytes read by one handle are never lost
    /// when another handle does the next read.
    pending: Vec<u8>,
    pos: usize,
    /// The socket reached EOF.
    eof: bool,
}

impl Inner {
    /// Feeds `pending`, then `fresh` (keeping what the session refuses);
    /// at the end of the input, tells the session about an EOF.
    fn feed(&mut self, fresh: &[u8]) -> Result<(), SessionError> {
        while self.pos < self.pending.len() {
            let k = self.session.feed_ciphertext(&self.pending[self.pos..])?;
            self.pos += k;
            if k == 0 {
                break; // plaintext buffer full: take some first
            }
        }
        if self.pos >= self.pending.len() {
            self.pending.clear();
            self.pos = 0;
        }
        let mut off = 0;
        if self.pending.is_empty() {
            while off < fresh.len() {
                let k = self.session.feed_ciphertext(&fresh[off..])?;
                off += k;
                if k == 0 {
                    break;
                }
            }
        }
        self.pending.extend_from_slice(&fresh[off..]);
        if self.eof && self.pending.is_empty() && self.session.peer_closed().is_none() && self.session.error().is_none()
        {
            self.session.feed_eof()?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Shared {
    sock: TcpStream,
    inner: Mutex<Inner>,
    /// Held while output is polled from the session and written to `sock`.
    out: Mutex<()>,
}

/// A blocking TLS client stream (see the module docs).
#[derive(Debug)]
pub struct TlsStream {
    shared: Arc<Shared>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    scratch: Vec<u8>,
}

fn io_err(e: SessionError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TlsStream {
    /// Starts a client session to `host` (checked as spice-gtk does, see
    /// [`client_config`](super::client_config)) over the connected `sock`.
    /// Nothing is sent until [`handshake`](Self::handshake) or the first
    /// read or write.
    pub fn client(sock: TcpStream, config: Arc<ClientConfig>, host: &str) -> Result<Self, SessionError> {
        let session = Session::client(config, host, Limits { tls_output_bytes: OUTPUT_LIMIT })?;
        let inner = Inner { session, pending: Vec::new(), pos: 0, eof: false };
        Ok(Self::from_shared(Arc::new(Shared { sock, inner: Mutex::new(inner), out: Mutex::new(()) })))
    }

    /// The underlying TCP socket (for readiness checks; never read or
    /// write it directly).
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.sock
    }

    fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared, rbuf: Vec::new(), wbuf: Vec::new(), scratch: Vec::new() }
    }

    /// Runs the handshake to its end (the socket's read timeout bounds each
    /// wait). A refused certificate is an `InvalidData` error whose source
    /// is the [`SessionError`].
    pub fn handshake(&mut self) -> io::Result<()> {
        loop {
            self.flush_output()?;
            let (handshaking, err, eof) = {
                let i = lock(&self.shared.inner);
                (i.session.is_handshaking(), i.session.error().cloned(), i.eof)
            };
            if let Some(e) = err {
                return Err(io_err(e));
            }
            if !handshaking {
                return self.flush_output();
            }
            if eof {
                return Err(io_err(SessionError::HandshakeEof));
            }
            self.recv()?;
        }
    }

    /// Another handle on the same connection (for a second thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self::from_shared(Arc::clone(&self.shared)))
    }

    /// Bounds each socket read.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.shared.sock.set_read_timeout(t)
    }

    /// Shuts the TCP socket down (SPICE peers send no close_notify).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.shared.sock.shutdown(how)
    }

    /// Negotiated protocol and suite, once the handshake is done.
    pub fn summary(&self) -> Option<String> {
        lock(&self.shared.inner).session.summary()
    }

    /// Reads ciphertext from the socket (no lock held while blocked), feeds
    /// it, and sends any output the session produced.
    fn recv(&mut self) -> io::Result<()> {
        if self.rbuf.is_empty() {
            self.rbuf = vec![0u8; RECV_BYTES];
        }
        let n = loop {
            match (&self.shared.sock).read(&mut self.rbuf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        let wants_output = {
            let mut i = lock(&self.shared.inner);
            if n == 0 {
                i.eof = true;
            }
            i.feed(&self.rbuf[..n]).map_err(io_err)?;
            i.session.wants_output()
        };
        if wants_output { self.flush_output() } else { Ok(()) }
    }

    /// Writes every pending TLS record to the socket, in session order.
    fn flush_output(&mut self) -> io::Result<()> {
        let _order = lock(&self.shared.out);
        if self.wbuf.is_empty() {
            self.wbuf = vec![0u8; SEND_BYTES];
        }
        loop {
            let n = {
                let mut i = lock(&self.shared.inner);
                if !i.session.wants_output() {
                    return Ok(());
                }
                i.session.poll_output(&mut self.wbuf)
            };
            if n == 0 {
                return Ok(());
            }
            (&self.shared.sock).write_all(&self.wbuf[..n])?;
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let (n, more, done, err) = {
                let mut i = lock(&self.shared.inner);
                let mut n = i.session.take_plaintext(out);
                if n == 0 && !i.pending.is_empty() {
                    // Plaintext was taken by another handle: feed the rest.
                    i.feed(&[]).map_err(io_err)?;
                    n = i.session.take_plaintext(out);
                }
                (n, !i.pending.is_empty(), i.session.wants_close() || i.eof, i.session.error().cloned())
            };
            if n > 0 {
                return Ok(n);
            }
            if let Some(e) = err {
                let _ = self.flush_output(); // an alert may be queued
                return Err(io_err(e));
            }
            if done && !more {
                return Ok(0);
            }
            self.recv()?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        for _ in 0..2 {
            let k = {
                let mut i = lock(&self.shared.inner);
                if let Some(e) = i.session.error() {
                    return Err(io_err(e.clone()));
                }
                i.session.write_plaintext(data)
            };
            self.flush_output()?;
            if k > 0 {
                return Ok(k);
            }
            // Output was at its bound; it is flushed now: offer again.
        }
        Err(io::Error::new(io::ErrorKind::WriteZero, "TLS session accepts no more data (closed)"))
    }

    /// Joins the slices so that a SPICE header and its payload share TLS
    /// records instead of the header taking a record of its own.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        for b in bufs {
            scratch.extend_from_slice(b);
        }
        let r = self.write(&scratch);
        self.scratch = scratch;
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_output()
    }
}
