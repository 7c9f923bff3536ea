//! State the workers share: the registry of sessions and channel owners
//! (touched at link and close only), mailboxes, counters, config.

use super::*;

/// A command for a worker from another thread.
#[derive(Debug, Clone, Copy)]
pub(super) enum Cmd {
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
    pub(super) fd: OwnedFd,
    pub(super) cmds: Mutex<Vec<Cmd>>,
    /// RSA keys in the worker's queue: the key thread adds one per key
    /// sent (in `wake`), the worker takes one per key received. Briefly
    /// negative when the worker is faster than the increment.
    pub(super) keys_ready: std::sync::atomic::AtomicI64,
}

impl Mailbox {
    pub(super) fn new() -> std::io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(Self { fd: fd.into(), cmds: Mutex::new(Vec::new()), keys_ready: std::sync::atomic::AtomicI64::new(0) })
    }

    pub(super) fn send(&self, cmd: Cmd) {
        if let Ok(mut q) = self.cmds.lock() {
            q.push(cmd);
        }
        self.poke();
    }

    pub(super) fn poke(&self) {
        let _ = nix::unistd::write(&self.fd, &1u64.to_ne_bytes());
    }
}

impl crate::relay::keypool::Wake for Mailbox {
    /// Called by the key thread after each key it queued for this worker.
    fn wake(&self) {
        self.keys_ready.fetch_add(1, Ordering::Relaxed);
        self.poke();
    }
}

/// Where a connection lives: worker, slot, generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Place {
    pub(super) worker: usize,
    pub(super) slot: u32,
    pub(super) generation: u32,
}

#[derive(Debug)]
pub(super) struct SessionEntry {
    pub(super) service: usize,
    pub(super) main: Place,
    /// Whole-VM proxy: the ticket QEMU accepted on this session's main
    /// link; the relay's own channels of the session require the same.
    pub(super) ticket: Option<Vec<u8>>,
    /// The main client's socket (shared with its connection), to see from
    /// any worker whether that client already hung up (see [`hung_up`]).
    pub(super) watch: Option<Arc<OwnedFd>>,
}

#[derive(Debug, Clone)]
pub(super) struct Owner {
    pub(super) place: Place,
    pub(super) session: u32,
    /// The channel client's socket, shared with its connection (see [`hung_up`]).
    pub(super) watch: Option<Arc<OwnedFd>>,
}

/// Whether the client behind `watch` already hung up (FIN or reset seen,
/// or our own close started: `close` shuts the socket down both ways).
///
/// A close is asynchronous: a client that closes a channel and relinks it
/// at once may find its previous link still registered. Such a link counts
/// as free. The check is one non-blocking `poll` on the
/// socket the connection shares, so it is exact whichever worker owns
/// the connection, and costs no descriptor of its own.
pub(super) fn hung_up(watch: Option<&Arc<OwnedFd>>) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let Some(fd) = watch else { return false };
    // nix has no name for POLLRDHUP (peer shut its writing side: FIN seen).
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(fd.as_fd(), rdhup)];
    // Only RDHUP is asked for; HUP, ERR and NVAL are always reported. Any
    // event at all is therefore a hang-up (nix's `revents` cannot decode
    // RDHUP, so the count is what is used).
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

impl Registry {
    /// Ends session `id` as a whole: forgets it and its aliases; returns
    /// its main and channel connections, to be closed. Their channel
    /// entries stay until each finishes closing; a link of another session
    /// treats them as free (their session is gone).
    pub(super) fn end_session(&mut self, id: u32) -> Vec<Place> {
        let Some(entry) = self.sessions.remove(&id) else { return Vec::new() };
        self.aliases.retain(|k, _| k.0 != id);
        let mut places = vec![entry.main];
        places.extend(self.channels.values().filter(|o| o.session == id).map(|o| o.place));
        places
    }
}

/// Failed-ticket throttle per source address, shared by the workers and
/// touched only when a link starts or a ticket fails or succeeds.
///
/// After `limit` failures within `window`, each further link from that
/// address starts only once its delay passed since the previous start:
/// 1 s, doubling with each further failure, capped at `max_delay`. Starts
/// are spaced, not just failures, so parallel connections from one address
/// gain nothing. A good ticket from the address clears its record. The
/// map is bounded ([`THROTTLE_MAX_ADDRS`]): expired records go first, then
/// the oldest.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    addrs: HashMap<std::net::IpAddr, Strikes>,
}

/// Most source addresses the throttle remembers (≈ 64 B each).
pub(super) const THROTTLE_MAX_ADDRS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    first: Instant,
    /// No link of the address starts before this.
    next_start: Instant,
    /// The last log line about this address (rate limit: one per 10 s).
    logged: Option<Instant>,
    /// Links held since that line.
    held_unlogged: u64,
}

/// What the throttle decided about one link start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    Go,
    /// Hold the connection until this instant.
    Wait(Instant),
}

/// The throttle's key: the address, or an IPv6 address's /64 (one host
/// owns a whole /64).
pub(super) fn throttle_key(peer: &str) -> Option<std::net::IpAddr> {
    let ip = peer.parse::<std::net::SocketAddr>().ok()?.ip();
    Some(match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    })
}

impl Throttle {
    fn delay(failures: u32, limit: u32, max_delay: Duration) -> Duration {
        let over = failures.saturating_sub(limit).min(20);
        Duration::from_secs(1u64 << over).min(max_delay)
    }

    /// A link from `ip` wants to start now.
    pub(super) fn gate(&mut self, ip: std::net::IpAddr, now: Instant, l: &super::super::config::Limits) -> Gate {
        if l.auth_fail_limit == 0 {
            return Gate::Go;
        }
        let window = Duration::from_secs(l.auth_fail_window_secs);
        let max_delay = Duration::from_secs(l.auth_fail_max_delay_secs);
        let Some(s) = self.addrs.get_mut(&ip) else { return Gate::Go };
        if s.failures < l.auth_fail_limit {
            return Gate::Go;
        }
        if now < s.next_start {
            return Gate::Wait(s.next_start);
        }
        if now.duration_since(s.first) > window && now.duration_since(s.next_start) > max_delay {
            // Quiet for a whole window: forgiven.
            self.addrs.remove(&ip);
            return Gate::Go;
        }
        s.next_start = now + Self::delay(s.failures, l.auth_fail_limit, max_delay);
        Gate::Go
    }

    /// A ticket from `ip` failed. Returns a log line when this is a
    /// throttling decision worth logging (rate-limited per address).
    pub(super) fn failed(
        &mut self,
        ip: std::net::IpAddr,
        now: Instant,
        l: &super::super::config::Limits,
    ) -> Option<String> {
        if l.auth_fail_limit == 0 {
            return None;
        }
        let window = Duration::from_secs(l.auth_fail_window_secs);
        let max_delay = Duration::from_secs(l.auth_fail_max_delay_secs);
        if !self.addrs.contains_key(&ip) && self.addrs.len() >= THROTTLE_MAX_ADDRS {
            self.evict(now, window, max_delay);
        }
        let s = self.addrs.entry(ip).or_insert(Strikes {
            failures: 0,
            first: now,
            next_start: now,
            logged: None,
            held_unlogged: 0,
        });
        if s.failures < l.auth_fail_limit && now.duration_since(s.first) > window {
            *s = Strikes { failures: 0, first: now, next_start: now, logged: s.logged, held_unlogged: 0 };
        }
        s.failures = s.failures.saturating_add(1);
        if s.failures < l.auth_fail_limit {
            return None;
        }
        let delay = Self::delay(s.failures, l.auth_fail_limit, max_delay);
        s.next_start = s.next_start.max(now + delay);
        if s.logged.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
            return None;
        }
        s.logged = Some(now);
        let held = std::mem::take(&mut s.held_unlogged);
        Some(format!(
            "throttle addr={ip} failed_tickets={} within_s={} delay_ms={} held_links_since_last_line={held} \
             (a wrong password, or a password guesser; raise --auth-fail-limit or wait {} s)",
            s.failures,
            now.duration_since(s.first).as_secs(),
            delay.as_millis(),
            l.auth_fail_window_secs
        ))
    }

    /// A link from `ip` was held back (counted for the next log line).
    pub(super) fn held(&mut self, ip: std::net::IpAddr) {
        if let Some(s) = self.addrs.get_mut(&ip) {
            s.held_unlogged += 1;
        }
    }

    /// A good ticket from `ip`: its record goes.
    pub(super) fn succeeded(&mut self, ip: std::net::IpAddr) {
        self.addrs.remove(&ip);
    }

    fn evict(&mut self, now: Instant, window: Duration, max_delay: Duration) {
        self.addrs.retain(|_, s| now.duration_since(s.first) <= window || now < s.next_start + max_delay);
        if self.addrs.len() >= THROTTLE_MAX_ADDRS
            && let Some(oldest) = self.addrs.iter().min_by_key(|(_, s)| s.first).map(|(ip, _)| *ip)
        {
            self.addrs.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.addrs.len()
    }
}

/// Sessions and channel owners across workers (touched at link and close only).
#[derive(Debug, Default)]
pub struct Registry {
    pub(super) sessions: HashMap<u32, SessionEntry>,
    pub(super) channels: HashMap<(usize, usize), Owner>,
    /// Channels announced again under a fresh id: (session, type, id) → channel index.
    pub(super) aliases: HashMap<(u32, u8, u8), usize>,
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
    /// Ticks of the worker's 1 s timer: its liveness for the watchdog.
    pub ticks: AtomicU64,
    /// The configuration generation the worker uses (see [`Live`]).
    pub config_generation: AtomicU64,
    /// Payload bytes client → endpoint.
    pub c2e_bytes: AtomicU64,
    /// Payload bytes endpoint → client.
    pub e2c_bytes: AtomicU64,
    /// Protocol errors (bad messages) that closed a connection.
    pub protocol_errors: AtomicU64,
    /// TLS sessions that failed (handshake or record errors).
    pub tls_errors: AtomicU64,
    /// Tickets refused (wrong password).
    pub auth_failures: AtomicU64,
    /// Link starts held back by the failed-ticket throttle (one count per
    /// connection held).
    pub links_throttled: AtomicU64,
    /// Links refused because the channel is already linked in the same
    /// session, or (`--busy refuse`) another session is linked.
    pub links_busy: AtomicU64,
    /// Sessions closed as a whole because a new session replaced them.
    pub sessions_replaced: AtomicU64,
    /// Link-stage connections closed to make room for newer ones.
    pub links_evicted: AtomicU64,
    /// Times a connection found the buffer pool empty and waited.
    pub buffer_waits: AtomicU64,
    /// Idle sides whose posted read was cancelled to take its buffer back.
    pub buffers_reclaimed: AtomicU64,
    /// Accepts that failed for want of file descriptors or memory
    /// (EMFILE, ENFILE, ENOBUFS, ENOMEM); the listener pauses each time.
    pub accepts_starved: AtomicU64,
}

/// Why `connect` gave up for good (the exit code follows from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalKind {
    /// The server refused the password.
    Auth,
    /// The server's TLS certificate did not verify.
    TlsVerify,
}

/// What a reload may change, published as one `Arc`: each worker takes
/// the newest at a safe point (mailbox wake or tick) and uses its own copy
/// in between, without a lock. Services and channels keep their index
/// across reloads (removed ones stay as tombstones, new ones are
/// appended), so a connection's `service` and channel index stay valid.
#[derive(Debug)]
pub struct Live {
    /// Bumped by every publish (0: the configuration at start).
    pub generation: u64,
    /// Configuration.
    pub config: ServeConfig,
    /// `--metrics` counters per service and channel.
    pub metrics: crate::relay::metrics::Counters,
    /// TLS configuration of each service with TLS listeners (reloadable).
    pub server_tls: Vec<Option<Arc<crate::tls::ServerTls>>>,
    /// TLS client configuration of each service with a TLS upstream (read
    /// again by every reload).
    pub upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// `unix-listen` sockets by (service, channel index).
    pub listen_eps: HashMap<(usize, usize), Arc<OwnedFd>>,
}

/// The TLS client configuration of every service's upstream (`None`: not
/// TLS), built from its CA file and subject.
pub fn upstream_tls_configs(config: &ServeConfig) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, String> {
    config
        .services
        .iter()
        .map(|s| match &s.upstream_tls {
            Some(o) if !s.removed => {
                crate::tls::client_config(o).map(Some).map_err(|e| format!("service {}: upstream TLS: {e}", s.name))
            }
            _ => Ok(None),
        })
        .collect()
}

/// Everything the workers share.
#[derive(Debug)]
pub struct Shared {
    /// The running configuration and what follows it (see [`Live`]).
    live: Mutex<Arc<Live>>,
    /// `live`'s generation, read without the lock by the workers' check.
    live_generation: AtomicU64,
    /// Key queues for the workers when a reload started the key thread.
    pub(super) new_keys: Mutex<Vec<Option<Receiver<TicketKey>>>>,
    pub(super) registry: Mutex<Registry>,
    pub(super) mailboxes: Vec<Arc<Mailbox>>,
    /// Set on SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// Listening sockets from systemd by (service, address): every
    /// worker accepts on a duplicate instead of binding its own.
    pub(super) activated: crate::relay::systemd::Activated,
    /// Whole-VM proxy: QEMU's channel caps by (service, type, id), from its
    /// link replies (they do not change while QEMU runs).
    pub(super) caps_cache: Mutex<HashMap<(usize, u8, u8), Caps>>,
    /// `unix-listen` endpoint connections kept while no client is linked.
    pub(super) parked: Mutex<HashMap<(usize, usize), OwnedFd>>,
    /// Failed-ticket throttle per source address.
    pub(super) throttle: Mutex<Throttle>,
    /// Per-worker counters.
    pub stats: Vec<WorkerStats>,
    /// Set by a worker that hit an error retrying cannot fix (e.g. a
    /// wrong password in `connect`); the main thread exits with it.
    pub fatal: Mutex<Option<(FatalKind, String)>>,
    /// What each worker published at its last tick (only with `--metrics`).
    pub snapshots: Vec<Mutex<crate::relay::metrics::WorkerSnapshot>>,
}

impl Shared {
    /// Builds shared state: mailboxes and `unix-listen` sockets.
    pub fn new(config: ServeConfig) -> std::io::Result<Arc<Self>> {
        Self::with_activated(config, crate::relay::systemd::Activated::new())
    }

    /// [`Shared::new`], with listening sockets systemd passed.
    pub fn with_activated(
        config: ServeConfig,
        activated: crate::relay::systemd::Activated,
    ) -> std::io::Result<Arc<Self>> {
        let n = config.limits.workers;
        let mailboxes = (0..n).map(|_| Mailbox::new().map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let mut server_tls = Vec::new();
        for s in &config.services {
            server_tls.push(match &s.tls {
                Some(files) => Some(Arc::new(
                    crate::tls::ServerTls::load(files.clone(), crate::tls::Limits::default())
                        .map_err(|e| std::io::Error::other(format!("service {}: TLS: {e}", s.name)))?,
                )),
                None => None,
            });
        }
        let upstream_tls = upstream_tls_configs(&config).map_err(std::io::Error::other)?;
        let mut listen_eps = HashMap::new();
        for (si, s) in config.services.iter().enumerate() {
            for (ci, c) in s.channels.iter().enumerate() {
                if let EndpointSpec::UnixListen(p) = &c.endpoint {
                    listen_eps.insert((si, ci), Arc::new(endpoint::bind_listener(p)?));
                }
            }
        }
        let metrics = crate::relay::metrics::Counters::new(&config);
        let live = Live { generation: 0, config, metrics, server_tls, upstream_tls, listen_eps };
        Ok(Arc::new(Self {
            snapshots: (0..n).map(|_| Mutex::new(Default::default())).collect(),
            live: Mutex::new(Arc::new(live)),
            live_generation: AtomicU64::new(0),
            new_keys: Mutex::new((0..n).map(|_| None).collect()),
            registry: Mutex::new(Registry::default()),
            mailboxes,
            shutdown: AtomicBool::new(false),
            activated,
            caps_cache: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            stats: (0..n).map(|_| WorkerStats::default()).collect(),
            fatal: Mutex::new(None),
        }))
    }

    /// The running configuration (and what follows it): the newest published.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The generation of the newest published [`Live`].
    pub fn live_generation(&self) -> u64 {
        self.live_generation.load(Ordering::Acquire)
    }

    /// Publishes `next` (its generation is set here) and wakes every
    /// worker to take it. Only the main thread publishes.
    pub fn publish(&self, mut next: Live) -> Arc<Live> {
        let mut cur = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        next.generation = cur.generation + 1;
        let next = Arc::new(next);
        *cur = Arc::clone(&next);
        self.live_generation.store(next.generation, Ordering::Release);
        drop(cur);
        for m in &self.mailboxes {
            m.poke();
        }
        next
    }

    /// Hands worker `i` the key queue of a key thread a reload started.
    pub fn give_keys(&self, keys: Vec<Receiver<TicketKey>>) {
        let mut q = self.new_keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (slot, k) in q.iter_mut().zip(keys) {
            *slot = Some(k);
        }
    }

    /// Wakers for the key pool.
    pub fn wakers(&self) -> Vec<Arc<dyn crate::relay::keypool::Wake>> {
        self.mailboxes.iter().map(|m| Arc::clone(m) as Arc<dyn crate::relay::keypool::Wake>).collect()
    }

    /// RSA keys ready in each worker's queue.
    pub fn keys_ready(&self) -> Vec<u64> {
        self.mailboxes.iter().map(|m| u64::try_from(m.keys_ready.load(Ordering::Relaxed)).unwrap_or(0)).collect()
    }

    /// Worker `i`'s last snapshot (a clone: the lock is held only for it).
    pub fn snapshot(&self, i: usize) -> crate::relay::metrics::WorkerSnapshot {
        self.snapshots
            .get(i)
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    /// When worker `i` last published its snapshot (and folded its counters).
    pub fn snapshot_time(&self, i: usize) -> Option<Instant> {
        self.snapshots.get(i).and_then(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner).at)
    }

    /// Services listening on sockets from systemd socket activation.
    pub fn activated_services(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.activated.keys().map(|(si, _)| *si).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Whether `(service, addr)` is a socket from systemd socket activation.
    pub fn is_activated(&self, service: usize, addr: std::net::SocketAddr) -> bool {
        self.activated.contains_key(&(service, addr))
    }

    /// Linked sessions per service, and linked connections per (service,
    /// channel index), from the registry.
    pub fn linked_counts(&self) -> (HashMap<usize, usize>, HashMap<(usize, usize), usize>) {
        let reg = self.registry();
        let mut sessions = HashMap::new();
        for s in reg.sessions.values() {
            *sessions.entry(s.service).or_insert(0) += 1;
        }
        let mut links = HashMap::new();
        for k in reg.channels.keys() {
            *links.entry(*k).or_insert(0) += 1;
        }
        (sessions, links)
    }

    /// Forgets what QEMU said about its channels for `service` (its
    /// upstream changed).
    pub fn forget_caps(&self, service: usize) {
        if let Ok(mut c) = self.caps_cache.lock() {
            c.retain(|k, _| k.0 != service);
        }
    }

    /// Drops the kept `unix-listen` endpoint connection of `(service,
    /// channel)` (its endpoint changed or it was removed).
    pub fn forget_parked(&self, service: usize, channel: usize) {
        if let Ok(mut p) = self.parked.lock() {
            p.remove(&(service, channel));
        }
    }

    /// Asks every worker to drain and stop.
    pub fn stop(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        for m in &self.mailboxes {
            m.poke();
        }
    }

    pub(super) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A worker that panicked while holding the lock cannot have left it
        // half-updated in a way that matters more than stopping the relay.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn throttle(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn tell(&self, place: Place, reason: &'static str) {
        if let Some(m) = self.mailboxes.get(place.worker) {
            m.send(Cmd::Close { slot: place.slot, generation: place.generation, reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::Limits;

    fn ip(n: u32) -> std::net::IpAddr {
        std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn throttle_spaces_starts_after_the_limit_and_forgives_a_good_ticket() {
        let l =
            Limits { auth_fail_limit: 3, auth_fail_window_secs: 60, auth_fail_max_delay_secs: 8, ..Limits::default() };
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let a = ip(2);
        assert_eq!(t.gate(a, t0, &l), Gate::Go);
        assert!(t.failed(a, t0, &l).is_none());
        assert!(t.failed(a, t0, &l).is_none());
        let line = t.failed(a, t0, &l).expect("the third failure is a throttling decision");
        assert!(line.contains("addr=10.0.0.2") && line.contains("delay_ms=1000"), "{line}");
        // Held for 1 s, then one start per delay; another address is free.
        assert_eq!(t.gate(a, t0, &l), Gate::Wait(t0 + Duration::from_secs(1)));
        assert_eq!(t.gate(ip(3), t0, &l), Gate::Go);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(t.gate(a, t1, &l), Gate::Go);
        assert!(matches!(t.gate(a, t1, &l), Gate::Wait(_)), "a parallel start waits its turn");
        // More failures double the delay, capped; the next line waits 10 s.
        for _ in 0..10 {
            assert!(t.failed(a, t1, &l).is_none(), "one line per 10 s per address");
        }
        let Gate::Wait(until) = t.gate(a, t1, &l) else { panic!("held") };
        assert!(until <= t1 + Duration::from_secs(16), "capped: {:?}", until - t1);
        t.succeeded(a);
        assert_eq!(t.gate(a, t1, &l), Gate::Go);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn throttle_map_is_bounded_and_ipv6_counts_per_64() {
        let l = Limits::default();
        let mut t = Throttle::default();
        let now = Instant::now();
        for n in 0..(u32::try_from(THROTTLE_MAX_ADDRS).expect("small") + 100) {
            let _ = t.failed(ip(n), now, &l);
        }
        assert!(t.len() <= THROTTLE_MAX_ADDRS);
        assert_eq!(throttle_key("[2001:db8:1:2:3:4:5:6]:5930"), throttle_key("[2001:db8:1:2:ffff::1]:1"));
        assert_ne!(throttle_key("[2001:db8:1:2::1]:1"), throttle_key("[2001:db8:1:3::1]:1"));
        assert_eq!(throttle_key("127.0.0.2:4000"), Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2))));
        assert_eq!(throttle_key("[::ffff:127.0.0.2]:4000"), throttle_key("127.0.0.2:1"));
        assert_eq!(throttle_key("garbage"), None);
    }
}
