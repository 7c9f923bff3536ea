//! Endpoints that go away behind a live session come back without the
//! client's help (QEMU restarted behind `serve`).
//!
//! - A **port** channel stays linked: the client gets PORT_EVENT closed,
//!   what it sends meanwhile is dropped (counted), and once the endpoint
//!   opens again PORT_EVENT opened and the bytes flow (spice-gtk's port
//!   apps see the port close and open).
//! - Any **other** channel (usbredir, smartcard, webdav, 128+) closes, as
//!   spice-server closes a channel whose device is unplugged. Once its
//!   endpoint opens again, the session's main channel announces it with a
//!   one-entry CHANNELS_LIST under a fresh id, as spice-server announces a
//!   hot-plugged device (spice-gtk never sees the same `(type, id)` twice
//!   in a session; it links the new channel by itself, and its USB device
//!   manager gets a free channel again). The endpoint opened for the check
//!   is kept for that link.
//!
//! The endpoint is tried once per worker tick (1 s) while the session
//! lives, without blocking: a unix or TCP connect that does not complete
//! at once is checked on the next tick.

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::AsFd;

use nix::sys::socket::{SockaddrStorage, sockopt};

use super::*;

/// What to do with the endpoint once it is back.
#[derive(Debug, Clone, Copy)]
pub(super) enum Then {
    /// Give it to this (still linked) port channel.
    Reattach { slot: u32, generation: u32 },
    /// Announce the channel again on the session's main channel.
    Announce,
}

/// An endpoint being waited for.
#[derive(Debug)]
pub(super) struct Revive {
    service: usize,
    ci: usize,
    session: u32,
    then: Then,
    /// A non-blocking connect still in progress.
    connecting: Option<OwnedFd>,
    since: Instant,
}

impl Worker {
    /// Starts waiting for the endpoint of `(service, ci)` on behalf of `session`.
    pub(super) fn revive_add(&mut self, service: usize, ci: usize, session: u32, then: Then) {
        if self.draining.is_some() || session == 0 {
            return;
        }
        if matches!(self.conf(service, ci).map(|c| &c.endpoint), Some(EndpointSpec::Echo | EndpointSpec::Sink)) {
            return;
        }
        // In a whole-VM session the main channel is QEMU's stream: nothing
        // can be announced on it (the next session links the channel again).
        if matches!(then, Then::Announce)
            && self.live.config.services.get(service).is_some_and(|s| s.upstream.is_some())
        {
            return;
        }
        self.revive.retain(|r| !(r.service == service && r.ci == ci));
        self.revive.push(Revive { service, ci, session, then, connecting: None, since: Instant::now() });
    }

    /// One try for every endpoint waited for (from the tick).
    pub(super) fn revive_tick(&mut self) {
        if self.revive.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.revive);
        for mut r in list {
            let alive = self.shared.registry().sessions.get(&r.session).is_some_and(|s| s.service == r.service);
            let still = match r.then {
                Then::Reattach { slot, generation } => {
                    alive
                        && self.slots.get(slot as usize).is_some_and(|s| s.generation == generation && s.conn.is_some())
                }
                Then::Announce => alive,
            };
            if !still || self.draining.is_some() {
                continue;
            }
            match self.revive_try(&mut r) {
                Ok(Some(fd)) => self.revive_done(&r, fd),
                Ok(None) => self.revive.push(r),
                Err(e) => {
                    debug!(self.who, "endpoint of {} still unavailable: {e}", self.revive_label(&r));
                    self.revive.push(r);
                }
            }
        }
    }

    fn revive_label(&self, r: &Revive) -> String {
        self.conf(r.service, r.ci).map_or_else(|| "?".into(), |c| format!("{} ({})", c.label(), c.endpoint))
    }

    /// Opens the endpoint without blocking: `Ok(None)` while a connect is in progress.
    fn revive_try(&mut self, r: &mut Revive) -> std::io::Result<Option<OwnedFd>> {
        if let Some(fd) = r.connecting.take() {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut fds, PollTimeout::ZERO)? == 0 {
                r.connecting = Some(fd);
                return Ok(None);
            }
            let err = nix::sys::socket::getsockopt(&fd, sockopt::SocketError)?;
            if err != 0 {
                return Err(std::io::Error::from_raw_os_error(err));
            }
            return Ok(Some(fd));
        }
        let Some(spec) = self.conf(r.service, r.ci).map(|c| c.endpoint.clone()) else {
            return Err(std::io::Error::other("channel no longer configured"));
        };
        match spec {
            EndpointSpec::UnixListen(_) => {
                let Some(l) = self.live.listen_eps.get(&(r.service, r.ci)) else {
                    return Err(std::io::Error::other("no unix-listen socket"));
                };
                // A dup shares the listener's O_NONBLOCK: accept never blocks.
                let l = std::os::unix::net::UnixListener::from(l.try_clone()?);
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true)?;
                        Ok(Some(OwnedFd::from(s)))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            }
            other => match endpoint::open(&other)? {
                Opening::Ready(fd) => Ok(Some(fd)),
                Opening::Connect(fd, addr) => connect_now(fd, &addr).map(|c| match c {
                    Connected::Now(fd) => Some(fd),
                    Connected::Later(fd) => {
                        r.connecting = Some(fd);
                        None
                    }
                }),
                Opening::Accept => Ok(None),
            },
        }
    }

    fn revive_done(&mut self, r: &Revive, fd: OwnedFd) {
        let label = self.revive_label(r);
        let waited = r.since.elapsed().as_millis();
        match r.then {
            Then::Reattach { slot, .. } => {
                info!(self.who, "endpoint back channel={label} after_ms={waited}: port opened again");
                self.with_conn(slot, |w, conn| {
                    let Stage::Chan(ch) = &mut conn.stage else { return };
                    ch.ep = Some(fd);
                    ch.ep_state = EpState::Open;
                    ch.app_left = None;
                    w.queue(slot, conn, &ServerMsg::PortEvent { event: PORT_EVENT_OPENED });
                    w.pump_in(slot, conn);
                    w.pump_out(slot, conn);
                });
            }
            Then::Announce => {
                let Some(t) = self.conf(r.service, r.ci).map(|c| c.kind.channel_type) else { return };
                let configured: Vec<u8> = self.live.config.services[r.service]
                    .channels
                    .iter()
                    .filter(|c| c.kind.channel_type == t)
                    .map(|c| c.id)
                    .collect();
                let (id, main) = {
                    let mut reg = self.shared.registry();
                    let Some(main) = reg.sessions.get(&r.session).map(|s| s.main) else { return };
                    let used = |id: u8, reg: &Registry| {
                        configured.contains(&id)
                            || reg.aliases.keys().any(|k| k.0 == r.session && k.1 == t && k.2 == id)
                    };
                    // Fresh ids count up from the highest one in use, like spice-server's;
                    // past 255, the lowest free one.
                    let top = (0..=u8::MAX).filter(|&i| used(i, &reg)).max().unwrap_or(0);
                    let fresh = if top < u8::MAX { Some(top + 1) } else { (0..=u8::MAX).find(|&i| !used(i, &reg)) };
                    let Some(id) = fresh else { return };
                    reg.aliases.insert((r.session, t, id), r.ci);
                    (id, main)
                };
                if let Ok(mut p) = self.shared.parked.lock() {
                    p.insert((r.service, r.ci), fd);
                }
                info!(
                    self.who,
                    "endpoint back channel={label} after_ms={waited}: announced to session {:#010x} as {}:{id}",
                    r.session,
                    kind_name(t)
                );
                let cmd = Cmd::Announce { slot: main.slot, generation: main.generation, channel: [t, id] };
                if main.worker == self.id {
                    self.on_announce(main.slot, main.generation, [t, id]);
                } else if let Some(m) = self.shared.mailboxes.get(main.worker) {
                    m.send(cmd);
                }
            }
        }
    }

    /// Sends a one-entry CHANNELS_LIST on a main channel of this worker.
    pub(super) fn on_announce(&mut self, slot: u32, generation: u32, channel: [u8; 2]) {
        if self.slots.get(slot as usize).is_none_or(|s| s.generation != generation) {
            return;
        }
        self.with_conn(slot, |w, conn| {
            if matches!(conn.stage, Stage::Main { .. }) {
                let entries = [channel];
                w.queue(slot, conn, &ServerMsg::ChannelsList(ChannelsList { entries: &entries }));
            }
        });
    }
}

enum Connected {
    Now(OwnedFd),
    Later(OwnedFd),
}

/// A non-blocking connect: done, in progress, or failed.
fn connect_now(fd: OwnedFd, addr: &SockaddrStorage) -> std::io::Result<Connected> {
    match nix::sys::socket::connect(fd.as_raw_fd(), addr) {
        Ok(()) => Ok(Connected::Now(fd)),
        Err(nix::errno::Errno::EINPROGRESS) => Ok(Connected::Later(fd)),
        Err(e) => Err(e.into()),
    }
}
