//! A worker's side of SIGHUP: taking the newest [`Live`] at a safe point
//! (mailbox wake, tick) and following it: listeners of new services and
//! addresses are bound, those of removed ones closed, the link settings
//! rebuilt. Connections are not touched: each keeps its service and
//! channel index, which stay valid (tombstones, appended entries).

use super::*;

/// Listeners a worker can add by reloads over its life (op slack in the
/// ring: each listener holds one multishot accept).
pub(super) const MAX_ADDED_LISTENERS: usize = 64;

/// Whether some service links with the worker's one open key (no
/// ticketing, not fronting QEMU, and with somewhere to listen).
pub(super) fn needs_open_key(config: &ServeConfig) -> bool {
    config.services.iter().any(|s| !s.removed && s.open_links() && !(s.listen.is_empty() && s.tls_listen.is_empty()))
}

/// A fresh RSA key for the links of services without ticketing.
pub(super) fn open_key() -> anyhow::Result<TicketKey> {
    let mut rng = rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| anyhow::anyhow!("cannot seed from the OS random source: {e}"))?;
    TicketKey::generate(&mut rng).map_err(|e| anyhow::anyhow!("cannot generate the RSA key: {e}"))
}

/// The server link settings of every service, by service index.
pub(super) fn link_cfg(config: &ServeConfig) -> Vec<ServerLinkConfig> {
    config.services.iter().map(|s| ServerLinkConfig { password: s.password.clone(), mini_header: true }).collect()
}

impl Worker {
    /// The busy policy of `service`.
    pub(super) fn busy(&self, service: usize) -> BusyPolicy {
        let c = &self.live.config;
        c.services.get(service).and_then(|s| s.busy).unwrap_or(c.limits.busy)
    }

    /// Takes the newest published configuration if it is not ours yet.
    pub(super) fn pick_up_live(&mut self) {
        if self.shared.live_generation() == self.live.generation {
            return;
        }
        let next = self.shared.live();
        if next.generation == self.live.generation {
            return;
        }
        let keys = self.shared.new_keys.lock().ok().and_then(|mut q| q.get_mut(self.id).and_then(Option::take));
        if let Some(k) = keys {
            self.keys = k;
        }
        self.live = next;
        self.link_cfg = link_cfg(&self.live.config);
        if self.open_key.is_none() && self.ctl.is_none() && needs_open_key(&self.live.config) {
            match open_key() {
                Ok(k) => self.open_key = Some(k),
                Err(e) => warn!(self.who, "reload: {e:#}; links of services without ticketing wait"),
            }
        }
        if self.ctl.is_none() && self.stopping.is_none() && self.draining.is_none() {
            self.follow_listeners();
        }
        self.stats().config_generation.store(self.live.generation, Ordering::Release);
        debug!(self.who, "reload: configuration generation {} in use", self.live.generation);
    }

    /// Closes the listeners the configuration no longer has and opens the
    /// ones it gained.
    fn follow_listeners(&mut self) {
        let mut wanted: Vec<(usize, std::net::SocketAddr, bool)> = Vec::new();
        for (si, s) in self.live.config.services.iter().enumerate().filter(|(_, s)| !s.removed) {
            wanted.extend(s.listen.iter().map(|a| (si, *a, false)));
            wanted.extend(s.tls_listen.iter().map(|a| (si, *a, true)));
        }
        for li in 0..self.listeners.len() {
            let Some(l) = &self.listeners[li] else { continue };
            let key = (l.service, l.addr, l.tls);
            if let Some(i) = wanted.iter().position(|w| *w == key) {
                wanted.swap_remove(i);
                continue;
            }
            let li32 = u32::try_from(li).unwrap_or(0);
            let _ = self.ring.cancel_where(
                |t| decode(t).is_some_and(|d| d.0 == Op::Accept && d.1 == li32),
                token(Op::Cancel, 0xff_ffff, 0),
            );
            // The ring keeps its own reference until the cancelled accept completes.
            self.listeners[li] = None;
            debug!(self.who, "reload: stopped listening on {} (service {})", key.1, self.service_name(key.0));
        }
        for (si, addr, tls) in wanted {
            // Each open listener holds one op of the ring's budget.
            let open = self.listeners.iter().filter(|l| l.is_some()).count();
            if open >= self.ring.max_ops().saturating_sub(self.slots.len() * 12 + 16) {
                warn!(self.who, "reload: cannot listen on {addr}: too many listeners for this ring; restart vmcrelay");
                continue;
            }
            let fd = match self.shared.activated.get(&(si, addr)) {
                Some(inherited) => inherited.try_clone(),
                None => bind_tcp(addr),
            };
            let fd = match fd {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(self.who, "reload: service {} cannot listen on {addr}: {e}", self.service_name(si));
                    continue;
                }
            };
            let li = self.listeners.len();
            let t = token(Op::Accept, u32::try_from(li).unwrap_or(0), 0);
            if let Err(e) = self.ring.accept_multi(fd.as_raw_fd(), t) {
                warn!(self.who, "reload: service {} cannot accept on {addr}: {e}", self.service_name(si));
                continue;
            }
            self.listeners.push(Some(Listener { fd, service: si, tls, addr }));
            debug!(self.who, "reload: listening on {addr} (service {})", self.service_name(si));
        }
    }
}
