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
//!
//! Where each role lives: this file has the tokens, the `Worker` and its
//! loop; `shared` the cross-worker registry, mailboxes and counters;
//! `conn` a connection's state and its close path; `lifecycle` accepts,
//! mailbox, drain and the tick; `link` the server link stage; `c2e` and
//! `e2c` the two data directions (top to bottom); `splice` the splice
//! path; `revive` endpoints that come back behind a live session;
//! `connect` the client role (`vmcrelay connect`).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use super::config::{BusyPolicy, ChannelConf, DataPath, EndpointSpec, ServeConfig};
use super::endpoint::{self, Opening};
use super::metrics::{ConnInfo, LinkResult, Reject, StageKind, Which, WorkerSnapshot};
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
use crate::proto::server_link::{Action, Decision, LinkFailure, LinkRequest, Linked, ServerLink, ServerLinkConfig};
use crate::uring::{BufId, Completion, MAX_IOV, Ring, RingConfig, SubmitError};
use crate::{debug, info, warn};

mod c2e;
mod conn;
mod connect;
mod e2c;
mod lifecycle;
mod link;
mod proxy;
mod reload;
mod revive;
mod shared;
mod splice;
mod tls;

use conn::*;
use lifecycle::bind_tcp;
use shared::{Cmd, Owner, Place, SessionEntry, hung_up};
pub use shared::{FatalKind, Live, Mailbox, Registry, Shared, WorkerStats, upstream_tls_configs};

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
    SplicePoll,
    LocalAccept,
    Linger,
    PipeWrite,
    TlsRead,
    TlsWrite,
    ClientPoll,
    EpPoll,
    AcceptRetry,
    /// A unix-listen endpoint's accept paused for want of descriptors
    /// (a connection op: the slot waits for its endpoint).
    EpAcceptRetry,
    /// `connect`: a local app's accept paused for want of descriptors.
    LocalAcceptRetry,
}

const OPS: [Op; 23] = [
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
    Op::SplicePoll,
    Op::LocalAccept,
    Op::Linger,
    Op::PipeWrite,
    Op::TlsRead,
    Op::TlsWrite,
    Op::ClientPoll,
    Op::EpPoll,
    Op::AcceptRetry,
    Op::EpAcceptRetry,
    Op::LocalAcceptRetry,
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
                | Op::SplicePoll
                | Op::PipeWrite
                | Op::TlsRead
                | Op::TlsWrite
                | Op::ClientPoll
                | Op::EpPoll
                | Op::EpAcceptRetry
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

/// One worker thread's state.
pub struct Worker {
    id: usize,
    who: String,
    shared: Arc<Shared>,
    /// This worker's copy of the running configuration; a reload replaces
    /// it at a safe point (see `reload`).
    live: Arc<Live>,
    ring: Ring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// By listener index (the accept token's slot); `None`: closed by a
    /// reload (indexes are never reused).
    listeners: Vec<Option<Listener>>,
    keys: Receiver<TicketKey>,
    /// Services without ticketing (and not fronting QEMU) link with this
    /// one key: there is no ticket to protect, so no key is generated per
    /// link and such links never wait for the key thread.
    open_key: Option<TicketKey>,
    waiting_key: VecDeque<(u32, u32)>,
    link_cfg: Vec<ServerLinkConfig>,
    rng: rand::rngs::StdRng,
    draining: Option<Instant>,
    /// SIGTERM/SIGINT in `serve`: no new connections; linked channels are
    /// served until they end, `drain_secs` at most, then `draining`.
    stopping: Option<Instant>,
    /// Link-stage input (see `link_read`): the worker's one scratch
    /// buffer, and while a link consumes from it: that connection's slot,
    /// the bytes peeked into it, how many the link took, how many there are.
    link_scratch: Vec<u8>,
    link_peek: Option<(u32, Vec<u8>, usize, usize)>,
    /// Connections held back by the failed-ticket throttle: (slot,
    /// generation, not before). At most one per slot.
    held: Vec<(u32, u32, Instant)>,
    /// Accepted connections in accept order (slot, generation, source
    /// address), for the link-stage budget; entries that linked or closed
    /// are dropped lazily.
    link_stage: VecDeque<(u32, u32, Option<std::net::IpAddr>)>,
    /// Link-stage evictions since the last log line, and when it was.
    evicted_quiet: u64,
    evict_logged: Instant,
    /// Table-full rejections since the last log line, and when it was.
    rejected_quiet: u64,
    reject_logged: Instant,
    /// Accepts (TCP listeners, unix-listen endpoints, `connect`'s local
    /// sockets) that failed for want of file descriptors or memory: the
    /// pause before the next try and the rate-limited log line.
    accept_backoff: lifecycle::AcceptBackoff,
    /// Accepted connections waiting for a slot (service, TLS listener,
    /// source address).
    pending: VecDeque<(OwnedFd, usize, bool, Option<std::net::IpAddr>)>,
    started: Instant,
    /// Worker 0 logs totals every `stats_secs`: (when, c2e, e2c) last time.
    last_stats: (Instant, u64, u64),
    /// `connect` mode state.
    ctl: Option<Box<connect::ConnectCtl>>,
    /// Endpoints waited for behind live sessions.
    revive: Vec<revive::Revive>,
    /// Connections waiting for a data buffer (slot, generation), in order.
    buf_waiters: VecDeque<(u32, u32)>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Worker {
    /// Sets up worker `id`: ring, arena, listeners.
    pub fn new(id: usize, shared: Arc<Shared>, keys: Receiver<TicketKey>) -> anyhow::Result<Self> {
        let live = shared.live();
        let l = &live.config.limits;
        let max = l.max_conns_per_worker;
        let listeners_n: usize = live.config.services.iter().map(|s| s.listen.len() + s.tls_listen.len()).sum();
        // Pool sizes, written out. Buffers: `buffers_per_worker`, shared
        // (a connection holds one per direction only while data moves).
        // Ops: each connection has at most 6 in flight (client read or poll
        // + write, endpoint read or poll + write, endpoint connect/accept),
        // plus one cancel per op while closing or reclaiming → bounded by
        // 12; plus one accept per listener, the mailbox read and the tick
        // timer, and slack (listeners a reload adds:
        // `reload::MAX_ADDED_LISTENERS`). Op records are allocated as they
        // are first needed, so memory follows the peak in flight.
        let buffers = l.buffers_per_worker;
        let max_ops = max * 12 + listeners_n + reload::MAX_ADDED_LISTENERS + 16;
        let ring = Ring::new(RingConfig {
            entries: u32::try_from((max * 4).clamp(64, 4096)).unwrap_or(4096),
            buffers,
            buf_size: l.buffer_bytes,
            max_ops,
            defer_taskrun: true,
        })?;
        let mut listeners = Vec::new();
        for (si, s) in live.config.services.iter().enumerate() {
            for a in &s.listen {
                let fd = match shared.activated.get(&(si, *a)) {
                    Some(inherited) => inherited.try_clone()?,
                    None => bind_tcp(*a)?,
                };
                listeners.push(Some(Listener { fd, service: si, tls: false, addr: *a }));
            }
            for a in &s.tls_listen {
                listeners.push(Some(Listener { fd: bind_tcp(*a)?, service: si, tls: true, addr: *a }));
            }
        }
        let open_key = if reload::needs_open_key(&live.config) { Some(reload::open_key()?) } else { None };
        let link_cfg = reload::link_cfg(&live.config);
        Ok(Self {
            id,
            who: format!("w{id}"),
            shared,
            live,
            ring,
            slots: (0..max).map(|_| Slot { generation: 0, conn: None }).collect(),
            free: (0..u32::try_from(max).unwrap_or(0)).rev().collect(),
            listeners,
            keys,
            open_key,
            waiting_key: VecDeque::new(),
            link_cfg,
            rng: rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
                .unwrap_or_else(|_| rand::rngs::StdRng::seed_from_u64(std::process::id().into())),
            draining: None,
            link_scratch: Vec::new(),
            link_peek: None,
            stopping: None,
            held: Vec::new(),
            link_stage: VecDeque::new(),
            evicted_quiet: 0,
            rejected_quiet: 0,
            reject_logged: Instant::now().checked_sub(Duration::from_secs(2)).unwrap_or_else(Instant::now),
            accept_backoff: lifecycle::AcceptBackoff::new(),
            pending: VecDeque::new(),
            evict_logged: Instant::now().checked_sub(Duration::from_secs(2)).unwrap_or_else(Instant::now),
            started: Instant::now(),
            last_stats: (Instant::now(), 0, 0),
            ctl: None,
            revive: Vec::new(),
            buf_waiters: VecDeque::new(),
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.id]
    }

    /// Runs until shutdown has drained every connection.
    pub fn run(mut self) -> anyhow::Result<()> {
        for i in 0..self.listeners.len() {
            let Some(fd) = self.listeners[i].as_ref().map(|l| l.fd.as_raw_fd()) else { continue };
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
            if !self.buf_waiters.is_empty() {
                self.wake_buf_waiters();
            }
            if !self.pending.is_empty() {
                self.admit_pending();
            }
            if (self.draining.is_some() || self.stopping.is_some()) && self.free.len() == self.slots.len() {
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
            Op::AcceptRetry => self.arm_accept(slot as usize),
            Op::Mailbox => self.on_mailbox(),
            Op::Tick => self.on_tick(),
            Op::Retry => self.on_retry(),
            Op::LocalAccept => self.on_local_accept(slot as usize, c.result, c.fd),
            Op::LocalAcceptRetry => self.on_local_accept_retry(slot as usize),
            Op::Linger => self.on_linger(),
            _ => self.on_conn_op(op, slot, generation, c),
        }
    }
}

fn errno_reason(what: &str, res: i32) -> String {
    format!("{what}: {}", std::io::Error::from_raw_os_error(-res))
}

fn kind_name(t: u8) -> String {
    ChannelKind::of(t).map_or_else(|| t.to_string(), |k| k.to_string())
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
