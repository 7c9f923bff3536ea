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
//!
//! Never harm the VM: spice-server 0.15.1 crashes QEMU when a channel
//! closes while the device has not consumed our input yet. So a channel
//! whose local app left is not closed at once: it *lingers*, server bytes
//! are dropped (and counted), and it closes only once the server has been
//! quiet for `linger` and everything of ours went out. The next app gets a
//! fresh link, and with it a fresh chardev session (QEMU's monitor greets
//! again: QEMU 7.2 ignores a client's PORT_EVENT opened/closed, measured,
//! so only a relink resets it). `--keep-linked` keeps the channel linked
//! instead and turns apps into PORT_EVENT opened/closed.
//!
//! Bytes of a local app that hung up before its channel was linked are
//! never sent anywhere (e.g. to the next QEMU after a restart).

use std::os::fd::AsFd;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr, socket};

use super::lifecycle::AcceptBackoff;
use super::*;
use crate::proto::auth::seed_from;
use crate::proto::client_link::{self, ClientLinkConfig, ClientLinkFailure};
use crate::{error, info, warn};

pub use crate::relay::config::ServerAddr;

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
    /// Keep `unix-listen` channels linked for the whole session; local apps
    /// come and go as PORT_EVENT opened/closed (implies eager links).
    pub keep_linked: bool,
    /// How long the server must be quiet after a local app left before its
    /// SPICE channel closes.
    pub linger: Duration,
    /// TLS client configuration (CA, host or subject check) when `server`
    /// is a TLS address.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Default for [`ConnectOptions::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1000);

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Failed port probes per session before unnamed ports count as missing.
const MAX_PROBE_FAILURES: u32 = 5;
/// Granularity of the linger check.
const LINGER_TICK: Duration = Duration::from_millis(100);

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
    /// The local endpoint failed: no SPICE link before this time.
    retry_at: Option<Instant>,
    /// Current local-endpoint backoff.
    backoff: Duration,
    /// Why the local endpoint is down (logged once per change of state).
    down: Option<String>,
}

/// The session controller.
#[derive(Debug)]
pub(crate) struct ConnectCtl {
    opts: ConnectOptions,
    main: Option<(u32, u32)>,
    session: Option<u32>,
    /// The server's CHANNELS_LIST came this session. Until it does, a port
    /// name is not missing, only not known yet.
    listed: bool,
    list: Vec<(u8, u8)>,
    specs: Vec<SpecState>,
    probes: usize,
    backoff: Duration,
    attempt: u32,
    retry_armed: bool,
    warned_missing: Vec<usize>,
    /// Port names learned this session: (id, name).
    ports: Vec<(u8, String)>,
    /// Port ids linked to learn their name this session.
    probed: Vec<u8>,
    /// Probes this session that closed before the port's name came.
    probe_failures: u32,
    /// The session's port names were logged (and missing ones named).
    ports_reported: bool,
    linger_armed: bool,
}

/// Runs a `connect` worker until shutdown or a fatal error.
pub fn run_connect_worker(shared: Arc<Shared>, opts: ConnectOptions) -> anyhow::Result<()> {
    // No ticket keys are needed on the client side.
    let (_tx, rx) = std::sync::mpsc::sync_channel(1);
    let mut w = Worker::new(0, Arc::clone(&shared), rx)?;
    let n = w.live.config.services.first().map_or(0, |s| s.channels.len());
    w.ctl = Some(Box::new(ConnectCtl {
        opts,
        main: None,
        session: None,
        listed: false,
        list: Vec::new(),
        specs: (0..n).map(|_| SpecState::default()).collect(),
        probes: 0,
        backoff: FIRST_BACKOFF,
        attempt: 0,
        retry_armed: false,
        warned_missing: Vec::new(),
        ports: Vec::new(),
        probed: Vec::new(),
        probe_failures: 0,
        ports_reported: false,
        linger_armed: false,
    }));
    w.ctl_arm_local_accepts();
    w.run()
}

/// A non-blocking socket and address for a SPICE server (TCP with
/// NODELAY and keepalive, or unix); `connect` and the whole-VM proxy.
pub(super) fn server_socket(addr: &ServerAddr) -> std::io::Result<(OwnedFd, SockaddrStorage)> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    Ok(match addr {
        ServerAddr::Tcp(a) | ServerAddr::Tls { addr: a, .. } => {
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
        self.live.config.services.first()?.channels.get(ci)
    }

    /// Whether spec `ci` links only once its local app is there.
    fn ctl_lazy(&self, ci: usize) -> bool {
        let eager = self.ctl.as_ref().is_none_or(|c| c.opts.eager || c.opts.keep_linked);
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
            let Some(lfd) = self.live.listen_eps.get(&(0, ci)).map(AsRawFd::as_raw_fd) else { continue };
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
        let Some(st) = self.ctl.as_mut().and_then(|c| c.specs.get_mut(ci)) else { return };
        st.accepting = false;
        let Some(fd) = fd else {
            if AcceptBackoff::starved(res) && self.draining.is_none() {
                // Out of descriptors: the app waits in the backlog while
                // this accept pauses (see `AcceptBackoff`); `accepting`
                // stays set so nothing re-arms it meanwhile.
                st.accepting = true;
                let listen = self.ctl_conf(ci).map_or_else(String::new, |c| c.endpoint.to_string());
                let pause = self.accept_starved(&listen, res);
                let t = token(Op::LocalAcceptRetry, u32::try_from(ci).unwrap_or(0), 0);
                if let Err(e) = self.ring.timeout(pause, t) {
                    warn!(self.who, "cannot pause a local accept: {e}");
                    if let Some(st) = self.ctl.as_mut().and_then(|c| c.specs.get_mut(ci)) {
                        st.accepting = false;
                    }
                }
                return;
            }
            if res != -libc::ECANCELED {
                warn!(self.who, "local accept failed: {}", std::io::Error::from_raw_os_error(-res));
            }
            return self.ctl_arm_local_accepts();
        };
        self.accept_backoff.reset();
        if self.draining.is_some() {
            return;
        }
        let conf = self.ctl_conf(ci).cloned();
        let Some(ctl) = self.ctl.as_mut() else { return };
        let is_port = conf.as_ref().is_some_and(|c| c.kind.channel_type == crate::proto::channel::CH_PORT);
        if is_port && ctl.ports_reported && ctl.specs[ci].port_id.is_none() {
            // The server has no such port: say so instead of swallowing the app's bytes.
            let name = conf.and_then(|c| c.port_name).unwrap_or_default();
            warn!(self.who, "local app for port {name} closed: the server has no port of that name");
            drop(fd);
            return self.ctl_arm_local_accepts();
        }
        ctl.specs[ci].local = Some(fd);
        debug!(self.who, "local app connected for spec {ci}");
        if ctl.session.is_some() {
            self.ctl_link_channels();
        } else {
            info!(self.who, "local app waits: no SPICE session yet (its bytes go nowhere if it leaves before)");
        }
    }

    /// The pause of spec `ci`'s local accept is over: wait for the app again.
    pub(super) fn on_local_accept_retry(&mut self, ci: usize) {
        let Some(st) = self.ctl.as_mut().and_then(|c| c.specs.get_mut(ci)) else { return };
        st.accepting = false;
        self.ctl_arm_local_accepts();
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
            defer_ticket: false,
        };
        let link = match ClientLink::new(cfg, seed_from(&mut self.rng)) {
            Ok(l) => l,
            Err(e) => {
                error!(self.who, "cannot link: {e}");
                return None;
            }
        };
        let tls = match (&server, ctl.opts.tls.as_ref()) {
            (ServerAddr::Tls { host, .. }, Some(cfg)) => {
                match crate::tls::Session::client(Arc::clone(cfg), host, crate::tls::Limits::default()) {
                    Ok(s) => Some(super::tls::TlsConn::new(s)),
                    Err(e) => {
                        error!(self.who, "cannot start TLS to {server}: {e}");
                        return None;
                    }
                }
            }
            _ => None,
        };
        let stage = Stage::CLink { link: Box::new(link), ci, probe };
        let Some(slot) = self.new_conn(fd, server.to_string(), 0, stage, true) else {
            warn!(self.who, "connection table full; cannot link {}:{id}", kind_name(t));
            return None;
        };
        let generation = self.slots[slot as usize].generation;
        self.with_conn(slot, |w, conn| {
            conn.tls = tls;
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
        if matches!(conn.stage, Stage::ULink { .. }) {
            if res < 0 {
                return self.proxy_connect_failed(slot, conn, res);
            }
            return self.proxy_connected(slot, conn);
        }
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
        let input = conn
            .rx
            .and_then(|b| self.ring.arena().get(b))
            .and_then(|b| b.get(conn.rx_pos..conn.rx_len))
            .unwrap_or_default();
        conn.rx_pos += link.handle_input(input);
        match link.poll_action() {
            // `Reply` comes only with `defer_ticket`, which `connect` never sets.
            None | Some(client_link::Action::Reply { .. }) => {
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
                    self.ctl_fatal(
                        super::shared::FatalKind::Auth,
                        format!(
                            "the server refused the password ({}); check --password-file",
                            LinkErrorCode::PermissionDenied
                        ),
                    );
                }
                self.stats().links_failed.fetch_add(1, Ordering::Relaxed);
                warn!(self.who, "link to {} channel={} failed: {f}", conn.peer, conn.label);
                self.close(slot, conn, &format!("link failed: {f}"));
                false
            }
        }
    }

    fn on_clinked(&mut self, slot: u32, conn: &mut Conn, l: Linked) {
        self.stats().links_ok.fetch_add(1, Ordering::Relaxed);
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
            if hung_up(&fd) {
                // Nothing of ours went to the server on this channel: closing is safe.
                info!(
                    self.who,
                    "channel={} the local app left before its channel was linked; its bytes are discarded", conn.label
                );
                drop(fd);
                return self.close(slot, conn, "local app left before the link");
            }
            return self.ctl_attach_local(slot, conn, fd);
        }
        match ep {
            EndpointSpec::UnixListen(_) => {
                if let Stage::Chan(ch) = &mut conn.stage {
                    ch.ep_state = EpState::Accepting;
                }
                self.accept_endpoint(slot, conn, ci);
            }
            other => match endpoint::open(&other) {
                Ok(Opening::Ready(fd)) => self.ctl_attach_local(slot, conn, fd),
                Ok(Opening::Connect(fd, addr)) => {
                    let t = self.tok(Op::EpConnect, slot);
                    let r = self.ring.connect(fd.as_raw_fd(), &addr, t);
                    if let Stage::Chan(ch) = &mut conn.stage {
                        ch.ep = Some(fd);
                    }
                    self.pushed(slot, conn, r);
                }
                Ok(Opening::Accept) => {}
                Err(e) => self.ctl_local_failed(slot, conn, &e.to_string()),
            },
        }
    }

    /// The channel's local app is there: start moving bytes.
    fn ctl_attach_local(&mut self, slot: u32, conn: &mut Conn, fd: OwnedFd) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        ch.ep = Some(fd);
        ch.ep_state = EpState::Open;
        ch.app_left = None;
        ch.app_eof = false;
        if ch.kind.port_messages {
            // The local app is the port's frontend (QEMU 7.2 ignores this; other servers may not).
            self.queue_client(slot, conn, &ClientMsg::PortEvent { event: PORT_EVENT_OPENED });
        }
        self.ctl_local_up(slot, conn);
        // Called from within the deframing pass (link or PORT_INIT): it goes
        // on by itself; only the output side needs a push.
        self.pump_out(slot, conn);
    }

    /// The local end of a linked channel went away (EOF, error, shutdown):
    /// tell a port, drop what the server sends from now on, and let the
    /// channel linger (or, with `--keep-linked`, wait for the next app).
    pub(super) fn ctl_app_gone(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        let keep = self.ctl.as_ref().is_some_and(|c| c.opts.keep_linked) && self.draining.is_none();
        let Stage::Chan(ch) = &mut conn.stage else { return self.close(slot, conn, reason) };
        if ch.app_left.is_some() {
            return;
        }
        let ci = ch.conf;
        ch.drop_endpoint();
        let port = ch.kind.port_messages;
        self.cancel_ep_poll(slot, conn);
        let listen = matches!(self.ctl_conf(ci).map(|c| &c.endpoint), Some(EndpointSpec::UnixListen(_)));
        info!(
            self.who,
            "channel={} local app left ({reason}); {}",
            conn.label,
            if keep && listen {
                "the channel stays linked for the next app"
            } else {
                "closing once the server is quiet"
            }
        );
        if port {
            self.queue_client(slot, conn, &ClientMsg::PortEvent { event: PORT_EVENT_CLOSED });
        }
        if keep && listen {
            if let Stage::Chan(ch) = &mut conn.stage {
                ch.ep_state = EpState::Accepting;
            }
            self.accept_endpoint(slot, conn, ci);
        } else {
            self.ctl_arm_linger();
        }
        self.pump_in(slot, conn);
    }

    /// The local app sent EOF. Fully closed: it is gone. Half-closed: it may
    /// still wait for replies, so keep writing to it until it hangs up.
    pub(super) fn ctl_app_eof(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let Some(ep) = ch.ep.as_ref() else { return };
        if hung_up(ep) {
            return self.ctl_app_gone(slot, conn, "local app closed");
        }
        ch.app_eof = true;
        debug!(self.who, "channel={} local app half-closed; replies still go to it", conn.label);
        // An io_uring POLL would fire at once on the half-close (RDHUP):
        // the linger tick checks for the full hang-up instead.
        self.ctl_arm_linger();
    }

    /// SIGTERM in `connect`: local apps go, channels linger until the server
    /// is quiet, main closes last (bounded by the drain timeout).
    pub(super) fn ctl_drain_conn(&mut self, slot: u32, conn: &mut Conn) {
        match conn.stage {
            Stage::Chan(_) => {
                let generation = self.slots[slot as usize].generation;
                let pred = move |t: u64| {
                    decode(t).is_some_and(|(op, s, g)| {
                        s == slot && g == generation && matches!(op, Op::EpAccept | Op::EpAcceptRetry)
                    })
                };
                if let Ok(n) = self.ring.cancel_where(pred, token(Op::Cancel, slot, generation)) {
                    conn.inflight += u32::try_from(n).unwrap_or(0);
                }
                if let Stage::Chan(ch) = &mut conn.stage
                    && ch.app_left.is_some()
                {
                    ch.ep_state = EpState::Gone;
                }
                self.ctl_app_gone(slot, conn, "shutdown");
            }
            Stage::CMain => {}
            _ => self.close(slot, conn, "shutdown"),
        }
        self.ctl_arm_linger();
    }

    fn ctl_arm_linger(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        if ctl.linger_armed {
            return;
        }
        ctl.linger_armed = true;
        if let Err(e) = self.ring.timeout(LINGER_TICK, token(Op::Linger, 0, 0)) {
            warn!(self.who, "cannot arm the linger timer: {e}");
        }
    }

    /// Closes lingering channels whose server has been quiet long enough;
    /// while draining, closes main once no channel is left.
    pub(super) fn on_linger(&mut self) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        ctl.linger_armed = false;
        let linger = ctl.opts.linger;
        let now = Instant::now();
        let mut waiting = false;
        let mut chans = 0usize;
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            let Some(c) = self.slots[slot as usize].conn.as_ref() else { continue };
            let Stage::Chan(ch) = &c.stage else { continue };
            if !c.client_role || c.closing.is_some() {
                continue;
            }
            chans += 1;
            if ch.app_eof && ch.app_left.is_none() {
                if ch.ep.as_ref().is_some_and(hung_up) {
                    self.with_conn(slot, |w, conn| w.ctl_app_gone(slot, conn, "local app closed"));
                }
                waiting = true;
                continue;
            }
            let Some(left) = ch.app_left else { continue };
            if ch.ep_state != EpState::Gone {
                continue;
            }
            let quiet = now.duration_since(left.max(c.last_rx)) >= linger;
            if quiet && !c.tx_busy && c.ctl_q.is_empty() {
                let why = format!("local app left; server quiet for {} ms", linger.as_millis());
                self.with_conn(slot, |w, conn| w.close(slot, conn, &why));
            } else {
                waiting = true;
            }
        }
        if self.draining.is_some() {
            if chans == 0 {
                for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
                    self.with_conn(slot, |w, conn| w.close(slot, conn, "shutdown"));
                }
            } else {
                waiting = true;
            }
        }
        if waiting {
            self.ctl_arm_linger();
        }
    }

    /// The channel's local endpoint could not be opened: back off (no SPICE
    /// link until the next try) and close the channel.
    pub(super) fn ctl_local_failed(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        if let Some(ci) = conn.owns {
            self.ctl_local_down(ci, reason);
        }
        self.close(slot, conn, &format!("local endpoint unavailable: {reason}"));
    }

    /// Records a local-endpoint failure of spec `ci`: one warning per change
    /// of state, capped exponential backoff.
    fn ctl_local_down(&mut self, ci: usize, reason: &str) {
        let (label, ep) = self.ctl_conf(ci).map(|c| (c.label(), c.endpoint.to_string())).unwrap_or_default();
        let Some(ctl) = self.ctl.as_mut() else { return };
        let max = ctl.opts.max_backoff;
        let st = &mut ctl.specs[ci];
        st.backoff = if st.down.is_some() { (st.backoff * 2).min(max) } else { FIRST_BACKOFF };
        st.retry_at = Some(Instant::now() + st.backoff);
        if st.down.is_none() {
            warn!(
                self.who,
                "channel={label} local endpoint {ep} unavailable: {reason}; not linking it until it is back \
                 (retrying with backoff up to {} s)",
                max.as_secs()
            );
        } else {
            debug!(self.who, "channel={label} local endpoint {ep} still unavailable: {reason}");
        }
        st.down = Some(reason.to_string());
        let wait = st.backoff;
        self.ctl_schedule_retry_after(wait);
    }

    /// The channel's local end is up: clear a recorded failure.
    pub(super) fn ctl_local_up(&mut self, _slot: u32, conn: &mut Conn) {
        let Some(ci) = conn.owns else { return };
        let ep = self.ctl_conf(ci).map(|c| c.endpoint.to_string()).unwrap_or_default();
        let Some(st) = self.ctl.as_mut().and_then(|c| c.specs.get_mut(ci)) else { return };
        st.retry_at = None;
        if st.down.take().is_some() {
            info!(self.who, "channel={} local endpoint {ep} is back", conn.label);
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
                    ctl.listed = true;
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
        // A local app that connects between MAIN_INIT and CHANNELS_LIST
        // waits for the list: judging its port missing then would close it.
        if ctl.session.is_none() || !ctl.listed {
            return;
        }
        let now = Instant::now();
        let list = ctl.list.clone();
        let unprobed: Vec<u8> = list
            .iter()
            .filter(|(t, id)| *t == crate::proto::channel::CH_PORT && !ctl.probed.contains(id))
            .map(|&(_, id)| id)
            .collect();
        let ports_pending = !unprobed.is_empty() || ctl.probes > 0;
        let mut todo: Vec<(usize, u8, u8)> = Vec::new();
        let mut need_probe = false;
        let mut missing = Vec::new();
        let mut learned = Vec::new();
        let mut next_try: Option<Instant> = None;
        for (ci, st) in ctl.specs.iter().enumerate() {
            if st.conn.is_some() {
                continue;
            }
            let Some(c) = self.ctl_conf(ci) else { continue };
            let t = c.kind.channel_type;
            let id = if t == crate::proto::channel::CH_PORT {
                let known = st.port_id.or_else(|| {
                    let name = c.port_name.as_deref()?;
                    ctl.ports.iter().find(|(_, n)| n == name).map(|(id, _)| *id)
                });
                match known {
                    Some(id) => {
                        learned.push((ci, id));
                        id
                    }
                    // Names still being learned: neither link nor report yet.
                    None if ports_pending => {
                        need_probe |= !unprobed.is_empty();
                        continue;
                    }
                    None => {
                        missing.push(ci);
                        continue;
                    }
                }
            } else {
                c.id
            };
            if !list.contains(&(t, id)) {
                missing.push(ci);
                continue;
            }
            if self.ctl_lazy(ci) && st.local.is_none() {
                continue;
            }
            if let Some(at) = st.retry_at
                && at > now
            {
                next_try = Some(next_try.map_or(at, |n| n.min(at)));
                continue;
            }
            todo.push((ci, t, id));
        }
        if let Some(ctl) = self.ctl.as_mut() {
            for (ci, id) in learned {
                ctl.specs[ci].port_id = Some(id);
            }
        }
        if !ports_pending {
            self.ctl_report_ports(&missing, &list);
        }
        for (ci, t, id) in todo {
            // A local end we connect to is opened first: no SPICE link (and no
            // device socket opened on the VM's side) while it is missing.
            if !self.ctl_lazy(ci) && !self.ctl_open_local_first(ci) {
                continue;
            }
            let c = self.ctl_link(Some(ci), t, id, false);
            if let Some(ctl) = self.ctl.as_mut() {
                ctl.specs[ci].conn = c;
            }
        }
        if let Some(at) = next_try {
            self.ctl_schedule_retry_after(at.saturating_duration_since(now));
        }
        let probes_running = self.ctl.as_ref().is_some_and(|c| c.probes > 0);
        if need_probe && !probes_running {
            // Learn port names: link every port not probed yet this session.
            for id in unprobed {
                if let Some(ctl) = self.ctl.as_mut() {
                    ctl.probed.push(id);
                }
                if self.ctl_link(None, crate::proto::channel::CH_PORT, id, true).is_some()
                    && let Some(ctl) = self.ctl.as_mut()
                {
                    ctl.probes += 1;
                }
            }
        }
    }

    /// Opens a `unix:` or `file:` local end before its SPICE link (kept as
    /// the spec's pending local fd). Returns whether to link now.
    fn ctl_open_local_first(&mut self, ci: usize) -> bool {
        let Some(ep) = self.ctl_conf(ci).map(|c| c.endpoint.clone()) else { return false };
        if self.ctl.as_ref().is_some_and(|c| c.specs[ci].local.is_some()) {
            return true;
        }
        let opened = match &ep {
            EndpointSpec::Unix(p) => connect_unix_now(p),
            EndpointSpec::File(_) => match endpoint::open(&ep) {
                Ok(Opening::Ready(fd)) => Ok(fd),
                Ok(_) => return true,
                Err(e) => Err(e),
            },
            // TCP connects through the ring after the link; failures back off there.
            _ => return true,
        };
        match opened {
            Ok(fd) => {
                if let Some(ctl) = self.ctl.as_mut() {
                    ctl.specs[ci].local = Some(fd);
                }
                true
            }
            Err(e) => {
                self.ctl_local_down(ci, &e.to_string());
                false
            }
        }
    }

    /// Once per session, when every port's name is known: the names the
    /// server has, and the configured channels it does not have.
    fn ctl_report_ports(&mut self, missing: &[usize], list: &[(u8, u8)]) {
        let Some(ctl) = self.ctl.as_ref() else { return };
        if ctl.ports_reported && missing.iter().all(|ci| ctl.warned_missing.contains(ci)) {
            return;
        }
        let mut ports: Vec<String> = ctl.ports.iter().map(|(id, n)| format!("{n} (port:{id})")).collect();
        ports.sort();
        let first = !ctl.ports_reported;
        if first && !ctl.ports.is_empty() {
            info!(self.who, "server ports: {}", ports.join(", "));
        }
        let have: Vec<String> = list.iter().map(|(t, i)| format!("{}:{i}", kind_name(*t))).collect();
        let mut warned = Vec::new();
        for &ci in missing {
            if ctl.warned_missing.contains(&ci) {
                continue;
            }
            let Some(c) = self.ctl_conf(ci) else { continue };
            if c.kind.channel_type == crate::proto::channel::CH_PORT {
                let name = c.port_name.clone().unwrap_or_default();
                warn!(
                    self.who,
                    "the server has no port named {name} (its ports: {}); check --channel port:NAME; local apps \
                     of this channel are closed at once",
                    if ports.is_empty() { "none".to_string() } else { ports.join(", ") }
                );
            } else {
                warn!(self.who, "server offers no channel {} (it has {}); waiting for it", c.label(), have.join(" "));
            }
            warned.push(ci);
        }
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.ports_reported = true;
            ctl.warned_missing.extend(warned);
        }
        // Apps already waiting on a port that does not exist get their answer now.
        for &ci in missing {
            let is_port = self.ctl_conf(ci).is_some_and(|c| c.kind.channel_type == crate::proto::channel::CH_PORT);
            if is_port
                && let Some(ctl) = self.ctl.as_mut()
                && ctl.specs[ci].local.take().is_some()
            {
                info!(self.who, "closed the waiting local app of a port the server does not have");
            }
        }
        self.ctl_arm_local_accepts();
    }

    /// A port probe learned its name: keep it if a spec wants that name.
    fn ctl_on_probe(&mut self, slot: u32, conn: &mut Conn, name: &str) {
        let generation = self.slots[slot as usize].generation;
        if let Some(ctl) = self.ctl.as_mut()
            && !ctl.ports.iter().any(|(id, _)| *id == conn.chan.1)
        {
            ctl.ports.push((conn.chan.1, name.to_string()));
        }
        let want = self.ctl.as_ref().and_then(|ctl| {
            ctl.specs.iter().enumerate().position(|(ci, st)| {
                st.conn.is_none()
                    && self.ctl_conf(ci).is_some_and(|c| {
                        c.kind.channel_type == crate::proto::channel::CH_PORT && c.port_name.as_deref() == Some(name)
                    })
            })
        });
        let adopt =
            want.filter(|&ci| !(self.ctl_lazy(ci) && self.ctl.as_ref().is_some_and(|c| c.specs[ci].local.is_none())));
        let Some(ci) = adopt else {
            if let (Some(ci), Some(ctl)) = (want, self.ctl.as_mut()) {
                ctl.specs[ci].port_id = Some(conn.chan.1);
                info!(self.who, "port {name} is port:{}; linking when the local app connects", conn.chan.1);
            } else {
                debug!(self.who, "port {} is {name}: not wanted, closing the probe", conn.label);
            }
            // We sent nothing on a probe: closing it at once is safe for the VM.
            return self.close(slot, conn, "port probe done");
        };
        if let Some(ctl) = self.ctl.as_mut() {
            ctl.specs[ci].conn = Some((slot, generation));
            ctl.specs[ci].port_id = Some(conn.chan.1);
            ctl.probes = ctl.probes.saturating_sub(1);
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
            ctl.listed = false;
            ctl.list.clear();
            ctl.probes = 0;
            ctl.warned_missing.clear();
            ctl.ports.clear();
            ctl.probed.clear();
            ctl.probe_failures = 0;
            ctl.ports_reported = false;
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
        let was_probe = matches!(&conn.stage, Stage::Chan(ch) if ch.probe)
            || matches!(conn.stage, Stage::CLink { probe: true, .. });
        if was_probe {
            ctl.probes = ctl.probes.saturating_sub(1);
            let id = conn.chan.1;
            if !ctl.ports.iter().any(|(p, _)| *p == id) && ctl.probe_failures < MAX_PROBE_FAILURES {
                // The probe closed before PORT_INIT (a refused or cut link):
                // the port's name is unknown, not missing. Probe it again
                // instead of closing the apps that wait for a port name.
                ctl.probe_failures += 1;
                ctl.probed.retain(|p| *p != id);
                info!(self.who, "port probe of port:{id} failed ({reason}); probing it again");
                if self.draining.is_none() {
                    self.ctl_schedule_retry_after(Duration::from_millis(100));
                }
                return;
            }
            if ctl.probes == 0 && self.draining.is_none() {
                // Every port is known now (or failed to link): link, report.
                self.ctl_link_channels();
            }
            return;
        }
        let Some(ctl) = self.ctl.as_mut() else { return };
        if let Some(ci) = conn.owns
            && ctl.specs.get(ci).is_some_and(|s| s.conn == Some((slot, generation)))
        {
            ctl.specs[ci].conn = None;
            let dropped = match &conn.stage {
                Stage::Chan(ch) => ch.dropped,
                _ => 0,
            };
            info!(
                self.who,
                "close server={} channel={} c2e_bytes={} e2c_bytes={} dropped_bytes={dropped} duration_ms={} \
                 reason=\"{reason}\"",
                conn.peer,
                conn.label,
                conn.st.c2e_bytes,
                conn.st.e2c_bytes,
                conn.since.elapsed().as_millis()
            );
            if self.draining.is_none() {
                if self.ctl_lazy(ci) {
                    // Wait for the next local app.
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

    /// TLS to the server failed. A certificate that does not verify is
    /// never retried (it will not verify the next time either); anything
    /// else closes this connection and the usual relink follows.
    pub(super) fn ctl_tls_failed(&mut self, _slot: u32, conn: &mut Conn, e: &crate::tls::SessionError) {
        if e.kind() == crate::tls::SessionErrorKind::Verification {
            let server = self.ctl.as_ref().map_or_else(String::new, |c| c.opts.server.to_string());
            self.ctl_fatal(
                super::shared::FatalKind::TlsVerify,
                format!(
                    "{server}: {e}; check --ca-file (the CA that signed the server's certificate), the host in the \
                     URI (it must be in the certificate's subjectAltName) or --cert-subject"
                ),
            );
        } else {
            warn!(self.who, "TLS to {} channel={} failed: {e}", conn.peer, conn.label);
        }
    }

    /// An error retrying cannot fix: record it, wake the main thread, drain.
    fn ctl_fatal(&mut self, kind: super::shared::FatalKind, why: String) {
        error!(self.who, "{why}");
        if let Ok(mut f) = self.shared.fatal.lock() {
            *f = Some((kind, why));
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

/// Whether the peer of a local socket has closed it completely (a
/// half-closed app that still waits for replies is not hung up).
fn hung_up(fd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Connects a unix socket without waiting (a unix connect completes or
/// fails at once; a full backlog counts as a failure, retried later).
fn connect_unix_now(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr).map_err(|e| {
        std::io::Error::new(std::io::Error::from(e).kind(), format!("cannot connect to {}: {e}", path.display()))
    })?;
    Ok(fd)
}
