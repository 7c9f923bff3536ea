//! A worker's life around its connections: listeners and accepts, the
//! key queue, the mailbox, drain on shutdown, the 1 s tick (link
//! timeouts, stats, endpoints waited for).

use super::*;

/// Accepted connections that may wait for a slot per worker.
const PENDING_ACCEPTS: usize = 1024;

/// The first and the longest pause of an accept when the process is out
/// of file descriptors.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(50);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Back-off of every accept a worker makes (TCP listeners, `unix-listen`
/// endpoints, `connect`'s local sockets) when it fails for want of file
/// descriptors or kernel memory. The connection stays in the listen
/// backlog: re-arming at once would fail again at once, a busy loop. The
/// shortage is the process's, not one socket's, so one pause serves them
/// all: 50 ms, doubling to 1 s, back to 50 ms on the next accepted
/// connection; one log line a minute with the count since.
pub(super) struct AcceptBackoff {
    pause: Duration,
    quiet: u64,
    logged: Option<Instant>,
}

impl AcceptBackoff {
    pub(super) fn new() -> Self {
        Self { pause: ACCEPT_PAUSE_MIN, quiet: 0, logged: None }
    }

    /// Whether an accept's result is a shortage to wait out (rather than
    /// a reason to re-arm at once or to give up).
    pub(super) fn starved(res: i32) -> bool {
        res < 0 && matches!(-res, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    }

    /// An accept succeeded.
    pub(super) fn reset(&mut self) {
        self.pause = ACCEPT_PAUSE_MIN;
    }

    /// An accept starved: the pause to wait now (the next one doubles),
    /// and whether to log (with the failures since the last line).
    fn fail(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self.pause;
        self.pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
        self.quiet += 1;
        if self.logged.is_some_and(|t| now.duration_since(t) < Duration::from_secs(60)) {
            return (pause, None);
        }
        self.logged = Some(now);
        let n = std::mem::take(&mut self.quiet);
        (pause, Some(n))
    }
}

/// Free buffers a worker keeps registered (and their pages) between bursts.
const BUFFERS_KEPT: usize = 8;

impl Worker {
    pub(super) fn on_accept(&mut self, li: usize, c: Completion) {
        // Out of file descriptors (or kernel memory): pause this
        // listener's accepts (see `AcceptBackoff`).
        let starved = AcceptBackoff::starved(c.result);
        let pause = if starved {
            let addr = self.listeners.get(li).and_then(Option::as_ref).map(|l| l.addr.to_string()).unwrap_or_default();
            Some(self.accept_starved(&addr, c.result))
        } else {
            None
        };
        if !c.more && self.draining.is_none() {
            if let Some(pause) = pause {
                let t = token(Op::AcceptRetry, u32::try_from(li).unwrap_or(0), 0);
                if let Err(e) = self.ring.timeout(pause, t) {
                    warn!(self.who, "cannot pause accept: {e}");
                }
            } else {
                self.arm_accept(li);
            }
        }
        if c.result < 0 {
            if !starved && c.result != -libc::ECANCELED {
                warn!(self.who, "accept failed: {}", std::io::Error::from_raw_os_error(-c.result));
            }
            return;
        }
        self.accept_backoff.reset();
        let Some(fd) = c.fd else { return };
        let Some((service, tls)) = self.listeners.get(li).and_then(Option::as_ref).map(|l| (l.service, l.tls)) else {
            return;
        };
        if self.draining.is_some() || self.stopping.is_some() {
            return;
        }
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::KeepAlive, &true);
        self.admit(fd, service, tls);
    }

    /// Arms listener `li`'s multishot accept (unless it is gone or the
    /// worker drains).
    pub(super) fn arm_accept(&mut self, li: usize) {
        if self.draining.is_some() || self.stopping.is_some() {
            return;
        }
        let Some(l) = self.listeners.get(li).and_then(Option::as_ref) else { return };
        let fd = l.fd.as_raw_fd();
        if let Err(e) = self.ring.accept_multi(fd, token(Op::Accept, u32::try_from(li).unwrap_or(0), 0)) {
            warn!(self.who, "cannot re-arm accept: {e}");
        }
    }

    /// An accept on `listen` (a TCP address or an endpoint) failed for
    /// want of file descriptors or memory: counted, logged once a minute;
    /// returns how long that accept pauses.
    pub(super) fn accept_starved(&mut self, listen: &str, res: i32) -> Duration {
        self.stats().accepts_starved.fetch_add(1, Ordering::Relaxed);
        let (pause, log) = self.accept_backoff.fail(Instant::now());
        if let Some(failures) = log {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(0, |l| l.0);
            warn!(
                self.who,
                "accept paused listen={listen} reason=\"{}\" pause_ms={} failures={failures} fd_limit={limit}: \
                 connections wait in the listen backlog; raise LimitNOFILE= (or ulimit -n) or lower --max-conns \
                 (one line a minute)",
                std::io::Error::from_raw_os_error(-res),
                pause.as_millis(),
            );
        }
        pause
    }

    /// Slots freed since the last batch take the connections that waited
    /// for one (oldest first).
    pub(super) fn admit_pending(&mut self) {
        while !self.free.is_empty() {
            let Some((fd, service, tls, _)) = self.pending.pop_front() else { return };
            if self.draining.is_some() || self.stopping.is_some() {
                self.pending.clear();
                return;
            }
            self.admit(fd, service, tls);
        }
    }

    /// A new connection takes a slot, or waits for one: link-stage
    /// connections closed to make room free their slots only once their
    /// cancelled ops complete, which a burst of accepts in one batch
    /// outruns. The wait queue is bounded; when it is full the oldest
    /// waiting connection of the address with the most waiting is turned
    /// away.
    fn admit(&mut self, fd: OwnedFd, service: usize, tls: bool) {
        let peer = endpoint::peer_of(&fd);
        let ip = shared::throttle_key(&peer);
        self.make_link_room(ip);
        if self.free.is_empty() {
            if self.pending.len() >= PENDING_ACCEPTS {
                // The oldest waiting connection of the address with the most waiting.
                let mut counts: HashMap<Option<std::net::IpAddr>, usize> = HashMap::new();
                for e in &self.pending {
                    *counts.entry(e.3).or_default() += 1;
                }
                let heavy = counts.into_iter().max_by_key(|&(_, n)| n).map(|(a, _)| a);
                let i = heavy.and_then(|a| self.pending.iter().position(|e| e.3 == a)).unwrap_or(0);
                if let Some((old, s, _, _)) = self.pending.remove(i) {
                    self.table_full(s, &endpoint::peer_of(&old));
                }
            }
            self.pending.push_back((fd, service, tls, ip));
            return;
        }
        let Some(slot) = self.new_conn(fd, peer.clone(), service, Stage::WaitKey, false) else {
            self.table_full(service, &peer);
            return;
        };
        if tls {
            let Some(t) = self.tls_accepted(service, &peer) else {
                self.live.metrics.reject(service, Reject::Tls);
                self.with_conn(slot, |w, conn| w.close(slot, conn, "no TLS session"));
                return;
            };
            if let Some(c) = self.slots[slot as usize].conn.as_mut() {
                c.tls = Some(t);
            }
        }
        let generation = self.slots[slot as usize].generation;
        self.link_stage.push_back((slot, generation, ip));
        // The failed-ticket throttle: an address that guessed wrong too
        // often waits before its link even starts (no key spent on it).
        if let Some(ip) = shared::throttle_key(&peer) {
            let mut t = self.shared.throttle();
            if let shared::Gate::Wait(until) = t.gate(ip, Instant::now(), &self.live.config.limits) {
                t.held(ip);
                drop(t);
                self.stats().links_throttled.fetch_add(1, Ordering::Relaxed);
                self.live.metrics.reject(service, Reject::Throttled);
                debug!(
                    self.who,
                    "throttle peer={peer} held for {} ms",
                    until.saturating_duration_since(Instant::now()).as_millis()
                );
                self.held.push((slot, generation, until));
                return;
            }
        }
        self.start_link(slot, generation);
    }

    /// Turns a connection away: the table is full of linked connections.
    /// Logged once per second at most, with the count since.
    fn table_full(&mut self, service: usize, peer: &str) {
        self.stats().conns_rejected.fetch_add(1, Ordering::Relaxed);
        self.live.metrics.reject(service, Reject::TableFull);
        self.rejected_quiet += 1;
        let now = Instant::now();
        if now.duration_since(self.reject_logged) >= Duration::from_secs(1) {
            warn!(
                self.who,
                "reject peer={peer} reason=\"connection table full ({} per worker; raise --max-conns)\" rejected={} \
                 (one line per second)",
                self.slots.len(),
                self.rejected_quiet
            );
            self.reject_logged = now;
            self.rejected_quiet = 0;
        }
    }

    /// Whether `(slot, generation)` is an accepted connection that has not
    /// linked yet.
    fn in_link_stage(&self, slot: u32, generation: u32) -> bool {
        self.slots.get(slot as usize).filter(|s| s.generation == generation).and_then(|s| s.conn.as_ref()).is_some_and(
            |c| c.closing.is_none() && !c.client_role && matches!(c.stage, Stage::WaitKey | Stage::Link { .. }),
        )
    }

    /// The link-stage budget, before a new connection takes a slot: over
    /// the per-address cap that address's oldest link-stage connection
    /// closes; with the link-stage table full, or the slot table down to
    /// its reserve, the oldest of the address holding the most link-stage
    /// connections closes. The newest always gets in,
    /// so a flood of half-open connections cannot keep a fresh client out.
    fn make_link_room(&mut self, ip: Option<std::net::IpAddr>) {
        let mut stage = std::mem::take(&mut self.link_stage);
        stage.retain(|&(s, g, _)| self.in_link_stage(s, g));
        let l = &self.live.config.limits;
        let per_addr = ip.map_or(0, |ip| stage.iter().filter(|e| e.2 == Some(ip)).count());
        let reserve = (self.slots.len() / 32).max(1);
        let victim = if ip.is_some() && per_addr >= l.max_link_stage_per_addr {
            stage.iter().position(|e| e.2 == ip).map(|i| (i, "per-address link-stage cap (--max-link-stage-per-addr)"))
        } else if stage.len() >= l.max_link_stage || self.free.len() <= reserve {
            // The oldest of the address holding the most link-stage
            // connections: a flood pays for itself, a lone client is spared.
            let mut counts: HashMap<Option<std::net::IpAddr>, usize> = HashMap::new();
            for e in &stage {
                *counts.entry(e.2).or_default() += 1;
            }
            let heavy = counts.into_iter().max_by_key(|&(_, n)| n).map(|(a, _)| a);
            heavy.and_then(|a| stage.iter().position(|e| e.2 == a)).map(|i| (i, "link stage full (--max-link-stage)"))
        } else {
            None
        };
        let victim = victim.and_then(|(i, why)| stage.remove(i).map(|v| (v, why)));
        self.link_stage = stage;
        let Some(((slot, _, vip), why)) = victim else { return };
        self.stats().links_evicted.fetch_add(1, Ordering::Relaxed);
        let service = self.slots[slot as usize].conn.as_ref().map_or(0, |c| c.service);
        self.live.metrics.reject(service, Reject::LinkStageFull);
        // One line per second at most, with the count since the last one.
        self.evicted_quiet += 1;
        let now = Instant::now();
        if now.duration_since(self.evict_logged) >= Duration::from_secs(1) {
            let addr = vip.map_or_else(|| "?".to_string(), |a| a.to_string());
            warn!(
                self.who,
                "throttle evict addr={addr} reason=\"{why}\" evicted={} (oldest link-stage connections closed to \
                 make room for new ones; one line per second)",
                self.evicted_quiet
            );
            self.evict_logged = now;
            self.evicted_quiet = 0;
        }
        self.with_conn(slot, |w, conn| w.close(slot, conn, why));
    }

    /// Held connections whose time came start their link (one per address
    /// per delay: the gate is asked again).
    pub(super) fn release_held(&mut self, now: Instant) {
        let mut held = std::mem::take(&mut self.held);
        let mut go = Vec::new();
        held.retain_mut(|(slot, generation, until)| {
            let Some(conn) =
                self.slots.get(*slot as usize).filter(|s| s.generation == *generation).and_then(|s| s.conn.as_ref())
            else {
                return false;
            };
            if conn.closing.is_some() {
                return false;
            }
            if now < *until {
                return true;
            }
            let gate = shared::throttle_key(&conn.peer)
                .map_or(shared::Gate::Go, |ip| self.shared.throttle().gate(ip, now, &self.live.config.limits));
            match gate {
                shared::Gate::Go => {
                    go.push((*slot, *generation));
                    false
                }
                shared::Gate::Wait(t) => {
                    *until = t;
                    true
                }
            }
        });
        self.held = held;
        for (slot, generation) in go {
            self.start_link(slot, generation);
        }
        self.serve_key_waiters();
    }

    /// Starts the link of a new connection: at once for a service without
    /// ticketing (the worker's one open key), else when a fresh key is
    /// ready (FIFO).
    pub(super) fn start_link(&mut self, slot: u32, generation: u32) {
        let open = self.slots[slot as usize]
            .conn
            .as_ref()
            .map(|c| &self.live.config.services[c.service])
            .is_some_and(super::super::config::Service::open_links);
        match self.open_key.as_ref().filter(|_| open).map(TicketKey::share) {
            Some(key) => self.link_with(slot, key),
            None => {
                self.waiting_key.push_back((slot, generation));
                self.serve_key_waiters();
            }
        }
    }

    fn link_with(&mut self, slot: u32, key: TicketKey) {
        self.with_conn(slot, |w, conn| {
            let link = ServerLink::new(&w.link_cfg[conn.service], key);
            conn.stage = Stage::Link { link: Box::new(link), req: None, conf: None, ep: None };
            w.pump_in(slot, conn);
        });
    }

    pub(super) fn serve_key_waiters(&mut self) {
        while let Some(&(slot, generation)) = self.waiting_key.front() {
            let live = self.slots.get(slot as usize).is_some_and(|s| s.generation == generation && s.conn.is_some());
            if !live {
                self.waiting_key.pop_front();
                continue;
            }
            let Ok(key) = self.keys.try_recv() else { return };
            self.shared.mailboxes[self.id].keys_ready.fetch_sub(1, Ordering::Relaxed);
            self.waiting_key.pop_front();
            self.link_with(slot, key);
        }
    }

    pub(super) fn on_mailbox(&mut self) {
        self.pick_up_live();
        let mfd = self.shared.mailboxes[self.id].fd.as_raw_fd();
        let cmds: Vec<Cmd> = match self.shared.mailboxes[self.id].cmds.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => Vec::new(),
        };
        for cmd in cmds {
            match cmd {
                Cmd::Close { slot, generation, reason } => {
                    if self.slots.get(slot as usize).is_some_and(|s| s.generation == generation) {
                        if reason == SESSION_CLOSED {
                            self.with_conn(slot, |w, conn| w.close_flushing(slot, conn, reason));
                        } else {
                            self.with_conn(slot, |w, conn| w.close(slot, conn, reason));
                        }
                    }
                }
                Cmd::Announce { slot, generation, channel } => self.on_announce(slot, generation, channel),
            }
        }
        self.serve_key_waiters();
        if self.shared.shutdown.load(Ordering::SeqCst) && self.draining.is_none() && self.stopping.is_none() {
            if self.ctl.is_some() || self.live.config.limits.drain_secs == 0 {
                self.start_drain();
            } else {
                self.start_stop();
            }
        }
        if let Err(e) = self.ring.read_counter(mfd, token(Op::Mailbox, 0, 0)) {
            warn!(self.who, "cannot re-arm mailbox: {e}");
        }
    }

    /// SIGTERM/SIGINT in `serve`: stop accepting (the listeners close, so a
    /// new connection is refused), end link stages and mains without
    /// channels, keep serving linked channels until they end; the tick
    /// moves on to `start_drain` (flush, close) when `drain_secs` is near.
    pub(super) fn start_stop(&mut self) {
        self.stopping = Some(Instant::now());
        info!(
            self.who,
            "stopping: no new connections; serving linked channels until they end, {} s at most (--drain-secs)",
            self.live.config.limits.drain_secs
        );
        let _ =
            self.ring.cancel_where(|t| decode(t).is_some_and(|d| d.0 == Op::Accept), token(Op::Cancel, 0xff_ffff, 0));
        // The ring keeps its own reference until the cancelled accepts complete.
        self.listeners.clear();
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            self.with_conn(slot, |w, conn| {
                if matches!(conn.stage, Stage::WaitKey | Stage::Link { .. } | Stage::ULink { .. }) {
                    w.close(slot, conn, "shutdown");
                }
            });
        }
        self.held.clear();
        self.close_idle_mains();
    }

    /// While stopping: a main channel whose session has no channel left
    /// closes (its client is done with this relay).
    fn close_idle_mains(&mut self) {
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            let Some(session) = self.slots[slot as usize].conn.as_ref().and_then(|c| match c.stage {
                Stage::Main { session } if c.closing.is_none() => Some(session),
                _ => None,
            }) else {
                continue;
            };
            let busy = self.shared.registry().channels.values().any(|o| o.session == session);
            if !busy {
                self.with_conn(slot, |w, conn| w.close(slot, conn, "shutdown"));
            }
        }
    }

    pub(super) fn start_drain(&mut self) {
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
                            s == slot
                                && g == generation
                                && matches!(
                                    op,
                                    Op::ClientRead
                                        | Op::TlsRead
                                        | Op::EpRead
                                        | Op::EpAccept
                                        | Op::EpAcceptRetry
                                        | Op::SplicePoll
                                )
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

    pub(super) fn maybe_drained(&mut self, slot: u32, conn: &mut Conn) {
        // `connect` closes its channels itself, once the server is quiet.
        if self.draining.is_some() && !conn.client_role && !conn.c2e_busy && !conn.tx_busy && conn.ctl_q.is_empty() {
            self.close(slot, conn, "shutdown");
        }
    }

    pub(super) fn on_tick(&mut self) {
        self.pick_up_live();
        self.stats().ticks.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let timeout = Duration::from_secs(self.live.config.limits.link_timeout_secs);
        let mut timed_out = (0u64, String::new());
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            let late = self.slots[slot as usize].conn.as_ref().is_some_and(|c| {
                matches!(c.stage, Stage::WaitKey | Stage::Link { .. } | Stage::CLink { .. } | Stage::ULink { .. })
                    && c.closing.is_none()
                    && now.duration_since(c.since) > timeout
            });
            let flush_over = self.slots[slot as usize]
                .conn
                .as_ref()
                .and_then(|c| c.flush_close.as_ref())
                .is_some_and(|(_, t)| now.duration_since(*t) > FLUSH_CLOSE_BOUND);
            if flush_over {
                self.with_conn(slot, |w, conn| {
                    if let Some((reason, _)) = conn.flush_close.take() {
                        warn!(
                            w.who,
                            "peer={} channel={} endpoint did not take the last bytes within {} s of its session's end: \
                             closing (unwritten bytes dropped)",
                            conn.peer,
                            conn.label,
                            FLUSH_CLOSE_BOUND.as_secs()
                        );
                        w.close(slot, conn, &reason);
                    }
                });
                continue;
            }
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
                        w.live.metrics.reject(conn.service, Reject::LinkTimeout);
                        if timed_out.0 == 0 {
                            timed_out.1.clone_from(&conn.peer);
                        }
                        timed_out.0 += 1;
                        w.close(slot, conn, "link timeout");
                    }
                });
            }
        }
        // Pinned buffer memory follows the buffers in use: a few stay
        // registered for the next burst, the rest go back to the kernel.
        self.ring.trim_buffers(BUFFERS_KEPT, 64);
        let idle = Duration::from_secs(self.live.config.limits.idle_buffer_secs);
        for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
            let reclaim = self.slots[slot as usize].conn.as_ref().is_some_and(|c| {
                (c.lend.rx_reading && now.duration_since(c.last_rx) >= idle)
                    || (c.lend.ep_reading && now.duration_since(c.lend.last_ep) >= idle)
            });
            if reclaim {
                self.with_conn(slot, |w, conn| w.reclaim_idle(slot, conn, now, idle));
            }
        }
        if timed_out.0 > 0 {
            // One line per tick: a flood of half-open connections is one
            // line per second, not one per connection.
            info!(
                self.who,
                "link timeout closed={} first_peer={} (connections that did not finish the link stage within {} s; \
                 --link-timeout-secs)",
                timed_out.0,
                timed_out.1,
                timeout.as_secs()
            );
        }
        if let Some(t) = self.stopping
            && self.draining.is_none()
        {
            // The last second of --drain-secs flushes what was accepted.
            let serve = Duration::from_secs(self.live.config.limits.drain_secs.saturating_sub(1));
            if now.duration_since(t) >= serve {
                self.start_drain();
            } else {
                self.close_idle_mains();
            }
        }
        self.release_held(now);
        let flush = if self.stopping.is_some() { Duration::from_millis(900) } else { Duration::from_secs(5) };
        if let Some(t) = self.draining
            && now.duration_since(t) > flush
        {
            for slot in 0..u32::try_from(self.slots.len()).unwrap_or(0) {
                self.with_conn(slot, |w, conn| w.close(slot, conn, "shutdown (drain timeout)"));
            }
        }
        self.log_stats(now);
        self.publish_counters(now);
        self.revive_tick();
        if let Err(e) = self.ring.timeout(Duration::from_secs(1), token(Op::Tick, 0, 0)) {
            warn!(self.who, "cannot re-arm tick: {e}");
        }
    }

    /// Folds every connection's counters into the shared ones and, with
    /// `--metrics`, publishes this worker's snapshot for the metrics thread.
    pub(super) fn publish_counters(&mut self, now: Instant) {
        let metrics = &self.live.metrics;
        for s in &mut self.slots {
            if let Some(conn) = s.conn.as_mut() {
                fold_counters(metrics, conn);
            }
        }
        if self.live.config.limits.metrics.is_none() {
            return;
        }
        let conns = self
            .slots
            .iter()
            .filter_map(|s| s.conn.as_deref())
            .filter(|c| c.closing.is_none())
            .map(|c| ConnInfo {
                service: c.service,
                stage: stage_kind(c),
                session: c.session,
                label: c.label.clone(),
                peer: c.peer.clone(),
                since: c.since,
                which: which_of(c),
                c2e_bytes: c.st.c2e_bytes,
                e2c_bytes: c.st.e2c_bytes,
            })
            .collect();
        let arena = self.ring.arena();
        let snap = WorkerSnapshot {
            conns,
            buffers_in_use: (arena.count() - arena.free_count()) as u64,
            buffers_total: arena.count() as u64,
            buffers_pinned: arena.registered_count() as u64,
            ops_inflight: self.ring.inflight() as u64,
            sq_full_events: self.ring.sq_full_events(),
            at: Some(now),
        };
        if let Some(m) = self.shared.snapshots.get(self.id) {
            *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = snap;
        }
    }

    /// Worker 0: one line of live totals across workers, when anything moved.
    pub(super) fn log_stats(&mut self, now: Instant) {
        let every = self.live.config.limits.stats_secs;
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
            "stats conns_open={} links_ok={} links_failed={} rejected={} protocol_errors={} auth_failures={} \
             links_throttled={} links_busy={} sessions_replaced={} links_evicted={} c2e_bytes={c2e} e2c_bytes={e2c} c2e_mib_s={:.1} \
             e2c_mib_s={:.1} uptime_s={}",
            sum(|s| &s.conns_open),
            sum(|s| &s.links_ok),
            sum(|s| &s.links_failed),
            sum(|s| &s.conns_rejected),
            sum(|s| &s.protocol_errors),
            sum(|s| &s.auth_failures),
            sum(|s| &s.links_throttled),
            sum(|s| &s.links_busy),
            sum(|s| &s.sessions_replaced),
            sum(|s| &s.links_evicted),
            mib(c2e - c2e0) / secs,
            mib(e2c - e2c0) / secs,
            self.started.elapsed().as_secs()
        );
    }
}

/// Binds a SO_REUSEPORT TCP listener (one per worker per address).
pub(super) fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<OwnedFd> {
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
