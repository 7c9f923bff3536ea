//! The server link stage: link message, ticket, the relay's decision
//! (session, channel, busy policy), opening the endpoint before the
//! result goes out, then the hand-over to the data stage (main or channel).

use super::lifecycle::AcceptBackoff;
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use super::*;

/// The worker's link-stage scratch buffer: a link header, the largest
/// link body the state machine accepts, and a ticket.
const LINK_SCRATCH_BYTES: usize = 8 * 1024;

impl Worker {
    /// Reads link-stage input without a registered buffer: the socket's
    /// bytes are peeked (`MSG_PEEK`) into the worker's one scratch buffer,
    /// the link takes what it wants, and exactly that much is consumed
    /// from the socket (in `pump_link`); whatever follows the link
    /// (data-stage bytes) stays in the socket for the data stage's own
    /// reads. A connection that has not linked thus never touches (or
    /// pins) a 256 KiB data buffer: a flood of half-open connections costs
    /// their link state only.
    pub(super) fn link_read(&mut self, slot: u32, conn: &mut Conn) {
        if let Some(p) = &self.link_peek {
            if p.0 == slot {
                // This link is consuming its peeked bytes (a nested call):
                // it reads again once they are taken from the socket.
                return;
            }
            // Another link holds the scratch buffer: wait on readiness,
            // which completes at once if bytes are there.
            conn.lend.rx_ready = false;
            return self.read_client(slot, conn);
        }
        let mut buf = std::mem::take(&mut self.link_scratch);
        buf.resize(LINK_SCRATCH_BYTES, 0);
        let fd = conn.fd.as_raw_fd();
        let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        let n = match nix::sys::socket::recv(fd, &mut buf, peek) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => {
                // Nothing after all: wait for readiness again.
                self.link_scratch = buf;
                conn.lend.rx_ready = false;
                return self.read_client(slot, conn);
            }
            Err(e) => {
                self.link_scratch = buf;
                return self.close(slot, conn, &errno_reason("client read", -(e as i32)));
            }
        };
        if n == 0 {
            self.link_scratch = buf;
            return self.close(slot, conn, "client closed");
        }
        conn.lend.rx_ready = false;
        conn.last_rx = Instant::now();
        self.link_peek = Some((slot, buf, 0, n));
        let more = self.pump_link(slot, conn);
        let Some((_, buf, used, _)) = self.link_peek.take() else { return };
        self.link_scratch = buf;
        if conn.closing.is_some() || !more {
            return;
        }
        if matches!(conn.stage, Stage::Link { .. }) {
            if used == 0 {
                // The link wants nothing now (it waits for its reply to go
                // out, or for the server side): it resumes through pump_in.
                return;
            }
            return self.read_client(slot, conn);
        }
        // Linked: the data stage reads the rest from the socket itself.
        self.pump_in(slot, conn);
    }

    /// Link stage: feeds the state machine, acts on its actions. Returns
    /// whether more client input is wanted now.
    pub(super) fn pump_link(&mut self, slot: u32, conn: &mut Conn) -> bool {
        loop {
            let Stage::Link { link, .. } = &mut conn.stage else { return true };
            if let Some((_, buf, pos, len)) = self.link_peek.as_mut().filter(|p| p.0 == slot) {
                // Peeked bytes (`link_read`): the link takes what it wants,
                // and that is consumed from the socket at once, before any
                // action can start a data-stage read.
                let used = link.handle_input(buf.get(*pos..*len).unwrap_or_default());
                if used > 0 {
                    let flags = MsgFlags::MSG_DONTWAIT;
                    match nix::sys::socket::recv(conn.fd.as_raw_fd(), &mut buf[*pos..*pos + used], flags) {
                        Ok(k) if k == used => *pos += used,
                        r => {
                            let why = format!("client read: {used} peeked bytes not there ({r:?})");
                            self.close(slot, conn, &why);
                            return false;
                        }
                    }
                }
            } else {
                let input = conn
                    .rx
                    .and_then(|b| self.ring.arena().get(b))
                    .and_then(|b| b.get(conn.rx_pos..conn.rx_len))
                    .unwrap_or_default();
                let used = link.handle_input(input);
                conn.rx_pos += used;
            }
            let Some(action) = link.poll_action() else {
                let done = link.is_done();
                self.pump_out(slot, conn);
                return !done;
            };
            match action {
                Action::Request(req) if self.live.config.services[conn.service].upstream.is_some() => {
                    self.proxy_on_request(slot, conn, req)
                }
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
                    self.on_ticket_verdict(conn, None);
                    self.on_linked(slot, conn, l);
                    return conn.closing.is_none();
                }
                Action::Close(f) => {
                    self.stats().links_failed.fetch_add(1, Ordering::Relaxed);
                    let result = if bad_ticket(Some(&f)) {
                        LinkResult::Auth
                    } else if conn.busy_refused {
                        LinkResult::Busy
                    } else {
                        LinkResult::Failed
                    };
                    let which = self.link_which(conn);
                    self.live.metrics.link(conn.service, which, result);
                    self.on_ticket_verdict(conn, Some(&f));
                    let svc = self.service_name(conn.service).to_string();
                    let what = match &conn.stage {
                        Stage::Link { req: Some(r), .. } => format!("{}:{}", kind_name(r.channel_type), r.channel_id),
                        _ => "?".into(),
                    };
                    info!(
                        self.who,
                        "link peer={} service={svc} channel={what} tls={} result=refused error=\"{f}\"{}",
                        conn.peer,
                        if conn.tls.is_some() { "yes" } else { "no" },
                        f.code().map_or(String::new(), |c| format!(" code={}", c.code()))
                    );
                    conn.close_after_flush = Some(format!("link refused: {f}"));
                    self.pump_out(slot, conn);
                    return false;
                }
            }
        }
    }

    pub(super) fn on_link_request(&mut self, conn: &mut Conn, req: LinkRequest) {
        let service = conn.service;
        let secure = conn.tls.is_some();
        let decision = if let Some(code) = self.live.config.services[service].security.check(req.channel_type, secure) {
            // As spice-server: before the channel lookup and any reply.
            Decision::Refuse(code)
        } else if req.channel_type == CH_MAIN {
            if req.connection_id != 0 {
                // spice-server would treat this as a migration target; we do not migrate.
                Decision::BadConnectionId
            } else if self.busy(service) == BusyPolicy::Refuse && self.live_session(service).is_some() {
                self.stats().links_busy.fetch_add(1, Ordering::Relaxed);
                conn.busy_refused = true;
                info!(
                    self.who,
                    "busy peer={} service={} channel=main:0 another session is linked and --busy refuse keeps it: \
                     refused with CHANNEL_NOT_AVAILABLE after the ticket",
                    conn.peer,
                    self.service_name(service)
                );
                Decision::FailAfterAuth(LinkErrorCode::ChannelNotAvailable)
            } else {
                Decision::Accept { channel_caps: Caps::EMPTY }
            }
        } else {
            let found = self.live.config.services[service]
                .live_channel(req.channel_type, req.channel_id)
                .or_else(|| {
                    let key = (req.connection_id, req.channel_type, req.channel_id);
                    self.shared.registry().aliases.get(&key).copied()
                })
                .filter(|&ci| ci < self.live.config.services[service].channels.len());
            match found {
                None => Decision::Unknown,
                Some(ci) => {
                    let reg = self.shared.registry();
                    let session_ok = reg.sessions.get(&req.connection_id).is_some_and(|s| s.service == service);
                    let claim = judge(&reg, service, ci, req.connection_id);
                    drop(reg);
                    if let Stage::Link { conf, .. } = &mut conn.stage {
                        *conf = Some(ci);
                    }
                    let refuse = match claim {
                        Claim::SameSession => true,
                        Claim::OtherSession(_) => self.busy(service) == BusyPolicy::Refuse,
                        Claim::Free | Claim::Stale(_) => false,
                    };
                    if !session_ok {
                        Decision::BadConnectionId
                    } else if refuse {
                        conn.busy_refused = true;
                        self.log_busy(conn, &req, claim);
                        Decision::FailAfterAuth(LinkErrorCode::ChannelNotAvailable)
                    } else {
                        let kind = self.live.config.services[service].channels[ci].kind;
                        let channel_caps = kind.channel_caps(true);
                        if self.live.config.services[service].upstream.is_some() {
                            // The ticket is judged against the session's (QEMU's) one.
                            Decision::Forward { channel_caps }
                        } else {
                            Decision::AcceptThenConfirm { channel_caps }
                        }
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
    pub(super) fn on_authenticated(&mut self, slot: u32, conn: &mut Conn, req: LinkRequest) {
        let service = conn.service;
        if conn.pair.is_some() {
            return self.proxy_on_authenticated(conn);
        }
        if self.live.config.services[service].upstream.is_some() {
            // One of our channels in a whole-VM session: the ticket must be
            // the one QEMU accepted on this session's main link.
            let ticket = match &mut conn.stage {
                Stage::Link { link, .. } => link.take_ticket(),
                _ => None,
            };
            let ok = {
                let reg = self.shared.registry();
                match (reg.sessions.get(&req.connection_id).and_then(|s| s.ticket.as_ref()), &ticket) {
                    (Some(want), Some(got)) => crate::proto::auth::constant_time_eq(want, got),
                    // No ticket known for the session (or none sent): never.
                    _ => false,
                }
            };
            if !ok {
                return self.confirm(conn, Err(LinkErrorCode::PermissionDenied));
            }
        }
        let Stage::Link { conf: Some(ci), .. } = conn.stage else {
            return self.confirm(conn, Err(LinkErrorCode::Error));
        };
        let place = Place { worker: self.id, slot, generation: self.slots[slot as usize].generation };
        // Claim the channel: a second link in the same session is refused
        // (the first keeps working); a link of a new session replaces the
        // old session as a whole (unless `--busy refuse`); a previous link
        // whose client already hung up counts as free.
        let policy = self.busy(service);
        let (claim, to_close) = {
            let mut reg = self.shared.registry();
            if reg.sessions.get(&req.connection_id).is_none_or(|s| s.service != service) {
                drop(reg);
                return self.confirm(conn, Err(LinkErrorCode::BadConnectionId));
            }
            let claim = judge(&reg, service, ci, req.connection_id);
            let to_close = match claim {
                Claim::SameSession => None,
                Claim::OtherSession(_) if policy == BusyPolicy::Refuse => None,
                Claim::OtherSession(old) => Some(reg.end_session(old)),
                Claim::Stale(p) => Some(vec![p]),
                Claim::Free => Some(Vec::new()),
            };
            if to_close.is_some() {
                let watch = Some(Arc::clone(&conn.fd));
                reg.channels.insert((service, ci), Owner { place, session: req.connection_id, watch });
            }
            (claim, to_close)
        };
        let Some(to_close) = to_close else {
            conn.busy_refused = true;
            self.log_busy(conn, &req, claim);
            return self.confirm(conn, Err(LinkErrorCode::ChannelNotAvailable));
        };
        conn.owns = Some(ci);
        conn.session = req.connection_id;
        let reason = match claim {
            Claim::OtherSession(old) => {
                self.stats().sessions_replaced.fetch_add(1, Ordering::Relaxed);
                info!(
                    self.who,
                    "session {old:#010x} replaced as a whole by session {:#010x} (peer={} linked {}); its {} \
                     connections close",
                    req.connection_id,
                    conn.peer,
                    kind_name(req.channel_type),
                    to_close.len()
                );
                "replaced by a new session"
            }
            _ => "replaced: its client had hung up",
        };
        for p in to_close {
            self.close_place(p, reason);
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
                self.revive_refused(conn, ci);
            }
        }
    }

    /// A channel refused because its endpoint is down: once the endpoint
    /// is back the session is told, as one that had the channel linked
    /// when it went away is (a fresh id on its main channel). Port
    /// channels are left out: spice-server's ports always link, and a
    /// port client reconnects by name.
    fn revive_refused(&mut self, conn: &Conn, ci: usize) {
        let port = self.conf(conn.service, ci).is_some_and(|c| c.kind.port_messages);
        if !port && conn.session != 0 {
            self.revive_add(conn.service, ci, conn.session, revive::Then::Announce);
        }
    }

    pub(super) fn set_link_ep(&mut self, conn: &mut Conn, fd: OwnedFd, state: EpState) {
        if let Stage::Link { ep, .. } = &mut conn.stage {
            *ep = Some((fd, state));
        }
    }

    pub(super) fn confirm(&mut self, conn: &mut Conn, r: Result<(), LinkErrorCode>) {
        if let Stage::Link { link, .. } = &mut conn.stage {
            link.confirm(r);
        }
    }

    pub(super) fn on_ep_connect(&mut self, slot: u32, conn: &mut Conn, res: i32) {
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
            self.revive_refused(conn, ci);
        } else {
            if let Stage::Link { ep: Some((_, st)), .. } = &mut conn.stage {
                *st = EpState::Open;
            }
            self.confirm(conn, Ok(()));
        }
        self.pump_in(slot, conn);
    }

    pub(super) fn on_linked(&mut self, slot: u32, conn: &mut Conn, l: Linked) {
        if conn.pair.is_some() {
            let stage = std::mem::replace(&mut conn.stage, Stage::WaitKey);
            let Stage::Link { mut link, .. } = stage else { return };
            return self.proxy_on_client_linked(slot, conn, l, &mut link);
        }
        self.stats().links_ok.fetch_add(1, Ordering::Relaxed);
        let which = if l.channel_type == CH_MAIN { Some(Which::Main) } else { self.link_which_conf(conn) };
        if let Some(which) = which {
            self.live.metrics.link(conn.service, which, LinkResult::Ok);
        }
        self.live.metrics.link_duration.observe(conn.since.elapsed());
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
            let watch = Some(Arc::clone(&conn.fd));
            let session = self.new_session(conn.service, slot, watch);
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
            let lz4_send = self.live.config.limits.lz4_to_client
                && cc.kind.lz4
                && l.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4);
            let mut ch = Chan::new(ci, cc.kind, false, lz4_send);
            ch.ep = ep_fd;
            ch.ep_state = ep_state;
            conn.stage = Stage::Chan(Box::new(ch));
            let window = self.live.config.limits.ack_window;
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
            "link peer={} service={svc} channel={} session={:#010x} header={:?} tls={} result=ok",
            conn.peer,
            conn.label,
            conn.session,
            l.header_kind,
            if conn.tls.is_some() { "yes" } else { "no" }
        );
        // Bytes after the link result belong to the data stage.
        self.pump_out(slot, conn);
    }

    pub(super) fn accept_endpoint(&mut self, slot: u32, conn: &mut Conn, ci: usize) {
        let Some(lfd) = self.live.listen_eps.get(&(conn.service, ci)).map(AsRawFd::as_raw_fd) else {
            return self.close(slot, conn, "internal: no unix-listen socket");
        };
        let t = self.tok(Op::EpAccept, slot);
        let r = self.ring.accept(lfd, t);
        self.pushed(slot, conn, r);
    }

    pub(super) fn on_ep_accept(&mut self, slot: u32, conn: &mut Conn, res: i32, fd: Option<OwnedFd>) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let Some(fd) = fd else {
            let ci = ch.conf;
            if self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            if AcceptBackoff::starved(res) {
                // Out of descriptors: the app waits in the backlog while
                // this accept pauses (see `AcceptBackoff`).
                let listen = self.endpoint_label(conn.service, ci);
                let pause = self.accept_starved(&listen, res);
                let t = self.tok(Op::EpAcceptRetry, slot);
                let r = self.ring.timeout(pause, t);
                self.pushed(slot, conn, r);
                return;
            }
            warn!(self.who, "endpoint accept failed: {}", std::io::Error::from_raw_os_error(-res));
            return self.accept_endpoint(slot, conn, ci);
        };
        self.accept_backoff.reset();
        let Stage::Chan(ch) = &mut conn.stage else { return };
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

    /// The pause of a unix-listen endpoint's accept is over: try again
    /// (unless the endpoint came or the channel drains meanwhile).
    pub(super) fn on_ep_accept_retry(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &conn.stage else { return };
        if ch.ep.is_some() || ch.ep_state != EpState::Accepting {
            return;
        }
        let ci = ch.conf;
        if self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        self.accept_endpoint(slot, conn, ci);
    }

    /// A channel's endpoint as configured, for log lines.
    fn endpoint_label(&self, service: usize, ci: usize) -> String {
        self.live
            .config
            .services
            .get(service)
            .and_then(|s| s.channels.get(ci))
            .map_or_else(String::new, |c| c.endpoint.to_string())
    }

    pub(super) fn new_session(&mut self, service: usize, slot: u32, watch: Option<Arc<OwnedFd>>) -> u32 {
        let place = Place { worker: self.id, slot, generation: self.slots[slot as usize].generation };
        let mut reg = self.shared.registry();
        loop {
            let id: u32 = self.rng.random();
            if id != 0 && !reg.sessions.contains_key(&id) {
                reg.sessions.insert(id, SessionEntry { service, main: place, ticket: None, watch });
                return id;
            }
        }
    }

    /// A live session of `service` whose main client has not hung up.
    pub(super) fn live_session(&self, service: usize) -> Option<u32> {
        let reg = self.shared.registry();
        reg.sessions.iter().find(|(_, s)| s.service == service && !hung_up(s.watch.as_ref())).map(|(id, _)| *id)
    }

    /// Closes the connection at `place`, on this worker or another.
    pub(super) fn close_place(&mut self, p: Place, reason: &'static str) {
        if p.worker == self.id {
            if self.slots.get(p.slot as usize).is_some_and(|s| s.generation == p.generation) {
                self.with_conn(p.slot, |w, c| w.close(p.slot, c, reason));
            }
        } else {
            self.shared.tell(p, reason);
        }
    }

    fn log_busy(&self, conn: &Conn, req: &LinkRequest, claim: Claim) {
        self.stats().links_busy.fetch_add(1, Ordering::Relaxed);
        let why = match claim {
            Claim::SameSession => "already linked in this session: the first link keeps working".to_string(),
            Claim::OtherSession(s) => format!("held by live session {s:#010x} and --busy refuse keeps it"),
            Claim::Free | Claim::Stale(_) => "no longer busy".to_string(),
        };
        info!(
            self.who,
            "busy peer={} service={} channel={}:{} session={:#010x} {why}; refused with CHANNEL_NOT_AVAILABLE",
            conn.peer,
            self.service_name(conn.service),
            kind_name(req.channel_type),
            req.channel_id,
            req.connection_id
        );
    }

    /// The link's ticket was judged: feeds the failed-ticket throttle.
    /// `failure`: `None` for a completed link.
    pub(super) fn on_ticket_verdict(&mut self, conn: &Conn, failure: Option<&LinkFailure>) {
        let Some(ip) = shared::throttle_key(&conn.peer) else { return };
        if failure.is_none() {
            if conn.pair.is_none() {
                self.shared.throttle().succeeded(ip);
            }
        } else if bad_ticket(failure) {
            self.stats().auth_failures.fetch_add(1, Ordering::Relaxed);
            let line = self.shared.throttle().failed(ip, Instant::now(), &self.live.config.limits);
            if let Some(line) = line {
                warn!(self.who, "{line}");
            }
        }
    }
}

impl Worker {
    /// The configured channel a link stage is for, if known yet.
    fn link_which_conf(&self, conn: &Conn) -> Option<Which> {
        match &conn.stage {
            Stage::Link { conf: Some(ci), .. } => Some(Which::Channel(*ci)),
            _ => None,
        }
    }

    /// The counter set a link attempt counts in.
    fn link_which(&self, conn: &Conn) -> Which {
        if let Some(w) = self.link_which_conf(conn) {
            return w;
        }
        match &conn.stage {
            Stage::Link { req: Some(r), .. } if r.channel_type == CH_MAIN => Which::Main,
            _ if self.live.config.services.get(conn.service).is_some_and(|s| s.upstream.is_some()) => Which::Proxy,
            _ => Which::Other,
        }
    }
}

/// Whether a link failed on its ticket (wrong password).
fn bad_ticket(failure: Option<&LinkFailure>) -> bool {
    matches!(
        failure,
        Some(
            LinkFailure::WrongPassword
                | LinkFailure::TicketUndecryptable
                | LinkFailure::Refused(LinkErrorCode::PermissionDenied)
        )
    )
}

/// Who holds a channel, seen by a link of `session`.
#[derive(Debug, Clone, Copy)]
enum Claim {
    Free,
    /// Linked in the same session by a client that is still there.
    SameSession,
    /// Held by another live session.
    OtherSession(u32),
    /// Held by a link whose client hung up, or whose session is gone.
    Stale(Place),
}

fn judge(reg: &Registry, service: usize, ci: usize, session: u32) -> Claim {
    let Some(o) = reg.channels.get(&(service, ci)) else { return Claim::Free };
    if hung_up(o.watch.as_ref()) || !reg.sessions.contains_key(&o.session) {
        Claim::Stale(o.place)
    } else if o.session == session {
        Claim::SameSession
    } else {
        Claim::OtherSession(o.session)
    }
}

/// Whether the link is parked waiting for `confirm` (endpoint pending).
fn link_waiting(link: &ServerLink) -> bool {
    !link.is_done() && link.pending_output().is_empty()
}
