//! Connections: the per-slot state (`Conn`, its stage, a channel's
//! `Chan`), the slot table, op accounting and the close path (cancel every
//! op, free the slot once their completions are reaped).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EpState {
    Connecting,
    Accepting,
    Open,
    /// `connect`: the local app left; the SPICE channel lingers (see
    /// `Chan::app_left`) and what the server sends is dropped.
    Gone,
}

/// What the current client message's body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cur {
    None,
    Data,
    Control,
    Compressed,
}

#[derive(Debug)]
pub(super) struct Chan {
    pub(super) conf: usize,
    pub(super) kind: ChannelKind,
    pub(super) ep: Option<OwnedFd>,
    pub(super) ep_state: EpState,
    /// Pending gathered write of `rx` payload ranges to the endpoint.
    pub(super) ranges: Vec<(usize, usize)>,
    /// Compressed body being collected (bounded by `max_lz4_bytes`).
    pub(super) lz4_in: Vec<u8>,
    /// Decompression output; `None` while the ring holds it for a write.
    pub(super) lz4_out: Option<Vec<u8>>,
    /// A write of `lz4_out` is pending (possibly partially done).
    pub(super) lz4_pending: Option<usize>,
    pub(super) eof_client: bool,
    /// Payload sizes of the chunks in flight in `tx`.
    pub(super) e2c_chunk: usize,
    /// `connect` only: linked to learn the port's name from PORT_INIT.
    pub(super) probe: bool,
    /// Compress payloads over 1000 bytes toward the SPICE peer (it
    /// announced LZ4 and we were asked to).
    pub(super) lz4_send: Option<Box<Lz4Compressor>>,
    /// Framed output when compressing; `None` while the ring holds it.
    pub(super) lz4_tx: Option<Vec<u8>>,
    /// Server-side ACK window toward a client (`ack_window` > 0).
    pub(super) ack: ServerAck,
    /// Splice data path: the pipe (read end, write end), made on first use.
    pub(super) pipe: Option<(OwnedFd, OwnedFd)>,
    /// Bytes spliced into the pipe and not yet out to the endpoint.
    pub(super) piped: u32,
    /// Which splice a POLL wakes up: true = into the pipe (socket readable).
    pub(super) poll_in: bool,
    /// No pipe could be made for splice (out of descriptors): this
    /// channel copies.
    pub(super) splice_off: bool,
    /// Payload bytes dropped because no local app was there to take them.
    pub(super) dropped: u64,
    /// `connect`: when the local app left. From then on server bytes are
    /// dropped (counted), and the SPICE channel is closed only once the
    /// server has been quiet for the linger time: spice-server 0.15.1
    /// crashes QEMU when a channel closes while the device still has input
    /// of ours to consume.
    pub(super) app_left: Option<Instant>,
    /// `connect`: the local app half-closed (sent EOF) and may still wait
    /// for replies; the linger tick watches for its hang-up.
    pub(super) app_eof: bool,
}

impl Chan {
    /// The endpoint (or `connect`'s local app) is gone while the SPICE
    /// channel stays: payload not yet written to it is dropped (counted),
    /// the socket is shut down so any op still on it completes, and what
    /// the peer sends from now on is dropped until an endpoint is back.
    pub(super) fn drop_endpoint(&mut self) {
        let pending: usize = self.ranges.iter().map(|r| r.1).sum();
        self.dropped += pending as u64 + u64::from(self.piped);
        self.ranges.clear();
        // Bytes still in the splice pipe were for this endpoint.
        self.piped = 0;
        self.pipe = None;
        if let Some(fd) = self.ep.take() {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        self.ep_state = EpState::Gone;
        self.app_left = Some(Instant::now());
        self.app_eof = false;
    }

    /// A channel's data-stage state, endpoint not open yet.
    pub(super) fn new(conf: usize, kind: ChannelKind, probe: bool, lz4_send: bool) -> Self {
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
            splice_off: false,
            dropped: 0,
            app_left: None,
            app_eof: false,
        }
    }
}

#[derive(Debug)]
pub(super) enum Stage {
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
    /// Whole-VM proxy: our link to the upstream server for the client
    /// connection `client` (slot, generation).
    ULink {
        link: Box<ClientLink>,
        client: (u32, u32),
        /// The client's ticket, once it came (main: kept for the session).
        ticket: Option<Vec<u8>>,
        /// Cached-caps order: the client got its reply from these cached
        /// caps; our link message waits (`hold`) until its ticket came, so
        /// an unauthenticated client costs QEMU a bare connect, no RSA key.
        cached: Option<Caps>,
        hold: bool,
        /// The ticket to send once QEMU's reply comes.
        password: Option<Vec<u8>>,
    },
    /// Whole-VM proxy data stage: bytes copied to the paired connection
    /// (`Conn::pair`) unparsed, except upstream → client on main.
    Pipe(Box<Pipe>),
}

/// A proxied connection's data stage.
#[derive(Debug)]
pub(super) struct Pipe {
    /// Upstream main only: rewrites CHANNELS_LIST, reads MAIN_INIT.
    pub(super) filter: Option<Box<crate::proto::main_filter::MainFilter>>,
    /// Filtered output; `None` while the ring holds it.
    pub(super) out: Option<Vec<u8>>,
    /// Upstream main only: the ticket QEMU accepted, for the session entry.
    pub(super) ticket: Option<Vec<u8>>,
    /// Upstream main only: the session registered from its MAIN_INIT.
    pub(super) session: Option<u32>,
    /// This side faces the client (its bytes go upstream).
    pub(super) client_side: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConnStats {
    pub(super) c2e_bytes: u64,
    pub(super) c2e_msgs: u64,
    pub(super) e2c_bytes: u64,
    pub(super) e2c_msgs: u64,
}

#[derive(Debug)]
pub(super) struct Conn {
    /// The client's (or upstream's) socket. Shared, not duplicated: the
    /// registry's hang-up watch and a proxy pair hold clones, so a link
    /// costs one descriptor, and the number cannot be reused while any
    /// clone lives (the socket closes with the last one).
    pub(super) fd: Arc<OwnedFd>,
    /// Whole-VM proxy: the paired connection (slot, generation) and a
    /// clone of its socket, so that our writes can never reach a reused
    /// descriptor number.
    pub(super) pair: Option<(u32, u32)>,
    pub(super) pair_fd: Option<Arc<OwnedFd>>,
    pub(super) peer: String,
    pub(super) service: usize,
    pub(super) since: Instant,
    /// Client → endpoint bytes; held only while an op uses it or it holds
    /// bytes not yet consumed (see [`Lend`]).
    pub(super) rx: Option<BufId>,
    /// Endpoint → client bytes (and link output, control messages); held
    /// likewise.
    pub(super) tx: Option<BufId>,
    /// How reads are posted on each side.
    pub(super) lend: Lend,
    pub(super) inflight: u32,
    pub(super) closing: Option<String>,
    pub(super) close_after_flush: Option<String>,
    /// A channel whose session ended while bytes it read from the client
    /// were still on their way to the endpoint: it reads no more and closes
    /// (with this reason) once they are written, or when the flush bound
    /// passes (`Worker::close_flushing`).
    pub(super) flush_close: Option<(String, Instant)>,
    /// A client read or an endpoint write of `rx` (or of lz4 output) is in flight.
    pub(super) c2e_busy: bool,
    /// An endpoint read into `tx` or a client write from `tx` is in flight.
    pub(super) tx_busy: bool,
    pub(super) tx_len: usize,
    pub(super) tx_done: usize,
    /// `tx` holds link bytes (not SPICE-framed); under TLS they go out
    /// alone, never in one write with framed messages.
    pub(super) tx_raw: bool,
    pub(super) rx_len: usize,
    pub(super) rx_pos: usize,
    pub(super) ctl_q: VecDeque<(u16, Vec<u8>)>,
    pub(super) enc: Encoder,
    pub(super) deframer: Deframer,
    pub(super) ctl: ControlBuf<256>,
    pub(super) cur: Cur,
    pub(super) session: u32,
    pub(super) label: String,
    pub(super) owns: Option<usize>,
    pub(super) stage: Stage,
    pub(super) st: ConnStats,
    /// The part of `st` already folded into the shared counters.
    pub(super) published: ConnStats,
    /// The link was refused as busy (for the links counter's `result`).
    pub(super) busy_refused: bool,
    /// We are the SPICE client on this socket (`connect`).
    pub(super) client_role: bool,
    /// `(type, id)` this connection links (`connect`).
    pub(super) chan: (u8, u8),
    /// Client-side ACK window accounting (`connect`).
    pub(super) ack: ClientAck,
    /// When the last bytes came from the peer socket.
    pub(super) last_rx: Instant,
    /// TLS between the socket and the SPICE code (a TLS listener, or
    /// `connect` to a TLS port).
    pub(super) tls: Option<Box<super::tls::TlsConn>>,
}

/// Buffers belong to traffic, not to connections. A side whose data
/// flowed lately posts its read with a buffer (the fast path: no extra
/// round trip per message); a side that is new, in the link stage, or idle
/// for `idle_buffer_secs` posts a POLL instead and takes a buffer only once
/// the socket is readable. The tick demotes an idle side by cancelling its
/// posted read, which gives the buffer back. A connection that finds the
/// worker's pool empty waits in a queue and is woken when one comes back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lend {
    /// Client socket: post reads with a buffer.
    pub(super) rx_hot: bool,
    /// Client socket: a POLL said readable; the next read needs no POLL.
    pub(super) rx_ready: bool,
    /// A ClientRead (with `rx`) is in flight.
    pub(super) rx_reading: bool,
    /// The tick cancelled that read to take `rx` back.
    pub(super) rx_demote: bool,
    /// A POLL on the client socket is in flight.
    pub(super) rx_polling: bool,
    /// Endpoint: post reads with a buffer.
    pub(super) tx_hot: bool,
    /// Endpoint: a POLL said readable.
    pub(super) tx_ready: bool,
    /// An EpRead (into `tx`) is in flight.
    pub(super) ep_reading: bool,
    /// The tick cancelled that read to take `tx` back.
    pub(super) tx_demote: bool,
    /// A POLL on the endpoint is in flight.
    pub(super) ep_polling: bool,
    /// When the endpoint last gave bytes.
    pub(super) last_ep: Instant,
    /// Ring ids of the posted client read and endpoint read or poll.
    pub(super) rx_op: u64,
    pub(super) ep_op: u64,
    /// Queued for a buffer (`Worker::buf_waiters`).
    pub(super) waiting: bool,
}

impl Lend {
    fn new() -> Self {
        Self {
            rx_hot: false,
            rx_ready: false,
            rx_reading: false,
            rx_demote: false,
            rx_polling: false,
            tx_hot: false,
            tx_ready: false,
            ep_reading: false,
            tx_demote: false,
            ep_polling: false,
            last_ep: Instant::now(),
            rx_op: 0,
            ep_op: 0,
            waiting: false,
        }
    }
}

/// Smallest DATA body remainder worth splicing (below it, one read is cheaper).
pub(super) const SPLICE_MIN_BYTES: u32 = 16 * 1024;
/// Pipe capacity asked for the splice path.
pub(super) const PIPE_BYTES: u32 = 1024 * 1024;

/// Most control messages queued toward one client (they are tiny; a
/// client that never reads is cut off rather than buffered without bound).
pub(super) const MAX_CTL_QUEUE: usize = 64;

/// Why a session's channels close when the session ends (its main
/// channel closed, or QEMU's did): such a close flushes first.
pub(super) const SESSION_CLOSED: &str = "session closed";

/// How long a channel whose session ended may take to write the bytes it
/// already read to its endpoint (`Worker::close_flushing`).
pub(super) const FLUSH_CLOSE_BOUND: Duration = Duration::from_secs(5);

pub(super) struct Slot {
    pub(super) generation: u32,
    pub(super) conn: Option<Box<Conn>>,
}

pub(super) struct Listener {
    pub(super) fd: OwnedFd,
    pub(super) service: usize,
    /// Connections accepted here speak TLS first.
    pub(super) tls: bool,
    /// The address it listens on.
    pub(super) addr: std::net::SocketAddr,
}

impl Worker {
    /// Puts a new connection in a free slot (no buffer yet: see [`Lend`]).
    pub(super) fn new_conn(
        &mut self,
        fd: OwnedFd,
        peer: String,
        service: usize,
        stage: Stage,
        client_role: bool,
    ) -> Option<u32> {
        let slot = self.free.pop()?;
        let conn = Conn {
            fd: Arc::new(fd),
            pair: None,
            pair_fd: None,
            peer,
            service,
            since: Instant::now(),
            rx: None,
            tx: None,
            lend: Lend::new(),
            inflight: 0,
            closing: None,
            close_after_flush: None,
            flush_close: None,
            c2e_busy: false,
            tx_busy: false,
            tx_len: 0,
            tx_done: 0,
            tx_raw: false,
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
            published: ConnStats::default(),
            busy_refused: false,
            client_role,
            chan: (0, 0),
            ack: ClientAck::new(),
            last_rx: Instant::now(),
            tls: None,
        };
        self.stats().conns_open.fetch_add(1, Ordering::Relaxed);
        self.slots[slot as usize].conn = Some(Box::new(conn));
        Some(slot)
    }

    /// Runs `f` with the slot's connection taken out of the table, then
    /// puts it back, or finishes its close once no op is in flight.
    pub(super) fn with_conn(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut Conn)) {
        let Some(mut conn) = self.slots.get_mut(slot as usize).and_then(|s| s.conn.take()) else { return };
        f(self, &mut conn);
        if conn.closing.is_some() && conn.inflight == 0 {
            self.finish_close(slot, conn);
        } else if let Some(s) = self.slots.get_mut(slot as usize) {
            s.conn = Some(conn);
        }
    }

    pub(super) fn on_conn_op(&mut self, op: Op, slot: u32, generation: u32, c: Completion) {
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
                Op::EpAcceptRetry => w.on_ep_accept_retry(slot, conn),
                Op::SrvConnect => w.on_srv_connect(slot, conn, c.result),
                Op::SplicePoll => w.on_splice_poll(slot, conn, c.result),
                Op::PipeWrite => w.proxy_on_write(slot, conn, c.result, c.owned),
                Op::TlsRead => w.on_tls_read(slot, conn, c.result, c.owned),
                Op::TlsWrite => w.on_tls_write(slot, conn, c.result, c.owned),
                Op::ClientPoll => w.on_client_poll(slot, conn, c.result),
                Op::EpPoll => w.on_ep_poll(slot, conn, c.result),
                _ => {}
            }
        });
    }

    /// Counts a pushed op, or closes the connection if the push failed.
    pub(super) fn pushed(&mut self, slot: u32, conn: &mut Conn, r: Result<(), SubmitError>) -> bool {
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

    pub(super) fn tok(&self, op: Op, slot: u32) -> u64 {
        token(op, slot, self.slots[slot as usize].generation)
    }

    /// Starts closing: cancels every op of the connection. The slot is
    /// freed by `finish_close` once their completions are reaped.
    pub(super) fn close(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
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
        // A proxied connection lives and dies with its pair.
        if let Some((ps, pg)) = conn.pair
            && self.slots.get(ps as usize).is_some_and(|x| x.generation == pg)
        {
            let why = format!("proxy peer closed: {reason}");
            self.with_conn(ps, |w, c| w.close(ps, c, &why));
        }
    }

    /// Closes a channel whose session ended, without losing what the relay
    /// already read from its client: while an endpoint write (or splice)
    /// of those bytes is in flight, or read bytes wait in `rx`, the channel
    /// reads no more from the client and closes once they are written
    /// (`take_flush_close`), at most [`FLUSH_CLOSE_BOUND`] later. Anything
    /// else closes at once.
    pub(super) fn close_flushing(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        if conn.closing.is_some() || conn.flush_close.is_some() {
            return;
        }
        let Stage::Chan(ch) = &conn.stage else { return self.close(slot, conn, reason) };
        let toward_endpoint =
            conn.c2e_busy && !conn.lend.rx_reading && !conn.lend.rx_polling && !self.tls_reading(conn);
        let waiting = conn.rx_pos < conn.rx_len || !ch.ranges.is_empty() || ch.lz4_pending.is_some() || ch.piped > 0;
        if conn.client_role || ch.ep_state != EpState::Open || !(toward_endpoint || waiting) {
            return self.close(slot, conn, reason);
        }
        conn.flush_close = Some((reason.to_string(), Instant::now()));
    }

    /// Where a flushing channel would read from its client again: every
    /// byte it read is written, so it closes now. Returns whether it did.
    pub(super) fn take_flush_close(&mut self, slot: u32, conn: &mut Conn) -> bool {
        let Some((reason, _)) = conn.flush_close.take() else { return false };
        self.close(slot, conn, &reason);
        true
    }

    pub(super) fn finish_close(&mut self, slot: u32, mut conn: Box<Conn>) {
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
            self.shared.tell(p, SESSION_CLOSED);
        }
        fold_counters(&self.live.metrics, &mut conn);
        let mut linked = false;
        let mut dropped = 0;
        if let Stage::Chan(ch) = &mut conn.stage {
            linked = true;
            dropped = ch.dropped;
            let keep = self.live.config.limits.keep_listen_endpoint
                && ch.ep_state == EpState::Open
                && reason == "client closed"
                && matches!(self.conf(service, ch.conf).map(|c| &c.endpoint), Some(EndpointSpec::UnixListen(_)));
            if keep && let (Some(fd), Ok(mut parked)) = (ch.ep.take(), self.shared.parked.lock()) {
                parked.insert((service, ch.conf), fd);
            }
        } else if matches!(conn.stage, Stage::Main { .. } | Stage::CMain) {
            linked = true;
        } else if let Stage::Pipe(p) = &conn.stage {
            linked = p.client_side;
            self.proxy_on_closed(&mut conn);
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
        for b in [conn.rx.take(), conn.tx.take()].into_iter().flatten() {
            arena.free(b);
        }
        drop(conn);
        self.stats().conns_open.fetch_sub(1, Ordering::Relaxed);
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
    }

    /// `rx`, taken from the pool if the connection holds none; `None` (and
    /// the connection queued for a buffer) when the pool is empty.
    pub(super) fn take_rx(&mut self, slot: u32, conn: &mut Conn) -> Option<BufId> {
        if conn.rx.is_none() {
            conn.rx = self.take_buf(slot, conn);
        }
        conn.rx
    }

    /// `tx`, likewise.
    pub(super) fn take_tx(&mut self, slot: u32, conn: &mut Conn) -> Option<BufId> {
        if conn.tx.is_none() {
            conn.tx = self.take_buf(slot, conn);
        }
        conn.tx
    }

    fn take_buf(&mut self, slot: u32, conn: &mut Conn) -> Option<BufId> {
        if let Some(b) = self.ring.alloc_buf() {
            return Some(b);
        }
        self.stats().buffer_waits.fetch_add(1, Ordering::Relaxed);
        if !conn.lend.waiting {
            conn.lend.waiting = true;
            let generation = self.slots[slot as usize].generation;
            self.buf_waiters.push_back((slot, generation));
        }
        None
    }

    /// Gives `rx` back when it holds nothing unconsumed and no op uses it.
    pub(super) fn put_rx(&mut self, conn: &mut Conn) {
        let idle = conn.rx_pos >= conn.rx_len
            && !conn.c2e_busy
            && match &conn.stage {
                Stage::Chan(ch) => ch.ranges.is_empty(),
                _ => true,
            };
        if idle && let Some(b) = conn.rx.take() {
            if self.ring.arena().is_lent(b) {
                conn.rx = Some(b);
                return;
            }
            conn.rx_len = 0;
            conn.rx_pos = 0;
            self.ring.arena_mut().free(b);
        }
    }

    /// Gives `tx` back when nothing waits in it and no op uses it.
    pub(super) fn put_tx(&mut self, conn: &mut Conn) {
        if conn.tx_busy || conn.tx_done < conn.tx_len {
            return;
        }
        if let Some(b) = conn.tx.take() {
            if self.ring.arena().is_lent(b) {
                conn.tx = Some(b);
                return;
            }
            self.ring.arena_mut().free(b);
        }
    }

    /// The tick: an idle side whose read holds a buffer gets that read
    /// cancelled; its completion gives the buffer back and posts a POLL.
    pub(super) fn reclaim_idle(&mut self, slot: u32, conn: &mut Conn, now: Instant, idle: Duration) {
        if conn.closing.is_some() || conn.tls.is_some() {
            return;
        }
        let cancel = token(Op::Cancel, slot, self.slots[slot as usize].generation);
        let l = &mut conn.lend;
        if l.rx_reading
            && !l.rx_demote
            && now.duration_since(conn.last_rx) >= idle
            && let Ok(true) = self.ring.cancel_op(l.rx_op, cancel)
        {
            l.rx_demote = true;
            l.rx_hot = false;
            conn.inflight += 1;
        }
        let l = &mut conn.lend;
        if l.ep_reading
            && !l.tx_demote
            && now.duration_since(l.last_ep) >= idle
            && let Ok(true) = self.ring.cancel_op(l.ep_op, cancel)
        {
            l.tx_demote = true;
            l.tx_hot = false;
            conn.inflight += 1;
        }
    }

    /// An endpoint POLL still posted on an endpoint that is gone is
    /// cancelled, so the next endpoint arms its own.
    pub(super) fn cancel_ep_poll(&mut self, slot: u32, conn: &mut Conn) {
        if !conn.lend.ep_polling {
            return;
        }
        conn.lend.ep_polling = false;
        let cancel = token(Op::Cancel, slot, self.slots[slot as usize].generation);
        if let Ok(true) = self.ring.cancel_op(conn.lend.ep_op, cancel) {
            conn.inflight += 1;
        }
    }

    /// Wakes connections that waited for a buffer, while buffers are free.
    pub(super) fn wake_buf_waiters(&mut self) {
        while self.ring.arena().free_count() > 0 {
            let Some((slot, generation)) = self.buf_waiters.pop_front() else { return };
            if self.slots.get(slot as usize).is_none_or(|s| s.generation != generation || s.conn.is_none()) {
                continue;
            }
            self.with_conn(slot, |w, conn| {
                conn.lend.waiting = false;
                if conn.closing.is_some() {
                    return;
                }
                w.pump_out(slot, conn);
                w.pump_in(slot, conn);
            });
        }
    }

    pub(super) fn service_name(&self, service: usize) -> &str {
        self.live.config.services.get(service).map_or("?", |s| s.name.as_str())
    }

    pub(super) fn conf(&self, service: usize, ci: usize) -> Option<&ChannelConf> {
        self.live.config.services.get(service)?.channels.get(ci)
    }
}

/// The counter set a connection counts in (`None` before its link).
pub(super) fn which_of(conn: &Conn) -> Option<Which> {
    match &conn.stage {
        Stage::Chan(ch) => Some(Which::Channel(ch.conf)),
        Stage::Main { .. } | Stage::CMain => Some(Which::Main),
        Stage::Pipe(_) if conn.chan.0 == CH_MAIN => Some(Which::Main),
        Stage::Pipe(_) => Some(Which::Proxy),
        _ => None,
    }
}

/// The `stage` label of a connection.
pub(super) fn stage_kind(conn: &Conn) -> StageKind {
    match &conn.stage {
        Stage::WaitKey | Stage::Link { .. } | Stage::CLink { .. } => StageKind::Link,
        Stage::ULink { .. } => StageKind::Upstream,
        Stage::Main { .. } | Stage::CMain => StageKind::Main,
        Stage::Chan(_) => StageKind::Channel,
        Stage::Pipe(p) if p.client_side => StageKind::Proxy,
        Stage::Pipe(_) => StageKind::Upstream,
    }
}

/// Adds what `conn.st` gained since the last fold to the shared counters
/// (at the tick and at close: the data path itself never touches them).
pub(super) fn fold_counters(metrics: &crate::relay::metrics::Counters, conn: &mut Conn) {
    let (now, was) = (conn.st, conn.published);
    if now == was {
        return;
    }
    conn.published = now;
    let Some(c) = which_of(conn).and_then(|w| metrics.get(conn.service, w)) else { return };
    for (a, n) in [
        (&c.c2e_bytes, now.c2e_bytes.saturating_sub(was.c2e_bytes)),
        (&c.c2e_msgs, now.c2e_msgs.saturating_sub(was.c2e_msgs)),
        (&c.e2c_bytes, now.e2c_bytes.saturating_sub(was.e2c_bytes)),
        (&c.e2c_msgs, now.e2c_msgs.saturating_sub(was.e2c_msgs)),
    ] {
        if n > 0 {
            a.fetch_add(n, Ordering::Relaxed);
        }
    }
}
