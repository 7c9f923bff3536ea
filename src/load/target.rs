//! What a load run talks to: a SPICE server (each connection its own
//! session plus one pass-through channel) or, for the no-relay ceiling and
//! the socat comparison, a raw TCP or unix stream with no framing at all.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::proto::channel::{CH_PORT, ChannelKind};
use crate::proto::client_link::ClientLinkFailure;
use crate::proto::link::LinkErrorCode;
use crate::relay::config::parse_channel;
use crate::relay::sync_client::{ChannelReader, ChannelWriter, ClientError, ClientTls, Session};
use crate::tls::blocking::TlsStream;

use super::LoadError;

/// One `--channel` selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSel {
    /// `KIND` or `KIND:ID`: that channel; when it is the only selection,
    /// connection `i` takes id `ID + i`.
    From {
        /// Channel type.
        channel_type: u8,
        /// First id.
        first: u8,
    },
    /// `KIND:A-B`: ids A..=B.
    Range {
        /// Channel type.
        channel_type: u8,
        /// First id.
        first: u8,
        /// Last id.
        last: u8,
    },
    /// `KIND:*`: every announced channel of the type.
    All {
        /// Channel type.
        channel_type: u8,
    },
    /// `port:NAME` (or `port:PREFIX*`): port channels found by their
    /// PORT_INIT name.
    Port {
        /// Name, or prefix when `prefix` is set.
        name: String,
        /// Whether `name` ended in `*`.
        prefix: bool,
    },
}

const SEL_HELP: &str = "write port:NAME, port:PREFIX*, usbredir[:ID], smartcard[:ID], webdav[:ID] or 128..=255[:ID]; \
     ID may be A-B or *";

fn kind_of(kind: &str) -> Result<u8, String> {
    // The relay's own parser knows the kind names; the endpoint is a dummy.
    parse_channel(&format!("{kind}:0=sink:"), &mut |_| 0)
        .map(|c| c.kind.channel_type)
        .map_err(|e| format!("{e}; {SEL_HELP}"))
}

impl ChannelSel {
    /// Parses a `--channel` value.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.contains('=') {
            return Err(format!("`{s}`: vmcload names a channel, not an endpoint; drop the `=...` part"));
        }
        if let Some(name) = s.strip_prefix("port:") {
            if name.is_empty() {
                return Err(format!("`{s}`: a port channel is chosen by name; {SEL_HELP}"));
            }
            return Ok(match name.strip_suffix('*') {
                Some(p) => Self::Port { name: p.to_string(), prefix: true },
                None => Self::Port { name: name.to_string(), prefix: false },
            });
        }
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let channel_type = kind_of(kind)?;
        if channel_type == CH_PORT {
            return Err(format!("`{s}`: a port channel is chosen by name; {SEL_HELP}"));
        }
        let id = |t: &str| t.parse::<u8>().map_err(|_| format!("`{s}`: channel id `{t}` must be 0..=255"));
        Ok(match arg {
            None => Self::From { channel_type, first: 0 },
            Some("*") => Self::All { channel_type },
            Some(a) => match a.split_once('-') {
                Some((x, y)) => {
                    let (first, last) = (id(x)?, id(y)?);
                    if first > last {
                        return Err(format!("`{s}`: empty id range"));
                    }
                    Self::Range { channel_type, first, last }
                }
                None => Self::From { channel_type, first: id(a)? },
            },
        })
    }

    fn needs_probe(&self) -> bool {
        matches!(self, Self::Port { .. })
    }
}

impl std::fmt::Display for ChannelSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let k = |t: u8| ChannelKind::of(t).map_or_else(|| t.to_string(), |k| k.to_string());
        match self {
            Self::From { channel_type, first } => write!(f, "{}:{first}", k(*channel_type)),
            Self::Range { channel_type, first, last } => write!(f, "{}:{first}-{last}", k(*channel_type)),
            Self::All { channel_type } => write!(f, "{}:*", k(*channel_type)),
            Self::Port { name, prefix } => write!(f, "port:{name}{}", if *prefix { "*" } else { "" }),
        }
    }
}

/// A channel a connection will link.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelPick {
    /// Wire type.
    pub channel_type: u8,
    /// Id within the type.
    pub id: u8,
    /// `128:0`, `port:com.example.x (id 1)`.
    pub label: String,
}

fn label(t: u8, id: u8) -> String {
    format!("{}:{id}", ChannelKind::of(t).map_or_else(|| t.to_string(), |k| k.to_string()))
}

/// Maps selections onto announced channels, one per connection.
///
/// `port_names` gives the PORT_INIT name of each announced port channel id
/// (only consulted when a `port:` selection exists). The relay, like
/// spice-server, gives a channel to one client at a time, so `connections`
/// distinct channels are needed.
pub fn resolve(
    sels: &[ChannelSel],
    announced: &[(u8, u8)],
    port_names: &[(u8, String)],
    connections: usize,
) -> Result<Vec<ChannelPick>, String> {
    let has = |t: u8, id: u8| announced.contains(&(t, id));
    let listed = || announced.iter().map(|&(t, id)| label(t, id)).collect::<Vec<_>>().join(", ");
    let mut out: Vec<ChannelPick> = Vec::new();
    fn push(out: &mut Vec<ChannelPick>, p: ChannelPick) -> Result<(), String> {
        if out.iter().any(|o| (o.channel_type, o.id) == (p.channel_type, p.id)) {
            return Err(format!("channel {} is selected twice; each connection needs its own channel", p.label));
        }
        out.push(p);
        Ok(())
    }
    for sel in sels {
        match sel {
            ChannelSel::From { channel_type, first } => {
                let count = if sels.len() == 1 { connections } else { 1 };
                for k in 0..count {
                    let id = u8::try_from(usize::from(*first) + k)
                        .map_err(|_| format!("{sel}: {connections} connections run past id 255"))?;
                    if !has(*channel_type, id) {
                        return Err(format!(
                            "the server does not offer channel {} (connection {k} of {connections}); it offers: {}",
                            label(*channel_type, id),
                            listed()
                        ));
                    }
                    push(&mut out, ChannelPick { channel_type: *channel_type, id, label: label(*channel_type, id) })?;
                }
            }
            ChannelSel::Range { channel_type, first, last } => {
                for id in *first..=*last {
                    if !has(*channel_type, id) {
                        return Err(format!(
                            "the server does not offer channel {}; it offers: {}",
                            label(*channel_type, id),
                            listed()
                        ));
                    }
                    push(&mut out, ChannelPick { channel_type: *channel_type, id, label: label(*channel_type, id) })?;
                }
            }
            ChannelSel::All { channel_type } => {
                let before = out.len();
                for &(t, id) in announced.iter().filter(|c| c.0 == *channel_type) {
                    push(&mut out, ChannelPick { channel_type: t, id, label: label(t, id) })?;
                }
                if out.len() == before {
                    return Err(format!("{sel}: the server offers no such channel; it offers: {}", listed()));
                }
            }
            ChannelSel::Port { name, prefix } => {
                let before = out.len();
                for (id, n) in port_names {
                    if (*prefix && n.starts_with(name.as_str())) || (!*prefix && n == name) {
                        push(
                            &mut out,
                            ChannelPick { channel_type: CH_PORT, id: *id, label: format!("port:{n} (id {id})") },
                        )?;
                    }
                }
                if out.len() == before {
                    let names: Vec<&str> = port_names.iter().map(|p| p.1.as_str()).collect();
                    return Err(format!("{sel}: no port channel has that name; the server's ports are {names:?}"));
                }
            }
        }
    }
    if out.len() < connections {
        return Err(format!(
            "{connections} connections need {connections} distinct channels but the selection gives {}: the relay \
             (like spice-server) serves a channel to one client at a time. Configure more channels and select \
             them, e.g. --channel 128:0-{} or --channel 128:*",
            out.len(),
            connections.saturating_sub(1).min(255)
        ));
    }
    out.truncate(connections);
    Ok(out)
}

/// Where a run's connections go.
#[derive(Debug, Clone)]
pub enum Target {
    /// A SPICE server.
    Spice {
        /// `HOST:PORT`.
        addr: String,
        /// Ticket password (empty without ticketing).
        password: Vec<u8>,
        /// Channel selections.
        channels: Vec<ChannelSel>,
        /// Announce LZ4 (and send COMPRESSED_DATA when it helps).
        lz4: bool,
        /// TLS on every link (`spice+tls://`, `?tls-port=`).
        tls: Option<ClientTls>,
    },
    /// A raw TCP stream.
    RawTcp(String),
    /// A raw TLS stream over TCP (`HOST:PORT`; e.g. stunnel in front of
    /// an endpoint).
    RawTls(String, ClientTls),
    /// A raw unix stream.
    RawUnix(PathBuf),
}

impl Target {
    /// `spice`, `raw-tcp` or `raw-unix`.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Spice { tls: None, .. } => "spice",
            Self::Spice { tls: Some(_), .. } => "spice+tls",
            Self::RawTcp(_) => "raw-tcp",
            Self::RawTls(..) => "raw-tls",
            Self::RawUnix(_) => "raw-unix",
        }
    }

    /// `spice://HOST:PORT`, `tcp:HOST:PORT`, `unix:PATH`.
    pub fn uri(&self) -> String {
        match self {
            Self::Spice { addr, tls: None, .. } => format!("spice://{addr}"),
            Self::Spice { addr, tls: Some(_), .. } => format!("spice+tls://{addr}"),
            Self::RawTcp(a) => format!("tcp:{a}"),
            Self::RawTls(a, _) => format!("tls:{a}"),
            Self::RawUnix(p) => format!("unix:{}", p.display()),
        }
    }

    /// Picks the channel of each connection (SPICE; raw targets get one
    /// unnamed pick per connection). Port names are learnt by linking each
    /// announced port channel once in a probe session.
    pub fn plan(&self, connections: usize, timeout: Duration) -> Result<Vec<ChannelPick>, LoadError> {
        let Self::Spice { addr, password, channels, tls, .. } = self else {
            let l = self.uri();
            return Ok((0..connections).map(|_| ChannelPick { channel_type: 0, id: 0, label: l.clone() }).collect());
        };
        let session = Arc::new(
            Session::connect_tls(addr, tls.clone(), password, timeout)
                .map_err(|e| LoadError::Run(format!("probe session to {addr}: {e}")))?,
        );
        let mut names = Vec::new();
        if channels.iter().any(ChannelSel::needs_probe) {
            let ports: Vec<u8> = session.channels.iter().filter(|c| c.0 == CH_PORT).map(|c| c.1).collect();
            names = probe_port_names(&session, &ports, timeout)?;
        }
        let announced = session.channels.clone();
        session.close();
        resolve(channels, &announced, &names, connections).map_err(LoadError::Usage)
    }
}

/// Links each port channel id and reads its PORT_INIT name. Ids whose link
/// is refused (endpoint down) are skipped.
fn probe_port_names(session: &Arc<Session>, ids: &[u8], timeout: Duration) -> Result<Vec<(u8, String)>, LoadError> {
    let (tx, rx) = mpsc::channel();
    let s = Arc::clone(session);
    let ids2 = ids.to_vec();
    std::thread::Builder::new()
        .name("vmcload-probe".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for id in ids2 {
                let r = s.open(CH_PORT, id, false).and_then(|mut ch| {
                    ch.reader.wait_port_state()?;
                    Ok(ch.reader.port_name.clone().unwrap_or_default())
                });
                if tx.send((id, r)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| LoadError::Run(format!("probe thread: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    for _ in ids {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((id, Ok(name))) => out.push((id, name)),
            Ok((_, Err(_))) => {}
            Err(_) => {
                session.close();
                return Err(LoadError::Run(format!(
                    "probing port names timed out after {timeout:?} (no PORT_INIT from the server)"
                )));
            }
        }
    }
    Ok(out)
}

/// The sending half of a link.
#[derive(Debug)]
pub enum TxHalf {
    /// SPICE DATA messages.
    Spice(ChannelWriter),
    /// Raw TCP.
    Tcp(TcpStream),
    /// Raw unix.
    Unix(UnixStream),
    /// Raw TLS.
    Tls(TlsStream),
}

impl TxHalf {
    /// Sends one message (SPICE) or the bytes (raw).
    pub fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Spice(w) => w.send(data),
            Self::Tcp(s) => s.write_all(data),
            Self::Unix(s) => s.write_all(data),
            Self::Tls(s) => s.write_all(data),
        }
    }

    /// Half-closes: no more data from us.
    pub fn finish(&mut self) {
        match self {
            Self::Spice(w) => w.shutdown(),
            Self::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            Self::Unix(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            Self::Tls(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }
}

/// The receiving half of a link.
#[derive(Debug)]
pub enum RxHalf {
    /// SPICE: the payload stream of DATA / COMPRESSED_DATA (boxed: it
    /// carries its buffers).
    Spice(Box<ChannelReader>),
    /// Raw TCP.
    Tcp(TcpStream),
    /// Raw unix.
    Unix(UnixStream),
    /// Raw TLS.
    Tls(TlsStream),
}

impl RxHalf {
    /// Reads stream bytes; 0 at EOF.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<usize, String> {
        loop {
            let r = match self {
                Self::Spice(r) => return r.read(out).map_err(|e| e.to_string()),
                Self::Tcp(s) => s.read(out),
                Self::Unix(s) => s.read(out),
                Self::Tls(s) => s.read(out),
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.to_string()),
                Ok(n) => return Ok(n),
            }
        }
    }

    /// Wakes anyone blocked on this socket (raw; SPICE ends with its session).
    pub fn abort(&self) {
        match self {
            Self::Spice(_) => {}
            Self::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Self::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Self::Tls(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// DATA messages received so far (SPICE only).
    pub fn msgs(&self) -> Option<u64> {
        match self {
            Self::Spice(r) => Some(r.data_msgs),
            _ => None,
        }
    }
}

/// One linked connection.
#[derive(Debug)]
pub struct Link {
    /// Sending half.
    pub tx: TxHalf,
    /// Receiving half.
    pub rx: RxHalf,
    /// The session that must outlive the channel (SPICE).
    pub session: Option<Session>,
}

impl Link {
    /// Closes everything (the session ends its channels on the relay).
    pub fn close(self) {
        if let Some(s) = &self.session {
            s.close();
        }
    }
}

/// How long a refused link (CHANNEL_NOT_AVAILABLE) is retried: a channel
/// just released by the probe session or a previous run may still be
/// closing on the server.
const BUSY_RETRY: Duration = Duration::from_secs(3);

/// Links one connection: session + channel (SPICE) or a socket (raw).
pub fn connect(target: &Target, pick: &ChannelPick, timeout: Duration) -> Result<Link, String> {
    match target {
        Target::RawTcp(addr) => {
            let sa = addr
                .to_socket_addrs()
                .map_err(|e| format!("{addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr}: no address"))?;
            let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let w = s.try_clone().map_err(|e| e.to_string())?;
            Ok(Link { tx: TxHalf::Tcp(w), rx: RxHalf::Tcp(s), session: None })
        }
        Target::RawTls(addr, tls) => {
            let sa = addr
                .to_socket_addrs()
                .map_err(|e| format!("{addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr}: no address"))?;
            let s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(timeout));
            let mut t = TlsStream::client(s, Arc::clone(&tls.config), &tls.host).map_err(|e| format!("{addr}: {e}"))?;
            t.handshake().map_err(|e| format!("TLS to {addr}: {e}"))?;
            t.set_read_timeout(None).map_err(|e| e.to_string())?;
            let w = t.try_clone().map_err(|e| e.to_string())?;
            Ok(Link { tx: TxHalf::Tls(w), rx: RxHalf::Tls(t), session: None })
        }
        Target::RawUnix(path) => {
            let s = UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
            let w = s.try_clone().map_err(|e| e.to_string())?;
            Ok(Link { tx: TxHalf::Unix(w), rx: RxHalf::Unix(s), session: None })
        }
        Target::Spice { addr, password, lz4, tls, .. } => {
            let give_up = Instant::now() + BUSY_RETRY;
            loop {
                let session =
                    Session::connect_tls(addr, tls.clone(), password, timeout).map_err(|e| format!("session: {e}"))?;
                match session.open(pick.channel_type, pick.id, *lz4) {
                    Ok(mut ch) => {
                        if ch.kind.port_messages {
                            // PORT_INIT says whether the endpoint is there.
                            ch.reader.wait_port_state().map_err(|e| format!("{}: {e}", pick.label))?;
                        }
                        return Ok(Link {
                            tx: TxHalf::Spice(ch.writer),
                            rx: RxHalf::Spice(Box::new(ch.reader)),
                            session: Some(session),
                        });
                    }
                    Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable)))
                        if Instant::now() < give_up =>
                    {
                        session.close();
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        session.close();
                        return Err(format!("{}: {e}", pick.label));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> ChannelSel {
        ChannelSel::parse(s).expect(s)
    }

    #[test]
    fn selections_parse() {
        assert_eq!(sel("128"), ChannelSel::From { channel_type: 128, first: 0 });
        assert_eq!(sel("usbredir:2"), ChannelSel::From { channel_type: 9, first: 2 });
        assert_eq!(sel("200:3-7"), ChannelSel::Range { channel_type: 200, first: 3, last: 7 });
        assert_eq!(sel("128:*"), ChannelSel::All { channel_type: 128 });
        assert_eq!(sel("port:a.b"), ChannelSel::Port { name: "a.b".into(), prefix: false });
        assert_eq!(sel("port:a.*"), ChannelSel::Port { name: "a.".into(), prefix: true });
        assert_eq!(sel("200:3-7").to_string(), "200:3-7");
        for bad in ["port", "port:", "100", "bogus", "128:x", "128:5-2", "128=sink:", "128:300"] {
            assert!(ChannelSel::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolution() {
        let ann = [(1, 0), (128, 0), (128, 1), (128, 2), (10, 0), (10, 1), (9, 0)];
        let names = [(0u8, "com.example.a".to_string()), (1, "com.example.x".to_string())];
        let ids = |v: Vec<ChannelPick>| v.iter().map(|p| (p.channel_type, p.id)).collect::<Vec<_>>();
        assert_eq!(ids(resolve(&[sel("128")], &ann, &[], 3).expect("ok")), vec![(128, 0), (128, 1), (128, 2)]);
        assert!(resolve(&[sel("128:1")], &ann, &[], 3).unwrap_err().contains("does not offer channel 128:3"));
        assert_eq!(ids(resolve(&[sel("128:*")], &ann, &[], 2).expect("ok")), vec![(128, 0), (128, 1)]);
        let p = resolve(&[sel("port:com.example.x")], &ann, &names, 1).expect("ok");
        assert_eq!(ids(p.clone()), vec![(10, 1)]);
        assert!(p[0].label.contains("com.example.x"));
        assert_eq!(ids(resolve(&[sel("port:com.*"), sel("usbredir")], &ann, &names, 3).expect("ok")).len(), 3);
        assert!(resolve(&[sel("port:nope")], &ann, &names, 1).unwrap_err().contains("no port channel"));
        assert!(resolve(&[sel("128:0"), sel("usbredir")], &ann, &[], 3).unwrap_err().contains("distinct channels"));
        assert!(resolve(&[sel("128:0-1"), sel("128:1")], &ann, &[], 3).unwrap_err().contains("twice"));
    }
}
