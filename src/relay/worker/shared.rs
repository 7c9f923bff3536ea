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
}

impl Mailbox {
    pub(super) fn new() -> std::io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(Self { fd: fd.into(), cmds: Mutex::new(Vec::new()) })
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
    fn wake(&self) {
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
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Owner {
    pub(super) place: Place,
    pub(super) session: u32,
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
    /// Payload bytes client → endpoint.
    pub c2e_bytes: AtomicU64,
    /// Payload bytes endpoint → client.
    pub e2c_bytes: AtomicU64,
    /// Protocol errors (bad messages) that closed a connection.
    pub protocol_errors: AtomicU64,
    /// TLS sessions that failed (handshake or record errors).
    pub tls_errors: AtomicU64,
}

/// Why `connect` gave up for good (the exit code follows from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatalKind {
    /// The server refused the password.
    Auth,
    /// The server's TLS certificate did not verify.
    TlsVerify,
}

/// Everything the workers share.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub config: ServeConfig,
    pub(super) registry: Mutex<Registry>,
    pub(super) mailboxes: Vec<Arc<Mailbox>>,
    /// Set on SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// `unix-listen` sockets by (service, channel index).
    pub(super) listen_eps: HashMap<(usize, usize), OwnedFd>,
    /// Listening sockets from systemd by (service, address): every
    /// worker accepts on a duplicate instead of binding its own.
    pub(super) activated: crate::relay::systemd::Activated,
    /// Whole-VM proxy: QEMU's channel caps by (service, type, id), from its
    /// link replies (they do not change while QEMU runs).
    pub(super) caps_cache: Mutex<HashMap<(usize, u8, u8), Caps>>,
    /// `unix-listen` endpoint connections kept while no client is linked.
    pub(super) parked: Mutex<HashMap<(usize, usize), OwnedFd>>,
    /// Per-worker counters.
    pub stats: Vec<WorkerStats>,
    /// Set by a worker that hit an error retrying cannot fix (e.g. a
    /// wrong password in `connect`); the main thread exits with it.
    pub fatal: Mutex<Option<(FatalKind, String)>>,
    /// TLS configuration of each service with TLS listeners (reloadable).
    pub server_tls: Vec<Option<crate::tls::ServerTls>>,
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
                Some(files) => Some(
                    crate::tls::ServerTls::load(files.clone(), crate::tls::Limits::default())
                        .map_err(|e| std::io::Error::other(format!("service {}: TLS: {e}", s.name)))?,
                ),
                None => None,
            });
        }
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
            activated,
            caps_cache: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            stats: (0..n).map(|_| WorkerStats::default()).collect(),
            fatal: Mutex::new(None),
            server_tls,
        }))
    }

    /// Wakers for the key pool.
    pub fn wakers(&self) -> Vec<Arc<dyn crate::relay::keypool::Wake>> {
        self.mailboxes.iter().map(|m| Arc::clone(m) as Arc<dyn crate::relay::keypool::Wake>).collect()
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

    pub(super) fn tell(&self, place: Place, reason: &'static str) {
        if let Some(m) = self.mailboxes.get(place.worker) {
            m.send(Cmd::Close { slot: place.slot, generation: place.generation, reason });
        }
    }
}
