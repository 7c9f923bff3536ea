//! One worker: a thread with its own io_uring, listeners, buffer arena and
//! connection table. No locks and no cross-thread traffic on the data
//! path; the shared registry is touched only when a link completes or a
//! connection closes.
//!
//! Each loop tick reaps a batch of completions, handles them without
//! re-entering the ring, and submits once.
//!
//! Data path of a pass-through channel (one slot = one SPICE client
//! connection plus its endpoint; two registered buffers):
//! - client → endpoint: read the client socket into `rx`; the deframer
//!   yields payload ranges of `rx`; one gathered write sends them to the
//!   endpoint. Headers never get copied out; payload bytes are not copied
//!   in user space. While the write is in flight `rx` belongs to the
//!   kernel and the client socket is not read: back-pressure.
//! - endpoint → client: one scattered read fills `tx` leaving a header-sized
//!   gap before each chunk of at most `max_payload_bytes`; headers are
//!   written into the gaps and the whole run goes out in one write. A read
//!   that fills the buffer is followed at once by another: a source is read
//!   until it would block, not once per wake-up.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use super::config::{BusyPolicy, ChannelConf, DataPath, EndpointSpec, ServeConfig};
use super::endpoint::{self, Opening};
use crate::proto::ack::{ClientAck, ServerAck};
use crate::proto::auth::TicketKey;
use crate::proto::caps::Caps;
use crate::proto::channel::{CH_MAIN, ChannelKind};
use crate::proto::client_link::ClientLink;
use crate::proto::consts::*;
use crate::proto::framing::{Deframer, Encoder, Event, HeaderKind, MsgHeader};
use crate::proto::link::LinkErrorCode;
use crate::proto::msg::{
    ChannelsList, ClientMsg, CompressedData, ControlBuf, Lz4Compressor, MainInit, PortInit, ServerMsg, lz4_scratch_len,
};
use crate::proto::server_link::{Action, Decision, LinkRequest, Linked, ServerLink, ServerLinkConfig};
use crate::uring::{BufId, Completion, MAX_IOV, Ring, RingConfig, SubmitError};
use crate::{debug, info, warn};

mod connect;
mod revive;

pub use connect::{ConnectOptions, DEFAULT_LINGER, ServerAddr, run_connect_worker};

// ---------------------------------------------------------------------------
// tokens

/// What an op is for; the top byte of every token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Mailbox,
    Tick,
    ClientRead,
    ClientWrite,
    EpRead,
    EpWrite,
    EpConnect,
    EpAccept,
    Cancel,
    SrvConnect,
    Retry,
    SpliceIn,
    SpliceOut,
    SplicePoll,
    LocalAccept,
    Linger,
}

const OPS: [Op; 17] = [
    Op::Accept,
    Op::Mailbox,
    Op::Tick,
    Op::ClientRead,
    Op::ClientWrite,
    Op::EpRead,
    Op::EpWrite,
    Op::EpConnect,
    Op::EpAccept,
    Op::Cancel,
    Op::SrvConnect,
    Op::Retry,
    Op::SpliceIn,
    Op::SpliceOut,
    Op::SplicePoll,
    Op::LocalAccept,
    Op::Linger,
];

impl Op {
    /// Ops that belong to a connection slot (the others use the slot
    /// field for a listener or channel index, so a slot match alone must
    /// never select them).
    fn is_conn_op(self) -> bool {
        matches!(
            self,
            Op::ClientRead
                | Op::ClientWrite
                | Op::EpRead
                | Op::EpWrite
                | Op::EpConnect
                | Op::EpAccept
                | Op::SrvConnect
                | Op::SpliceIn
                | Op::SpliceOut
                | Op::SplicePoll
        )
    }
}

/// `op:8 | slot:24 | generation:32`. The generation is bumped on every slot
/// reuse, so a late completion can never touch the slot's next connection.
fn token(op: Op, slot: u32, generation: u32) -> u64 {
    (u64::from(op as u8) << 56) | (u64::from(slot & 0xff_ffff) << 32) | u64::from(generation)
}

/// The one decoder of tokens.
fn decode(t: u64) -> Option<(Op, u32, u32)> {
    let op = OPS.iter().copied().find(|o| *o as u8 == (t >> 56) as u8)?;
    let slot = u32::try_from((t >> 32) & 0xff_ffff).unwrap_or(0);
    Some((op, slot, (t & 0xffff_ffff) as u32))
}

// ---------------------------------------------------------------------------
// shared state

/// A command for a worker from another thread.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    Close {
        slot: u32,
        generation: u32,
        reason: &'static str,
    },
    /// Announce `channel` (type, id) on this main channel (one-entry CHANNELS_LIST).
    Announce {
        slot: u32,
        generation: u32,
        channel: [u8; 2],
    },
}

/// A worker's inbox: commands plus an eventfd to wake its ring.
#[derive(Debug)]
pub struct Mailbox {
    fd: OwnedFd,
    cmds: Mutex<Vec<Cmd>>,
}

impl Mailbox {
    fn new() -> std::io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(Self { fd: fd.into(), cmds: Mutex::new(Vec::new()) })
    }

    fn send(&self, cmd: Cmd) {
        if let Ok(mut q) = self.cmds.lock() {
            q.push(cmd);
        }
        self.poke();
    }

    fn poke(&self) {
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }
}

impl super::keypool::Wake for Mailbox {
    fn wake(&self) {
        self.poke();
    }
}

/// Where a connection lives: worker, slot, generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    worker: usize,
    slot: u32,
    generation: u32,
}

#[derive(Debug)]
struct SessionEntry {
    service: usize,
    main: Place,
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    place: Place,
    session: u32,
}

/// Sessions and channel owners across workers (touched at link and close only).
#[derive(Debug, Default)]
pub struct Registry {
    sessions: HashMap<u32, SessionEntry>,
    channels: HashMap<(usize, usize), Owner>,
    /// Channels announced again under a fresh id: (session, type, id) → channel index.
    aliases: HashMap<(u32, u8, u8), usize>,
}

/// Counters of one worker, readable from any thread.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Links completed.
    pub links_ok: AtomicU64,
    /// Links refused or failed.
    pub links_failed: AtomicU64,
    /// Connections refused at accept (table or buffers full).
    pub conns_rejected: AtomicU64,
    /// Connections open now.
    pub conns_open: AtomicU64,
    /// Payload bytes client → endpoint.
    pub c2e_bytes: AtomicU64,
    /// Payload bytes endpoint → client.
    pub e2c_bytes: AtomicU64,
    /// Protocol errors (bad messages) that closed a connection.
    pub protocol_errors: AtomicU64,
}

/// Everything the workers share.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: ServeConfig,
    registry: Mutex<Registry>,
    mailboxes: Vec<Arc<Mailbox>>,
    /// Set on SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// `unix-listen` sockets by (service, channel index).
    listen_eps: HashMap<(usize, usize), OwnedFd>,
    /// `unix-listen` endpoint connections kept while no client is linked.
    parked: Mutex<HashMap<(usize, usize), OwnedFd>>,
    /// Per-worker counters.
    pub stats: Vec<WorkerStats>,
    /// Set by a worker that hit an error retrying cannot fix (e.g. a
    /// wrong password in `connect`); the main thread exits with it.
    pub fatal: Mutex<Option<String>>,
}

impl Shared {
    /// Builds shared state: mailboxes and `unix-listen` sockets.
    pub fn new(config: ServeConfig) -> std::io::Result<Arc<Self>> {
        let n = config.limits.workers;
        let mailboxes = (0..n).map(|_| Mailbox::new().map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let mut listen_eps = HashMap::new();
        for (si, s) in config.services.iter().enumerate() {
            for (ci, c) in s.channels.iter().enumerate() {
                if let EndpointSpec::UnixListen(p) = &c.endpoint {
                    listen_eps.insert((si, ci), endpoint::bind_listener(p)?);
                }
            }
        }
        Ok(Arc::new(Self {
            config,
            registry: Mutex::new(Registry::default()),
            mailboxes,
            shutdown: AtomicBool::new(false),
            listen_eps,
            parked: Mutex::new(HashMap::new()),
            stats: (0..n).map(|_| WorkerStats::default()).collect(),
            fatal: Mutex::new(None),
        }))
    }

    /// Wakers for the key pool.
    pub fn wakers(&self) -> Vec<Arc<dyn super::keypool::Wake>> {
        self.mailboxes.iter().map(|m| Arc::clone(m) as Arc<dyn super::keypool::Wake>).collect()
    }

    /// Asks every worker to drain and stop.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for m in &self.mailboxes {
            m.poke();
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A worker that panicked while holding the lock cannot have left it
        // half-updated in a way that matters more than stopping the relay.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tell(&self, place: Place, reason: &'static str) {
        if let Some(m) = self.mailboxes.get(place.worker) {
            m.send(Cmd::Close { slot: place.slot, generation: place.generation, reason });
        }
    }
}

// ---------------------------------------------------------------------------
// connections

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpState {
    Connecting,
    Accepting,
    Open,
    /// `connect`: the local app left; the SPICE channel lingers (see
    /// `Chan::app_left`) and what the server sends is dropped.
    Gone,
}

/// What the current client message's body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cur {
    None,
    Data,
    Control,
    Compressed,
}

#[derive(Debug)]
struct Chan {
    conf: usize,
    kind: ChannelKind,
    ep: Option<OwnedFd>,
    ep_state: EpState,
    /// Pending gathered write of `rx` payload ranges to the endpoint.
    ranges: Vec<(usize, usize)>,
    /// Compressed body being collected (bounded by `max_lz4_bytes`).
    lz4_in: Vec<u8>,
    /// Decompression output; `None` while the ring holds it for a write.
    lz4_out: Option<Vec<u8>>,
    /// A write of `lz4_out` is pending (possibly partially done).
    lz4_pending: Option<usize>,
    eof_client: bool,
    /// Payload sizes of the chunks in flight in `tx`.
    e2c_chunk: usize,
    /// `connect` only: linked to learn the port's name from PORT_INIT.
    probe: bool,
    /// Compress payloads over 1000 bytes toward the SPICE peer (it
    /// announced LZ4 and we were asked to).
    lz4_send: Option<Box<Lz4Compressor>>,
    /// Framed output when compressing; `None` while the ring holds it.
    lz4_tx: Option<Vec<u8>>,
    /// Server-side ACK window toward a client (`ack_window` > 0).
    ack: ServerAck,
    /// Splice data path: the pipe (read end, write end), made on first use.
    pipe: Option<(OwnedFd, OwnedFd)>,
    /// Bytes spliced into the pipe and not yet out to the endpoint.
    piped: u32,
    /// Which splice a POLL wakes up: true = into the pipe (socket readable).
    poll_in: bool,
    /// Payload bytes dropped because no local app was there to take them.
    dropped: u64,
    /// `connect`: when the local app left. From then on server bytes are
    /// dropped (counted), and the SPICE channel is closed only once the
    /// server has been quiet for the linger time: spice-server 0.15.1
    /// crashes QEMU when a channel closes while the device still has input
    /// of ours to consume.
    app_left: Option<Instant>,
    /// `connect`: the local app half-closed (sent EOF) and may still wait
    /// for replies; the linger tick watches for its hang-up.
    app_eof: bool,
}

impl Chan {
    /// A channel's data-stage state, endpoint not open yet.
    fn new(conf: usize, kind: ChannelKind, probe: bool, lz4_send: bool) -> Self {
        Self {
            conf,
            kind,
            ep: None,
            ep_state: EpState::Connecting,
            ranges: Vec::with_capacity(MAX_IOV),
            lz4_in: Vec::new(),
            lz4_out: Some(Vec::new()),
            lz4_pending: None,
            eof_client: false,
            e2c_chunk: 0,
            probe,
            lz4_send: lz4_send.then(|| Box::new(Lz4Compressor::new())),
            lz4_tx: Some(Vec::new()),
            ack: ServerAck::new(),
            pipe: None,
            piped: 0,
            poll_in: false,
            dropped: 0,
            app_left: None,
            app_eof: false,
        }
    }
}

#[derive(Debug)]
enum Stage {
    WaitKey,
    Link {
        link: Box<ServerLink>,
        req: Option<LinkRequest>,
        conf: Option<usize>,
        ep: Option<(OwnedFd, EpState)>,
    },
    Main {
        session: u32,
    },
    Chan(Box<Chan>),
    /// `connect`: our own link to a SPICE server (`ci` None for main).
    CLink {
        link: Box<ClientLink>,
        ci: Option<usize>,
        probe: bool,
    },
    /// `connect`: the session's main channel.
    CMain,
}

#[derive(Debug, Default, Clone, Copy)]
struct ConnStats {
    c2e_bytes: u64,
    c2e_msgs: u64,
    e2c_bytes: u64,
    e2c_msgs: u64,
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    peer: String,
    service: usize,
    since: Instant,
    rx: BufId,
    tx: BufId,
    inflight: u32,
    closing: Option<String>,
    close_after_flush: Option<String>,
    /// A client read or an endpoint write of `rx` (or of lz4 output) is in flight.
    c2e_busy: bool,
    /// An endpoint read into `tx` or a client write from `tx` is in flight.
    tx_busy: bool,
    tx_len: usize,
    tx_done: usize,
    rx_len: usize,
    rx_pos: usize,
    ctl_q: VecDeque<(u16, Vec<u8>)>,
    enc: Encoder,
    deframer: Deframer,
    ctl: ControlBuf<256>,
    cur: Cur,
    session: u32,
    label: String,
    owns: Option<usize>,
    stage: Stage,
    st: ConnStats,
    /// We are the SPICE client on this socket (`connect`).
    client_role: bool,
    /// `(type, id)` this connection links (`connect`).
    chan: (u8, u8),
    /// Client-side ACK window accounting (`connect`).
    ack: ClientAck,
    /// When the last bytes came from the peer socket.
    last_rx: Instant,
}

/// Smallest DATA body remainder worth splicing (below it, one read is cheaper).
const SPLICE_MIN_BYTES: u32 = 16 * 1024;
/// Pipe capacity asked for the splice path.
const PIPE_BYTES: u32 = 1024 * 1024;

/// Most control messages queued toward one client (they are tiny; a
/// client that never reads is cut off rather than buffered without bound).
const MAX_CTL_QUEUE: usize = 64;

struct Slot {
    generation: u32,
    conn: Option<Box<Conn>>,
}

struct Listener {
    fd: OwnedFd,
    service: usize,
}

/// One worker thread's state.
pub struct Worker {
    id: usize,
    who: String,
    shared: Arc<Shared>,
    ring: Ring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    listeners: Vec<Listener>,
    keys: Receiver<TicketKey>,
    waiting_key: VecDeque<(u32, u32)>,
    link_cfg: Vec<ServerLinkConfig>,
    rng: rand::rngs::StdRng,
    draining: Option<Instant>,
    started: Instant,
    /// Worker 0 logs totals every `stats_secs`: (when, c2e, e2c) last time.
    last_stats: (Instant, u64, u64),
    /// `connect` mode state.
    ctl: Option<Box<connect::ConnectCtl>>,
    /// Endpoints waited for behind live sessions.
    revive: Vec<revive::Revive>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Binds a SO_REUSEPORT TCP listener (one per worker per address).
fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| std::io::Error::new(std::io::Error::from(e).kind(), format!("cannot listen on {addr}: {e}")))?;
    listen(&fd, nix::sys::socket::Backlog::new(1024).unwrap_or(nix::sys::socket::Backlog::MAXCONN))?;
    Ok(fd)
}

impl Worker {
    /// Sets up worker `id`: ring, arena, listeners.
    pub fn new(id: usize, shared: Arc<Shared>, keys: Receiver<TicketKey>) -> anyhow::Result<Self> {
        let l = &shared.config.limits;
        let max = l.max_conns_per_worker;
        let listeners_n: usize = shared.config.services.iter().map(|s| s.listen.len()).sum();
        // Pool sizes, written out: each connection holds 2 buffers (rx, tx);
        // each has at most 6 ops in flight (client read + write, endpoint
        // read + write, endpoint connect/accept, one cancel per other op
        // while closing ≤ 5 → bounded by 12); plus one accept per listener,
        // the mailbox read and the tick timer, and slack.
        let buffers = max * 2;
        let max_ops = max * 12 + listeners_n + 16;
        let ring = Ring::new(RingConfig {
            entries: u32::try_from((max * 4).clamp(64, 4096)).unwrap_or(4096),
            buffers,
            buf_size: l.buffer_bytes,
            max_ops,
            defer_taskrun: true,
        })?;
        let mut listeners = Vec::new();
        for (si, s) in shared.config.services.iter().enumerate() {
            for a in &s.listen {
                listeners.push(Listener { fd: bind_tcp(*a)?, service: si });
            }
        }
        let link_cfg = shared
            .config
            .services
            .iter()
            .map(|s| ServerLinkConfig { password: s.password.clone(), mini_header: true })
            .collect();
        Ok(Self {
            id,
            who: format!("w{id}"),
            shared,
            ring,
            slots: (0..max).map(|_| Slot { generation: 0, conn: None }).collect(),
            free: (0..u32::try_from(max).unwrap_or(0)).rev().collect(),
            listeners,
            keys,
            waiting_key: VecDeque::new(),
            link_cfg,
            rng: rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
                .unwrap_or_else(|_| rand::rngs::StdRng::seed_from_u64(std::process::id().into())),
            draining: None,
            started: Instant::now(),
            last_stats: (Instant::now(), 0, 0),
            ctl: None,
            revive: Vec::new(),
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Runs until shutdown has drained every connection.
    pub fn run(mut self) -> anyhow::Result<()> {
        for i in 0..self.listeners.len() {
            let fd = self.listeners[i].fd.as_raw_fd();
            self.ring.accept_multi(fd, token(Op::Accept, u32::try_from(i).unwrap_or(0), 0))?;
        }
        let mfd = self.shared.mailboxes[self.id].fd.as_raw_fd();
        self.ring.read_counter(mfd, token(Op::Mailbox, 0, 0))?;
        self.ring.timeout(Duration::from_secs(1), token(Op::Tick, 0, 0))?;
        if self.ctl.is_some() {
            self.ctl_start_main();
        }
        let mut comps = Vec::with_capacity(256);
        loop {
            self.ring.submit_and_wait(1)?;
            self.ring.reap(&mut comps);
            for c in comps.drain(..) {
                self.on_completion(c);
            }
            if self.draining.is_some() && self.free.len() == self.slots.len() {
                break;
            }
        }
        debug!(self.who, "worker stopped; stale_cqes={}", self.ring.stale_cqes());
        Ok(())
    }

    fn on_completion(&mut self, c: Completion) {
        let Some((op, slot, generation)) = decode(c.token) else { return };
        match op {
            Op::Accept => self.on_accept(slot as usize, c),
            Op::Mailbox => self.on_mailbox(),
            Op::Tick => self.on_tick(),
            Op::Retry => self.on_retry(),
            Op::LocalAccept => self.on_local_accept(slot as usize, c.result, c.fd),
            Op::Linger => self.on_linger(),
            _ => self.on_conn_op(op, slot, generation, c),
        }
    }

    // -- accept, mailbox, tick --------------------------------------------

    fn on_accept(&mut self, li: usize, c: Completion) {
        if !c.more
            && self.draining.is_none()
            && let Some(l) = self.listeners.get(li)
        {
            let fd = l.fd.as_raw_fd();
            if let Err(e) = self.ring.accept_multi(fd, token(Op::Accept, u32::try_from(li).unwrap_or(0), 0)) {
                warn!(self.who, "cannot re-arm accept: {e}");
            }
        }
        if c.result < 0 {
            if c.result != -libc::ECANCELED {
                warn!(self.who, "accept failed: {}", std::io::Error::from_raw_os_error(-c.result));
            }
            return;
        }
        let Some(fd) = c.fd else { return };
        let Some(service) = self.listeners.get(li).map(|l| l.service) else { return };
        if self.draining.is_some() {
            return;
        }
        let peer = endpoint::peer_of(&fd);
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::KeepAlive, &true);
        let Some(slot) = self.new_conn(fd, peer.clone(), service, Stage::WaitKey, false) else {
            self.stats().conns_rejected.fetch_add(1, Ordering::Relaxed);
            warn!(
                self.who,
                "reject peer={peer} reason=\"connection table full ({} per worker; raise --max-conns)\"",
                self.slots.len()
            );
            return;
        };
        let generation = self.slots[slot as usize].generation;
        self.waiting_key.push_back((slot, generation));
        self.serve_key_waiters();
    }

    /// Puts a new connection in a free slot with two buffers.
    fn new_conn(&mut self, fd: OwnedFd, peer: String, service: usize, stage: Stage, client_role: bool) -> Option<u32> {
        let slot = self.free.pop()?;
        let Some(rx) = self.ring.alloc_buf() else {
            // The arena holds two buffers per slot; only a failed buffer
            // registration (locked-memory limit) gets here.
            self.free.push(slot);
            return None;
        };
        let Some(tx) = self.ring.alloc_buf() else {
            self.ring.arena_mut().free(rx);
            self.free.push(slot);
            return None;
        };
        let conn = Conn {
            fd,
            peer,
            service,
            since: Instant::now(),
            rx,
            tx,
            inflight: 0,
            closing: None,
            close_after_flush: None,
            c2e_busy: false,
            tx_busy: false,
            tx_len: 0,
            tx_done: 0,
            rx_len: 0,
            rx_pos: 0,
            ctl_q: VecDeque::new(),
            enc: Encoder::new(HeaderKind::Mini),
            deframer: Deframer::new(HeaderKind::Mini),
            ctl: ControlBuf::new(),
            cur: Cur::None,
            session: 0,
            label: "?".into(),
            owns: None,
            stage,
            st: ConnStats::default(),
            client_role,
            chan: (0, 0),
            ack: ClientAck::new(),
            last_rx: Instant::now(),
        };
        self.stats().conns_open.fetch_add(1, Ordering::Relaxed);
        self.slots[slot as usize].conn = Some(Box::new(conn));
        Some(slot)
    }

    fn serve_key_waiters(&mut self) {
        while let Some(&(slot, generation)) = self.waiting_key.front() {
            let live = self.slots.get(slot as usize).is_some_and(|s| s.generation == generation && s.conn.is_some());
            if !live {
                self.waiting_key.pop_front();
                continue;
            }
            let Ok(key) = self.keys.try_recv() else { return };
            self.waiting_key.pop_front();
            self.with_conn(slot, |w, conn| {
                let link = ServerLink::new(&w.link_cfg[conn.service], key);
                conn.stage = Stage::Link { link: Box::new(link), req: None, conf: None, ep: None };
                w.pump_in(slot, conn);
            });
        }
    }

    fn on_mailbox(&mut self) {
        let mfd = self.shared.mailboxes[self.id].fd.as_raw_fd();
        let cmds: Vec<Cmd> = match self.shared.mailboxes[self.id].cmds.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => Vec::new(),
        };
        for cmd in cmds {
            match cmd {
                Cmd::Close { slot, generation, reason } => {
                    if self.slots.get(slot as usize).is_some_and(|s| s.generation == generation) {
                        self.with_conn(slot, |w, conn| w.close(slot, conn, reason));
                    }
                }
                Cmd::Announce { slot, generation, channel } => self.on_announce(slot, generation, channel),
            }
        }
        self.serve_key_waiters();
        if self.shared.shutdown.load(Ordering::SeqCst) && self.draining.is_none() {
            self.start_drain();
        }
        if let Err(e) = self.ring.read_counter(mfd, token(Op::Mailbox, 0, 0)) {
            warn!(self.who, "cannot re-arm mailbox: {e}");
        }
    }

    fn start_drain(&mut self) {
        self.draining = Some(Instant::now());
        info!(self.who, "draining: no new connections; flushing accepted data");
        let _ =
            self.ring.cancel_where(|t| decode(t).is_some_and(|d| d.0 == Op::Accept), token(Op::Cancel, 0xff_ffff, 0));
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            self.with_conn(slot, |w, conn| match conn.stage {
                _ if conn.client_role => w.ctl_drain_conn(slot, conn),
                Stage::Chan(_) => {
                    // Stop reading; what was read is still written.
                    let generation = w.slots[slot as usize].generation;
                    let pred = move |t: u64| {
                        decode(t).is_some_and(|(op, s, g)| {
                            s == slot && g == generation && matches!(op, Op::ClientRead | Op::EpRead | Op::EpAccept)
                        })
                    };
                    if let Ok(n) = w.ring.cancel_where(pred, token(Op::Cancel, slot, generation)) {
                        conn.inflight += u32::try_from(n).unwrap_or(0);
                    }
                    w.maybe_drained(slot, conn);
                }
                _ => w.close(slot, conn, "shutdown"),
            });
        }
    }

    fn maybe_drained(&mut self, slot: u32, conn: &mut Conn) {
        // `connect` closes its channels itself, once the server is quiet.
        if self.draining.is_some() && !conn.client_role && !conn.c2e_busy && !conn.tx_busy && conn.ctl_q.is_empty() {
            self.close(slot, conn, "shutdown");
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let timeout = Duration::from_secs(self.shared.config.limits.link_timeout_secs);
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            let late = self.slots[slot as usize].conn.as_ref().is_some_and(|c| {
                matches!(c.stage, Stage::WaitKey | Stage::Link { .. } | Stage::CLink { .. })
                    && c.closing.is_none()
                    && now.duration_since(c.since) > timeout
            });
            if late {
                self.with_conn(slot, |w, conn| {
                    if conn.client_role {
                        let why = format!(
                            "no answer from {} within {} s: not a SPICE server, or it is stuck",
                            conn.peer,
                            timeout.as_secs()
                        );
                        warn!(w.who, "link to {} channel={} failed: {why}", conn.peer, conn.label);
                        w.close(slot, conn, &why);
                    } else {
                        w.close(slot, conn, "link timeout");
                    }
                });
            }
        }
        if let Some(t) = self.draining
            && now.duration_since(t) > Duration::from_secs(5)
        {
            for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
                self.with_conn(slot, |w, conn| w.close(slot, conn, "shutdown (drain timeout)"));
            }
        }
        self.log_stats(now);
        self.revive_tick();
        if let Err(e) = self.ring.timeout(Duration::from_secs(1), token(Op::Tick, 0, 0)) {
            warn!(self.who, "cannot re-arm tick: {e}");
        }
    }

    /// Worker 0: one line of live totals across workers, when anything moved.
    fn log_stats(&mut self, now: Instant) {
        let every = self.shared.config.limits.stats_secs;
        let (then, c2e0, e2c0) = self.last_stats;
        if self.id != 0 || every == 0 || now.duration_since(then) < Duration::from_secs(every) {
            return;
        }
        let sum = |f: fn(&WorkerStats) -> &AtomicU64| -> u64 {
            self.shared.stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
        };
        let (c2e, e2c) = (sum(|s| &s.c2e_bytes), sum(|s| &s.e2c_bytes));
        self.last_stats = (now, c2e, e2c);
        let secs = now.duration_since(then).as_secs_f64().max(0.001);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        info!(
            self.who,
            "stats conns_open={} links_ok={} links_failed={} rejected={} protocol_errors={} c2e_bytes={c2e} \
             e2c_bytes={e2c} c2e_mib_s={:.1} e2c_mib_s={:.1} uptime_s={}",
            sum(|s| &s.conns_open),
            sum(|s| &s.links_ok),
            sum(|s| &s.links_failed),
            sum(|s| &s.conns_rejected),
            sum(|s| &s.protocol_errors),
            mib(c2e - c2e0) / secs,
            mib(e2c - e2c0) / secs,
            self.started.elapsed().as_secs()
        );
    }

    // -- connection plumbing ------------------------------------------------

    /// Runs `f` with the slot's connection taken out of the table, then
    /// puts it back, or finishes its close once no op is in flight.
    fn with_conn(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut Conn)) {
        let Some(mut conn) = self.slots.get_mut(slot as usize).and_then(|s| s.conn.take()) else { return };
        f(self, &mut conn);
        if conn.closing.is_some() && conn.inflight == 0 {
            self.finish_close(slot, conn);
        } else if let Some(s) = self.slots.get_mut(slot as usize) {
            s.conn = Some(conn);
        }
    }

    fn on_conn_op(&mut self, op: Op, slot: u32, generation: u32, c: Completion) {
        if self.slots.get(slot as usize).is_none_or(|s| s.generation != generation || s.conn.is_none()) {
            return;
        }
        self.with_conn(slot, |w, conn| {
            if !c.more {
                conn.inflight = conn.inflight.saturating_sub(1);
            }
            if op == Op::Cancel {
                return;
            }
            if conn.closing.is_some() {
                // An accepted endpoint fd that raced with the close is
                // dropped (closed) with the completion.
                // Owned vectors come home; nothing else to do while closing.
                drop(c.owned);
                return;
            }
            match op {
                Op::ClientRead => w.on_client_read(slot, conn, c.result),
                Op::ClientWrite => w.on_client_write(slot, conn, c.result, c.owned),
                Op::EpRead => w.on_ep_read(slot, conn, c.result),
                Op::EpWrite => w.on_ep_write(slot, conn, c.result, c.owned),
                Op::EpConnect => w.on_ep_connect(slot, conn, c.result),
                Op::EpAccept => w.on_ep_accept(slot, conn, c.result, c.fd),
                Op::SrvConnect => w.on_srv_connect(slot, conn, c.result),
                Op::SpliceIn => w.on_splice_in(slot, conn, c.result),
                Op::SpliceOut => w.on_splice_out(slot, conn, c.result),
                Op::SplicePoll => w.on_splice_poll(slot, conn, c.result),
                _ => {}
            }
        });
    }

    /// Counts a pushed op, or closes the connection if the push failed.
    fn pushed(&mut self, slot: u32, conn: &mut Conn, r: Result<(), SubmitError>) -> bool {
        match r {
            Ok(()) => {
                conn.inflight += 1;
                true
            }
            Err(e) => {
                warn!(self.who, "peer={} cannot submit: {e}", conn.peer);
                self.close(slot, conn, "ring submission failed");
                false
            }
        }
    }

    fn tok(&self, op: Op, slot: u32) -> u64 {
        token(op, slot, self.slots[slot as usize].generation)
    }

    /// Starts closing: cancels every op of the connection. The slot is
    /// freed by `finish_close` once their completions are reaped.
    fn close(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        if conn.closing.is_some() {
            return;
        }
        conn.closing = Some(reason.to_string());
        let generation = self.slots[slot as usize].generation;
        let pred = move |t: u64| decode(t).is_some_and(|(op, s, g)| s == slot && g == generation && op.is_conn_op());
        match self.ring.cancel_where(pred, token(Op::Cancel, slot, generation)) {
            Ok(n) => conn.inflight += u32::try_from(n).unwrap_or(0),
            Err(e) => warn!(self.who, "cannot cancel ops of peer={}: {e}", conn.peer),
        }
        // Closing the client socket for writing tells the peer at once.
        let _ = nix::sys::socket::shutdown(conn.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    fn finish_close(&mut self, slot: u32, mut conn: Box<Conn>) {
        let reason = conn.closing.take().unwrap_or_default();
        let place = Place { worker: self.id, slot, generation: self.slots[slot as usize].generation };
        let service = conn.service;
        let mut to_close: Vec<Place> = Vec::new();
        {
            let mut reg = self.shared.registry();
            match &conn.stage {
                Stage::Main { session } => {
                    if reg.sessions.get(session).is_some_and(|s| s.main == place) {
                        reg.sessions.remove(session);
                        let session = *session;
                        reg.aliases.retain(|k, _| k.0 != session);
                        to_close.extend(reg.channels.values().filter(|o| o.session == session).map(|o| o.place));
                    }
                }
                _ => {
                    if let Some(ci) = conn.owns
                        && reg.channels.get(&(service, ci)).is_some_and(|o| o.place == place)
                    {
                        reg.channels.remove(&(service, ci));
                    }
                }
            }
        }
        for p in to_close {
            self.shared.tell(p, "session closed");
        }
        let mut linked = false;
        let mut dropped = 0;
        if let Stage::Chan(ch) = &mut conn.stage {
            linked = true;
            dropped = ch.dropped;
            let keep = self.shared.config.limits.keep_listen_endpoint
                && ch.ep_state == EpState::Open
                && reason == "client closed"
                && matches!(self.conf(service, ch.conf).map(|c| &c.endpoint), Some(EndpointSpec::UnixListen(_)));
            if keep && let (Some(fd), Ok(mut parked)) = (ch.ep.take(), self.shared.parked.lock()) {
                parked.insert((service, ch.conf), fd);
            }
        } else if matches!(conn.stage, Stage::Main { .. } | Stage::CMain) {
            linked = true;
        }
        if linked {
            let svc = self.service_name(service);
            info!(
                self.who,
                "close peer={} service={svc} channel={} session={:#010x} c2e_bytes={} c2e_msgs={} e2c_bytes={} \
                 e2c_msgs={} dropped_bytes={dropped} duration_ms={} reason=\"{reason}\"",
                conn.peer,
                conn.label,
                conn.session,
                conn.st.c2e_bytes,
                conn.st.c2e_msgs,
                conn.st.e2c_bytes,
                conn.st.e2c_msgs,
                conn.since.elapsed().as_millis()
            );
        } else {
            debug!(self.who, "close peer={} before link reason=\"{reason}\"", conn.peer);
        }
        if conn.client_role {
            self.ctl_on_closed(slot, &mut conn, &reason);
        }
        let arena = self.ring.arena_mut();
        arena.free(conn.rx);
        arena.free(conn.tx);
        drop(conn);
        self.stats().conns_open.fetch_sub(1, Ordering::Relaxed);
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
    }

    fn service_name(&self, service: usize) -> &str {
        self.shared.config.services.get(service).map_or("?", |s| s.name.as_str())
    }

    fn conf(&self, service: usize, ci: usize) -> Option<&ChannelConf> {
        self.shared.config.services.get(service)?.channels.get(ci)
    }

    // -- client → relay ------------------------------------------------------

    fn read_client(&mut self, slot: u32, conn: &mut Conn) {
        // While draining, `connect` keeps reading (and dropping) until the server is quiet.
        if conn.c2e_busy || conn.closing.is_some() || (self.draining.is_some() && !conn.client_role) {
            return;
        }
        if let Stage::Chan(ch) = &conn.stage
            && ch.eof_client
        {
            return;
        }
        let mut size = self.ring.arena().buf_size();
        if self.shared.config.limits.data_path == DataPath::Splice && matches!(conn.stage, Stage::Chan(_)) {
            // Read exactly up to the next header so payloads stay in the
            // socket for splice; a small body is read whole.
            let hl = conn.enc.header_len();
            size = if conn.deframer.at_boundary() {
                hl
            } else {
                (conn.deframer.body_remaining() as usize).min(size).max(1)
            };
        }
        let t = self.tok(Op::ClientRead, slot);
        let r = self.ring.read_fixed(conn.fd.as_raw_fd(), conn.rx, 0, size, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    fn on_client_read(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res <= 0 {
            let reason = if res == 0 { "client closed".to_string() } else { errno_reason("client read", res) };
            if let Stage::Chan(ch) = &mut conn.stage {
                // Everything read was written already (reads wait for writes).
                ch.eof_client = true;
            }
            if self.draining.is_some() && res == -libc::ECANCELED {
                self.maybe_drained(slot, conn);
                return;
            }
            self.close(slot, conn, &reason);
            return;
        }
        conn.rx_len = usize::try_from(res).unwrap_or(0);
        conn.rx_pos = 0;
        conn.last_rx = Instant::now();
        self.pump_in(slot, conn);
    }

    /// Processes buffered client bytes according to the stage, then reads more.
    fn pump_in(&mut self, slot: u32, conn: &mut Conn) {
        if conn.closing.is_some() || conn.c2e_busy {
            return;
        }
        // A link stage that completes hands the rest of the input to the
        // data stage in the same pass (bytes may follow the link result).
        loop {
            match conn.stage {
                Stage::WaitKey => return,
                Stage::Link { .. } => {
                    if !self.pump_link(slot, conn) {
                        return;
                    }
                    if matches!(conn.stage, Stage::Link { .. }) {
                        break;
                    }
                }
                Stage::CLink { .. } => {
                    if !self.pump_clink(slot, conn) {
                        return;
                    }
                    if matches!(conn.stage, Stage::CLink { .. }) {
                        break;
                    }
                }
                Stage::Main { .. } | Stage::CMain | Stage::Chan(_) => {
                    if !self.pump_data(slot, conn) {
                        return;
                    }
                    break;
                }
            }
            if conn.closing.is_some() || conn.c2e_busy {
                return;
            }
        }
        if conn.rx_pos >= conn.rx_len && conn.closing.is_none() {
            self.read_client(slot, conn);
        }
    }

    /// Link stage: feeds the state machine, acts on its actions. Returns
    /// whether more client input is wanted now.
    fn pump_link(&mut self, slot: u32, conn: &mut Conn) -> bool {
        loop {
            let Stage::Link { link, .. } = &mut conn.stage else { return true };
            let input =
                self.ring.arena().get(conn.rx).and_then(|b| b.get(conn.rx_pos..conn.rx_len)).unwrap_or_default();
            let used = link.handle_input(input);
            conn.rx_pos += used;
            let Some(action) = link.poll_action() else {
                let done = link.is_done();
                self.pump_out(slot, conn);
                return !done;
            };
            match action {
                Action::Request(req) => self.on_link_request(conn, req),
                Action::Authenticated(req) => {
                    self.on_authenticated(slot, conn, req);
                    self.pump_out(slot, conn);
                    // Input resumes after the endpoint answers.
                    let Stage::Link { link, .. } = &conn.stage else { return true };
                    if !link.is_done() && link_waiting(link) {
                        return false;
                    }
                }
                Action::Linked(l) => {
                    self.on_linked(slot, conn, l);
                    return conn.closing.is_none();
                }
                Action::Close(f) => {
                    self.stats().links_failed.fetch_add(1, Ordering::Relaxed);
                    let svc = self.service_name(conn.service).to_string();
                    let what = match &conn.stage {
                        Stage::Link { req: Some(r), .. } => format!("{}:{}", kind_name(r.channel_type), r.channel_id),
                        _ => "?".into(),
                    };
                    info!(
                        self.who,
                        "link peer={} service={svc} channel={what} result=refused error=\"{f}\"{}",
                        conn.peer,
                        f.code().map_or(String::new(), |c| format!(" code={}", c.code()))
                    );
                    conn.close_after_flush = Some(format!("link refused: {f}"));
                    self.pump_out(slot, conn);
                    return false;
                }
            }
        }
    }

    fn on_link_request(&mut self, conn: &mut Conn, req: LinkRequest) {
        let service = conn.service;
        let decision = if req.channel_type == CH_MAIN {
            if req.connection_id != 0 {
                // spice-server would treat this as a migration target; we do not migrate.
                Decision::BadConnectionId
            } else {
                Decision::Accept { channel_caps: Caps::EMPTY }
            }
        } else {
            let found = self.shared.config.services[service]
                .channels
                .iter()
                .position(|c| c.kind.channel_type == req.channel_type && c.id == req.channel_id)
                .or_else(|| {
                    let key = (req.connection_id, req.channel_type, req.channel_id);
                    self.shared.registry().aliases.get(&key).copied()
                });
            match found {
                None => Decision::Unknown,
                Some(ci) => {
                    let reg = self.shared.registry();
                    let session_ok = reg.sessions.get(&req.connection_id).is_some_and(|s| s.service == service);
                    let busy = reg.channels.contains_key(&(service, ci));
                    drop(reg);
                    if let Stage::Link { conf, .. } = &mut conn.stage {
                        *conf = Some(ci);
                    }
                    if !session_ok {
                        Decision::BadConnectionId
                    } else if busy && self.shared.config.limits.busy == BusyPolicy::Refuse {
                        Decision::FailAfterAuth(LinkErrorCode::ChannelNotAvailable)
                    } else {
                        let kind = self.shared.config.services[service].channels[ci].kind;
                        Decision::AcceptThenConfirm { channel_caps: kind.channel_caps(true) }
                    }
                }
            }
        };
        if let Stage::Link { link, req: r, .. } = &mut conn.stage {
            *r = Some(req);
            link.decide(decision);
        }
    }

    /// The client is authenticated for a pass-through channel: claim the
    /// channel and open its endpoint.
    fn on_authenticated(&mut self, slot: u32, conn: &mut Conn, req: LinkRequest) {
        let service = conn.service;
        let Stage::Link { conf: Some(ci), .. } = conn.stage else {
            return self.confirm(conn, Err(LinkErrorCode::Error));
        };
        let place = Place { worker: self.id, slot, generation: self.slots[slot as usize].generation };
        // Claim the channel (newest wins, unless the policy refuses).
        let old = {
            let mut reg = self.shared.registry();
            if reg.sessions.get(&req.connection_id).is_none_or(|s| s.service != service) {
                drop(reg);
                return self.confirm(conn, Err(LinkErrorCode::BadConnectionId));
            }
            let prev = reg.channels.get(&(service, ci)).copied();
            if prev.is_some() && self.shared.config.limits.busy == BusyPolicy::Refuse {
                drop(reg);
                return self.confirm(conn, Err(LinkErrorCode::ChannelNotAvailable));
            }
            reg.channels.insert((service, ci), Owner { place, session: req.connection_id });
            prev
        };
        conn.owns = Some(ci);
        conn.session = req.connection_id;
        if let Some(o) = old {
            if o.place.worker == self.id {
                self.with_conn(o.place.slot, |w, c| w.close(o.place.slot, c, "replaced by a newer client"));
            } else {
                self.shared.tell(o.place, "replaced by a newer client");
            }
        }
        let Some(cc) = self.conf(service, ci).cloned() else {
            return self.confirm(conn, Err(LinkErrorCode::Error));
        };
        conn.label = cc.label();
        // A kept unix-listen connection, or an endpoint reopened for a re-announced channel.
        let parked = self.shared.parked.lock().ok().and_then(|mut p| p.remove(&(service, ci)));
        let opening = match parked {
            Some(fd) => Ok(Opening::Ready(fd)),
            None => endpoint::open(&cc.endpoint),
        };
        match opening {
            Ok(Opening::Ready(fd)) => {
                self.set_link_ep(conn, fd, EpState::Open);
                self.confirm(conn, Ok(()));
            }
            Ok(Opening::Accept) => self.confirm(conn, Ok(())),
            Ok(Opening::Connect(fd, addr)) => {
                let t = self.tok(Op::EpConnect, slot);
                let r = self.ring.connect(fd.as_raw_fd(), &addr, t);
                self.set_link_ep(conn, fd, EpState::Connecting);
                self.pushed(slot, conn, r);
            }
            Err(e) => {
                warn!(
                    self.who,
                    "endpoint unavailable service={} channel={} endpoint={} error=\"{e}\"",
                    self.service_name(service),
                    conn.label,
                    cc.endpoint
                );
                self.confirm(conn, Err(LinkErrorCode::ChannelNotAvailable));
            }
        }
    }

    fn set_link_ep(&mut self, conn: &mut Conn, fd: OwnedFd, state: EpState) {
        if let Stage::Link { ep, .. } = &mut conn.stage {
            *ep = Some((fd, state));
        }
    }

    fn confirm(&mut self, conn: &mut Conn, r: Result<(), LinkErrorCode>) {
        if let Stage::Link { link, .. } = &mut conn.stage {
            link.confirm(r);
        }
    }

    fn on_ep_connect(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        if let Stage::Chan(ch) = &mut conn.stage {
            if res < 0 {
                let r = errno_reason("local endpoint connect", res);
                if conn.client_role {
                    return self.ctl_local_failed(slot, conn, &r);
                }
                warn!(self.who, "channel={} {r}", conn.label);
                return self.close(slot, conn, &r);
            }
            ch.ep_state = EpState::Open;
            if conn.client_role {
                self.ctl_local_up(slot, conn);
            }
            self.pump_in(slot, conn);
            return self.pump_out(slot, conn);
        }
        if res < 0 {
            let Stage::Link { conf: Some(ci), .. } = conn.stage else { return };
            let ep = self.conf(conn.service, ci).map_or_else(String::new, |c| c.endpoint.to_string());
            warn!(
                self.who,
                "endpoint unavailable service={} channel={} endpoint={ep} error=\"{}\"",
                self.service_name(conn.service),
                conn.label,
                std::io::Error::from_raw_os_error(-res)
            );
            if let Stage::Link { ep, .. } = &mut conn.stage {
                *ep = None;
            }
            self.confirm(conn, Err(LinkErrorCode::ChannelNotAvailable));
        } else {
            if let Stage::Link { ep: Some((_, st)), .. } = &mut conn.stage {
                *st = EpState::Open;
            }
            self.confirm(conn, Ok(()));
        }
        self.pump_in(slot, conn);
    }

    fn on_linked(&mut self, slot: u32, conn: &mut Conn, l: Linked) {
        self.stats().links_ok.fetch_add(1, Ordering::Relaxed);
        conn.enc = Encoder::new(l.header_kind);
        conn.deframer = Deframer::new(l.header_kind);
        // Flush the link result before anything of the data stage.
        let svc = self.service_name(conn.service).to_string();
        let stage = std::mem::replace(&mut conn.stage, Stage::WaitKey);
        let Stage::Link { mut link, conf, ep, .. } = stage else { return };
        let mut tmp = [0u8; 8];
        let n = link.poll_output(&mut tmp);
        if n > 0 {
            conn.ctl_q.push_front((u16::MAX, tmp[..n].to_vec()));
        }
        if l.channel_type == CH_MAIN {
            let session = self.new_session(conn.service, slot);
            conn.session = session;
            conn.label = "main:0".into();
            conn.stage = Stage::Main { session };
            let init = MainInit {
                session_id: session,
                display_channels_hint: 0,
                supported_mouse_modes: MOUSE_MODE_SERVER | MOUSE_MODE_CLIENT,
                current_mouse_mode: MOUSE_MODE_CLIENT,
                agent_connected: 0,
                agent_tokens: 10,
                multi_media_time: 0,
                ram_hint: 0,
            };
            self.queue(slot, conn, &ServerMsg::MainInit(init));
        } else {
            let Some(ci) = conf else { return self.close(slot, conn, "internal: no channel") };
            let Some(cc) = self.conf(conn.service, ci).cloned() else { return };
            let (ep_fd, ep_state) = match ep {
                Some((fd, st)) => (Some(fd), st),
                None => (None, EpState::Accepting),
            };
            let opened = ep_state == EpState::Open;
            let lz4_send = self.shared.config.limits.lz4_to_client
                && cc.kind.lz4
                && l.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4);
            let mut ch = Chan::new(ci, cc.kind, false, lz4_send);
            ch.ep = ep_fd;
            ch.ep_state = ep_state;
            conn.stage = Stage::Chan(Box::new(ch));
            let window = self.shared.config.limits.ack_window;
            if window > 0
                && let Stage::Chan(ch) = &mut conn.stage
            {
                let m = ch.ack.set_ack(window);
                self.queue(slot, conn, &m);
            }
            if cc.kind.port_messages {
                let name = cc.port_name.clone().unwrap_or_default();
                self.queue(slot, conn, &ServerMsg::PortInit(PortInit { name: name.as_bytes(), opened }));
            }
            if ep_state == EpState::Accepting {
                self.accept_endpoint(slot, conn, ci);
            }
        }
        info!(
            self.who,
            "link peer={} service={svc} channel={} session={:#010x} header={:?} result=ok",
            conn.peer,
            conn.label,
            conn.session,
            l.header_kind
        );
        // Bytes after the link result belong to the data stage.
        self.pump_out(slot, conn);
    }

    fn accept_endpoint(&mut self, slot: u32, conn: &mut Conn, ci: usize) {
        let Some(lfd) = self.shared.listen_eps.get(&(conn.service, ci)).map(AsRawFd::as_raw_fd) else {
            return self.close(slot, conn, "internal: no unix-listen socket");
        };
        let t = self.tok(Op::EpAccept, slot);
        let r = self.ring.accept(lfd, t);
        self.pushed(slot, conn, r);
    }

    fn on_ep_accept(&mut self, slot: u32, conn: &mut Conn, res: i32, fd: Option<OwnedFd>) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let Some(fd) = fd else {
            let ci = ch.conf;
            if self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            warn!(self.who, "endpoint accept failed: {}", std::io::Error::from_raw_os_error(-res));
            return self.accept_endpoint(slot, conn, ci);
        };
        ch.ep = Some(fd);
        ch.ep_state = EpState::Open;
        ch.app_left = None;
        ch.app_eof = false;
        let port = ch.kind.port_messages;
        debug!(self.who, "endpoint connected channel={}", conn.label);
        if port && conn.client_role {
            // The local app is the port's frontend.
            self.queue_client(slot, conn, &ClientMsg::PortEvent { event: PORT_EVENT_OPENED });
        } else if port {
            self.queue(slot, conn, &ServerMsg::PortEvent { event: PORT_EVENT_OPENED });
        }
        self.pump_in(slot, conn);
        self.pump_out(slot, conn);
    }

    fn new_session(&mut self, service: usize, slot: u32) -> u32 {
        let place = Place { worker: self.id, slot, generation: self.slots[slot as usize].generation };
        let mut reg = self.shared.registry();
        loop {
            let id: u32 = self.rng.random();
            if id != 0 && !reg.sessions.contains_key(&id) {
                reg.sessions.insert(id, SessionEntry { service, main: place });
                return id;
            }
        }
    }

    /// Data stage: deframes client bytes. Returns whether more input is wanted now.
    fn pump_data(&mut self, slot: u32, conn: &mut Conn) -> bool {
        let limits = &self.shared.config.limits;
        let (max_ctl, max_lz4) = (limits.max_control_bytes, limits.max_lz4_bytes);
        let kind = match &conn.stage {
            Stage::Main { .. } | Stage::CMain => ChannelKind::of(CH_MAIN),
            Stage::Chan(ch) => Some(ch.kind),
            _ => None,
        };
        let Some(kind) = kind else { return false };
        if let Stage::Chan(ch) = &conn.stage
            && (ch.lz4_pending.is_some() || (!ch.ranges.is_empty() && ch.ep_state != EpState::Open))
        {
            return false;
        }
        let Some(buf) = self.ring.arena().get(conn.rx) else { return false };
        let mut error: Option<String> = None;
        let mut control: Vec<(MsgHeader, Vec<u8>)> = Vec::new();
        let mut compressed_done = false;
        let mut acks: Vec<ClientMsg<'static>> = Vec::new();
        let mut c2e_delta = 0u64;
        while conn.rx_pos < conn.rx_len {
            let input = &buf[conn.rx_pos..conn.rx_len];
            let (used, ev) = conn.deframer.advance(input);
            let base = conn.rx_pos;
            conn.rx_pos += used;
            match ev {
                Some(Event::Header(h)) => {
                    if conn.client_role {
                        // Every server message counts toward the ACK window.
                        if h.msg_type != MSG_SET_ACK
                            && let Some(m) = conn.ack.on_message()
                        {
                            acks.push(m);
                        }
                    } else if !kind.client_msg_allowed(h.msg_type) {
                        error = Some(format!("protocol error: message type {} not valid on {}", h.msg_type, kind));
                        break;
                    }
                    if h.sub_list != 0 {
                        error = Some("protocol error: sub-message list".into());
                        break;
                    }
                    conn.st.c2e_msgs += 1;
                    conn.cur = if h.msg_type == MSG_SPICEVMC_DATA
                        && kind.class != crate::proto::channel::ChannelClass::Main
                    {
                        Cur::Data
                    } else if h.msg_type == MSG_SPICEVMC_COMPRESSED_DATA
                        && kind.class != crate::proto::channel::ChannelClass::Main
                    {
                        if h.size as usize > max_lz4 {
                            error = Some(format!("protocol error: compressed message of {} bytes", h.size));
                            break;
                        }
                        if let Stage::Chan(ch) = &mut conn.stage {
                            ch.lz4_in.clear();
                            // Flush earlier data first, to keep the stream in order.
                            if !ch.ranges.is_empty() {
                                conn.cur = Cur::Compressed;
                                break;
                            }
                        }
                        Cur::Compressed
                    } else {
                        // A client keeps the first bytes of any server message
                        // (a PING carries 256 000 bytes of padding).
                        let big_ok = conn.client_role
                            || (kind.class == crate::proto::channel::ChannelClass::Main
                                && matches!(h.msg_type, MSGC_MAIN_AGENT_DATA | 112));
                        if h.size as usize > max_ctl && !big_ok {
                            error = Some(format!("protocol error: message type {} of {} bytes", h.msg_type, h.size));
                            break;
                        }
                        conn.ctl.start(h);
                        Cur::Control
                    };
                    // An empty body is complete now; the deframer's empty
                    // last chunk (if the caller asks again) is then ignored.
                    if h.size == 0 {
                        match conn.cur {
                            Cur::Control => control.push((h, Vec::new())),
                            Cur::Compressed => {
                                error = Some("protocol error: empty compressed message".into());
                                break;
                            }
                            _ => {}
                        }
                        conn.cur = Cur::None;
                    }
                }
                Some(Event::Body { offset, len, last }) => {
                    let (a, b) = (base + offset, base + offset + len);
                    match conn.cur {
                        Cur::Data => {
                            if let Stage::Chan(ch) = &mut conn.stage {
                                if ch.app_left.is_some() {
                                    // No local app: dropped, counted.
                                    ch.dropped += len as u64;
                                } else if len > 0 {
                                    // Merge with the previous range when contiguous.
                                    match ch.ranges.last_mut() {
                                        Some(r) if r.0 + r.1 == a => r.1 += len,
                                        _ => ch.ranges.push((a, len)),
                                    }
                                    conn.st.c2e_bytes += len as u64;
                                    c2e_delta += len as u64;
                                }
                                if ch.ranges.len() == MAX_IOV {
                                    break;
                                }
                            }
                        }
                        Cur::Compressed => {
                            if let Stage::Chan(ch) = &mut conn.stage {
                                ch.lz4_in.extend_from_slice(&buf[a..b]);
                                if last {
                                    compressed_done = true;
                                    conn.cur = Cur::None;
                                    break;
                                }
                            }
                        }
                        Cur::Control => {
                            conn.ctl.push(&buf[a..b]);
                            if last {
                                control.push((conn.ctl.header(), conn.ctl.body().to_vec()));
                                conn.cur = Cur::None;
                            }
                        }
                        Cur::None => {}
                    }
                    if last && conn.cur == Cur::Data {
                        conn.cur = Cur::None;
                    }
                }
                None => {
                    if used == 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = error {
            self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(self.who, "peer={} channel={} {e}", conn.peer, conn.label);
            self.close(slot, conn, &e);
            return false;
        }
        self.stats().c2e_bytes.fetch_add(c2e_delta, Ordering::Relaxed);
        for m in acks {
            self.queue_client(slot, conn, &m);
        }
        for (h, body) in control {
            if conn.client_role {
                self.on_server_control(slot, conn, kind, h, &body);
            } else {
                self.on_control(slot, conn, kind, h, &body);
            }
        }
        if conn.closing.is_some() {
            return false;
        }
        let Stage::Chan(ch) = &mut conn.stage else { return true };
        if compressed_done && ch.app_left.is_some() {
            ch.dropped += ch.lz4_in.len() as u64;
        } else if compressed_done {
            let mut out = ch.lz4_out.take().unwrap_or_default();
            let parsed = if conn.client_role {
                match ServerMsg::parse(kind, MSG_SPICEVMC_COMPRESSED_DATA, &ch.lz4_in) {
                    Ok(ServerMsg::CompressedData(cd)) => Ok(cd),
                    Ok(_) => Err(crate::proto::framing::FrameError::BadCompression),
                    Err(e) => Err(e),
                }
            } else {
                match ClientMsg::parse(kind, MSG_SPICEVMC_COMPRESSED_DATA, &ch.lz4_in) {
                    Ok(ClientMsg::CompressedData(cd)) => Ok(cd),
                    Ok(_) => Err(crate::proto::framing::FrameError::BadCompression),
                    Err(e) => Err(e),
                }
            };
            let r = parsed.and_then(|cd| {
                out.resize((cd.uncompressed_size as usize).min(max_lz4), 0);
                cd.decompress(max_lz4, &mut out)
            });
            match r {
                Ok(n) => {
                    out.truncate(n);
                    conn.st.c2e_bytes += n as u64;
                    self.stats().c2e_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    ch.lz4_pending = Some(0);
                    return self.write_lz4(slot, conn, out, 0);
                }
                Err(e) => {
                    ch.lz4_out = Some(out);
                    self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
                    let m = format!("protocol error: {e}");
                    warn!(self.who, "peer={} channel={} {m}", conn.peer, conn.label);
                    self.close(slot, conn, &m);
                    return false;
                }
            }
        }
        if !ch.ranges.is_empty() {
            if ch.ep_state != EpState::Open {
                return false;
            }
            self.write_ranges(slot, conn);
            return false;
        }
        if self.shared.config.limits.data_path == DataPath::Splice
            && conn.cur == Cur::Data
            && conn.rx_pos >= conn.rx_len
            && conn.deframer.body_remaining() >= SPLICE_MIN_BYTES
            && ch.ep_state == EpState::Open
        {
            self.splice_in(slot, conn);
            return false;
        }
        true
    }

    // -- splice data path ------------------------------------------------------

    /// Moves the rest of the current DATA body socket → pipe.
    fn splice_in(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.pipe.is_none() {
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    let _ = nix::fcntl::fcntl(
                        &w,
                        nix::fcntl::FcntlArg::F_SETPIPE_SZ(i32::try_from(PIPE_BYTES).unwrap_or(65536)),
                    );
                    ch.pipe = Some((r, w));
                }
                Err(e) => return self.close(slot, conn, &format!("cannot create a pipe for splice: {e}")),
            }
        }
        let Some((_, pw)) = &ch.pipe else { return };
        let len = conn.deframer.body_remaining().min(PIPE_BYTES);
        let t = self.tok(Op::SpliceIn, slot);
        let r = self.ring.splice(conn.fd.as_raw_fd(), pw.as_raw_fd(), len, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    fn on_splice_in(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res == -libc::EAGAIN {
            return self.splice_poll(slot, conn, true);
        }
        if res <= 0 {
            let reason = if res == 0 { "client closed".to_string() } else { errno_reason("splice from client", res) };
            return self.close(slot, conn, &reason);
        }
        let n = res.cast_unsigned();
        conn.st.c2e_bytes += u64::from(n);
        self.stats().c2e_bytes.fetch_add(u64::from(n), Ordering::Relaxed);
        if let Stage::Chan(ch) = &mut conn.stage {
            ch.piped = n;
        }
        conn.deframer.skip_body(n);
        if conn.deframer.body_remaining() == 0 {
            conn.cur = Cur::None;
        }
        self.splice_out(slot, conn);
    }

    /// Drains the pipe into the endpoint.
    fn splice_out(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let (Some((pr, _)), Some(ep)) = (&ch.pipe, &ch.ep) else { return };
        let t = self.tok(Op::SpliceOut, slot);
        let r = self.ring.splice(pr.as_raw_fd(), ep.as_raw_fd(), ch.piped, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    fn on_splice_out(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res == -libc::EAGAIN {
            return self.splice_poll(slot, conn, false);
        }
        if res <= 0 {
            let r = if res == 0 { "endpoint closed".to_string() } else { errno_reason("splice to endpoint", res) };
            return self.endpoint_gone(slot, conn, &r);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return };
        ch.piped = ch.piped.saturating_sub(res.cast_unsigned());
        if ch.piped > 0 {
            return self.splice_out(slot, conn);
        }
        if self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        // More of this body: splice again; else back to reading headers.
        if conn.cur == Cur::Data && conn.deframer.body_remaining() >= SPLICE_MIN_BYTES {
            return self.splice_in(slot, conn);
        }
        self.pump_in(slot, conn);
    }

    /// A non-blocking socket had nothing to give (or no room): wait for it.
    fn splice_poll(&mut self, slot: u32, conn: &mut Conn, input: bool) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        ch.poll_in = input;
        let fd = if input { Some(conn.fd.as_raw_fd()) } else { ch.ep.as_ref().map(AsRawFd::as_raw_fd) };
        let Some(fd) = fd else { return };
        let t = self.tok(Op::SplicePoll, slot);
        let r = self.ring.poll(fd, if input { libc::POLLIN } else { libc::POLLOUT }, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    fn on_splice_poll(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res < 0 {
            return self.close(slot, conn, &errno_reason("poll", res));
        }
        let input = matches!(&conn.stage, Stage::Chan(ch) if ch.poll_in);
        if input { self.splice_in(slot, conn) } else { self.splice_out(slot, conn) }
    }

    fn write_lz4(&mut self, slot: u32, conn: &mut Conn, out: Vec<u8>, done: usize) -> bool {
        let Stage::Chan(ch) = &mut conn.stage else { return false };
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else {
            // Endpoint not there yet: keep the output until it is.
            ch.lz4_out = Some(out);
            ch.lz4_pending = None;
            return false;
        };
        ch.lz4_pending = Some(done);
        let t = self.tok(Op::EpWrite, slot);
        let r = self.ring.write_owned(fd, out, done, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
        false
    }

    fn write_ranges(&mut self, slot: u32, conn: &mut Conn) {
        let t = self.tok(Op::EpWrite, slot);
        let Stage::Chan(ch) = &conn.stage else { return };
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else { return };
        // The ring copies the ranges into its own iovec array: no clone needed.
        let r = self.ring.writev(fd, conn.rx, &ch.ranges, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    fn on_ep_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.c2e_busy = false;
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.app_left.is_some() {
            // The local app left while this write was in flight: what it
            // did not take is dropped (counted when the app left).
            ch.ranges.clear();
            ch.lz4_pending = None;
            if let Some(v) = owned {
                ch.lz4_out = Some(v);
            }
            return self.pump_in(slot, conn);
        }
        if res < 0 {
            if let Some(v) = owned {
                ch.lz4_out = Some(v);
            }
            if res == -libc::EAGAIN || res == -libc::EINTR {
                // Retry the same write.
                return self.pump_in(slot, conn);
            }
            let r = errno_reason("endpoint write", res);
            return self.endpoint_gone(slot, conn, &r);
        }
        let n = usize::try_from(res).unwrap_or(0);
        if let Some(v) = owned {
            let done = ch.lz4_pending.unwrap_or(0) + n;
            if done < v.len() {
                self.write_lz4(slot, conn, v, done);
                return;
            }
            ch.lz4_pending = None;
            ch.lz4_out = Some(v);
        } else {
            // Drop the written prefix of the gathered ranges.
            let mut left = n;
            while let Some(first) = ch.ranges.first_mut() {
                if left >= first.1 {
                    left -= first.1;
                    ch.ranges.remove(0);
                } else {
                    first.0 += left;
                    first.1 -= left;
                    break;
                }
            }
            if !ch.ranges.is_empty() {
                self.write_ranges(slot, conn);
                return;
            }
        }
        if self.draining.is_some() && conn.rx_pos >= conn.rx_len {
            return self.maybe_drained(slot, conn);
        }
        self.pump_in(slot, conn);
    }

    fn on_control(&mut self, slot: u32, conn: &mut Conn, kind: ChannelKind, h: MsgHeader, body: &[u8]) {
        let msg = match ClientMsg::parse(kind, h.msg_type, body) {
            Ok(m) => m,
            // Main-channel messages we only skip (agent data) may be truncated.
            Err(_) if kind.class == crate::proto::channel::ChannelClass::Main && conn.ctl.is_truncated() => return,
            Err(e) => {
                self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
                let m = format!("protocol error: {e}");
                warn!(self.who, "peer={} channel={} {m}", conn.peer, conn.label);
                return self.close(slot, conn, &m);
            }
        };
        match msg {
            ClientMsg::AttachChannels => {
                let entries: Vec<[u8; 2]> = self.shared.config.services[conn.service]
                    .channels
                    .iter()
                    .map(|c| [c.kind.channel_type, c.id])
                    .collect();
                self.queue(slot, conn, &ServerMsg::ChannelsList(ChannelsList { entries: &entries }));
            }
            ClientMsg::AckSync { .. } | ClientMsg::Ack => {
                if let Stage::Chan(ch) = &mut conn.stage {
                    let was_blocked = !ch.ack.may_send();
                    ch.ack.on_client_msg(&msg);
                    if was_blocked && ch.ack.may_send() {
                        self.pump_out(slot, conn);
                    }
                }
            }
            ClientMsg::Disconnecting(_) => conn.close_after_flush = Some("client disconnecting".into()),
            ClientMsg::PortEvent { event } => debug!(self.who, "channel={} client port event {event}", conn.label),
            _ => {}
        }
    }

    // -- relay → client ------------------------------------------------------

    /// Queues a control message toward the client.
    fn queue(&mut self, slot: u32, conn: &mut Conn, msg: &ServerMsg<'_>) {
        let mut body = vec![0u8; msg.encoded_len()];
        let mut w = crate::proto::wire::Writer::new(&mut body);
        if msg.emit(&mut w).is_ok() {
            self.queue_body(slot, conn, msg.msg_type(), body);
        }
    }

    /// Queues a control message toward the server (`connect`).
    fn queue_client(&mut self, slot: u32, conn: &mut Conn, msg: &ClientMsg<'_>) {
        let mut body = vec![0u8; msg.encoded_len()];
        let mut w = crate::proto::wire::Writer::new(&mut body);
        if msg.emit(&mut w).is_ok() {
            self.queue_body(slot, conn, msg.msg_type(), body);
        }
    }

    fn queue_body(&mut self, slot: u32, conn: &mut Conn, msg_type: u16, body: Vec<u8>) {
        if conn.ctl_q.len() >= MAX_CTL_QUEUE {
            return self.close(slot, conn, "peer does not read its control messages");
        }
        conn.ctl_q.push_back((msg_type, body));
        self.pump_out(slot, conn);
    }

    /// Drives the client-bound side: link output, control messages, then
    /// endpoint data.
    fn pump_out(&mut self, slot: u32, conn: &mut Conn) {
        if conn.closing.is_some() || conn.tx_busy {
            return;
        }
        let hl = conn.enc.header_len();
        let Some(tx) = self.ring.arena_mut().get_mut(conn.tx) else { return };
        let mut n = 0;
        match &mut conn.stage {
            Stage::Link { link, .. } => n = link.poll_output(tx),
            Stage::CLink { link, .. } => n = link.poll_output(tx),
            _ => {}
        }
        // Control messages, framed now so serials follow the send order.
        while n == 0 || !conn.ctl_q.is_empty() {
            let Some((t, body)) = conn.ctl_q.front() else { break };
            let need = if *t == u16::MAX { body.len() } else { hl + body.len() };
            if n + need > tx.len() {
                break;
            }
            if *t == u16::MAX {
                tx[n..n + body.len()].copy_from_slice(body);
            } else {
                let _ = conn.enc.header(*t, u32::try_from(body.len()).unwrap_or(0), &mut tx[n..n + hl]);
                tx[n + hl..n + need].copy_from_slice(body);
                conn.st.e2c_msgs += 1;
            }
            n += need;
            conn.ctl_q.pop_front();
        }
        if n > 0 {
            conn.tx_len = n;
            conn.tx_done = 0;
            return self.write_client(slot, conn);
        }
        if let Some(r) = conn.close_after_flush.take() {
            return self.close(slot, conn, &r);
        }
        if self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        self.read_endpoint(slot, conn);
    }

    fn write_client(&mut self, slot: u32, conn: &mut Conn) {
        let t = self.tok(Op::ClientWrite, slot);
        let r = self.ring.write_fixed(conn.fd.as_raw_fd(), conn.tx, conn.tx_done, conn.tx_len - conn.tx_done, t);
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
        }
    }

    fn on_client_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.tx_busy = false;
        if res < 0 {
            if let (Some(v), Stage::Chan(ch)) = (owned, &mut conn.stage) {
                ch.lz4_tx = Some(v);
            }
            return self.close(slot, conn, &errno_reason("client write", res));
        }
        conn.tx_done += usize::try_from(res).unwrap_or(0);
        if let Some(v) = owned {
            if conn.tx_done < conn.tx_len {
                return self.write_client_owned(slot, conn, v);
            }
            if let Stage::Chan(ch) = &mut conn.stage {
                ch.lz4_tx = Some(v);
            }
        } else if conn.tx_done < conn.tx_len {
            return self.write_client(slot, conn);
        }
        // The link stage may now continue (e.g. after the reply went out).
        if matches!(conn.stage, Stage::Link { .. } | Stage::CLink { .. }) {
            self.pump_out(slot, conn);
            return self.pump_in(slot, conn);
        }
        self.pump_out(slot, conn);
    }

    /// Scattered read from the endpoint into `tx`, one header gap before
    /// each chunk.
    fn read_endpoint(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.ep_state != EpState::Open || conn.tx_busy || !ch.ack.may_send() || ch.app_eof {
            return;
        }
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else { return };
        let hl = conn.enc.header_len();
        let size = self.ring.arena().buf_size();
        let chunk = self.shared.config.limits.max_payload_bytes.min(size - hl);
        ch.e2c_chunk = chunk;
        let mut ranges = [(0usize, 0usize); MAX_IOV];
        let mut k = 0;
        let mut off = 0;
        while k < MAX_IOV && off + hl < size {
            let len = chunk.min(size - off - hl);
            ranges[k] = (off + hl, len);
            off += hl + len;
            k += 1;
        }
        let t = self.tok(Op::EpRead, slot);
        let r = self.ring.readv(fd, conn.tx, &ranges[..k], t);
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
        }
    }

    fn on_ep_read(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.tx_busy = false;
        if res <= 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                return self.pump_out(slot, conn);
            }
            if res == -libc::ECANCELED && self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            if res == 0 && conn.client_role {
                return self.ctl_app_eof(slot, conn);
            }
            let r = if res == 0 { "endpoint closed".to_string() } else { errno_reason("endpoint read", res) };
            return self.endpoint_gone(slot, conn, &r);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let chunk = ch.e2c_chunk.max(1);
        let hl = conn.enc.header_len();
        let mut n = usize::try_from(res).unwrap_or(0);
        conn.st.e2c_bytes += n as u64;
        self.stats().e2c_bytes.fetch_add(n as u64, Ordering::Relaxed);
        let Some(tx) = self.ring.arena_mut().get_mut(conn.tx) else { return };
        if let (Some(comp), Some(mut out)) = (ch.lz4_send.as_mut(), ch.lz4_tx.take()) {
            // Compressing: frame into a separate vector (LZ4 reads every
            // byte anyway); chunks that do not shrink go as DATA.
            out.clear();
            let mut off = 0;
            while n > 0 {
                let len = n.min(chunk);
                let data = &tx[off + hl..off + hl + len];
                let start = out.len();
                let pre = CompressedData::PREFIX_LEN;
                out.resize(start + hl + pre + lz4_scratch_len(len), 0);
                let packed = if len > LZ4_THRESHOLD { comp.compress(data, &mut out[start + hl + pre..]) } else { None };
                match packed {
                    Some(c) => {
                        let size = u32::try_from(pre + c).unwrap_or(0);
                        let _ = conn.enc.header(MSG_SPICEVMC_COMPRESSED_DATA, size, &mut out[start..start + hl]);
                        let mut w = crate::proto::wire::Writer::new(&mut out[start + hl..start + hl + pre]);
                        let _ = CompressedData::emit_prefix(COMPRESSION_LZ4, u32::try_from(len).unwrap_or(0), &mut w);
                        out.truncate(start + hl + pre + c);
                    }
                    None => {
                        out.truncate(start + hl);
                        let _ = conn.enc.header(MSG_SPICEVMC_DATA, u32::try_from(len).unwrap_or(0), &mut out[start..]);
                        out.extend_from_slice(data);
                    }
                }
                ch.ack.on_sent();
                conn.st.e2c_msgs += 1;
                off += hl + len;
                n -= len;
            }
            conn.tx_len = out.len();
            conn.tx_done = 0;
            return self.write_client_owned(slot, conn, out);
        }
        let mut off = 0;
        while n > 0 {
            let len = n.min(chunk);
            let _ = conn.enc.header(MSG_SPICEVMC_DATA, u32::try_from(len).unwrap_or(0), &mut tx[off..off + hl]);
            ch.ack.on_sent();
            conn.st.e2c_msgs += 1;
            off += hl + len;
            n -= len;
        }
        conn.tx_len = off;
        conn.tx_done = 0;
        self.write_client(slot, conn);
    }

    fn write_client_owned(&mut self, slot: u32, conn: &mut Conn, out: Vec<u8>) {
        let t = self.tok(Op::ClientWrite, slot);
        let r = self.ring.write_owned(conn.fd.as_raw_fd(), out, conn.tx_done, t);
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
        }
    }

    /// The endpoint went away: tell a port client, then close.
    fn endpoint_gone(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        if conn.client_role {
            return self.ctl_app_gone(slot, conn, reason);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return self.close(slot, conn, reason) };
        let (service, ci, session) = (conn.service, ch.conf, conn.session);
        let generation = self.slots[slot as usize].generation;
        let label =
            self.conf(service, ci).map_or_else(String::new, |c| format!("{} endpoint={}", c.label(), c.endpoint));
        if ch.kind.port_messages {
            // The port stays linked; its endpoint is reopened behind it.
            let pending: usize = ch.ranges.iter().map(|r| r.1).sum();
            ch.dropped += pending as u64;
            ch.ranges.clear();
            if let Some(fd) = ch.ep.take() {
                let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
            ch.ep_state = EpState::Gone;
            ch.app_left = Some(Instant::now());
            warn!(
                self.who,
                "endpoint gone channel={label} reason=\"{reason}\": port closed for the client, reopening it every \
                 second while the session lives"
            );
            self.queue(slot, conn, &ServerMsg::PortEvent { event: PORT_EVENT_CLOSED });
            self.revive_add(service, ci, session, revive::Then::Reattach { slot, generation });
            self.pump_in(slot, conn);
        } else {
            warn!(
                self.who,
                "endpoint gone channel={label} reason=\"{reason}\": channel closed; it is announced to the client \
                 again once the endpoint is back"
            );
            self.close(slot, conn, reason);
            self.revive_add(service, ci, session, revive::Then::Announce);
        }
    }
}

fn errno_reason(what: &str, res: i32) -> String {
    format!("{what}: {}", std::io::Error::from_raw_os_error(-res))
}

fn kind_name(t: u8) -> String {
    ChannelKind::of(t).map_or_else(|| t.to_string(), |k| k.to_string())
}

/// Whether the link is parked waiting for `confirm` (endpoint pending).
fn link_waiting(link: &ServerLink) -> bool {
    !link.is_done() && link.pending_output().is_empty()
}

#[allow(dead_code)]
fn _assert_raw(_: RawFd) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        for op in OPS {
            for (slot, generation) in [(0, 0), (1, 7), (0xff_ffff, u32::MAX)] {
                assert_eq!(decode(token(op, slot, generation)), Some((op, slot, generation)));
            }
        }
        assert_eq!(decode(0), None);
    }
}
