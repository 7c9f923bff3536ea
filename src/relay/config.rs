//! Serve configuration: services (one per VM), their channels and
//! endpoints, and the engine's limits. Built from a TOML file or from
//! command-line flags; every error names where it is and what to write.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::proto::channel::{CH_PORT, ChannelClass, ChannelKind, ChannelSecurity, Transport};
use crate::tls::{ClientTlsOptions, ServerTlsFiles};

/// Where a channel's bytes go on the host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    /// Connect to a unix stream socket (e.g. QEMU `-chardev socket,server=on`).
    Unix(PathBuf),
    /// Listen on a unix socket; QEMU or the app connects to us.
    UnixListen(PathBuf),
    /// Open a character device or FIFO read-write.
    File(PathBuf),
    /// Connect to a TCP address.
    Tcp(SocketAddr),
    /// Built-in: echo every byte back.
    Echo,
    /// Built-in: discard every byte.
    Sink,
}

impl std::fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::UnixListen(p) => write!(f, "unix-listen:{}", p.display()),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Echo => f.write_str("echo:"),
            Self::Sink => f.write_str("sink:"),
        }
    }
}

/// One channel a service offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConf {
    /// Kind (usbredir, port, 128, …).
    pub kind: ChannelKind,
    /// Channel id (per type, 0-based).
    pub id: u8,
    /// Port name for port/webdav channels (sent in PORT_INIT), and for
    /// user-defined channels (vmcrelay's own convention).
    pub port_name: Option<String>,
    /// Where the bytes go.
    pub endpoint: EndpointSpec,
    /// Dropped by a reload (a tombstone): kept so that the links on it keep
    /// their index until they end; never announced, never linked anew.
    pub removed: bool,
}

impl ChannelConf {
    /// `usbredir:0`, `port:NAME`, `128:0` — for logs.
    pub fn label(&self) -> String {
        match &self.port_name {
            Some(n) if self.kind.channel_type == CH_PORT => format!("port:{n}"),
            _ => format!("{}:{}", self.kind, self.id),
        }
    }
}

/// One SPICE server (usually one per VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name used in logs.
    pub name: String,
    /// TCP addresses to listen on (plain SPICE).
    pub listen: Vec<SocketAddr>,
    /// TCP addresses to listen on with TLS (QEMU's `tls-port`).
    pub tls_listen: Vec<SocketAddr>,
    /// Certificate, key and CA of the TLS listeners.
    pub tls: Option<ServerTlsFiles>,
    /// Which channel types must (or must not) use TLS.
    pub security: ChannelSecurity,
    /// Ticket password; `None` when ticketing is disabled.
    pub password: Option<Vec<u8>>,
    /// Offered channels.
    pub channels: Vec<ChannelConf>,
    /// Whole-VM mode: every channel not in `channels` is proxied to this
    /// SPICE server (QEMU's spice-server), whose password applies.
    pub upstream: Option<ServerAddr>,
    /// TLS to a `spice+tls://` (or `?tls-port=`) upstream: the CA file and
    /// the optional subject, checked as `connect` checks its server.
    pub upstream_tls: Option<ClientTlsOptions>,
    /// This service's busy policy (`None`: the relay's, `Limits::busy`).
    pub busy: Option<BusyPolicy>,
    /// Dropped by a reload (a tombstone): its listeners are closed, its
    /// sessions run until they end; indexes of the others stay put.
    pub removed: bool,
}

impl Service {
    /// Links of this service need no fresh RSA key each: no ticketing, and
    /// not fronting QEMU (whose ticket vmcrelay re-encrypts).
    pub fn open_links(&self) -> bool {
        self.password.is_none() && self.upstream.is_none()
    }

    /// Whether channel `(channel_type, id)` is configured and not removed
    /// by a reload: the channels a new link may take.
    pub fn live_channel(&self, channel_type: u8, id: u8) -> Option<usize> {
        self.channels.iter().position(|c| !c.removed && c.kind.channel_type == channel_type && c.id == id)
    }

    /// The channels not removed by a reload, with their indexes.
    pub fn live_channels(&self) -> impl Iterator<Item = (usize, &ChannelConf)> {
        self.channels.iter().enumerate().filter(|(_, c)| !c.removed)
    }
}

/// Where a SPICE server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// `spice://HOST:PORT`.
    Tcp(SocketAddr),
    /// `spice+unix:///path`.
    Unix(PathBuf),
    /// `spice+tls://HOST:PORT` or `spice://HOST?tls-port=PORT`: TLS on
    /// every channel, the certificate checked against `host` as written.
    Tls {
        /// Where to connect.
        addr: SocketAddr,
        /// The host as the user wrote it (IP address or DNS name).
        host: String,
    },
}

impl ServerAddr {
    /// Whether channels to this server run over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "spice://{a}"),
            Self::Unix(p) => write!(f, "spice+unix://{}", p.display()),
            Self::Tls { addr, .. } => write!(f, "spice+tls://{addr}"),
        }
    }
}

const URI_HELP: &str = "write spice://HOST:PORT, spice://HOST?port=PORT, spice://HOST?tls-port=PORT, \
     spice+tls://HOST:PORT or spice+unix:///PATH";

/// Parses `spice://HOST:PORT`, `spice://HOST?port=P&tls-port=T`,
/// `spice+tls://HOST:PORT` or `spice+unix:///PATH`. A TLS port, when
/// given, is used for every channel (spice-gtk with only a `tls-port`).
pub fn parse_spice_uri(uri: &str) -> Result<ServerAddr, String> {
    if let Some(p) = uri.strip_prefix("spice+unix://") {
        if p.is_empty() {
            return Err(format!("`{uri}`: write spice+unix:///PATH"));
        }
        return Ok(ServerAddr::Unix(PathBuf::from(p)));
    }
    if let Some(rest) = uri.strip_prefix("spice+tls://") {
        let hostport = rest.trim_end_matches('/');
        let addr = parse_server_addr(hostport)?;
        let host = host_of(hostport).ok_or_else(|| format!("`{uri}`: {URI_HELP}"))?;
        return Ok(ServerAddr::Tls { addr, host });
    }
    let rest = uri.strip_prefix("spice://").ok_or_else(|| format!("`{uri}`: {URI_HELP}"))?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a.trim_end_matches('/'), Some(q)),
        None => (rest.trim_end_matches('/'), None),
    };
    let (mut port, mut tls_port) = (None, None);
    for kv in query.into_iter().flat_map(|q| q.split('&')).filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("port", p)) => port = Some(p),
            Some(("tls-port", p)) => tls_port = Some(p),
            _ => return Err(format!("`{uri}`: unknown query `{kv}`; {URI_HELP}")),
        }
    }
    let host = match (port, tls_port) {
        (None, None) => return parse_server_addr(authority).map(ServerAddr::Tcp),
        _ => authority,
    };
    let bracketed = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
    if let Some(t) = tls_port {
        let addr = parse_server_addr(&format!("{bracketed}:{t}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        return Ok(ServerAddr::Tls { addr, host });
    }
    parse_server_addr(&format!("{bracketed}:{}", port.unwrap_or_default())).map(ServerAddr::Tcp)
}

/// `HOST` of `HOST:PORT` / `[V6]:PORT`, without brackets.
fn host_of(hostport: &str) -> Option<String> {
    let (h, _) = hostport.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    (!h.is_empty()).then(|| h.to_string())
}

/// What to do when a *new session* wants what another live session holds.
/// Either way, a second link of a channel already linked in the *same*
/// session is refused (CHANNEL_NOT_AVAILABLE) and the first keeps working,
/// as spice-server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BusyPolicy {
    /// The new session replaces the old one as a whole (spice-server's
    /// behaviour): the old session's main and channels close and their
    /// endpoint connections are reset.
    #[default]
    Replace,
    /// Keep the old session: a new main link is refused while another
    /// session of the service is linked (CHANNEL_NOT_AVAILABLE).
    Refuse,
}

/// How client → endpoint payload bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// Registered buffers: one large read, one gathered write of the
    /// payload ranges (headers skipped in place).
    #[default]
    Copy,
    /// Headers read into memory; the payload of each DATA message of at
    /// least 16 KiB spliced socket → pipe → endpoint, never in user memory.
    Splice,
}

impl Limits {
    /// Key threads to start (`key_threads`, or one per core).
    pub fn key_threads(&self) -> usize {
        if self.key_threads > 0 {
            self.key_threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Most connections one worker may hold (the op token has 24 bits of slot).
pub const MAX_CONNS_PER_WORKER: usize = 1 << 20;

/// Engine limits and knobs, each with a default and a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Worker threads (one io_uring each).
    pub workers: usize,
    /// Client connections (any stage) per worker.
    pub max_conns_per_worker: usize,
    /// Bytes per registered buffer; a connection holds one per direction
    /// only while data moves.
    pub buffer_bytes: usize,
    /// Registered buffers per worker, shared by its connections (a
    /// connection moving data both ways holds two; idle ones none).
    pub buffers_per_worker: usize,
    /// Seconds without data after which a connection's posted read gives
    /// its buffer back (it waits with a POLL instead).
    pub idle_buffer_secs: u64,
    /// Largest DATA payload sent to the client.
    pub max_payload_bytes: usize,
    /// Largest control-message body accepted from a client.
    pub max_control_bytes: usize,
    /// Seconds a client may take to finish the link stage.
    pub link_timeout_secs: u64,
    /// Connections in the link stage (accepted, not linked) per worker;
    /// when full, the oldest is closed to make room for the newest.
    pub max_link_stage: usize,
    /// Link-stage connections per source address (IPv6: its /64) per
    /// worker; over it, that address's oldest is closed.
    pub max_link_stage_per_addr: usize,
    /// Seconds SIGTERM/SIGINT keeps serving linked channels before the
    /// rest is flushed and closed.
    pub drain_secs: u64,
    /// Failed tickets from one source address (IPv6: its /64) within
    /// `auth_fail_window_secs` before its further links are delayed (0: off).
    pub auth_fail_limit: u32,
    /// The window over which failed tickets are counted.
    pub auth_fail_window_secs: u64,
    /// Longest delay a throttled address waits per link (the delay doubles
    /// from 1 s with each further failure).
    pub auth_fail_max_delay_secs: u64,
    /// Busy-channel policy.
    pub busy: BusyPolicy,
    /// Keep a `unix-listen` endpoint connection open when the client goes.
    pub keep_listen_endpoint: bool,
    /// RSA keys kept ready per worker: what absorbs a burst of links.
    pub key_pool_per_worker: usize,
    /// Key threads filling the pools at idle priority (0: one per core).
    pub key_threads: usize,
    /// Largest decompressed COMPRESSED_DATA payload accepted.
    pub max_lz4_bytes: usize,
    /// Send LZ4 COMPRESSED_DATA (payloads over 1000 bytes that shrink) to
    /// clients that announced the cap.
    pub lz4_to_client: bool,
    /// SPICE ACK window toward clients (0: none, as spice-server does on
    /// spicevmc channels; TCP back-pressure still applies).
    pub ack_window: u32,
    /// Data path for client → endpoint payloads.
    pub data_path: DataPath,
    /// Seconds between `stats` log lines (0: none).
    pub stats_secs: u64,
    /// `[relay] log-format` (`--log-format` wins over it); None: not set.
    pub log_format: Option<crate::relay::log::LogFormat>,
    /// Links served by one RSA ticket key (1: a fresh key per link, as
    /// spice-server). More raises the link rate but lets a sniffed ticket
    /// be replayed on another link that got the same key.
    pub key_reuse: usize,
    /// Mode, owner and group of the `unix-listen` sockets.
    pub socket: SocketPerms,
    /// `--metrics`: where to serve `/metrics` and the status page (`None`: off).
    pub metrics: Option<SocketAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            // An idle connection costs its `Conn` (about 2 KiB) and its
            // sockets, no data buffer: 10,000 idle channels fit easily.
            max_conns_per_worker: 16_384,
            // Four 64 KiB DATA messages with 18-byte headers fit in one buffer.
            buffer_bytes: 4 * (64 * 1024 + 18),
            buffers_per_worker: 512,
            idle_buffer_secs: 2,
            max_payload_bytes: 64 * 1024,
            max_control_bytes: 64 * 1024,
            link_timeout_secs: 10,
            max_link_stage: 128,
            max_link_stage_per_addr: 32,
            drain_secs: 5,
            auth_fail_limit: 3,
            auth_fail_window_secs: 60,
            auth_fail_max_delay_secs: 8,
            busy: BusyPolicy::Replace,
            keep_listen_endpoint: false,
            // A burst of 100 sessions (200 links) spread over the workers
            // finds its keys ready; filling it takes ~1 s of idle CPU.
            key_pool_per_worker: 128,
            key_threads: 0,
            max_lz4_bytes: 1024 * 1024,
            lz4_to_client: false,
            ack_window: 0,
            data_path: DataPath::Copy,
            stats_secs: 60,
            log_format: None,
            key_reuse: 1,
            socket: SocketPerms::default(),
            metrics: None,
        }
    }
}

/// The whole serve configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Services.
    pub services: Vec<Service>,
    /// Limits.
    pub limits: Limits,
}

/// A configuration error with where it is and what to write instead.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ConfigError {
    /// `FILE:LINE`, or `--channel`, …
    pub origin: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

fn err(origin: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { origin: origin.into(), message: message.into() }
}

const KIND_HELP: &str = "KIND is usbredir, smartcard, webdav, port:NAME or a number 128..=255";
const ENDPOINT_HELP: &str = "ENDPOINT is unix:PATH, unix-listen:PATH, file:PATH, tcp:HOST:PORT, echo: or sink:";

/// Parses an endpoint (`unix:/run/x.sock`, `echo:`, …).
pub fn parse_endpoint(s: &str) -> Result<EndpointSpec, String> {
    let (scheme, rest) = s.split_once(':').ok_or_else(|| format!("endpoint `{s}` has no scheme; {ENDPOINT_HELP}"))?;
    let path = |what: &str| -> Result<PathBuf, String> {
        if rest.is_empty() {
            Err(format!("`{what}:` needs a path, e.g. `{what}:/run/vm1/ur0.sock`"))
        } else {
            Ok(PathBuf::from(rest))
        }
    };
    Ok(match scheme {
        "unix" => EndpointSpec::Unix(path("unix")?),
        "unix-listen" => EndpointSpec::UnixListen(path("unix-listen")?),
        "file" => EndpointSpec::File(path("file")?),
        "tcp" => EndpointSpec::Tcp(
            rest.to_socket_addrs()
                .map_err(|e| format!("`tcp:{rest}`: {e}; write tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444"))?
                .next()
                .ok_or_else(|| format!("`tcp:{rest}` resolves to no address"))?,
        ),
        "echo" if rest.is_empty() => EndpointSpec::Echo,
        "sink" if rest.is_empty() => EndpointSpec::Sink,
        _ => return Err(format!("unknown endpoint `{s}`; {ENDPOINT_HELP}")),
    })
}

/// Parses `KIND[:ID]=ENDPOINT`. `next_id` gives the next free id of a type
/// when the spec has none.
pub fn parse_channel(spec: &str, next_id: &mut dyn FnMut(u8) -> u8) -> Result<ChannelConf, String> {
    let (lhs, rhs) = spec
        .split_once('=')
        .ok_or_else(|| format!("channel `{spec}` has no `=ENDPOINT`; write KIND[:ID]=ENDPOINT ({KIND_HELP})"))?;
    let endpoint = parse_endpoint(rhs)?;
    let (kind_s, arg) = match lhs.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (lhs, None),
    };
    let kind = if let Ok(n) = kind_s.parse::<u16>() {
        match u8::try_from(n).ok().and_then(ChannelKind::of) {
            Some(k) if k.is_user_defined() => k,
            _ => return Err(format!("channel type {n} is not user-defined; numbers must be 128..=255 ({KIND_HELP})")),
        }
    } else {
        match ChannelKind::by_name(kind_s) {
            Some(k) if k.class == ChannelClass::PassThrough => k,
            _ => return Err(format!("unknown channel kind `{kind_s}`; {KIND_HELP}")),
        }
    };
    let (id, port_name) = if kind.channel_type == CH_PORT {
        let name = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
            "a port channel needs its name: `port:NAME=...`, e.g. `port:org.qemu.monitor.qmp.0=unix:/run/vm1/qmp.sock`"
                .to_string()
        })?;
        if name.len() > 255 || name.contains('\0') {
            return Err(format!("port name `{name}` must be 1..=255 bytes without NUL"));
        }
        (next_id(kind.channel_type), Some(name.to_string()))
    } else {
        let id = match arg {
            Some(a) => a.parse::<u8>().map_err(|_| format!("channel id `{a}` must be a number 0..=255"))?,
            None => next_id(kind.channel_type),
        };
        let name = match kind.channel_type {
            11 => Some("org.spice-space.webdav.0".to_string()),
            _ if kind.is_user_defined() => Some(format!("vmcrelay.user.{}.{id}", kind.channel_type)),
            _ => None,
        };
        (id, name)
    };
    Ok(ChannelConf { kind, id, port_name, endpoint, removed: false })
}

/// Builds a channel list, assigning ids and refusing duplicates.
pub fn parse_channels<'a>(specs: impl IntoIterator<Item = (&'a str, String)>) -> Result<Vec<ChannelConf>, ConfigError> {
    let mut out: Vec<ChannelConf> = Vec::new();
    for (spec, origin) in specs {
        let taken: Vec<(u8, u8)> = out.iter().map(|c| (c.kind.channel_type, c.id)).collect();
        let mut next = |t: u8| (0..=255u8).find(|i| !taken.contains(&(t, *i))).unwrap_or(255);
        let c = parse_channel(spec, &mut next).map_err(|m| err(&origin, m))?;
        if taken.contains(&(c.kind.channel_type, c.id)) {
            return Err(err(origin, format!("channel {} is configured twice; give each its own id", c.label())));
        }
        if let Some(n) = &c.port_name
            && c.kind.channel_type == CH_PORT
            && out.iter().any(|o| o.port_name.as_deref() == Some(n))
        {
            return Err(err(origin, format!("port name `{n}` is configured twice")));
        }
        out.push(c);
    }
    if out.is_empty() {
        return Err(err("channels", "a service needs at least one channel, e.g. --channel port:com.example.0=echo:"));
    }
    Ok(out)
}

/// Reads a password from a file (first line, without the newline).
pub fn read_password_file(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    check_password(line.to_vec())
}

/// Reads a password from an environment variable.
pub fn read_password_env(var: &str) -> Result<Vec<u8>, String> {
    let v = std::env::var_os(var).ok_or_else(|| format!("environment variable {var} is not set"))?;
    check_password(v.into_encoded_bytes())
}

fn check_password(p: Vec<u8>) -> Result<Vec<u8>, String> {
    if p.len() > crate::proto::consts::MAX_PASSWORD_LEN {
        return Err(format!("password is {} bytes; SPICE allows at most 60", p.len()));
    }
    if p.is_empty() {
        return Err("password is empty; use disable-ticketing to serve without a password".into());
    }
    Ok(p)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    #[serde(default)]
    relay: FileRelay,
    #[serde(default)]
    service: Vec<toml::Spanned<FileService>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRelay {
    workers: Option<usize>,
    max_conns_per_worker: Option<usize>,
    buffer_kib: Option<usize>,
    buffers_per_worker: Option<usize>,
    idle_buffer_secs: Option<u64>,
    key_pool_per_worker: Option<usize>,
    key_threads: Option<usize>,
    max_payload_kib: Option<usize>,
    link_timeout_secs: Option<u64>,
    max_link_stage: Option<usize>,
    max_link_stage_per_addr: Option<usize>,
    drain_secs: Option<u64>,
    auth_fail_limit: Option<u32>,
    auth_fail_window_secs: Option<u64>,
    auth_fail_max_delay_secs: Option<u64>,
    busy: Option<BusyPolicy>,
    keep_listen_endpoint: Option<bool>,
    lz4_to_client: Option<bool>,
    ack_window: Option<u32>,
    data_path: Option<DataPath>,
    stats_secs: Option<u64>,
    log_format: Option<crate::relay::log::LogFormat>,
    key_reuse: Option<usize>,
    socket_mode: Option<toml::Spanned<toml::Value>>,
    socket_owner: Option<toml::Spanned<String>>,
    socket_group: Option<toml::Spanned<String>>,
    metrics: Option<toml::Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileService {
    name: Option<String>,
    #[serde(default)]
    listen: Vec<toml::Spanned<String>>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    #[serde(default)]
    disable_ticketing: bool,
    #[serde(default)]
    channels: Vec<toml::Spanned<String>>,
    upstream: Option<toml::Spanned<String>>,
    upstream_ca_file: Option<PathBuf>,
    upstream_cert_subject: Option<String>,
    busy: Option<BusyPolicy>,
    #[serde(default)]
    tls_listen: Vec<toml::Spanned<String>>,
    x509_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    tls_channel: Vec<String>,
    #[serde(default)]
    plaintext_channel: Vec<String>,
}

/// The TLS files from `x509-dir` (QEMU's layout) and/or explicit files
/// (each overrides the directory's file, as QEMU's `x509-*-file`).
pub fn tls_files(
    x509_dir: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
) -> Result<Option<ServerTlsFiles>, String> {
    let mut f = match (x509_dir, cert, key) {
        (Some(d), _, _) => ServerTlsFiles::from_x509_dir(d),
        (None, Some(c), Some(k)) => ServerTlsFiles { cert: c.to_path_buf(), key: k.to_path_buf(), ca: None },
        (None, None, None) if ca.is_none() => return Ok(None),
        _ => {
            return Err("TLS needs x509-dir (ca-cert.pem, server-cert.pem, server-key.pem) or both tls-cert and \
                 tls-key"
                .into());
        }
    };
    if let Some(c) = cert {
        f.cert = c.to_path_buf();
    }
    if let Some(k) = key {
        f.key = k.to_path_buf();
    }
    if let Some(c) = ca {
        f.ca = Some(c.to_path_buf());
    }
    Ok(Some(f))
}

/// The TLS options of an upstream: a TLS URI needs the CA file that signed
/// QEMU's certificate; the CA file and subject go with a TLS URI only.
pub fn upstream_tls(
    upstream: Option<&ServerAddr>,
    ca_file: Option<&Path>,
    cert_subject: Option<&str>,
) -> Result<Option<ClientTlsOptions>, String> {
    match (upstream, ca_file) {
        (Some(u), Some(ca)) if u.is_tls() => {
            let mut o = ClientTlsOptions::with_ca_file(ca);
            o.cert_subject = cert_subject.map(str::to_string);
            Ok(Some(o))
        }
        (Some(u), None) if u.is_tls() => Err(format!(
            "upstream {u} is TLS: give upstream-ca-file FILE (--upstream-ca-file), the CA that signed QEMU's \
             certificate (QEMU: x509-dir/ca-cert.pem)"
        )),
        _ if ca_file.is_some() || cert_subject.is_some() => {
            Err("upstream-ca-file / upstream-cert-subject apply to a TLS upstream only: write upstream = \
             \"spice+tls://HOST:PORT\" or \"spice://HOST?tls-port=PORT\""
                .into())
        }
        _ => Ok(None),
    }
}

/// Builds the per-type TLS policy from `tls-channel` / `plaintext-channel` names.
pub fn channel_security<'a>(
    tls: impl IntoIterator<Item = &'a str>,
    plain: impl IntoIterator<Item = &'a str>,
) -> Result<ChannelSecurity, String> {
    let mut p = ChannelSecurity::default();
    for n in tls {
        p.add(n, Transport::Tls)?;
    }
    for n in plain {
        p.add(n, Transport::Plain)?;
    }
    Ok(p)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |t| t.bytes().filter(|&b| b == b'\n').count() + 1)
}

/// Resolves a listen address (`127.0.0.1:5930`, `[::1]:5930`, `localhost:5930`).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    resolve_addr(s, "listen address", "HOST:PORT, e.g. 127.0.0.1:5930")
}

/// Resolves the `HOST:PORT` of a SPICE server to connect to (`connect`'s URI).
pub fn parse_server_addr(s: &str) -> Result<SocketAddr, String> {
    resolve_addr(s, "server address", "spice://HOST:PORT or spice://HOST?port=PORT, e.g. spice://127.0.0.1:5930")
}

fn resolve_addr(s: &str, what: &str, write: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{what} `{s}`: {e}; write {write}"))?
        .next()
        .ok_or_else(|| format!("{what} `{s}` resolves to nothing"))
}

/// Who may use the `unix-listen` sockets vmcrelay creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits (connecting needs write permission).
    pub mode: u32,
    /// Owner uid to set (`None`: the process's).
    pub owner: Option<u32>,
    /// Group gid to set (`None`: the process's).
    pub group: Option<u32>,
}

/// Default `unix-listen` socket mode: owner and group may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

impl Default for SocketPerms {
    fn default() -> Self {
        Self { mode: DEFAULT_SOCKET_MODE, owner: None, group: None }
    }
}

/// Parses an octal mode such as `0660`, `660` or `0o660`.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!("socket mode `{s}` must be octal permission bits 0..=0777, e.g. 0660")),
    }
}

/// Resolves a user name (or a numeric uid) to a uid.
pub fn parse_socket_owner(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("socket owner `{s}`: no such user")),
        Err(e) => Err(format!("socket owner `{s}`: cannot look it up: {e}")),
    }
}

/// Resolves a group name (or a numeric gid) to a gid.
pub fn parse_socket_group(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("socket group `{s}`: no such group")),
        Err(e) => Err(format!("socket group `{s}`: cannot look it up: {e}")),
    }
}

/// Chooses the password from the mutually exclusive sources.
pub fn resolve_password(
    file: Option<&Path>,
    env: Option<&str>,
    disable_ticketing: bool,
) -> Result<Option<Vec<u8>>, String> {
    match (file, env, disable_ticketing) {
        (Some(f), None, false) => read_password_file(f).map(Some),
        (None, Some(v), false) => read_password_env(v).map(Some),
        (None, None, true) => Ok(None),
        (None, None, false) => Err("no password source: set password-file, password-env, or disable-ticketing \
             (spice-server refuses every client in that case; vmcrelay refuses to start)"
            .into()),
        _ => Err("choose exactly one of password-file, password-env, disable-ticketing".into()),
    }
}

impl ServeConfig {
    /// Loads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| err(&origin, format!("cannot read: {e}")))?;
        Self::from_toml(&text, &origin)
    }

    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let at = |off: usize| format!("{origin}:{}", line_of(text, off));
        let fc: FileConfig = toml::from_str(text).map_err(|e| {
            let place = e.span().map_or_else(|| origin.to_string(), |s| at(s.start));
            err(place, e.message().to_string())
        })?;
        let mut limits = Limits::default();
        let r = fc.relay;
        if let Some(w) = r.workers {
            limits.workers = w;
        }
        if let Some(v) = r.max_conns_per_worker {
            limits.max_conns_per_worker = v;
        }
        if let Some(v) = r.buffer_kib {
            limits.buffer_bytes = v * 1024;
        }
        limits.buffers_per_worker = r.buffers_per_worker.unwrap_or(limits.buffers_per_worker);
        limits.idle_buffer_secs = r.idle_buffer_secs.unwrap_or(limits.idle_buffer_secs);
        limits.key_pool_per_worker = r.key_pool_per_worker.unwrap_or(limits.key_pool_per_worker);
        limits.key_threads = r.key_threads.unwrap_or(limits.key_threads);
        if let Some(v) = r.max_payload_kib {
            limits.max_payload_bytes = v * 1024;
        }
        if let Some(v) = r.link_timeout_secs {
            limits.link_timeout_secs = v;
        }
        limits.max_link_stage = r.max_link_stage.unwrap_or(limits.max_link_stage);
        limits.max_link_stage_per_addr = r.max_link_stage_per_addr.unwrap_or(limits.max_link_stage_per_addr);
        limits.drain_secs = r.drain_secs.unwrap_or(limits.drain_secs);
        limits.auth_fail_limit = r.auth_fail_limit.unwrap_or(limits.auth_fail_limit);
        limits.auth_fail_window_secs = r.auth_fail_window_secs.unwrap_or(limits.auth_fail_window_secs);
        limits.auth_fail_max_delay_secs = r.auth_fail_max_delay_secs.unwrap_or(limits.auth_fail_max_delay_secs);
        limits.busy = r.busy.unwrap_or(limits.busy);
        limits.keep_listen_endpoint = r.keep_listen_endpoint.unwrap_or(limits.keep_listen_endpoint);
        limits.lz4_to_client = r.lz4_to_client.unwrap_or(limits.lz4_to_client);
        limits.ack_window = r.ack_window.unwrap_or(limits.ack_window);
        limits.data_path = r.data_path.unwrap_or(limits.data_path);
        limits.stats_secs = r.stats_secs.unwrap_or(limits.stats_secs);
        limits.log_format = r.log_format.or(limits.log_format);
        limits.key_reuse = r.key_reuse.unwrap_or(limits.key_reuse);
        if let Some(m) = &r.socket_mode {
            limits.socket.mode = match m.get_ref() {
                toml::Value::String(t) => parse_socket_mode(t),
                other => Err(format!(
                    "socket-mode must be an octal string in quotes, e.g. socket-mode = \"0660\" (not a {})",
                    other.type_str()
                )),
            }
            .map_err(|e| err(at(m.span().start), e))?;
        }
        if let Some(o) = &r.socket_owner {
            limits.socket.owner = Some(parse_socket_owner(o.get_ref()).map_err(|e| err(at(o.span().start), e))?);
        }
        if let Some(m) = &r.metrics {
            limits.metrics = Some(parse_listen(m.get_ref()).map_err(|e| err(at(m.span().start), e))?);
        }
        if let Some(g) = &r.socket_group {
            limits.socket.group = Some(parse_socket_group(g.get_ref()).map_err(|e| err(at(g.span().start), e))?);
        }
        let mut services = Vec::new();
        for (n, sp) in fc.service.iter().enumerate() {
            let s = sp.get_ref();
            let here = at(sp.span().start);
            let name = s.name.clone().unwrap_or_else(|| format!("service{n}"));
            let mut listen = Vec::new();
            for l in &s.listen {
                listen.push(parse_listen(l.get_ref()).map_err(|m| err(at(l.span().start), m))?);
            }
            let mut tls_listen = Vec::new();
            for l in &s.tls_listen {
                tls_listen.push(parse_listen(l.get_ref()).map_err(|m| err(at(l.span().start), m))?);
            }
            if listen.is_empty() && tls_listen.is_empty() && !crate::relay::systemd::listen_fds_present() {
                return Err(err(
                    here,
                    "a service needs listen = [\"127.0.0.1:5930\"] (or tls-listen, or a socket from systemd socket \
                     activation)",
                ));
            }
            let tls =
                tls_files(s.x509_dir.as_deref(), s.tls_cert.as_deref(), s.tls_key.as_deref(), s.tls_ca.as_deref())
                    .map_err(|m| err(&here, m))?;
            let security = channel_security(
                s.tls_channel.iter().map(String::as_str),
                s.plaintext_channel.iter().map(String::as_str),
            )
            .map_err(|m| err(&here, m))?;
            let upstream = match &s.upstream {
                Some(u) => Some(parse_spice_uri(u.get_ref()).map_err(|m| err(at(u.span().start), m))?),
                None => None,
            };
            let upstream_tls =
                upstream_tls(upstream.as_ref(), s.upstream_ca_file.as_deref(), s.upstream_cert_subject.as_deref())
                    .map_err(|m| err(&here, m))?;
            let password = if upstream.is_some() {
                if s.password_file.is_some() || s.password_env.is_some() {
                    return Err(err(
                        here,
                        "with upstream = \"...\" the password is QEMU's: drop password-file/password-env",
                    ));
                }
                None
            } else {
                resolve_password(s.password_file.as_deref(), s.password_env.as_deref(), s.disable_ticketing)
                    .map_err(|m| err(&here, m))?
            };
            let channels = parse_channels(s.channels.iter().map(|c| (c.get_ref().as_str(), at(c.span().start))))
                .map_err(|e| if e.origin == "channels" { err(&here, e.message) } else { e })?;
            services.push(Service {
                name,
                listen,
                tls_listen,
                tls,
                security,
                password,
                channels,
                upstream,
                upstream_tls,
                busy: s.busy,
                removed: false,
            });
        }
        let cfg = Self { services, limits };
        cfg.validate().map_err(|m| err(origin, m))?;
        Ok(cfg)
    }

    /// Cross-service checks and limit sanity.
    pub fn validate(&self) -> Result<(), String> {
        if self.services.iter().all(|s| s.removed) {
            return Err("no service configured: add a [[service]] table".into());
        }
        let mut seen: Vec<SocketAddr> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for s in self.services.iter().filter(|s| !s.removed) {
            let svc = &s.name;
            if names.contains(&svc.as_str()) {
                return Err(format!(
                    "service name {svc} is used twice: give each [[service]] its own name (a reload matches services                      by name)"
                ));
            }
            names.push(svc);
            if !s.tls_listen.is_empty() && s.tls.is_none() {
                return Err(format!(
                    "service {svc}: tls-listen needs a certificate: --x509-dir DIR (QEMU's layout) or --tls-cert \
                     and --tls-key"
                ));
            }
            if s.tls_listen.is_empty() && s.tls.is_some() {
                return Err(format!("service {svc}: TLS certificate given but no tls-listen address"));
            }
            if s.tls_listen.is_empty() && s.security != ChannelSecurity::default() {
                return Err(format!(
                    "service {svc}: tls-channel / plaintext-channel need a tls-listen address (as QEMU's tls-port)"
                ));
            }
            if let Some(u) = s.upstream.as_ref().filter(|u| u.is_tls())
                && s.upstream_tls.is_none()
            {
                return Err(format!(
                    "service {svc}: upstream {u} is TLS: give upstream-ca-file FILE (--upstream-ca-file), the CA \
                     that signed QEMU's certificate (QEMU: x509-dir/ca-cert.pem)"
                ));
            }
            if s.upstream_tls.is_some() && !s.upstream.as_ref().is_some_and(ServerAddr::is_tls) {
                return Err(format!(
                    "service {svc}: upstream-ca-file / upstream-cert-subject apply to a TLS upstream only \
                     (spice+tls://HOST:PORT or spice://HOST?tls-port=PORT)"
                ));
            }
            if s.listen.is_empty() && s.security.default == Transport::Plain {
                return Err(format!("service {svc}: plaintext-channel=default without a plain listen address"));
            }
            for a in s.listen.iter().chain(&s.tls_listen) {
                if self.limits.metrics == Some(*a) {
                    return Err(format!("metrics address {a} is also a listen address of service {svc}"));
                }
                if seen.contains(a) {
                    return Err(format!("listen address {a} is used by two services"));
                }
                seen.push(*a);
            }
        }
        let l = &self.limits;
        if l.workers == 0 || l.workers > 256 {
            return Err(format!("workers = {} must be 1..=256", l.workers));
        }
        if l.max_conns_per_worker == 0 || l.max_conns_per_worker > MAX_CONNS_PER_WORKER {
            return Err(format!(
                "max-conns-per-worker = {} must be 1..={MAX_CONNS_PER_WORKER}",
                l.max_conns_per_worker
            ));
        }
        if l.buffers_per_worker < 2 || l.buffers_per_worker > crate::uring::MAX_BUFFERS {
            return Err(format!(
                "buffers-per-worker = {} must be 2..={} (a connection moving data both ways holds two)",
                l.buffers_per_worker,
                crate::uring::MAX_BUFFERS
            ));
        }
        if l.key_pool_per_worker == 0 || l.key_pool_per_worker > 65_536 {
            return Err(format!("key-pool-per-worker = {} must be 1..=65536", l.key_pool_per_worker));
        }
        if l.key_threads > 1024 {
            return Err(format!("key-threads = {} must be 0..=1024 (0: one per core)", l.key_threads));
        }
        if l.idle_buffer_secs == 0 || l.idle_buffer_secs > 3600 {
            return Err(format!("idle-buffer-secs = {} must be 1..=3600", l.idle_buffer_secs));
        }
        if l.max_link_stage == 0 || l.max_link_stage_per_addr == 0 {
            return Err("max-link-stage and max-link-stage-per-addr must be at least 1".into());
        }
        if l.buffer_bytes < 16 * 1024 || l.buffer_bytes > 16 * 1024 * 1024 {
            return Err("buffer size must be 16 KiB..=16 MiB".into());
        }
        if l.key_reuse == 0 || l.key_reuse > 1024 {
            return Err(format!("key-reuse = {} must be 1..=1024 (1: a fresh RSA key per link)", l.key_reuse));
        }
        if l.max_payload_bytes == 0 || l.max_payload_bytes + 18 > l.buffer_bytes {
            return Err("max payload must be > 0 and fit in one buffer with its header".into());
        }
        if l.drain_secs > 3600 {
            return Err(format!("drain-secs = {} must be 0..=3600", l.drain_secs));
        }
        if l.auth_fail_window_secs == 0 || l.auth_fail_window_secs > 86_400 {
            return Err(format!("auth-fail-window-secs = {} must be 1..=86400", l.auth_fail_window_secs));
        }
        if l.auth_fail_max_delay_secs == 0 || l.auth_fail_max_delay_secs > 3600 {
            return Err(format!("auth-fail-max-delay-secs = {} must be 1..=3600", l.auth_fail_max_delay_secs));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(spec: &str) -> Result<ChannelConf, String> {
        parse_channel(spec, &mut |_| 0)
    }

    #[test]
    fn channel_specs() {
        let c = one("usbredir:1=unix:/run/vm1/ur0.sock").expect("ok");
        assert_eq!((c.kind.channel_type, c.id), (9, 1));
        assert_eq!(c.endpoint, EndpointSpec::Unix("/run/vm1/ur0.sock".into()));
        let c = one("port:org.qemu.monitor.qmp.0=unix-listen:/x").expect("ok");
        assert_eq!(c.port_name.as_deref(), Some("org.qemu.monitor.qmp.0"));
        assert_eq!(c.label(), "port:org.qemu.monitor.qmp.0");
        let c = one("128=echo:").expect("ok");
        assert!(c.kind.is_user_defined());
        assert!(one("tcp:1=echo:").unwrap_err().contains("unknown channel kind"));
        assert!(one("100=echo:").unwrap_err().contains("128..=255"));
        assert!(one("port=echo:").unwrap_err().contains("needs its name"));
        assert!(one("usbredir").unwrap_err().contains("no `=ENDPOINT`"));
        assert!(one("usbredir=ftp:x").unwrap_err().contains("unknown endpoint"));
        assert!(one("usbredir=unix:").unwrap_err().contains("needs a path"));
    }

    #[test]
    fn toml_errors_name_the_line() {
        let text = "[[service]]\nlisten = [\"127.0.0.1:5930\"]\ndisable-ticketing = true\nchannels = [\n  \"usbredir=echo:\",\n  \"bogus=echo:\",\n]\n";
        let e = ServeConfig::from_toml(text, "vm.toml").unwrap_err();
        assert_eq!(e.origin, "vm.toml:6", "{e}");
        assert!(e.message.contains("unknown channel kind"));
        let e = ServeConfig::from_toml("[[service]]\nlisten = [\"127.0.0.1:1\"]\nchannels = [\"128=sink:\"]\n", "f")
            .unwrap_err();
        assert!(e.to_string().contains("no password source"), "{e}");
        let e = ServeConfig::from_toml("[relay]\nworkerz = 2\n", "f").unwrap_err();
        assert_eq!(e.origin, "f:2");
    }

    #[test]
    fn socket_perms() {
        assert_eq!(parse_socket_mode("0640"), Ok(0o640));
        assert_eq!(parse_socket_mode("660"), Ok(0o660));
        assert_eq!(parse_socket_mode("0o600"), Ok(0o600));
        assert!(parse_socket_mode("0668").is_err());
        assert!(parse_socket_mode("01777").is_err());
        assert!(parse_socket_mode("").is_err());
        assert_eq!(parse_socket_owner("0"), Ok(0));
        assert_eq!(parse_socket_owner("root"), Ok(0));
        assert!(parse_socket_owner("no-such-user-vmcrelay").unwrap_err().contains("no such user"));
        assert!(parse_socket_group("no-such-group-vmcrelay").unwrap_err().contains("no such group"));
        let base = "[[service]]\nlisten = [\"127.0.0.1:1\"]\ndisable-ticketing = true\nchannels = [\"128=sink:\"]\n";
        let c = ServeConfig::from_toml(&format!("[relay]\nsocket-mode = \"0640\"\nsocket-owner = \"0\"\n{base}"), "f")
            .expect("ok");
        assert_eq!(c.limits.socket, SocketPerms { mode: 0o640, owner: Some(0), group: None });
        assert_eq!(ServeConfig::from_toml(base, "f").expect("ok").limits.socket.mode, DEFAULT_SOCKET_MODE);
        let e = ServeConfig::from_toml(&format!("[relay]\nworkers = 1\nsocket-mode = 640\n{base}"), "f").unwrap_err();
        assert_eq!(e.origin, "f:3", "{e}");
        assert!(e.message.contains("octal string"), "{e}");
        let e = ServeConfig::from_toml(&format!("[relay]\nsocket-group = \"no-such-group-vmcrelay\"\n{base}"), "f")
            .unwrap_err();
        assert_eq!(e.origin, "f:2", "{e}");
    }

    #[test]
    fn toml_upstream() {
        let svc = "[[service]]\nlisten = [\"127.0.0.1:1\"]\nchannels = [\"usbredir:0=unix:/run/vm1/ur0.sock\"]\n";
        let c = ServeConfig::from_toml(&format!("{svc}upstream = \"spice+unix:///run/vm1/spice.sock\"\n"), "f")
            .expect("a whole-VM service needs no password settings");
        assert_eq!(c.services[0].upstream, Some(ServerAddr::Unix(PathBuf::from("/run/vm1/spice.sock"))));
        assert_eq!(c.services[0].password, None);
        let c = ServeConfig::from_toml(&format!("{svc}upstream = \"spice://127.0.0.1:5900\"\n"), "f").expect("tcp");
        assert_eq!(c.services[0].upstream, Some(ServerAddr::Tcp("127.0.0.1:5900".parse().expect("addr"))));
        let e = ServeConfig::from_toml(&format!("{svc}upstream = \"http://x\"\n"), "f").unwrap_err();
        assert_eq!(e.origin, "f:4", "{e}");
        let e =
            ServeConfig::from_toml(&format!("{svc}upstream = \"spice://127.0.0.1:5900\"\npassword-env = \"X\"\n"), "f")
                .unwrap_err();
        assert!(e.message.contains("the password is QEMU's"), "{e}");
        assert_eq!(
            parse_spice_uri("spice://127.0.0.1?port=5930"),
            Ok(ServerAddr::Tcp("127.0.0.1:5930".parse().expect("a")))
        );
        assert!(parse_spice_uri("spice+unix://").is_err());
    }

    #[test]
    fn toml_upstream_tls() {
        let svc = "[[service]]\nlisten = [\"127.0.0.1:1\"]\nchannels = [\"usbredir:0=unix:/run/vm1/ur0.sock\"]\n";
        let c = ServeConfig::from_toml(
            &format!(
                "{svc}upstream = \"spice+tls://127.0.0.1:5931\"\nupstream-ca-file = \"/etc/x509/ca-cert.pem\"\n\
                 upstream-cert-subject = \"CN=vm1\"\n"
            ),
            "f",
        )
        .expect("a TLS upstream with its CA file");
        let o = c.services[0].upstream_tls.as_ref().expect("tls options");
        assert_eq!(o.ca_file, PathBuf::from("/etc/x509/ca-cert.pem"));
        assert_eq!(o.cert_subject.as_deref(), Some("CN=vm1"));
        let c = ServeConfig::from_toml(
            &format!("{svc}upstream = \"spice://127.0.0.1?tls-port=5931\"\nupstream-ca-file = \"/ca.pem\"\n"),
            "f",
        )
        .expect("tls-port form");
        assert!(c.services[0].upstream.as_ref().is_some_and(ServerAddr::is_tls));
        assert!(c.services[0].upstream_tls.is_some());
        // TLS without a CA file: says what to give.
        let e = ServeConfig::from_toml(&format!("{svc}upstream = \"spice+tls://127.0.0.1:5931\"\n"), "f").unwrap_err();
        assert!(e.message.contains("upstream-ca-file FILE"), "{e}");
        assert!(e.message.contains("ca-cert.pem"), "{e}");
        // A CA file without TLS: refused, not ignored.
        let e = ServeConfig::from_toml(
            &format!("{svc}upstream = \"spice://127.0.0.1:5930\"\nupstream-ca-file = \"/ca.pem\"\n"),
            "f",
        )
        .unwrap_err();
        assert!(e.message.contains("TLS upstream only"), "{e}");
        let e = ServeConfig::from_toml(&format!("{svc}upstream-cert-subject = \"CN=x\"\n"), "f").unwrap_err();
        assert!(e.message.contains("TLS upstream only"), "{e}");
        // validate() catches a Service built without the options.
        let mut c = ServeConfig::from_toml(&format!("{svc}upstream = \"spice://127.0.0.1:5930\"\n"), "f").expect("ok");
        c.services[0].upstream = Some(parse_spice_uri("spice+tls://127.0.0.1:5931").expect("uri"));
        assert!(c.validate().unwrap_err().contains("upstream-ca-file"));
        assert_eq!(
            upstream_tls(None, Some(Path::new("/ca.pem")), None).unwrap_err(),
            upstream_tls(Some(&ServerAddr::Tcp("127.0.0.1:1".parse().expect("a"))), Some(Path::new("/c")), None)
                .unwrap_err()
        );
    }

    #[test]
    fn toml_metrics() {
        let svc = "[[service]]\nlisten = [\"127.0.0.1:5930\"]\ndisable-ticketing = true\nchannels = [\"128=echo:\"]\n";
        let c = ServeConfig::from_toml(&format!("[relay]\nmetrics = \"127.0.0.1:9930\"\n{svc}"), "f").expect("ok");
        assert_eq!(c.limits.metrics, Some("127.0.0.1:9930".parse().expect("addr")));
        assert_eq!(ServeConfig::from_toml(svc, "f").expect("ok").limits.metrics, None);
        let e =
            ServeConfig::from_toml(&format!("[relay]\nworkers = 1\nmetrics = \"nowhere\"\n{svc}"), "f").unwrap_err();
        assert_eq!(e.origin, "f:3", "{e}");
        let e = ServeConfig::from_toml(&format!("[relay]\nmetrics = \"127.0.0.1:5930\"\n{svc}"), "f").unwrap_err();
        assert!(e.message.contains("also a listen address"), "{e}");
    }

    #[test]
    fn toml_full() {
        let text = "[relay]\nworkers = 1\nbusy = \"refuse\"\n[[service]]\nname = \"vm1\"\nlisten = [\"127.0.0.1:5930\"]\ndisable-ticketing = true\nchannels = [\"usbredir=echo:\", \"usbredir=sink:\", \"port:a.b=echo:\", \"200=sink:\"]\n";
        let c = ServeConfig::from_toml(text, "f").expect("ok");
        assert_eq!(c.limits.workers, 1);
        assert_eq!(c.limits.busy, BusyPolicy::Refuse);
        let ids: Vec<_> = c.services[0].channels.iter().map(|c| (c.kind.channel_type, c.id)).collect();
        assert_eq!(ids, vec![(9, 0), (9, 1), (10, 0), (200, 0)]);
        let per = "[[service]]\nlisten = [\"127.0.0.1:5930\"]\ndisable-ticketing = true\nbusy = \"refuse\"\nchannels = [\"128=echo:\"]\n";
        let c = ServeConfig::from_toml(per, "t.toml").expect("per-service busy");
        assert_eq!(c.services[0].busy, Some(BusyPolicy::Refuse));
        assert_eq!(c.limits.busy, BusyPolicy::Replace);
    }
}
