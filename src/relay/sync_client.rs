//! A small blocking SPICE client on std sockets, built on `proto`.
//!
//! Used by the load generator, tests and `connect --list`: it links the main
//! channel (answering PINGs on a helper thread, as spice-server requires),
//! learns the channel list, and opens pass-through channels as byte
//! streams. The relay's data path does not use it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tls::blocking::TlsStream;

use crate::proto::auth::seed_from;
use crate::proto::caps::Caps;
use crate::proto::channel::{CH_MAIN, ChannelKind};
use crate::proto::client_link::{Action, ClientLink, ClientLinkConfig, ClientLinkFailure};
use crate::proto::consts::*;
use crate::proto::framing::{Deframer, Encoder, Event, HeaderKind, MsgHeader};
use crate::proto::msg::{ClientMsg, CompressedData, ServerMsg};
use crate::proto::server_link::Linked;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The link was refused or failed.
    #[error("{0}")]
    Link(ClientLinkFailure),
    /// The server closed during the link (spice-server does this for a
    /// channel that does not exist).
    #[error("server closed the connection during the link (no such channel?)")]
    LinkEof,
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {err}")]
    Connect {
        /// Server address.
        addr: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The server accepted the connection but sent nothing (or not enough)
    /// in time.
    #[error("no answer from {addr} within {secs} s: not a SPICE server, or it is stuck")]
    NoAnswer {
        /// Server address.
        addr: String,
        /// The timeout.
        secs: u64,
    },
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server's TLS certificate did not verify (CA, host or subject).
    #[error("{0}")]
    TlsVerify(String),
}

/// TLS for every link of a session: the client configuration (CA, subject
/// rule; see [`crate::tls::client_config`]) and the host the certificate is
/// checked against.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Client configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// Host as the user wrote it (IP address or DNS name).
    pub host: String,
}

/// A channel's connection: plain TCP or TLS over TCP.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Tls(TlsStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Tls(s) => Self::Tls(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Tls(s) => s.set_read_timeout(t),
        }
    }

    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Tls(s) => s.shutdown(how),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// A TCP connection to `sa` from source address `source` (port chosen by
/// the kernel); blocking connect.
pub fn tcp_from(sa: std::net::SocketAddr, source: std::net::IpAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let family = if sa.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(std::net::SocketAddr::new(source, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(sa))?;
    Ok(TcpStream::from(fd))
}

#[allow(clippy::too_many_arguments)]
fn link(
    addr: &str,
    tls: Option<&ClientTls>,
    source: Option<std::net::IpAddr>,
    password: &[u8],
    connection_id: u32,
    channel_type: u8,
    channel_id: u8,
    channel_caps: Caps,
    timeout: Duration,
) -> Result<(Stream, Linked, Vec<u8>), ClientError> {
    let cannot = |err: std::io::Error| ClientError::Connect { addr: addr.to_string(), err };
    let nothing = || cannot(std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address"));
    let sa = addr.to_socket_addrs().map_err(cannot)?.next().ok_or_else(nothing)?;
    let connected = match source {
        Some(src) => tcp_from(sa, src),
        None => TcpStream::connect_timeout(&sa, timeout),
    };
    let tcp = connected.map_err(|err| match err.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => cannot(std::io::Error::new(
            err.kind(),
            format!("no TCP answer within {} s (host down or a firewall drops the packets)", timeout.as_secs()),
        )),
        _ => cannot(err),
    })?;
    let no_answer = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            ClientError::NoAnswer { addr: addr.to_string(), secs: timeout.as_secs() }
        }
        _ => ClientError::Io(e),
    };
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(timeout))?;
    let mut s = match tls {
        None => Stream::Tcp(tcp),
        Some(t) => {
            let mut ts = TlsStream::client(tcp, Arc::clone(&t.config), &t.host)
                .map_err(|e| ClientError::Protocol(format!("TLS to {addr}: {e}")))?;
            ts.handshake().map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => {
                    let verify = e
                        .get_ref()
                        .and_then(|s| s.downcast_ref::<crate::tls::SessionError>())
                        .is_some_and(|s| s.kind() == crate::tls::SessionErrorKind::Verification);
                    if verify {
                        ClientError::TlsVerify(format!("TLS to {addr}: {e}"))
                    } else {
                        ClientError::Protocol(format!("TLS to {addr}: {e}"))
                    }
                }
                _ => no_answer(e),
            })?;
            Stream::Tls(ts)
        }
    };
    let cfg = ClientLinkConfig {
        connection_id,
        channel_type,
        channel_id,
        channel_caps,
        password: password.to_vec(),
        mini_header: true,
        defer_ticket: false,
    };
    let mut seed = [0u8; 32];
    getrandom_seed(&mut seed);
    let mut l = ClientLink::new(cfg, seed).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut buf = [0u8; 4096];
    loop {
        let out = l.pending_output().to_vec();
        if !out.is_empty() {
            s.write_all(&out)?;
            let mut sink = vec![0u8; out.len()];
            l.poll_output(&mut sink);
        }
        let n = s.read(&mut buf).map_err(no_answer)?;
        if n == 0 {
            return Err(ClientError::LinkEof);
        }
        let used = l.handle_input(&buf[..n]);
        match l.poll_action() {
            Some(Action::Linked(linked)) => {
                s.set_read_timeout(None)?;
                return Ok((s, linked, buf[used..n].to_vec()));
            }
            Some(Action::Close(f)) => return Err(ClientError::Link(f)),
            // Only with `defer_ticket`, which this client never sets.
            Some(Action::Reply { .. }) | None => {}
        }
    }
}

fn getrandom_seed(seed: &mut [u8; 32]) {
    use rand::SeedableRng;
    let mut r = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .unwrap_or_else(|_| rand::rngs::StdRng::seed_from_u64(u64::from(std::process::id())));
    *seed = seed_from(&mut r);
}

/// Reads whole messages from a linked channel socket.
struct MsgReader {
    sock: Stream,
    deframer: Deframer,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl MsgReader {
    fn new(sock: Stream, kind: HeaderKind, leftover: Vec<u8>) -> Self {
        let mut buf = vec![0u8; 256 * 1024];
        let len = leftover.len().min(buf.len());
        buf[..len].copy_from_slice(&leftover[..len]);
        Self { sock, deframer: Deframer::new(kind), buf, pos: 0, len }
    }

    /// Next message: header and body (body capped at `cap` bytes, the rest
    /// dropped). `None` at EOF.
    fn next(&mut self, body: &mut Vec<u8>, cap: usize) -> std::io::Result<Option<MsgHeader>> {
        body.clear();
        let mut header: Option<MsgHeader> = None;
        loop {
            while self.pos < self.len {
                let (used, ev) = self.deframer.advance(&self.buf[self.pos..self.len]);
                let base = self.pos;
                self.pos += used;
                match ev {
                    Some(Event::Header(h)) => {
                        if h.size == 0 {
                            // Drain the deframer's empty body event.
                            let _ = self.deframer.advance(&[]);
                            return Ok(Some(h));
                        }
                        header = Some(h);
                    }
                    Some(Event::Body { offset, len, last }) => {
                        let room = cap.saturating_sub(body.len()).min(len);
                        body.extend_from_slice(&self.buf[base + offset..base + offset + room]);
                        if last {
                            return Ok(header);
                        }
                    }
                    None if used == 0 => break,
                    None => {}
                }
            }
            let n = self.sock.read(&mut self.buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.pos = 0;
            self.len = n;
        }
    }
}

/// A SPICE session: the main channel and what the server announced.
#[derive(Debug)]
pub struct Session {
    addr: String,
    password: Vec<u8>,
    /// Session id from MAIN_INIT.
    pub session_id: u32,
    /// `(type, id)` of every announced channel.
    pub channels: Vec<(u8, u8)>,
    main: Stream,
    /// Set when the main channel ends.
    pub closed: Arc<Mutex<Option<String>>>,
    /// `(type, id)` of channels announced by later CHANNELS_LISTs (a
    /// channel whose endpoint came back), in arrival order.
    pub announced: Arc<Mutex<Vec<(u8, u8)>>>,
    /// Source address every link of the session is made from (`None`: any).
    source: Option<std::net::IpAddr>,
    /// TLS for every link of the session (`None`: plain TCP).
    tls: Option<ClientTls>,
}

impl Session {
    /// Links the main channel, sends ATTACH_CHANNELS and waits for the list.
    pub fn connect(addr: &str, password: &[u8], timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_from(addr, None, password, timeout)
    }

    /// As [`Session::connect`], every link of the session over TLS when
    /// `tls` is given (the server's `tls-port`).
    pub fn connect_tls(
        addr: &str,
        tls: Option<ClientTls>,
        password: &[u8],
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_inner(addr, tls, None, password, timeout)
    }

    /// As [`Session::connect`], every link of the session made from source
    /// address `source` (e.g. 127.0.0.2, to test per-address limits).
    pub fn connect_from(
        addr: &str,
        source: Option<std::net::IpAddr>,
        password: &[u8],
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Self::connect_inner(addr, None, source, password, timeout)
    }

    fn connect_inner(
        addr: &str,
        tls: Option<ClientTls>,
        source: Option<std::net::IpAddr>,
        password: &[u8],
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let (sock, linked, leftover) = link(addr, tls.as_ref(), source, password, 0, CH_MAIN, 0, Caps::EMPTY, timeout)?;
        let kind = linked.header_kind;
        let mut w = sock.try_clone()?;
        let mut enc = Encoder::new(kind);
        let mut r = MsgReader::new(sock.try_clone()?, kind, leftover);
        sock.set_read_timeout(Some(timeout))?;
        let main_kind = ChannelKind::of(CH_MAIN).ok_or_else(|| ClientError::Protocol("no main kind".into()))?;
        let mut body = Vec::new();
        let mut session_id = 0;
        let channels: Vec<(u8, u8)> = loop {
            let next = r.next(&mut body, 64 * 1024).map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => ClientError::Protocol(format!(
                    "{addr} linked the main channel but sent no channel list within {} s",
                    timeout.as_secs()
                )),
                _ => ClientError::Io(e),
            })?;
            let Some(h) = next else {
                return Err(ClientError::Protocol("main channel closed before CHANNELS_LIST".into()));
            };
            match ServerMsg::parse(main_kind, h.msg_type, &body) {
                Ok(ServerMsg::MainInit(init)) => {
                    session_id = init.session_id;
                    send_msg(&mut w, &mut enc, &ClientMsg::AttachChannels)?;
                }
                Ok(ServerMsg::ChannelsList(l)) => break l.iter().collect(),
                Ok(ServerMsg::Ping(p)) => send_msg(&mut w, &mut enc, &ClientMsg::Pong(p.pong()))?,
                Ok(ServerMsg::SetAck(a)) => {
                    send_msg(&mut w, &mut enc, &ClientMsg::AckSync { generation: a.generation })?
                }
                _ => {}
            }
        };
        sock.set_read_timeout(None)?;
        // Keep answering PINGs (spice-server drops silent sessions).
        let closed = Arc::new(Mutex::new(None));
        let closed2 = Arc::clone(&closed);
        let announced = Arc::new(Mutex::new(Vec::new()));
        let announced2 = Arc::clone(&announced);
        std::thread::Builder::new().name("spice-main".into()).spawn(move || {
            let mut body = Vec::new();
            let why = loop {
                match r.next(&mut body, 64 * 1024) {
                    Ok(Some(h)) => match ServerMsg::parse(main_kind, h.msg_type, &body) {
                        Ok(ServerMsg::Ping(p)) if send_msg(&mut w, &mut enc, &ClientMsg::Pong(p.pong())).is_err() => {
                            break "write failed".to_string();
                        }
                        Ok(ServerMsg::ChannelsList(l)) => {
                            if let Ok(mut a) = announced2.lock() {
                                // Bounded: a hostile server cannot grow it past 4,096 entries.
                                let room = 4096usize.saturating_sub(a.len());
                                a.extend(l.iter().take(room));
                            }
                        }
                        _ => {}
                    },
                    Ok(None) => break "closed by server".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            if let Ok(mut c) = closed2.lock() {
                *c = Some(why);
            }
        })?;
        Ok(Self {
            addr: addr.to_string(),
            password: password.to_vec(),
            session_id,
            channels,
            main: sock,
            closed,
            announced,
            source,
            tls,
        })
    }

    /// Opens a pass-through channel as a byte stream.
    pub fn open(&self, channel_type: u8, channel_id: u8, lz4: bool) -> Result<Channel, ClientError> {
        self.open_linked(channel_type, channel_id, lz4)?.into_channel()
    }

    /// Links a pass-through channel and stops there: one socket, no
    /// buffers, no reader (for holding many idle channels; make it a
    /// [`Channel`] with [`LinkedChannel::into_channel`] to use it).
    pub fn open_linked(&self, channel_type: u8, channel_id: u8, lz4: bool) -> Result<LinkedChannel, ClientError> {
        let kind = ChannelKind::of(channel_type)
            .ok_or_else(|| ClientError::Protocol(format!("unknown channel type {channel_type}")))?;
        let caps = kind.channel_caps(lz4);
        let (sock, linked, leftover) = link(
            &self.addr,
            self.tls.as_ref(),
            self.source,
            &self.password,
            self.session_id,
            channel_type,
            channel_id,
            caps,
            Duration::from_secs(10),
        )?;
        let lz4 = lz4 && kind.lz4 && linked.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4);
        Ok(LinkedChannel { kind, sock, header_kind: linked.header_kind, lz4, leftover })
    }

    /// Closes the main channel (and so the session).
    pub fn close(&self) {
        let _ = self.main.shutdown(Shutdown::Both);
    }
}

/// A linked channel that holds only its socket (and any bytes the server
/// sent right after the link).
#[derive(Debug)]
pub struct LinkedChannel {
    /// Its kind.
    pub kind: ChannelKind,
    sock: Stream,
    header_kind: HeaderKind,
    lz4: bool,
    leftover: Vec<u8>,
}

impl LinkedChannel {
    /// The TCP socket under the channel (under TLS too), for readiness
    /// checks such as "has the server closed it".
    pub fn tcp(&self) -> &TcpStream {
        match &self.sock {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => s.tcp(),
        }
    }

    /// The byte-stream halves (allocates the reader's buffer).
    pub fn into_channel(self) -> Result<Channel, ClientError> {
        let Self { kind, sock, header_kind, lz4, leftover } = self;
        Ok(Channel {
            kind,
            writer: ChannelWriter { sock: sock.try_clone()?, enc: Encoder::new(header_kind), lz4, scratch: Vec::new() },
            reader: ChannelReader {
                kind,
                r: MsgReader::new(sock, header_kind, leftover),
                port_name: None,
                port_opened: None,
                events: Vec::new(),
                compressed_msgs: 0,
                data_msgs: 0,
                body: Vec::new(),
                pending: Vec::new(),
                pending_pos: 0,
            },
        })
    }
}

fn send_msg(w: &mut Stream, enc: &mut Encoder, m: &ClientMsg<'_>) -> std::io::Result<()> {
    let mut out = vec![0u8; enc.header_len() + m.encoded_len()];
    let hl = enc
        .header(m.msg_type(), u32::try_from(m.encoded_len()).unwrap_or(0), &mut out)
        .map_err(|_| std::io::Error::other("header"))?;
    let mut wr = crate::proto::wire::Writer::new(&mut out[hl..]);
    m.emit(&mut wr).map_err(|_| std::io::Error::other("encode"))?;
    w.write_all(&out)
}

/// A linked pass-through channel.
#[derive(Debug)]
pub struct Channel {
    /// Its kind.
    pub kind: ChannelKind,
    /// Sending half.
    pub writer: ChannelWriter,
    /// Receiving half.
    pub reader: ChannelReader,
}

/// Sends bytes as DATA (or LZ4 COMPRESSED_DATA when negotiated and smaller).
#[derive(Debug)]
pub struct ChannelWriter {
    sock: Stream,
    enc: Encoder,
    lz4: bool,
    scratch: Vec<u8>,
}

impl ChannelWriter {
    /// Sends `data` as one message.
    pub fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        let hl = self.enc.header_len();
        if self.lz4 && data.len() > LZ4_THRESHOLD {
            self.scratch.resize(hl + 5 + crate::proto::msg::lz4_scratch_len(data.len()), 0);
            if let Some(n) = crate::proto::msg::compress_lz4(data, &mut self.scratch[hl + 5..]) {
                let size = u32::try_from(5 + n).map_err(|_| std::io::Error::other("too large"))?;
                let _ = self.enc.header(MSG_SPICEVMC_COMPRESSED_DATA, size, &mut self.scratch[..hl]);
                let mut w = crate::proto::wire::Writer::new(&mut self.scratch[hl..hl + 5]);
                let _ = CompressedData::emit_prefix(COMPRESSION_LZ4, u32::try_from(data.len()).unwrap_or(0), &mut w);
                return self.sock.write_all(&self.scratch[..hl + 5 + n]);
            }
        }
        let mut h = [0u8; DATA_HEADER_LEN];
        let size = u32::try_from(data.len()).map_err(|_| std::io::Error::other("too large"))?;
        let n = self.enc.header(MSG_SPICEVMC_DATA, size, &mut h).map_err(|_| std::io::Error::other("header"))?;
        let bufs = [std::io::IoSlice::new(&h[..n]), std::io::IoSlice::new(data)];
        let mut done = self.sock.write_vectored(&bufs)?;
        let total = n + data.len();
        while done < total {
            if done < n {
                done += self.sock.write(&h[done..n])?;
            } else {
                self.sock.write_all(&data[done - n..])?;
                done = total;
            }
        }
        Ok(())
    }

    /// Half-closes the sending side.
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

/// Receives the channel's byte stream, handling PORT_INIT/EVENT, PING and LZ4.
#[derive(Debug)]
pub struct ChannelReader {
    kind: ChannelKind,
    r: MsgReader,
    /// Port name from PORT_INIT.
    pub port_name: Option<String>,
    /// Latest port state (PORT_INIT opened, then events).
    pub port_opened: Option<bool>,
    /// Port events received.
    pub events: Vec<u8>,
    /// COMPRESSED_DATA messages received.
    pub compressed_msgs: u64,
    /// DATA and COMPRESSED_DATA messages received.
    pub data_msgs: u64,
    body: Vec<u8>,
    pending: Vec<u8>,
    pending_pos: usize,
}

impl std::fmt::Debug for MsgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgReader").finish_non_exhaustive()
    }
}

impl ChannelReader {
    /// Reads stream bytes into `out`; 0 at EOF.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, ClientError> {
        loop {
            if self.pending_pos < self.pending.len() {
                let n = out.len().min(self.pending.len() - self.pending_pos);
                out[..n].copy_from_slice(&self.pending[self.pending_pos..self.pending_pos + n]);
                self.pending_pos += n;
                return Ok(n);
            }
            let Some(h) = self.r.next(&mut self.body, 16 * 1024 * 1024)? else { return Ok(0) };
            match h.msg_type {
                MSG_SPICEVMC_DATA => {
                    self.data_msgs += 1;
                    std::mem::swap(&mut self.pending, &mut self.body);
                    self.pending_pos = 0;
                }
                _ => match ServerMsg::parse(self.kind, h.msg_type, &self.body) {
                    Ok(ServerMsg::CompressedData(cd)) => {
                        self.compressed_msgs += 1;
                        // Bound the announced size before allocating for it.
                        const MAX_LZ4: usize = 16 * 1024 * 1024;
                        let size = cd.uncompressed_size as usize;
                        if size > MAX_LZ4 {
                            return Err(ClientError::Protocol(format!(
                                "COMPRESSED_DATA announces {size} bytes (limit {MAX_LZ4})"
                            )));
                        }
                        let mut out = vec![0u8; size];
                        let n = cd.decompress(MAX_LZ4, &mut out).map_err(|e| ClientError::Protocol(e.to_string()))?;
                        out.truncate(n);
                        self.data_msgs += 1;
                        self.pending = out;
                        self.pending_pos = 0;
                    }
                    Ok(ServerMsg::PortInit(p)) => {
                        self.port_name = Some(String::from_utf8_lossy(p.name).into_owned());
                        self.port_opened = Some(p.opened);
                    }
                    Ok(ServerMsg::PortEvent { event }) => {
                        self.events.push(event);
                        match event {
                            PORT_EVENT_OPENED => self.port_opened = Some(true),
                            PORT_EVENT_CLOSED => self.port_opened = Some(false),
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(ClientError::Protocol(e.to_string())),
                },
            }
        }
    }

    /// Bounds each read (`None`: wait forever, the default once linked).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.r.sock.set_read_timeout(t)
    }

    /// Reads until the port reports `opened` (PORT_INIT or PORT_EVENT).
    pub fn wait_port_state(&mut self) -> Result<bool, ClientError> {
        while self.port_opened.is_none() {
            let Some(h) = self.r.next(&mut self.body, 64 * 1024)? else {
                return Err(ClientError::Protocol("closed before PORT_INIT".into()));
            };
            if let Ok(ServerMsg::PortInit(p)) = ServerMsg::parse(self.kind, h.msg_type, &self.body) {
                self.port_name = Some(String::from_utf8_lossy(p.name).into_owned());
                self.port_opened = Some(p.opened);
            } else if h.msg_type == MSG_SPICEVMC_DATA {
                self.data_msgs += 1;
                std::mem::swap(&mut self.pending, &mut self.body);
                self.pending_pos = 0;
            }
        }
        Ok(self.port_opened.unwrap_or(false))
    }
}
