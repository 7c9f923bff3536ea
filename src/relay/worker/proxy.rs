//! Whole-VM proxy (`serve --upstream`): every channel the relay does not
//! serve itself is linked to QEMU's spice-server and then copied byte for
//! byte, on the same worker, with the same bounded buffers.
//!
//! Link order (`shared/spice-proxy.md` §1.7, order A): the client's link
//! message opens the upstream connection and link; QEMU's reply gives the
//! caps for our reply to the client (with our own key); the client's ticket
//! is decrypted and re-encrypted under QEMU's key of that link, and QEMU's
//! verdict is the client's. A wrong password therefore never kicks QEMU's
//! current client (spice-server kicks only on an accepted main link). Both
//! hops use the same header kind (mini iff the client announced it; QEMU
//! always does), so the data stage needs no framing, except upstream →
//! client on main, where [`MainFilter`] reads MAIN_INIT (the session is
//! registered before the client sees its id) and rewrites CHANNELS_LIST
//! (QEMU's entries that the relay serves are hidden, the relay's own are
//! added to the first list).
//!
//! Each side reads into its own `rx` and writes it to the other side's
//! socket; while that write is in flight it does not read (back-pressure,
//! nothing queued beyond one buffer). One side closing closes the other;
//! a main channel closing ends the session, the relay's channels included.

use super::tls::PairBytes;
use super::*;
use crate::error;
use crate::proto::channel::CH_DISPLAY;
use crate::proto::client_link::{self, ClientLinkConfig, ClientLinkFailure};
use crate::proto::main_filter::MainFilter;

/// Main channel caps QEMU must not see (migration: not through a relay).
const MAIN_CLEAR: [u32; 2] = [0, 3];
/// Display cap GL_SCANOUT: fds cannot cross the relay.
const DISPLAY_CLEAR: [u32; 1] = [7];

fn without(mut caps: Caps, bits: &[u32]) -> Caps {
    for &b in bits {
        caps.clear(b);
    }
    caps
}

impl Worker {
    /// A client link on a whole-VM service: served by us, or proxied.
    pub(super) fn proxy_on_request(&mut self, slot: u32, conn: &mut Conn, req: LinkRequest) {
        let service = conn.service;
        if let Some(code) = self.live.config.services[service].security.check(req.channel_type, conn.tls.is_some()) {
            // tls-channel / plaintext-channel, as on a served channel:
            // before QEMU is asked (NEED_SECURED makes spice-gtk relink
            // the channel on the TLS port).
            if let Stage::Link { link, req: r, .. } = &mut conn.stage {
                *r = Some(req);
                link.decide(Decision::Refuse(code));
            }
            return;
        }
        let served = self.live.config.services[service].live_channel(req.channel_type, req.channel_id).is_some();
        if served && req.channel_type != CH_MAIN {
            return self.on_link_request(conn, req);
        }
        // Gate secondary links on a live session before touching QEMU.
        if req.channel_type != CH_MAIN {
            let known = self.shared.registry().sessions.get(&req.connection_id).is_some_and(|s| s.service == service);
            if !known {
                if let Stage::Link { link, req: r, .. } = &mut conn.stage {
                    *r = Some(req);
                    link.decide(Decision::BadConnectionId);
                }
                return;
            }
        }
        if let Stage::Link { req: r, .. } = &mut conn.stage {
            *r = Some(req);
        }
        conn.label = format!("{}:{}", kind_name(req.channel_type), req.channel_id);
        let Some(upstream) = self.live.config.services[service].upstream.clone() else { return };
        let refuse = |w: &mut Self, conn: &mut Conn, why: String| {
            warn!(w.who, "upstream {upstream} unavailable for channel={} peer={}: {why}", conn.label, conn.peer);
            if let Stage::Link { link, .. } = &mut conn.stage {
                link.decide(Decision::Refuse(LinkErrorCode::Error));
            }
        };
        // TLS upstream: every connection of the session (main and each
        // proxied channel) gets its own client session, checked against
        // the host of the URI as `connect` checks its server.
        let tls = match &upstream {
            ServerAddr::Tls { host, .. } => {
                let Some(cfg) = self.live.upstream_tls.get(service).and_then(Option::as_ref) else {
                    return refuse(self, conn, "no TLS configuration (upstream-ca-file)".into());
                };
                match crate::tls::Session::client(Arc::clone(cfg), host, crate::tls::Limits::default()) {
                    Ok(s) => Some(super::tls::TlsConn::new(s)),
                    Err(e) => return refuse(self, conn, format!("cannot start TLS: {e}")),
                }
            }
            _ => None,
        };
        let (fd, addr) = match super::connect::server_socket(&upstream) {
            Ok(x) => x,
            Err(e) => return refuse(self, conn, e.to_string()),
        };
        let channel_caps = match req.channel_type {
            CH_MAIN => without(req.channel_caps, &MAIN_CLEAR),
            CH_DISPLAY => without(req.channel_caps, &DISPLAY_CLEAR),
            _ => req.channel_caps,
        };
        let cfg = ClientLinkConfig {
            connection_id: req.connection_id,
            channel_type: req.channel_type,
            channel_id: req.channel_id,
            channel_caps,
            password: Vec::new(),
            mini_header: req.common_caps.has(CAP_MINI_HEADER),
            defer_ticket: true,
        };
        let link = match ClientLink::new(cfg, crate::proto::auth::seed_from(&mut self.rng)) {
            Ok(l) => l,
            Err(e) => return refuse(self, conn, e.to_string()),
        };
        let me = (slot, self.slots[slot as usize].generation);
        let cached = self
            .shared
            .caps_cache
            .lock()
            .ok()
            .and_then(|c| c.get(&(service, req.channel_type, req.channel_id)).copied());
        let stage = Stage::ULink {
            link: Box::new(link),
            client: me,
            ticket: None,
            cached,
            hold: cached.is_some(),
            password: None,
        };
        let Some(up) = self.new_conn(fd, upstream.to_string(), service, stage, false) else {
            return refuse(self, conn, "connection table full (raise --max-conns)".into());
        };
        let up_gen = self.slots[up as usize].generation;
        let dup_up = self.slots[up as usize].conn.as_ref().map(|c| Arc::clone(&c.fd));
        let dup_me = Some(Arc::clone(&conn.fd));
        conn.pair = Some((up, up_gen));
        conn.pair_fd = dup_up;
        conn.chan = (req.channel_type, req.channel_id);
        let label = conn.label.clone();
        self.with_conn(up, |w, u| {
            u.tls = tls;
            u.pair = Some(me);
            u.pair_fd = dup_me;
            u.label = label;
            u.chan = (req.channel_type, req.channel_id);
            u.session = req.connection_id;
            let t = w.tok(Op::SrvConnect, up);
            let r = w.ring.connect(u.fd.as_raw_fd(), &addr, t);
            w.pushed(up, u, r);
        });
    }

    /// Upstream link stage. Returns whether more input is wanted now.
    pub(super) fn proxy_pump_ulink(&mut self, slot: u32, conn: &mut Conn) -> bool {
        let Stage::ULink { link, .. } = &mut conn.stage else { return true };
        let input = conn
            .rx
            .and_then(|b| self.ring.arena().get(b))
            .and_then(|b| b.get(conn.rx_pos..conn.rx_len))
            .unwrap_or_default();
        conn.rx_pos += link.handle_input(input);
        let action = link.poll_action();
        let client = match &conn.stage {
            Stage::ULink { client, .. } => *client,
            _ => return false,
        };
        match action {
            None => {
                self.pump_out(slot, conn);
                true
            }
            Some(client_link::Action::Reply { channel_caps, .. }) => {
                if let Ok(mut cache) = self.shared.caps_cache.lock() {
                    cache.insert((conn.service, conn.chan.0, conn.chan.1), channel_caps);
                }
                let caps = if conn.chan_type() == CH_MAIN { without(channel_caps, &MAIN_CLEAR) } else { channel_caps };
                if let Stage::ULink { cached: Some(c), password, link, .. } = &mut conn.stage {
                    // The client already has its reply (from the cache) and sent its ticket.
                    if *c != channel_caps {
                        debug!(self.who, "upstream caps of {} changed since cached", conn.label);
                    }
                    if let Some(pw) = password.take() {
                        link.send_password(&pw);
                    }
                    self.pump_out(slot, conn);
                    return true;
                }
                self.with_pair(client, |w, c, cs| {
                    if let Stage::Link { link, .. } = &mut c.stage {
                        link.decide(Decision::Forward { channel_caps: caps });
                    }
                    w.pump_in(cs, c);
                    w.pump_out(cs, c);
                });
                true
            }
            Some(client_link::Action::Linked(l)) => {
                let ticket = match &mut conn.stage {
                    Stage::ULink { ticket, .. } => ticket.take(),
                    _ => None,
                };
                let main = conn.chan_type() == CH_MAIN;
                let filter = main.then(|| {
                    let served: Vec<(u8, u8)> = self.live.config.services[conn.service]
                        .live_channels()
                        .map(|(_, c)| (c.kind.channel_type, c.id))
                        .collect();
                    Box::new(MainFilter::new(l.header_kind, served.clone(), served))
                });
                conn.stage = Stage::Pipe(Box::new(Pipe {
                    filter,
                    out: Some(Vec::new()),
                    ticket: if main { ticket } else { None },
                    session: None,
                    client_side: false,
                }));
                conn.enc = Encoder::new(l.header_kind);
                let kind = l.header_kind;
                self.with_pair(client, |w, c, cs| {
                    if c.enc.kind() != kind && !matches!(c.stage, Stage::Link { .. }) {
                        return;
                    }
                    c.enc = Encoder::new(kind);
                    if let Stage::Link { link, .. } = &mut c.stage {
                        link.confirm(Ok(()));
                    }
                    w.pump_in(cs, c);
                    w.pump_out(cs, c);
                });
                // Bytes after the result belong to the data stage.
                self.pump_in(slot, conn);
                false
            }
            Some(client_link::Action::Close(f)) => {
                let code = match f {
                    ClientLinkFailure::Result(code) => Some(code),
                    _ => None,
                };
                if matches!(f, ClientLinkFailure::NoCommonAuth) {
                    error!(
                        self.who,
                        "upstream {} requires SASL: vmcrelay fronts QEMU with ticket authentication only \
                         (drop sasl=on from QEMU's -spice)",
                        conn.peer
                    );
                } else {
                    info!(self.who, "upstream {} link channel={} failed: {f}", conn.peer, conn.label);
                }
                self.proxy_fail_client(slot, conn, code);
                false
            }
        }
    }

    /// The upstream link failed: tell the client (error reply before its
    /// ticket, the upstream's result code after), then close our side.
    fn proxy_fail_client(&mut self, slot: u32, conn: &mut Conn, code: Option<LinkErrorCode>) {
        if let Some(client) = conn.pair.take() {
            conn.pair_fd = None;
            self.with_pair(client, |_, c, _| {
                c.pair = None;
                c.pair_fd = None;
                if let Stage::Link { link, .. } = &mut c.stage {
                    match code {
                        Some(code) => link.confirm(Err(code)),
                        // Before the reply: an error reply; after it, 9.
                        None => {
                            link.decide(Decision::Refuse(LinkErrorCode::Error));
                            link.confirm(Err(LinkErrorCode::ChannelNotAvailable));
                        }
                    }
                    if !link.is_done() {
                        // Waiting for the client's ticket: nothing more to say.
                        c.close_after_flush = Some("upstream link failed".into());
                    }
                }
            });
            self.with_pair(client, |w, c, cs| {
                w.pump_in(cs, c);
                w.pump_out(cs, c);
            });
        }
        self.close(slot, conn, "upstream link failed");
    }

    /// The upstream connect completed. With cached caps, the client gets
    /// its reply now (QEMU is reachable) and our link waits for its ticket.
    pub(super) fn proxy_connected(&mut self, slot: u32, conn: &mut Conn) {
        if let Stage::ULink { cached: Some(caps), hold: true, client, .. } = &conn.stage {
            let (caps, client) = (*caps, *client);
            let caps = if conn.chan_type() == CH_MAIN { without(caps, &MAIN_CLEAR) } else { caps };
            self.with_pair(client, |w, c, cs| {
                if let Stage::Link { link, .. } = &mut c.stage {
                    link.decide(Decision::Forward { channel_caps: caps });
                }
                w.pump_in(cs, c);
                w.pump_out(cs, c);
            });
        }
        self.pump_out(slot, conn);
        self.pump_in(slot, conn);
    }

    /// The upstream connect (Op::SrvConnect) failed.
    pub(super) fn proxy_connect_failed(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        warn!(
            self.who,
            "upstream {} unavailable for channel={}: {}",
            conn.peer,
            conn.label,
            std::io::Error::from_raw_os_error(-res)
        );
        self.proxy_fail_client(slot, conn, None);
    }

    /// The client's ticket for a proxied link: re-encrypt it for QEMU.
    pub(super) fn proxy_on_authenticated(&mut self, conn: &mut Conn) {
        let Stage::Link { link, .. } = &mut conn.stage else { return };
        let Some(ticket) = link.take_ticket() else { return };
        let Some(up) = conn.pair else { return };
        self.with_pair(up, |w, u, us| {
            let main = u.chan.0 == CH_MAIN;
            if let Stage::ULink { link, ticket: keep, hold, password, .. } = &mut u.stage {
                if *hold {
                    // Cached-caps order: only now does QEMU see our link message.
                    *hold = false;
                    *password = Some(ticket.clone());
                } else {
                    link.send_password(&ticket);
                }
                if main {
                    *keep = Some(ticket);
                }
            }
            w.pump_out(us, u);
            w.pump_in(us, u);
        });
    }

    /// The client side of a proxied link is linked: start copying.
    pub(super) fn proxy_on_client_linked(&mut self, slot: u32, conn: &mut Conn, l: Linked, link: &mut ServerLink) {
        self.stats().links_ok.fetch_add(1, Ordering::Relaxed);
        let which = if l.channel_type == CH_MAIN { Which::Main } else { Which::Proxy };
        self.live.metrics.link(conn.service, which, LinkResult::Ok);
        self.live.metrics.link_duration.observe(conn.since.elapsed());
        let mut tmp = [0u8; 8];
        let n = link.poll_output(&mut tmp);
        conn.chan = (l.channel_type, l.channel_id);
        conn.stage =
            Stage::Pipe(Box::new(Pipe { filter: None, out: None, ticket: None, session: None, client_side: true }));
        conn.deframer = Deframer::new(l.header_kind);
        conn.enc = Encoder::new(l.header_kind);
        let svc = self.service_name(conn.service).to_string();
        let up = self.live.config.services[conn.service].upstream.as_ref().map(ToString::to_string).unwrap_or_default();
        info!(
            self.who,
            "link peer={} service={svc} channel={} session={:#010x} header={:?} tls={} upstream={up} result=ok",
            conn.peer,
            conn.label,
            l.connection_id,
            l.header_kind,
            if conn.tls.is_some() { "yes" } else { "no" }
        );
        conn.session = l.connection_id;
        if n > 0 {
            conn.ctl_q.push_front((u16::MAX, tmp[..n].to_vec()));
        }
        self.pump_out(slot, conn);
    }

    /// Runs `f` on the paired connection if it is still the same one.
    fn with_pair(&mut self, pair: (u32, u32), f: impl FnOnce(&mut Self, &mut Conn, u32)) {
        let (s, g) = pair;
        if self.slots.get(s as usize).is_some_and(|x| x.generation == g && x.conn.is_some()) {
            self.with_conn(s, |w, c| f(w, c, s));
        }
    }

    /// Data stage: what was read goes to the pair (filtered on upstream main).
    /// Returns whether more input is wanted now.
    pub(super) fn proxy_forward(&mut self, slot: u32, conn: &mut Conn) -> bool {
        if conn.c2e_busy || conn.rx_pos >= conn.rx_len {
            return conn.rx_pos >= conn.rx_len;
        }
        let Some(fd) = conn.pair_fd.as_ref().map(AsRawFd::as_raw_fd) else {
            self.close(slot, conn, "proxy peer gone");
            return false;
        };
        let Stage::Pipe(p) = &mut conn.stage else { return false };
        let n = (conn.rx_len - conn.rx_pos) as u64;
        if p.client_side {
            conn.st.c2e_bytes += n;
            self.shared.stats[self.id].c2e_bytes.fetch_add(n, Ordering::Relaxed);
        } else {
            conn.st.e2c_bytes += n;
            self.shared.stats[self.id].e2c_bytes.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(filter) = p.filter.as_mut() {
            let Some(mut out) = p.out.take() else { return false };
            out.clear();
            let input = conn
                .rx
                .and_then(|b| self.ring.arena().get(b))
                .and_then(|b| b.get(conn.rx_pos..conn.rx_len))
                .unwrap_or_default();
            let r = filter.feed(input, &mut out);
            conn.rx_pos = conn.rx_len;
            if let Err(e) = r {
                p.out = Some(out);
                warn!(self.who, "upstream {} main channel: {e}; closing the session", conn.peer);
                self.close(slot, conn, &format!("upstream main: {e}"));
                return false;
            }
            if p.session.is_none()
                && let Some(id) = filter.session_id()
            {
                p.session = Some(id);
                let ticket = p.ticket.take();
                self.proxy_register_session(conn, id, ticket);
            }
            if out.is_empty() {
                if let Stage::Pipe(p) = &mut conn.stage {
                    p.out = Some(out);
                }
                return true;
            }
            conn.tx_len = out.len();
            conn.tx_done = 0;
            conn.tx_raw = false;
            if let Some(pair) = self.tls_pair(conn) {
                // TLS client: the rewritten bytes go through its session,
                // from `p.out` (kept here until all are taken).
                if let Stage::Pipe(p) = &mut conn.stage {
                    p.out = Some(out);
                }
                let mut taken = false;
                self.with_pair(pair, |w, c, cs| taken = w.proxy_tls_pull(cs, c, conn));
                if !taken && conn.closing.is_none() {
                    self.close(slot, conn, "proxy peer gone");
                }
                return false;
            }
            let t = self.tok(Op::PipeWrite, slot);
            let r = self.ring.write_owned(fd, out, 0, t);
            if self.pushed(slot, conn, r) {
                conn.c2e_busy = true;
            }
            return false;
        }
        let Some(rx) = conn.rx else { return false };
        if let Some(pair) = self.tls_pair(conn) {
            // TLS on the other hop: the bytes go through the pair's session.
            let mut taken = false;
            self.with_pair(pair, |w, u, us| taken = w.proxy_tls_pull(us, u, conn));
            if !taken && conn.closing.is_none() {
                self.close(slot, conn, "proxy peer gone");
            }
            return false;
        }
        let t = self.tok(Op::PipeWrite, slot);
        let r = self.ring.write_fixed(fd, rx, conn.rx_pos, conn.rx_len - conn.rx_pos, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
        false
    }

    pub(super) fn proxy_on_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.c2e_busy = false;
        if res < 0 {
            if let (Some(v), Stage::Pipe(p)) = (owned, &mut conn.stage) {
                p.out = Some(v);
            }
            return self.close(slot, conn, &errno_reason("proxy write", res));
        }
        let n = usize::try_from(res).unwrap_or(0);
        let Some(fd) = conn.pair_fd.as_ref().map(AsRawFd::as_raw_fd) else { return };
        if let Some(v) = owned {
            conn.tx_done += n;
            if conn.tx_done < conn.tx_len {
                let t = self.tok(Op::PipeWrite, slot);
                let done = conn.tx_done;
                let r = self.ring.write_owned(fd, v, done, t);
                if self.pushed(slot, conn, r) {
                    conn.c2e_busy = true;
                }
                return;
            }
            if let Stage::Pipe(p) = &mut conn.stage {
                p.out = Some(v);
            }
        } else {
            conn.rx_pos += n;
            if conn.rx_pos < conn.rx_len {
                self.proxy_forward(slot, conn);
                return;
            }
        }
        self.pump_in(slot, conn);
    }

    /// The pair of `conn` if it speaks TLS (a TLS upstream, or a client
    /// that came in on a TLS listener).
    fn tls_pair(&self, conn: &Conn) -> Option<(u32, u32)> {
        conn.pair.filter(|&(ps, pg)| {
            self.slots
                .get(ps as usize)
                .filter(|x| x.generation == pg)
                .and_then(|x| x.conn.as_ref())
                .is_some_and(|u| u.tls.is_some())
        })
    }

    /// TLS connection `u` takes what its pair `c` has for it into its
    /// session and sends the records: `c.rx[rx_pos..rx_len]`, or on an
    /// upstream main `c`'s rewritten bytes `out[tx_done..tx_len]`. `c`
    /// reads no more until [`Self::proxy_tls_written`] reports them sent
    /// (one buffer in flight per direction, as the plain path). If `u` is
    /// still sending its own bytes (the end of its link), `c` waits for
    /// [`Self::proxy_tls_resume`]. Returns whether `u` took it on.
    fn proxy_tls_pull(&mut self, us: u32, u: &mut Conn, c: &mut Conn) -> bool {
        if u.closing.is_some() || c.closing.is_some() {
            return false;
        }
        if u.tx_busy {
            Self::tls_pair_waits(u);
            c.c2e_busy = true;
            return true;
        }
        let sent = match &c.stage {
            Stage::Pipe(p) if p.filter.is_some() => {
                let Some(out) = p.out.as_ref() else { return false };
                let Some(bytes) = out.get(c.tx_done..c.tx_len) else { return false };
                self.tls_send_for_pair(us, u, PairBytes::Slice(bytes))
            }
            _ => {
                let Some(rx) = c.rx else { return false };
                self.tls_send_for_pair(us, u, PairBytes::Fixed(rx, c.rx_pos..c.rx_len))
            }
        };
        if sent {
            c.c2e_busy = true;
        }
        sent
    }

    /// TLS connection `conn` finished its own output while its pair waited
    /// with bytes for it: the pair hands them over now.
    pub(super) fn proxy_tls_resume(&mut self, slot: u32, conn: &mut Conn) {
        let Some(pair) = conn.pair else { return };
        self.with_pair(pair, |w, c, cs| {
            c.c2e_busy = false;
            if !w.proxy_tls_pull(slot, conn, c) {
                w.close(cs, c, "proxy peer gone");
            }
        });
    }

    /// The records of `n` plaintext bytes the pair handed over are sent:
    /// the pair goes on with the rest of its bytes, or reads.
    pub(super) fn proxy_tls_written(&mut self, slot: u32, conn: &mut Conn, n: usize) {
        conn.tx_busy = false;
        let Some(pair) = conn.pair else { return };
        self.with_pair(pair, |w, c, cs| {
            c.c2e_busy = false;
            let rest = match &mut c.stage {
                Stage::Pipe(p) if p.filter.is_some() => {
                    c.tx_done = (c.tx_done + n).min(c.tx_len);
                    c.tx_done < c.tx_len
                }
                _ => {
                    c.rx_pos = (c.rx_pos + n).min(c.rx_len);
                    c.rx_pos < c.rx_len
                }
            };
            if rest {
                if !w.proxy_tls_pull(slot, conn, c) {
                    w.close(cs, c, "proxy peer gone");
                }
                return;
            }
            w.pump_in(cs, c);
        });
    }

    /// TLS to the upstream failed during its link: the client gets a link
    /// error (not a silent close), the log says what to check.
    pub(super) fn proxy_tls_failed(&mut self, slot: u32, conn: &mut Conn, e: &crate::tls::SessionError) {
        if e.kind() == crate::tls::SessionErrorKind::Verification {
            error!(
                self.who,
                "upstream {} TLS certificate of channel={} peer={}: {e}; check upstream-ca-file \
                 (--upstream-ca-file: the CA that signed QEMU's certificate, x509-dir/ca-cert.pem), the host \
                 in the upstream URI (it must be in the certificate's subjectAltName) or upstream-cert-subject",
                conn.peer,
                conn.label,
                self.pair_peer(conn)
            );
        } else {
            warn!(self.who, "upstream {} TLS for channel={} failed: {e}", conn.peer, conn.label);
        }
        self.proxy_fail_client(slot, conn, None);
    }

    fn pair_peer(&self, conn: &Conn) -> String {
        conn.pair
            .and_then(|(s, g)| self.slots.get(s as usize).filter(|x| x.generation == g))
            .and_then(|x| x.conn.as_ref())
            .map(|c| c.peer.clone())
            .unwrap_or_default()
    }

    fn proxy_register_session(&mut self, conn: &mut Conn, id: u32, ticket: Option<Vec<u8>>) {
        let Some((cs, cg)) = conn.pair else { return };
        let place = Place { worker: self.id, slot: cs, generation: cg };
        let mut reg = self.shared.registry();
        reg.sessions.insert(id, SessionEntry { service: conn.service, main: place, ticket, watch: None });
        drop(reg);
        info!(self.who, "session {id:#010x} from upstream {} (main of peer slot {cs})", conn.peer);
    }

    /// A proxied connection finished closing: an upstream main ends its session.
    pub(super) fn proxy_on_closed(&mut self, conn: &mut Conn) {
        let Stage::Pipe(p) = &conn.stage else { return };
        let Some(session) = p.session else { return };
        let to_close: Vec<Place> = {
            let mut reg = self.shared.registry();
            reg.sessions.remove(&session);
            reg.aliases.retain(|k, _| k.0 != session);
            reg.channels.values().filter(|o| o.session == session).map(|o| o.place).collect()
        };
        info!(self.who, "session {session:#010x} ended with its upstream main");
        for p in to_close {
            if p.worker == self.id {
                self.with_pair((p.slot, p.generation), |w, c, s| w.close_flushing(s, c, SESSION_CLOSED));
            } else {
                self.shared.tell(p, SESSION_CLOSED);
            }
        }
    }
}

impl Conn {
    /// Channel type of a proxied connection (from its link label).
    pub(super) fn chan_type(&self) -> u8 {
        self.chan.0
    }
}
