//! `vmcload endpoint`: the local app behind the relay (where QEMU's chardev
//! would be), so a run measures the relay and nothing else.
//!
//! `sink` reads and (with `verify`) checks the pattern, `source` writes the
//! pattern as fast as the socket takes it, `echo` sends back what it gets.
//! One thread per connection; every connection starts at stream offset 0.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::LoadError;
use super::pattern::{Mismatch, Verifier, fill};
use super::report::{mib_s, round3};

const CONN_STACK_BYTES: usize = 256 * 1024;
const RX_BUF_BYTES: usize = 256 * 1024;

/// What the endpoint does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EpMode {
    /// Read and discard (check the pattern with `--verify`).
    Sink,
    /// Write the pattern until the peer closes (or `--bytes`).
    Source,
    /// Send back every byte (check the pattern with `--verify`).
    Echo,
}

impl EpMode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sink => "sink",
            Self::Source => "source",
            Self::Echo => "echo",
        }
    }
}

/// Where the endpoint's connections come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// Listen on a unix socket (the relay's `unix:PATH` connects here).
    UnixListen(PathBuf),
    /// Connect to a unix socket (the relay's `unix-listen:PATH`).
    Unix(PathBuf),
    /// Listen on TCP (raw, no SPICE: direct and socat comparisons).
    TcpListen(String),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnixListen(p) => write!(f, "unix-listen:{}", p.display()),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::TcpListen(a) => write!(f, "tcp-listen:{a}"),
        }
    }
}

/// Endpoint parameters.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Where connections come from.
    pub listen: Listen,
    /// What to do with them.
    pub mode: EpMode,
    /// Check incoming bytes against the pattern (sink, echo).
    pub verify: bool,
    /// Pattern seed.
    pub seed: u64,
    /// Write size for `source`.
    pub size: usize,
    /// `source`: stop after this many bytes per connection.
    pub bytes: Option<u64>,
    /// `--unix`: connect again after a connection ends.
    pub reconnect: bool,
    /// Rewrite this JSON file after every close and at exit.
    pub json: Option<PathBuf>,
    /// No per-connection lines on stderr.
    pub quiet: bool,
}

#[derive(Debug)]
enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn shutdown_write(&self) {
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Write),
            Self::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Connect(PathBuf),
}

/// How one connection ended.
#[derive(Debug, Clone)]
struct End {
    seconds: f64,
    reason: String,
    mismatch: Option<Mismatch>,
}

#[derive(Debug)]
struct Conn {
    id: usize,
    peer: String,
    opened: Instant,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    end: Mutex<Option<End>>,
}

/// One connection in the report.
#[derive(Debug, Clone, Serialize)]
pub struct ConnReport {
    /// Accept order, from 0.
    pub id: usize,
    /// Peer address (unix sockets: empty).
    pub peer: String,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Seconds open (so far, while open).
    pub seconds: f64,
    /// (in + out) MiB/s over those seconds.
    pub mib_s: f64,
    /// Still open.
    pub open: bool,
    /// `eof`, `peer closed`, `mismatch`, `limit`, or an error.
    pub end: Option<String>,
    /// First wrong byte.
    pub mismatch: Option<Mismatch>,
}

/// The endpoint's figures (the `--json` file).
#[derive(Debug, Clone, Serialize)]
pub struct EndpointReport {
    /// `vmcload endpoint`.
    pub tool: &'static str,
    /// vmcload version.
    pub version: &'static str,
    /// Where it listened.
    pub listen: String,
    /// Mode.
    pub mode: EpMode,
    /// Whether incoming bytes were checked.
    pub verify: bool,
    /// Pattern seed.
    pub seed: u64,
    /// `source` write size.
    pub size: usize,
    /// `source` per-connection limit.
    pub bytes_limit: Option<u64>,
    /// Seconds since start.
    pub elapsed_s: f64,
    /// Connections accepted.
    pub connections: usize,
    /// Connections closed.
    pub connections_closed: usize,
    /// Bytes read, all connections.
    pub bytes_in: u64,
    /// Bytes written, all connections.
    pub bytes_out: u64,
    /// `ok` (everything read was checked and matched), `mismatch`, or
    /// `unverified` (no `--verify`, or a source that reads nothing).
    pub integrity: &'static str,
    /// Connections that saw a wrong byte.
    pub mismatches: usize,
    /// The first of them: connection id and the byte.
    pub first_mismatch: Option<(usize, Mismatch)>,
    /// Each connection.
    pub per_connection: Vec<ConnReport>,
}

#[derive(Debug)]
struct State {
    cfg: EndpointConfig,
    started: Instant,
    conns: Mutex<Vec<Arc<Conn>>>,
    json_lock: Mutex<()>,
}

/// A bound endpoint.
#[derive(Debug)]
pub struct Endpoint {
    state: Arc<State>,
    listener: Listener,
}

impl Endpoint {
    /// Binds (or, for `--unix`, only records) the socket; on return a
    /// listening endpoint accepts connections.
    pub fn bind(cfg: EndpointConfig) -> Result<Self, LoadError> {
        let listener = match &cfg.listen {
            Listen::UnixListen(p) => {
                remove_stale_socket(p)?;
                let l = UnixListener::bind(p)
                    .map_err(|e| LoadError::Run(format!("cannot listen on {}: {e}", p.display())))?;
                Listener::Unix(l, p.clone())
            }
            Listen::TcpListen(a) => {
                Listener::Tcp(TcpListener::bind(a).map_err(|e| LoadError::Run(format!("cannot listen on {a}: {e}")))?)
            }
            Listen::Unix(p) => Listener::Connect(p.clone()),
        };
        let state =
            Arc::new(State { cfg, started: Instant::now(), conns: Mutex::new(Vec::new()), json_lock: Mutex::new(()) });
        Ok(Self { state, listener })
    }

    /// The TCP address actually bound (`--raw-tcp-listen HOST:0`).
    pub fn local_tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            _ => None,
        }
    }

    /// Accepts and serves until `stop` (or, for `--unix` without
    /// reconnect, until its one connection ends).
    pub fn serve(&self, stop: &AtomicBool) -> Result<(), LoadError> {
        match &self.listener {
            Listener::Unix(l, _) => {
                while let Some(r) =
                    accept_when_ready(l, stop, || l.accept().map(|(s, _)| (Sock::Unix(s), String::new())))
                {
                    self.spawn(r?)?;
                }
            }
            Listener::Tcp(l) => {
                while let Some(r) = accept_when_ready(l, stop, || {
                    l.accept().map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        (Sock::Tcp(s), a.to_string())
                    })
                }) {
                    self.spawn(r?)?;
                }
            }
            Listener::Connect(p) => loop {
                let s = connect_retry(p, stop, Duration::from_secs(10))?;
                let Some(s) = s else { return Ok(()) };
                // Served on its own thread so that `stop` is seen while the
                // connection blocks in a read.
                let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
                let conn = self.register(String::new());
                let st = Arc::clone(&self.state);
                std::thread::Builder::new()
                    .name(format!("vmcload-ep-{}", conn.id))
                    .stack_size(CONN_STACK_BYTES)
                    .spawn(move || {
                        serve_conn(&st, &conn, Sock::Unix(s));
                        let _ = done_tx.send(());
                    })
                    .map_err(|e| LoadError::Run(format!("connection thread: {e}")))?;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(Duration::from_millis(200))
                {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                }
                if !self.state.cfg.reconnect || stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            },
        }
        Ok(())
    }

    fn register(&self, peer: String) -> Arc<Conn> {
        let mut conns = lock(&self.state.conns);
        let c = Arc::new(Conn {
            id: conns.len(),
            peer,
            opened: Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            end: Mutex::new(None),
        });
        conns.push(Arc::clone(&c));
        c
    }

    fn spawn(&self, (sock, peer): (Sock, String)) -> Result<(), LoadError> {
        let conn = self.register(peer);
        let st = Arc::clone(&self.state);
        std::thread::Builder::new()
            .name(format!("vmcload-ep-{}", conn.id))
            .stack_size(CONN_STACK_BYTES)
            .spawn(move || serve_conn(&st, &conn, sock))
            .map_err(|e| LoadError::Run(format!("connection thread: {e}")))?;
        Ok(())
    }

    /// The figures so far.
    pub fn report(&self) -> EndpointReport {
        self.state.report()
    }

    /// Writes the JSON file now (if configured).
    pub fn write_json(&self) -> Result<(), LoadError> {
        self.state.write_json()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = &self.listener {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes a leftover socket file from an earlier run; refuses to touch
/// anything that is not a socket.
fn remove_stale_socket(p: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(p).is_ok() {
                return Err(LoadError::Run(format!("{} is in use by another listener", p.display())));
            }
            std::fs::remove_file(p)?;
            Ok(())
        }
        Ok(_) => Err(LoadError::Run(format!("{} exists and is not a socket; not replacing it", p.display()))),
        Err(_) => Ok(()),
    }
}

/// Waits for a connection, checking `stop` every 200 ms; `None` once stopped.
fn accept_when_ready<L: AsFd, T>(
    l: &L,
    stop: &AtomicBool,
    accept: impl Fn() -> std::io::Result<T>,
) -> Option<Result<T, LoadError>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Some(Err(LoadError::Run(format!("poll: {e}")))),
        }
        match accept() {
            Ok(t) => return Some(Ok(t)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
            // Out of fds and the like: say so, keep serving the others.
            Err(e) => {
                eprintln!("vmcload endpoint: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn connect_retry(p: &Path, stop: &AtomicBool, timeout: Duration) -> Result<Option<UnixStream>, LoadError> {
    let deadline = Instant::now() + timeout;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match UnixStream::connect(p) {
            Ok(s) => return Ok(Some(s)),
            Err(e) if Instant::now() >= deadline => {
                return Err(LoadError::Run(format!("cannot connect to {}: {e}", p.display())));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn is_peer_gone(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted)
}

/// Reads, checking the pattern when asked; `Err` is the end reason.
fn read_checked(
    sock: &mut Sock,
    buf: &mut [u8],
    v: Option<&mut Verifier>,
    conn: &Conn,
) -> Result<usize, (String, Option<Mismatch>)> {
    loop {
        match sock.read(buf) {
            Ok(0) => return Err(("eof".into(), None)),
            Ok(n) => {
                conn.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(v) = v
                    && let Err(m) = v.feed(&buf[..n])
                {
                    return Err(("mismatch".into(), Some(m)));
                }
                return Ok(n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_peer_gone(&e) => return Err(("peer closed".into(), None)),
            Err(e) => return Err((format!("read: {e}"), None)),
        }
    }
}

fn write_counted(sock: &mut Sock, mut data: &[u8], conn: &Conn) -> Result<(), String> {
    while !data.is_empty() {
        match sock.write(data) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => {
                conn.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                data = &data[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_peer_gone(&e) => return Err("peer closed".into()),
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

fn serve_conn(st: &State, conn: &Conn, mut sock: Sock) {
    let cfg = &st.cfg;
    let mut verifier = cfg.verify.then(|| Verifier::new(cfg.seed));
    let (reason, mismatch) = match cfg.mode {
        EpMode::Sink => {
            let mut buf = vec![0u8; RX_BUF_BYTES];
            loop {
                if let Err(end) = read_checked(&mut sock, &mut buf, verifier.as_mut(), conn) {
                    break end;
                }
            }
        }
        EpMode::Echo => {
            let mut buf = vec![0u8; RX_BUF_BYTES];
            loop {
                match read_checked(&mut sock, &mut buf, verifier.as_mut(), conn) {
                    Ok(n) => {
                        if let Err(e) = write_counted(&mut sock, &buf[..n], conn) {
                            break (e, None);
                        }
                    }
                    Err(end) => break end,
                }
            }
        }
        EpMode::Source => {
            let mut buf = vec![0u8; cfg.size.max(1)];
            let mut offset = 0u64;
            let end = loop {
                let n = match cfg.bytes {
                    Some(b) if offset >= b => break None,
                    Some(b) => usize::try_from(b - offset).map_or(buf.len(), |left| left.min(buf.len())),
                    None => buf.len(),
                };
                fill(cfg.seed, offset, &mut buf[..n]);
                if let Err(e) = write_counted(&mut sock, &buf[..n], conn) {
                    break Some(e);
                }
                offset += n as u64;
            };
            match end {
                Some(e) => (e, None),
                None => {
                    // Limit reached: say so, then wait for the peer to go.
                    sock.shutdown_write();
                    let mut sink = vec![0u8; 64 * 1024];
                    while let Ok(n) = sock.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                        conn.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    ("limit".into(), None)
                }
            }
        }
    };
    *lock(&conn.end) = Some(End { seconds: conn.opened.elapsed().as_secs_f64(), reason, mismatch });
    if !cfg.quiet {
        let r = conn_report(conn);
        let verdict = match (&r.mismatch, cfg.verify && cfg.mode != EpMode::Source) {
            (Some(m), _) => format!("MISMATCH: {m}"),
            (None, true) => "verified".into(),
            (None, false) => "not verified".into(),
        };
        eprintln!(
            "vmcload endpoint: conn {} closed ({}): in {} B, out {} B, {:.3} s, {:.1} MiB/s, {verdict}",
            r.id,
            r.end.as_deref().unwrap_or("?"),
            r.bytes_in,
            r.bytes_out,
            r.seconds,
            r.mib_s
        );
    }
    if let Err(e) = st.write_json() {
        eprintln!("vmcload endpoint: {e}");
    }
}

fn conn_report(c: &Conn) -> ConnReport {
    let end = lock(&c.end).clone();
    let seconds = end.as_ref().map_or_else(|| c.opened.elapsed().as_secs_f64(), |e| e.seconds);
    let (bytes_in, bytes_out) = (c.bytes_in.load(Ordering::Relaxed), c.bytes_out.load(Ordering::Relaxed));
    ConnReport {
        id: c.id,
        peer: c.peer.clone(),
        bytes_in,
        bytes_out,
        seconds: round3(seconds),
        mib_s: round3(mib_s(bytes_in + bytes_out, seconds)),
        open: end.is_none(),
        end: end.as_ref().map(|e| e.reason.clone()),
        mismatch: end.and_then(|e| e.mismatch),
    }
}

impl State {
    fn report(&self) -> EndpointReport {
        let per: Vec<ConnReport> = lock(&self.conns).iter().map(|c| conn_report(c)).collect();
        let bytes_in = per.iter().map(|c| c.bytes_in).sum();
        let bytes_out = per.iter().map(|c| c.bytes_out).sum();
        let mismatched: Vec<&ConnReport> = per.iter().filter(|c| c.mismatch.is_some()).collect();
        let checks = self.cfg.verify && self.cfg.mode != EpMode::Source;
        EndpointReport {
            tool: "vmcload endpoint",
            version: env!("CARGO_PKG_VERSION"),
            listen: self.cfg.listen.to_string(),
            mode: self.cfg.mode,
            verify: self.cfg.verify,
            seed: self.cfg.seed,
            size: self.cfg.size,
            bytes_limit: self.cfg.bytes,
            elapsed_s: round3(self.started.elapsed().as_secs_f64()),
            connections: per.len(),
            connections_closed: per.iter().filter(|c| !c.open).count(),
            bytes_in,
            bytes_out,
            integrity: if !mismatched.is_empty() {
                "mismatch"
            } else if checks {
                "ok"
            } else {
                "unverified"
            },
            mismatches: mismatched.len(),
            first_mismatch: mismatched.first().and_then(|c| c.mismatch.map(|m| (c.id, m))),
            per_connection: per,
        }
    }

    fn write_json(&self) -> Result<(), LoadError> {
        let Some(path) = &self.cfg.json else { return Ok(()) };
        let _g = lock(&self.json_lock);
        let text = serde_json::to_string_pretty(&self.report()).map_err(|e| LoadError::Run(e.to_string()))?;
        write_atomic(path, &text)
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> Result<(), LoadError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{text}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| LoadError::Run(format!("cannot write {}: {e}", path.display())))
}

impl EndpointReport {
    /// The totals printed at exit.
    pub fn human(&self) -> String {
        let first = self.first_mismatch.map(|(c, m)| format!(" (first: connection {c}, {m})")).unwrap_or_default();
        format!(
            "vmcload endpoint {} mode={} verify={}: {} connections ({} closed), in {} B, out {} B, {:.3} s; \
             integrity {}{}",
            self.listen,
            self.mode.name(),
            self.verify,
            self.connections,
            self.connections_closed,
            self.bytes_in,
            self.bytes_out,
            self.elapsed_s,
            self.integrity,
            first
        )
    }
}

/// Starts an endpoint on a thread (used by the demo and tests); stop it
/// with [`Background::stop`].
#[derive(Debug)]
pub struct Background {
    ep: Arc<Endpoint>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), LoadError>>>,
}

impl Background {
    /// Binds and serves on a thread.
    pub fn start(cfg: EndpointConfig) -> Result<Self, LoadError> {
        let ep = Arc::new(Endpoint::bind(cfg)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (e2, s2) = (Arc::clone(&ep), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("vmcload-endpoint".into())
            .spawn(move || e2.serve(&s2))
            .map_err(|e| LoadError::Run(format!("endpoint thread: {e}")))?;
        Ok(Self { ep, stop, thread: Some(thread) })
    }

    /// The figures so far.
    pub fn report(&self) -> EndpointReport {
        self.ep.report()
    }

    /// Stops accepting and returns the figures.
    pub fn stop(mut self) -> EndpointReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.ep.report()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(path: PathBuf, mode: EpMode) -> EndpointConfig {
        EndpointConfig {
            listen: Listen::UnixListen(path),
            mode,
            verify: true,
            seed: 5,
            size: 1000,
            bytes: Some(10_000),
            reconnect: false,
            json: None,
            quiet: true,
        }
    }

    fn wait_closed(b: &Background, n: usize) -> EndpointReport {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = b.report();
            if r.connections_closed >= n {
                return r;
            }
            assert!(Instant::now() < deadline, "connections never closed: {r:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn sink_verifies_and_source_writes_the_pattern() {
        let dir = std::env::temp_dir().join(format!("vmcload-ep-unit-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sink = Background::start(cfg(dir.join("sink.sock"), EpMode::Sink)).expect("sink");
        let mut s = UnixStream::connect(dir.join("sink.sock")).expect("connect");
        let mut data = vec![0u8; 5000];
        fill(5, 0, &mut data);
        s.write_all(&data).expect("write");
        drop(s);
        let mut s = UnixStream::connect(dir.join("sink.sock")).expect("connect");
        data[4000] ^= 1;
        s.write_all(&data).expect("write");
        drop(s);
        let r = wait_closed(&sink, 2);
        assert_eq!(r.bytes_in, 10_000);
        assert_eq!(r.integrity, "mismatch");
        assert_eq!(r.first_mismatch.map(|m| m.1.offset), Some(4000));
        assert_eq!(r.mismatches, 1);
        sink.stop();

        let source = Background::start(cfg(dir.join("source.sock"), EpMode::Source)).expect("source");
        let mut s = UnixStream::connect(dir.join("source.sock")).expect("connect");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        assert_eq!(got.len(), 10_000);
        assert!(super::super::pattern::check(5, 0, &got).is_ok());
        drop(s);
        let r = wait_closed(&source, 1);
        assert_eq!(r.bytes_out, 10_000);
        assert_eq!(r.per_connection[0].end.as_deref(), Some("limit"));
        source.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
