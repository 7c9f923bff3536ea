//! `connect` mode: the same worker and data path, with vmcrelay as the
//! SPICE *client* of a real server (QEMU) and each chosen channel ending in
//! a local unix socket.
//!
//! The SPICE socket plays the part the client socket plays in `serve`, the
//! local socket the endpoint's; only the link stage (our [`ClientLink`]) and
//! the control messages differ (we answer PING, SET_ACK, send
//! ATTACH_CHANNELS). A controller keeps the session: it links main, then
//! every wanted channel (port channels by name, learned from PORT_INIT),
//! relinks a channel that closes, and reconnects the session with capped
//! exponential backoff when the server goes away. A wrong password is not
//! retried.

use std::net::SocketAddr;
use std::path::PathBuf;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr, socket};

use super::*;
use crate::proto::auth::seed_from;
use crate::proto::client_link::{self, ClientLinkConfig, ClientLinkFailure};
use crate::{error, info, warn};

/// Where the SPICE server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// `spice://HOST:PORT`.
    Tcp(SocketAddr),
    /// `spice+unix:///path`.
    Unix(PathBuf),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "spice://{a}"),
            Self::Unix(p) => write!(f, "spice+unix://{}", p.display()),
        }
    }
}

/// `connect` settings besides the channel list (which lives in the
/// shared config's single service).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The server.
    pub server: ServerAddr,
    /// Ticket password (empty when the server has ticketing disabled).
    pub password: Vec<u8>,
    /// Announce LZ4 on pass-through channels (the server then compresses
    /// payloads over 1000 bytes; we decompress them).
    pub lz4: bool,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Link every channel when the session starts, instead of when its
    /// local app connects (`unix-listen` only).
    pub eager: bool,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct SpecState {
    /// Live connection `(slot, generation)` for this channel.
    conn: Option<(u32, u32)>,
    /// The port id that carries this spec's name (learned per session).
    port_id: Option<u8>,
    /// A local app that connected and waits for its SPICE channel.
    local: Option<OwnedFd>,
    /// An accept on the spec's `unix-listen` socket is in flight.
    accepting: bool,
}

/// The session controller.
#[derive(Debug)]
pub(crate) struct ConnectCtl {
    opts: ConnectOptions,
    main: Option<(u32, u32)>,
    session: Option<u32>,
    list: Vec<(u8, u8)>,
    specs: Vec<SpecState>,
    probes: usize,
    backoff: Duration,
    attempt: u32,
    retry_armed: bool,
    warned_missing: Vec<usize>,
}

/// Runs a `connect` worker until shutdown or a fatal error.
pub fn run_connect_worker(shared: Arc<Shared>, opts: ConnectOptions) -> anyhow::Result<()> {
    // No ticket keys are needed on the client side.
    let (_tx, rx) = std::sync::mpsc::sync_channel(1);
    let mut w = Worker::new(0, Arc::clone(&shared), rx)?;
    let n = shared.config.services.first().map_or(0, |s| s.channels.len());
    w.ctl = Some(Box::new(ConnectCtl {
        opts,
        main: None,
        session: None,
        list: Vec::new(),
        specs: (0..n).map(|_| SpecState::default()).collect(),
        probes: 0,
        backoff: FIRST_BACKOFF,
        attempt: 0,
        retry_armed: false,
        warned_missing: Vec::new(),
    }));
    w.ctl_arm_local_accepts();
    w.run()
}

fn server_socket(addr: &ServerAddr) -> std::io::Result<(OwnedFd, SockaddrStorage)> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    Ok(match addr {
        ServerAddr::Tcp(a) => {
            let fam = if a.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            let fd = socket(fam, SockType::Stream, flags, None)?;
            let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
            let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::KeepAlive, &true);
            (fd, SockaddrStorage::from(*a))
        }
        ServerAddr::Unix(p) => {
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            (fd, crate::uring::sockaddr_storage_of(&UnixAddr::new(p.as_path())?))
        }
    })
}

impl Worker {
    fn ctl_conf(&self, ci: usize) -> Option<&ChannelConf> {
        self.shared.config.services.first()?.channels.get(ci)
    }

    /// Whether spec `ci` links only once its local app is there.
    fn ctl_lazy(&self, ci: usize) -> bool {
        let eager = self.ctl.as_ref().is_none_or(|c| c.opts.eager);
        !eager && matches!(self.ctl_conf(ci).map(|c| &c.endpoint), Some(EndpointSpec::UnixListen(_)))
    }

    /// Lazy mode: wait for a local app on every `unix-listen` spec without one.
    fn ctl_arm_local_accepts(&mut self) {
        let n = self.ctl.as_ref().map_or(0, |c| c.specs.len());
        for ci in 0..n {
            let idle = self.ctl.as_ref().is_some_and(|c| {
                let st = &c.specs[ci];
                st.conn.is_none() && st.local.is_none() && !st.accepting
            });
            if !idle || !self.ctl_lazy(ci) || self.draining.is_some() {
                continue;
            }
            let Some(lfd) = self.shared.listen_eps.get(&(0, ci)).map(AsRawFd::as_raw_fd) else { continue };
            let t = token(Op::LocalAccept, u32::try_from(ci).unwrap_or(0), 0);
            match self.ring.accept(lfd, t) {
                Ok(()) => {
                    if let Some(c) = self.ctl.as_mut() {
                        c.specs[ci].accepting = true;
                    }
                }
                Err(e) => warn!(self.who, "cannot wait for a local app: {e}"),
            }
        }
    }

    pub(super) fn on_local_accept(&mut self, ci: usize, res: i32, fd: Option<OwnedFd>) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let Some(st) = ctl.specs.get_mut(ci) else { return };
        st.accepting = false;
        match fd {
            Some(fd) if self.draining.is_none() => {
                st.local = Some(fd);
                debug!(self.who, "local app connected for spec {ci}");
                if ctl.session.is_some() {
                    self.ctl_link_channels();
                } else {
                    info!(self.who, "local app waits: no SPICE session yet");
                }
            }
            Some(_) => {}
            None => {
                if res != -libc::ECANCELED {
                    warn!(self.who, "local accept failed: {}", std::io::Error::from_raw_os_error(-res));
                }
                self.ctl_arm_local_accepts();
            }
        }
    }

    /// Opens a SPICE connection and starts its link: main (`ci` None,
    /// not a probe), a wanted channel, or a port probe.
    fn ctl_link(&mut self, ci: Option<usize>, t: u8, id: u8, probe: bool) -> Option<(u32, u32)> {
        let ctl = self.ctl.as_ref()?;
        let (server, password, lz4) = (ctl.opts.server.clone(), ctl.opts.password.clone(), ctl.opts.lz4);
        let session = if t == CH_MAIN { 0 } else { ctl.session? };
        let (fd, addr) = match server_socket(&server) {
            Ok(x) => x,
            Err(e) => {
                warn!(self.who, "cannot create a socket for {server}: {e}");
                return None;
            }
        };
        let kind = ChannelKind::of(t)?;
        let cfg = ClientLinkConfig {
            connection_id: session,
            channel_type: t,
            channel_id: id,
            channel_caps: kind.channel_caps(lz4),
            password,
            mini_header: true,
        };
        let link = match ClientLink::new(cfg, seed_from(&mut self.rng)) {
            Ok(l) => l,
            Err(e) => {
                error!(self.who, "cannot link: {e}");
                return None;
            }
        };
        let stage = Stage::CLink { link: Box::new(link), ci, probe };
        let Some(slot) = self.new_conn(fd, server.to_string(), 0, stage, true) else {
            warn!(self.who, "connection table full; cannot link {}:{id}", kind_name(t));
            return None;
        };
        let generation = self.slots[slot as usize].generation;
        self.with_conn(slot, |w, conn| {
            conn.chan = (t, id);
            conn.session = session;
            conn.label = format!("{}:{id}", kind_name(t));
            let tok = w.tok(Op::SrvConnect, slot);
            let r = w.ring.connect(conn.fd.as_raw_fd(), &addr, tok);
            w.pushed(slot, conn, r);
        });
        Some((slot, generation))
    }

    pub(super) fn ctl_start_main(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        ctl.attempt += 1;
        let (attempt, server) = (ctl.attempt, ctl.opts.server.to_string());
        info!(self.who, "connecting to {server} attempt={attempt}");
        let main = self.ctl_link(None, CH_MAIN, 0, false);
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.main = main;
        }
        if main.is_none() {
            self.ctl_schedule_retry();
        }
    }

    pub(super) fn on_srv_connect(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        if res < 0 {
            let r = errno_reason("connect to SPICE server", res);
            return self.close(slot, conn, &r);
        }
        self.pump_out(slot, conn);
        self.pump_in(slot, conn);
    }

    /// Client link stage. Returns whether more input is wanted now.
    pub(super) fn pump_clink(&mut self, slot: u32, conn: &mut Conn) -> bool {
        let Stage::CLink { link, .. } = &mut conn.stage else { return true };
        let input = self.ring.arena().get(conn.rx).and_then(|b| b.get(conn.rx_pos..conn.rx_len)).unwrap_or_default();
        conn.rx_pos += link.handle_input(input);
        match link.poll_action() {
            None => {
                self.pump_out(slot, conn);
                true
            }
            Some(client_link::Action::Linked(l)) => {
                self.on_clinked(slot, conn, l);
                conn.closing.is_none()
            }
            Some(client_link::Action::Close(f)) => {
                let is_main = matches!(conn.stage, Stage::CLink { ci: None, probe: false, .. });
                if is_main && matches!(f, ClientLinkFailure::Result(LinkErrorCode::PermissionDenied)) {
                    self.ctl_fatal(format!(
                        "the server refused the password ({}); check --password-file",
                        LinkErrorCode::PermissionDenied
                    ));
                }
                warn!(self.who, "link to {} channel={} failed: {f}", conn.peer, conn.label);
                self.close(slot, conn, &format!("link failed: {f}"));
                false
            }
        }
    }

    fn on_clinked(&mut self, slot: u32, conn: &mut Conn, l: Linked) {
        conn.enc = Encoder::new(l.header_kind);
        conn.deframer = Deframer::new(l.header_kind);
        let Stage::CLink { ci, probe, .. } = conn.stage else { return };
        info!(
            self.who,
            "link server={} channel={} session={:#010x} header={:?} result=ok{}",
            conn.peer,
            conn.label,
            conn.session,
            l.header_kind,
            if probe { " (port probe)" } else { "" }
        );
        let Some(ci) = ci.or(if probe { Some(usize::MAX) } else { None }) else {
            conn.stage = Stage::CMain;
            return;
        };
        let kind = ChannelKind::of(conn.chan.0).unwrap_or(ChannelKind { channel_type: conn.chan.0, ..PORT_KIND });
        let lz4_send = self.ctl.as_ref().is_some_and(|c| c.opts.lz4)
            && kind.lz4
            && l.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4);
        conn.stage = Stage::Chan(Box::new(Chan::new(ci, kind, probe, lz4_send)));
        if !probe {
            conn.owns = Some(ci);
            self.ctl_open_local(slot, conn, ci);
        }
    }

    /// Opens (or waits for) the channel's local end.
    fn ctl_open_local(&mut self, slot: u32, conn: &mut Conn, ci: usize) {
        let Some(ep) = self.ctl_conf(ci).map(|c| c.endpoint.clone()) else { return };
        if let Some(c) = self.ctl_conf(ci) {
            conn.label = c.label();
        }
        let pending = self.ctl.as_mut().and_then(|c| c.specs.get_mut(ci)).and_then(|s| s.local.take());
        if let Some(fd) = pending {
            if let Stage::Chan(ch) = &mut conn.stage {
                ch.ep = Some(fd);
                ch.ep_state = EpState::Open;
            }
            return self.pump_out(slot, conn);
        }
        match ep {
            EndpointSpec::UnixListen(_) => {
                if let Stage::Chan(ch) = &mut conn.stage {
                    ch.ep_state = EpState::Accepting;
                }
                self.accept_endpoint(slot, conn, ci);
            }
            other => match endpoint::open(&other) {
                Ok(Opening::Ready(fd)) => {
                    if let Stage::Chan(ch) = &mut conn.stage {
                        ch.ep = Some(fd);
                        ch.ep_state = EpState::Open;
                    }
                    self.pump_out(slot, conn);
                }
                Ok(Opening::Connect(fd, addr)) => {
                    let t = self.tok(Op::EpConnect, slot);
                    let r = self.ring.connect(fd.as_raw_fd(), &addr, t);
                    if let Stage::Chan(ch) = &mut conn.stage {
                        ch.ep = Some(fd);
                    }
                    self.pushed(slot, conn, r);
                }
                Ok(Opening::Accept) => {}
                Err(e) => {
                    warn!(self.who, "channel={} local endpoint {other} unavailable: {e}", conn.label);
                    self.close(slot, conn, "local endpoint unavailable");
                }
            },
        }
    }

    /// A server control message on a connection we are the client of.
    pub(super) fn on_server_control(
        &mut self,
        slot: u32,
        conn: &mut Conn,
        kind: ChannelKind,
        h: MsgHeader,
        body: &[u8],
    ) {
        let msg = match ServerMsg::parse(kind, h.msg_type, body) {
            Ok(m) => m,
            Err(e) => {
                // Like spice-gtk: log and drop what we cannot parse.
                debug!(self.who, "channel={} ignoring server message {}: {e}", conn.label, h.msg_type);
                return;
            }
        };
        match msg {
            ServerMsg::Ping(p) => self.queue_client(slot, conn, &ClientMsg::Pong(p.pong())),
            ServerMsg::SetAck(a) => {
                let m = conn.ack.on_set_ack(a);
                self.queue_client(slot, conn, &m);
            }
            ServerMsg::MainInit(init) => {
                conn.session = init.session_id;
                if let Some(ctl) = self.ctl.as_mut() {
                    ctl.session = Some(init.session_id);
                }
                self.queue_client(slot, conn, &ClientMsg::AttachChannels);
            }
            ServerMsg::ChannelsList(l) => {
                let entries: Vec<(u8, u8)> = l.iter().collect();
                if let Some(ctl) = self.ctl.as_mut() {
                    for e in entries {
                        if !ctl.list.contains(&e) {
                            ctl.list.push(e);
                        }
                    }
                    ctl.backoff = FIRST_BACKOFF;
                }
                self.ctl_link_channels();
            }
            ServerMsg::Notify(n) => {
                info!(self.who, "server notify: {}", String::from_utf8_lossy(n.message).trim_end_matches('\0'))
            }
            ServerMsg::Disconnecting(d) => {
                conn.close_after_flush = Some(format!("server disconnecting ({})", d.reason));
            }
            ServerMsg::PortInit(p) => {
                let name = String::from_utf8_lossy(p.name).into_owned();
                debug!(self.who, "channel={} PORT_INIT name={name} opened={}", conn.label, p.opened);
                if matches!(&conn.stage, Stage::Chan(ch) if ch.probe) {
                    self.ctl_on_probe(slot, conn, &name);
                }
            }
            ServerMsg::PortEvent { event } => info!(self.who, "channel={} port event {event}", conn.label),
            ServerMsg::Migrate { .. } => warn!(self.who, "server started a migration; vmcrelay does not migrate"),
            _ => {}
        }
    }

    /// Links every wanted channel that is not linked yet.
    fn ctl_link_channels(&mut self) {
        if self.draining.is_some() {
            return;
        }
        let Some(ctl) = self.ctl.as_ref() else { return };
        if ctl.session.is_none() {
            return;
        }
        let list = ctl.list.clone();
        let mut todo: Vec<(usize, u8, u8)> = Vec::new();
        let mut need_probe = false;
        let mut missing = Vec::new();
        for (ci, st) in ctl.specs.iter().enumerate() {
            if st.conn.is_some() {
                continue;
            }
            let Some(c) = self.ctl_conf(ci) else { continue };
            let t = c.kind.channel_type;
            let waiting_app = self.ctl_lazy(ci) && st.local.is_none();
            if t == crate::proto::channel::CH_PORT {
                if waiting_app && st.port_id.is_some() {
                    continue;
                }
                match st.port_id {
                    Some(id) if list.contains(&(t, id)) => todo.push((ci, t, id)),
                    _ => need_probe = true,
                }
            } else if waiting_app {
                continue;
            } else if list.contains(&(t, c.id)) {
                todo.push((ci, t, c.id));
            } else {
                missing.push(ci);
            }
        }
        for ci in missing {
            let Some(ctl) = self.ctl.as_mut() else { return };
            if !ctl.warned_missing.contains(&ci) {
                ctl.warned_missing.push(ci);
                let label = self.ctl_conf(ci).map(ChannelConf::label).unwrap_or_default();
                let have: Vec<String> = list.iter().map(|(t, i)| format!("{}:{i}", kind_name(*t))).collect();
                warn!(self.who, "server offers no channel {label} (it has {}); waiting for it", have.join(" "));
            }
        }
        for (ci, t, id) in todo {
            let c = self.ctl_link(Some(ci), t, id, false);
            if let Some(ctl) = self.ctl.as_mut() {
                ctl.specs[ci].conn = c;
            }
        }
        let probes_running = self.ctl.as_ref().is_some_and(|c| c.probes > 0);
        if need_probe && !probes_running {
            // Learn port names: link every port channel not in use.
            let in_use: Vec<u8> = self
                .ctl
                .as_ref()
                .map(|c| c.specs.iter().filter(|s| s.conn.is_some()).filter_map(|s| s.port_id).collect())
                .unwrap_or_default();
            for &(t, id) in list.iter().filter(|(t, id)| *t == crate::proto::channel::CH_PORT && !in_use.contains(id)) {
                if self.ctl_link(None, t, id, true).is_some()
                    && let Some(ctl) = self.ctl.as_mut()
                {
                    ctl.probes += 1;
                }
            }
        }
    }

    /// A port probe learned its name: keep it if a spec wants that name.
    fn ctl_on_probe(&mut self, slot: u32, conn: &mut Conn, name: &str) {
        let generation = self.slots[slot as usize].generation;
        let want = self.ctl.as_ref().and_then(|ctl| {
            ctl.specs.iter().enumerate().position(|(ci, st)| {
                st.conn.is_none()
                    && self.ctl_conf(ci).is_some_and(|c| {
                        c.kind.channel_type == crate::proto::channel::CH_PORT && c.port_name.as_deref() == Some(name)
                    })
            })
        });
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.probes = ctl.probes.saturating_sub(1);
        }
        let Some(ci) = want else {
            debug!(self.who, "port {} is {name}: not wanted, closing the probe", conn.label);
            return self.close(slot, conn, "port probe done");
        };
        if self.ctl_lazy(ci) && self.ctl.as_ref().is_some_and(|c| c.specs[ci].local.is_none()) {
            // Known now; linked again when the local app connects.
            if let Some(ctl) = self.ctl.as_mut() {
                ctl.specs[ci].port_id = Some(conn.chan.1);
            }
            info!(self.who, "port {name} is port:{}; linking when the local app connects", conn.chan.1);
            return self.close(slot, conn, "port probe done");
        }
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.specs[ci].conn = Some((slot, generation));
            ctl.specs[ci].port_id = Some(conn.chan.1);
        }
        if let Stage::Chan(ch) = &mut conn.stage {
            ch.probe = false;
            ch.conf = ci;
        }
        conn.owns = Some(ci);
        info!(self.who, "port {name} is port:{}", conn.chan.1);
        self.ctl_open_local(slot, conn, ci);
        self.ctl_link_channels();
    }

    /// A connection we are the client of finished closing.
    pub(super) fn ctl_on_closed(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        let generation = self.slots[slot as usize].generation;
        let Some(ctl) = self.ctl.as_mut() else { return };
        if ctl.main == Some((slot, generation)) {
            ctl.main = None;
            ctl.session = None;
            ctl.list.clear();
            ctl.probes = 0;
            ctl.warned_missing.clear();
            for s in &mut ctl.specs {
                s.port_id = None;
            }
            let live: Vec<(u32, u32)> = ctl.specs.iter_mut().filter_map(|s| s.conn.take()).collect();
            info!(self.who, "session ended: {reason}");
            for (s, g) in live {
                if self.slots.get(s as usize).is_some_and(|x| x.generation == g) {
                    self.with_conn(s, |w, c| w.close(s, c, "session ended"));
                }
            }
            // Probes and any other client connection of the session go too.
            for s in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
                if s != slot {
                    self.with_conn(s, |w, c| {
                        if c.client_role {
                            w.close(s, c, "session ended")
                        }
                    });
                }
            }
            if self.draining.is_none() {
                // Their local apps went with them: wait for the next ones.
                self.ctl_arm_local_accepts();
                self.ctl_schedule_retry();
            }
            return;
        }
        if matches!(&conn.stage, Stage::Chan(ch) if ch.probe) || matches!(conn.stage, Stage::CLink { probe: true, .. })
        {
            ctl.probes = ctl.probes.saturating_sub(1);
        }
        if let Some(ci) = conn.owns
            && ctl.specs.get(ci).is_some_and(|s| s.conn == Some((slot, generation)))
        {
            ctl.specs[ci].conn = None;
            let linked = matches!(conn.stage, Stage::Chan(_));
            info!(
                self.who,
                "close server={} channel={} c2e_bytes={} e2c_bytes={} duration_ms={} reason=\"{reason}\"",
                conn.peer,
                conn.label,
                conn.st.c2e_bytes,
                conn.st.e2c_bytes,
                conn.since.elapsed().as_millis()
            );
            let _ = linked;
            if self.draining.is_none() {
                if self.ctl_lazy(ci) {
                    // The local app went with the channel; wait for the next one.
                    self.ctl_arm_local_accepts();
                } else if self.ctl.as_ref().is_some_and(|c| c.session.is_some()) {
                    // Relink soon (not at once: a server that keeps closing must not spin us).
                    self.ctl_schedule_retry_after(Duration::from_millis(100));
                }
            }
        }
    }

    fn ctl_schedule_retry(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let wait = ctl.backoff;
        ctl.backoff = (ctl.backoff * 2).min(ctl.opts.max_backoff);
        if ctl.main.is_none() {
            info!(self.who, "reconnecting to {} in {} ms", ctl.opts.server, wait.as_millis());
        }
        self.ctl_schedule_retry_after(wait);
    }

    fn ctl_schedule_retry_after(&mut self, wait: Duration) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        if ctl.retry_armed {
            return;
        }
        ctl.retry_armed = true;
        if let Err(e) = self.ring.timeout(wait, token(Op::Retry, 0, 0)) {
            warn!(self.who, "cannot arm the retry timer: {e}");
        }
    }

    pub(super) fn on_retry(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        ctl.retry_armed = false;
        if self.draining.is_some() {
            return;
        }
        if ctl.main.is_none() {
            self.ctl_start_main();
        } else {
            self.ctl_link_channels();
        }
    }

    /// An error retrying cannot fix: record it, wake the main thread, drain.
    fn ctl_fatal(&mut self, why: String) {
        error!(self.who, "{why}");
        if let Ok(mut f) = self.shared.fatal.lock() {
            *f = Some(why);
        }
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGUSR1);
        if self.draining.is_none() {
            self.start_drain();
        }
    }
}

/// Template for a channel type `ChannelKind::of` does not know.
const PORT_KIND: ChannelKind = ChannelKind {
    channel_type: crate::proto::channel::CH_PORT,
    name: "port",
    class: crate::proto::channel::ChannelClass::PassThrough,
    lz4: true,
    port_messages: true,
};
