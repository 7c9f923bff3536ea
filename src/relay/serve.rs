//! `vmcrelay serve`: starts the key pool and one worker per core, waits
//! for SIGTERM/SIGINT, drains and exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::stat::{Mode, umask};

use super::config::{EndpointSpec, ServeConfig};
use super::worker::{Live, Shared, Worker};
use super::{endpoint, keypool, reload, status, systemd};
use crate::{debug, error, info};

/// Why serve stopped with a failure; the binary maps it to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something at start-up (io_uring, a listen address, an endpoint socket).
    #[error("{0}")]
    Startup(String),
    /// A worker failed while running.
    #[error("worker failed: {0}")]
    Worker(String),
    /// An error retrying cannot fix (a wrong password in `connect`).
    #[error("{0}")]
    Fatal(String),
    /// `connect`: the server's TLS certificate did not verify (never retried).
    #[error("{0}")]
    TlsVerify(String),
}

/// Makes sure nobody holds a listen address before the workers bind it
/// with SO_REUSEPORT (which would otherwise share the port with another
/// vmcrelay of the same user in silence). Returns one exclusive abstract
/// unix socket per address, to hold while the address is configured: two
/// vmcrelays starting at once cannot both pass the probe.
/// Addresses systemd passed as sockets are skipped: they are ours already.
fn claim_listen_addrs(
    config: &ServeConfig,
    activated: &systemd::Activated,
) -> Result<HashMap<SocketAddr, OwnedFd>, ServeError> {
    let mut locks = HashMap::new();
    for addr in config.services.iter().flat_map(|s| &s.listen) {
        if addr.port() == 0 || activated.keys().any(|(_, a)| a == addr) || locks.contains_key(addr) {
            continue;
        }
        locks.insert(*addr, claim_listen_addr(*addr)?);
    }
    Ok(locks)
}

/// The lock and probe of one address (see [`claim_listen_addrs`]).
fn claim_listen_addr(addr: SocketAddr) -> Result<OwnedFd, ServeError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr, bind, setsockopt, socket};
    let in_use = |who: &str| {
        ServeError::Startup(format!(
            "cannot listen on {addr}: address in use ({who}; `ss -ltnp 'sport = :{}'` shows which process)",
            addr.port()
        ))
    };
    let other = |e: nix::Error| ServeError::Startup(format!("cannot listen on {addr}: {e}"));
    let lock = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(other)?;
    let name = UnixAddr::new_abstract(format!("vmcrelay-listen-{addr}").as_bytes()).map_err(other)?;
    match bind(lock.as_raw_fd(), &name) {
        Ok(()) => {}
        Err(nix::Error::EADDRINUSE) => return Err(in_use("another vmcrelay holds it")),
        Err(e) => return Err(other(e)),
    }
    // The probe: SO_REUSEADDR (TIME_WAIT leftovers do not count) but no
    // SO_REUSEPORT, so any listener on the port refuses it.
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let probe = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(other)?;
    setsockopt(&probe, nix::sys::socket::sockopt::ReuseAddr, &true).map_err(other)?;
    match bind(probe.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) => Ok(lock),
        Err(nix::Error::EADDRINUSE) => Err(in_use("another process holds it")),
        Err(e) => Err(other(e)),
    }
}

/// The `unix-listen` socket files this process created; each is removed
/// on drop if the path still names that file.
#[derive(Debug, Default)]
struct OwnSockets(Vec<(PathBuf, endpoint::FileId)>);

impl Drop for OwnSockets {
    fn drop(&mut self) {
        for (p, id) in &self.0 {
            if endpoint::remove_socket_if_ours(p, *id) {
                debug!("main", "removed unix-listen:{}", p.display());
            }
        }
    }
}

/// Builds the shared state, which binds the `unix-listen` sockets: their
/// missing directories are created first; each socket is bound under a
/// restrictive umask, then given its owner, group and mode.
fn make_shared(config: ServeConfig, activated: systemd::Activated) -> Result<(Arc<Shared>, OwnSockets), ServeError> {
    let perms = config.limits.socket;
    let paths: Vec<PathBuf> = config
        .services
        .iter()
        .flat_map(|s| &s.channels)
        .filter_map(|c| match &c.endpoint {
            EndpointSpec::UnixListen(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    for p in &paths {
        let made = endpoint::create_parent_dirs(p).map_err(|e| {
            ServeError::Startup(format!("cannot create the directory of unix-listen:{}: {e}", p.display()))
        })?;
        for d in made {
            info!("main", "created directory {} (mode 0755) for unix-listen:{}", d.display(), p.display());
        }
    }
    let before: Vec<Option<endpoint::FileId>> = paths.iter().map(|p| endpoint::socket_file_id(p)).collect();
    // Nobody but us may connect until owner, group and mode are set. No
    // other thread runs yet, so the process-wide umask is ours to change.
    let old_mask = umask(Mode::from_bits_truncate(0o177));
    let shared = Shared::with_activated(config, activated);
    umask(old_mask);
    let shared = match shared {
        Ok(s) => s,
        Err(e) => {
            // Remove what this attempt bound before it failed.
            for (p, b) in paths.iter().zip(&before) {
                if let Some(id) = endpoint::socket_file_id(p).filter(|id| Some(*id) != *b) {
                    endpoint::remove_socket_if_ours(p, id);
                }
            }
            return Err(ServeError::Startup(e.to_string()));
        }
    };
    let mut own = OwnSockets::default();
    for p in &paths {
        let id = endpoint::socket_file_id(p).ok_or_else(|| {
            ServeError::Startup(format!("unix-listen:{}: the socket file vanished after bind", p.display()))
        })?;
        own.0.push((p.clone(), id));
        endpoint::apply_socket_perms(p, &perms).map_err(|e| ServeError::Startup(e.to_string()))?;
        let (uid, gid) = std::fs::symlink_metadata(p)
            .map(|m| (std::os::unix::fs::MetadataExt::uid(&m), std::os::unix::fs::MetadataExt::gid(&m)))
            .unwrap_or((u32::MAX, u32::MAX));
        info!("main", "unix-listen:{} mode={:04o} uid={uid} gid={gid}", p.display(), perms.mode);
    }
    Ok((shared, own))
}

/// SIGHUP: every TLS service (of `only`, or all) reads its certificate,
/// key and CA again; new connections use them, linked ones keep theirs. A
/// file that does not load leaves the running certificate in force.
/// Returns whether there was any TLS service.
fn reload_tls(shared: &Shared, only: Option<&[usize]>) -> bool {
    let live = shared.live();
    let mut any = false;
    for (si, (s, tls)) in live.config.services.iter().zip(&live.server_tls).enumerate() {
        let Some(tls) = tls.as_ref().filter(|_| !s.removed && only.is_none_or(|o| o.contains(&si))) else { continue };
        any = true;
        match tls.reload() {
            Ok(generation) => info!(
                "main",
                "SIGHUP: service {} TLS certificate reloaded from {} (generation {generation}); new connections use it",
                s.name,
                tls.files().cert.display()
            ),
            Err(e) => crate::warn!(
                "main",
                "SIGHUP: service {} TLS reload failed, keeping the running certificate: {e}",
                s.name
            ),
        }
    }
    any
}

/// Where SIGHUP reads the configuration again (`serve --config FILE`).
pub struct Reload {
    /// The file, for log lines.
    pub origin: String,
    /// Reads and checks it as at start (the file, then the flags given
    /// with it); an error names FILE:LINE and what is wrong.
    pub load: Box<dyn Fn() -> Result<ServeConfig, String> + Send>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload").field("origin", &self.origin).finish_non_exhaustive()
    }
}

/// What the main thread keeps for reloads.
struct Reloading {
    source: Option<Reload>,
    /// Listen-address locks by address (see [`claim_listen_addrs`]).
    locks: HashMap<SocketAddr, OwnedFd>,
    own: OwnSockets,
    keys_started: bool,
    stop_keys: Arc<std::sync::atomic::AtomicBool>,
}

/// A `unix-listen` socket a reload bound.
struct Bound {
    key: (usize, usize),
    fd: OwnedFd,
    path: PathBuf,
    id: endpoint::FileId,
}

/// Binds a `unix-listen` socket as at start: directories first, the bind
/// under a restrictive umask, then owner, group and mode.
fn bind_unix_listen(
    p: &std::path::Path,
    perms: &super::config::SocketPerms,
) -> Result<(OwnedFd, endpoint::FileId), String> {
    let what = |e: std::io::Error| format!("unix-listen:{}: {e}", p.display());
    for d in endpoint::create_parent_dirs(p).map_err(what)? {
        info!("main", "created directory {} (mode 0755) for unix-listen:{}", d.display(), p.display());
    }
    // Workers create no files, so the process-wide umask is briefly ours.
    let old_mask = umask(Mode::from_bits_truncate(0o177));
    let fd = endpoint::bind_listener(p);
    umask(old_mask);
    let fd = fd.map_err(what)?;
    let id =
        endpoint::socket_file_id(p).ok_or_else(|| format!("unix-listen:{}: the socket file vanished", p.display()))?;
    if let Err(e) = endpoint::apply_socket_perms(p, perms) {
        endpoint::remove_socket_if_ours(p, id);
        return Err(e.to_string());
    }
    info!("main", "unix-listen:{} mode={:04o}", p.display(), perms.mode);
    Ok((fd, id))
}

/// What a reload prepared before it publishes: nothing of it is in force
/// yet, and dropping it undoes it.
struct Prepared {
    locks: Vec<(SocketAddr, OwnedFd)>,
    bound: Vec<Bound>,
    server_tls: Vec<Option<Arc<crate::tls::ServerTls>>>,
    upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// Services whose TLS files did not change: their certificates are read again.
    tls_again: Vec<usize>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        for b in self.bound.drain(..) {
            endpoint::remove_socket_if_ours(&b.path, b.id);
        }
    }
}

/// Binds, claims and loads what `next` needs that `live` does not have.
fn prepare(shared: &Shared, st: &mut Reloading, live: &Live, next: &ServeConfig) -> Result<Prepared, String> {
    let mut p = Prepared {
        locks: Vec::new(),
        bound: Vec::new(),
        server_tls: Vec::new(),
        upstream_tls: crate::relay::worker::upstream_tls_configs(next)?,
        tls_again: Vec::new(),
    };
    for (si, s) in next.services.iter().enumerate().filter(|(_, s)| !s.removed) {
        if s.listen.is_empty() && s.tls_listen.is_empty() {
            return Err(format!(
                "service {} has no listen address: a socket from systemd socket activation cannot be added by \
                 reload (add it to the .socket unit and restart, or give the service listen = [...])",
                s.name
            ));
        }
        for a in &s.listen {
            if a.port() == 0
                || shared.is_activated(si, *a)
                || st.locks.contains_key(a)
                || p.locks.iter().any(|l| l.0 == *a)
            {
                continue;
            }
            p.locks.push((*a, claim_listen_addr(*a).map_err(|e| format!("service {}: {e}", s.name))?));
        }
        for (ci, c) in s.live_channels() {
            let EndpointSpec::UnixListen(path) = &c.endpoint else { continue };
            let was = live.config.services.get(si).and_then(|o| o.channels.get(ci)).map(|o| &o.endpoint);
            if was == Some(&c.endpoint) && live.listen_eps.contains_key(&(si, ci)) {
                continue;
            }
            let (fd, id) =
                bind_unix_listen(path, &next.limits.socket).map_err(|e| format!("service {}: {e}", s.name))?;
            p.bound.push(Bound { key: (si, ci), fd, path: path.clone(), id });
        }
    }
    for (si, s) in next.services.iter().enumerate() {
        let old = live.server_tls.get(si).cloned().flatten();
        let was = live.config.services.get(si).and_then(|o| o.tls.as_ref());
        p.server_tls.push(match &s.tls {
            _ if s.removed => old,
            None => None,
            Some(files) if was == Some(files) && old.is_some() => {
                p.tls_again.push(si);
                old
            }
            Some(files) => Some(Arc::new(
                crate::tls::ServerTls::load(files.clone(), crate::tls::Limits::default())
                    .map_err(|e| format!("service {}: TLS: {e}", s.name))?,
            )),
        });
    }
    if !st.keys_started && next.services.iter().any(|s| !s.removed && !s.open_links()) {
        let l = &live.config.limits;
        let keys = keypool::start(
            l.workers,
            l.key_pool_per_worker,
            l.key_reuse,
            l.key_threads(),
            shared.wakers(),
            Arc::clone(&st.stop_keys),
        )
        .map_err(|e| format!("cannot start the key thread: {e}"))?;
        shared.give_keys(keys);
        st.keys_started = true;
        info!("main", "reload: a service with ticketing: RSA key thread started");
    }
    Ok(p)
}

/// SIGHUP with `--config`: reads the file again and applies what changed
/// (see [`reload`]); a file that does not load or check changes nothing.
fn reload_config(shared: &Shared, st: &mut Reloading) {
    let Some(src) = &st.source else {
        info!(
            "main",
            "SIGHUP: no configuration file to reload (started without --config); reloading TLS certificates only"
        );
        if !reload_tls(shared, None) {
            info!("main", "SIGHUP: nothing to reload (no TLS service)");
        }
        return;
    };
    let origin = src.origin.clone();
    info!("main", "SIGHUP: reloading {origin}");
    let refuse = |why: &str| {
        crate::warn!("main", "reload refused: {why}; the running configuration keeps serving (nothing changed)");
    };
    let file = match (src.load)() {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    let live = shared.live();
    let activated = shared.activated_services();
    let (sessions, links) = shared.linked_counts();
    let running = reload::Running {
        activated: &|i| activated.contains(&i),
        sessions: &|i| sessions.get(&i).copied().unwrap_or(0),
        links: &|s, c| links.get(&(s, c)).copied().unwrap_or(0),
    };
    let plan = reload::plan(&live.config, file, &running);
    if let Err(e) = plan.merged.validate() {
        return refuse(&format!("{origin}: {e}"));
    }
    let mut prep = match prepare(shared, st, &live, &plan.merged) {
        Ok(p) => p,
        Err(e) => return refuse(&e),
    };
    let mut listen_eps = live.listen_eps.clone();
    let mut replaced = Vec::new();
    for b in std::mem::take(&mut prep.bound) {
        if let Some(EndpointSpec::UnixListen(old)) =
            live.config.services.get(b.key.0).and_then(|s| s.channels.get(b.key.1)).map(|c| &c.endpoint)
            && *old != b.path
        {
            replaced.push(old.clone());
        }
        listen_eps.insert(b.key, Arc::new(b.fd));
        st.own.0.push((b.path, b.id));
    }
    let next = Live {
        generation: 0,
        metrics: live.metrics.grown(&plan.merged),
        server_tls: std::mem::take(&mut prep.server_tls),
        upstream_tls: std::mem::take(&mut prep.upstream_tls),
        listen_eps,
        config: plan.merged,
    };
    let published = shared.publish(next);
    // Now in force: the locks of new addresses are kept, those of
    // addresses no longer configured go; replaced socket files go.
    st.locks.extend(prep.locks.drain(..));
    let used: Vec<SocketAddr> =
        published.config.services.iter().filter(|s| !s.removed).flat_map(|s| s.listen.iter().copied()).collect();
    st.locks.retain(|a, _| used.contains(a));
    for old in replaced {
        if let Some(i) = st.own.0.iter().position(|(p, _)| *p == old) {
            let (p, id) = st.own.0.swap_remove(i);
            if endpoint::remove_socket_if_ours(&p, id) {
                debug!("main", "removed unix-listen:{} (its channel has a new endpoint)", p.display());
            }
        }
    }
    for (si, s) in published.config.services.iter().enumerate() {
        let Some(o) = live.config.services.get(si) else { continue };
        if o.upstream != s.upstream {
            shared.forget_caps(si);
        }
        for (ci, (oc, c)) in o.channels.iter().zip(&s.channels).enumerate() {
            if oc.endpoint != c.endpoint || c.removed || s.removed {
                shared.forget_parked(si, ci);
            }
        }
    }
    for line in &plan.changes {
        info!("main", "{line}");
    }
    for line in &plan.restart {
        crate::warn!("main", "{line}");
    }
    reload_tls(shared, Some(&prep.tls_again));
    // The workers take it at their next wake (the publish pokes them);
    // "done" says when every one has, so what the lines say is in force.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let taken =
        || shared.stats.iter().filter(|s| s.config_generation.load(Ordering::Acquire) >= published.generation).count();
    while taken() < shared.stats.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    info!(
        "main",
        "reload: done from {origin} generation={} changes={} needs_restart={} workers_updated={}/{}",
        published.generation,
        plan.changes.len(),
        plan.restart.len(),
        taken(),
        shared.stats.len()
    );
}

/// Raises the open-file limit to what the connection limits can use: per
/// connection its socket and an endpoint (two more with the splice pipe
/// counted loosely in the slack), plus listeners and the relay's own. Says
/// what it did, and how far short it is when the hard limit is lower.
fn raise_fd_limit(config: &ServeConfig) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let l = &config.limits;
    let want = u64::try_from(l.workers.saturating_mul(l.max_conns_per_worker).saturating_mul(2))
        .unwrap_or(u64::MAX)
        .saturating_add(256);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    if soft >= want {
        return;
    }
    let nr_open =
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(hard);
    // Raising the hard limit needs CAP_SYS_RESOURCE; try, then fall back.
    let target = want.min(nr_open);
    let got = if target > hard && setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        target
    } else if setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_ok() {
        want.min(hard)
    } else {
        soft
    };
    if got >= want {
        info!(
            "main",
            "open-file limit raised from {soft} to {got} for {} worker(s) × max-conns {}",
            l.workers,
            l.max_conns_per_worker
        );
    } else {
        // Info, not a warning: max-conns is a ceiling, not a need; the
        // line says what fits so a sysadmin can raise the limit.
        info!(
            "main",
            "open-file limit is {got} (hard limit {hard}); workers × max-conns-per-worker × 2 = {want} descriptors \
             would be needed (a channel takes its client socket and its endpoint's; a built-in echo:/sink: \
             endpoint takes 2), so about {} connections fit in all: raise LimitNOFILE= (systemd) or `ulimit -Hn`, \
             or lower --max-conns",
            got.saturating_sub(256) / 2
        );
    }
}

/// Runs the relay until a signal; returns after every worker drained.
/// SIGHUP reloads TLS certificates only (see [`run_with_reload`]).
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    run_with_reload(config, None)
}

/// [`run`], where SIGHUP also reads the configuration from `source` again.
pub fn run_with_reload(mut config: ServeConfig, source: Option<Reload>) -> Result<(), ServeError> {
    // Signals: SIGTERM/SIGINT go to the main thread's sigwait, never to a
    // worker (the mask is inherited by every thread spawned below).
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // SIGHUP: read the configuration file again, reload the TLS certificates.
    set.add(Signal::SIGHUP);
    // A peer that goes away must give EPIPE, not kill the relay: SIGPIPE
    // stays blocked (pending, never delivered) in every thread.
    let mut blocked = set;
    blocked.add(Signal::SIGPIPE);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).map_err(|e| ServeError::Startup(e.to_string()))?;

    // Socket activation: systemd's sockets replace the services' --listen.
    let inherited = systemd::take_listen_fds().map_err(ServeError::Startup)?;
    let (activated, notes) = systemd::assign(&mut config.services, inherited).map_err(ServeError::Startup)?;
    for n in notes {
        info!("main", "{n}");
    }
    raise_fd_limit(&config);
    let workers = config.limits.workers;
    let per_worker_keys = config.limits.key_pool_per_worker;
    let key_threads = config.limits.key_threads();
    for s in &config.services {
        let chans: Vec<String> = s.channels.iter().map(|c| format!("{}={}", c.label(), c.endpoint)).collect();
        let addrs: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        let mut extra = String::new();
        if !s.tls_listen.is_empty() {
            let t: Vec<String> = s.tls_listen.iter().map(ToString::to_string).collect();
            extra.push_str(&format!(" tls-listen={}", t.join(",")));
        }
        if let Some(u) = &s.upstream {
            extra.push_str(&format!(" upstream={u}"));
        }
        let ticketing = match (&s.upstream, &s.password) {
            (Some(_), _) => "upstream",
            (None, Some(_)) => "on",
            (None, None) => "off",
        };
        info!(
            "main",
            "service name={} listen={}{extra} ticketing={ticketing} channels=[{}]",
            s.name,
            addrs.join(","),
            chans.join(" ")
        );
    }
    let listen_locks = claim_listen_addrs(&config, &activated)?;
    let metrics_listener = match config.limits.metrics {
        Some(a) => Some((a, status::bind(a).map_err(|e| ServeError::Startup(e.to_string()))?)),
        None => None,
    };
    let (shared, own_sockets) = make_shared(config, activated)?;
    let stop_keys = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reuse = shared.live().config.limits.key_reuse;
    if reuse > 1 {
        crate::warn!(
            "main",
            "key-reuse={reuse}: each RSA ticket key serves up to {reuse} links; a sniffed ticket can be replayed \
             on a link that gets the same key (use 1 on untrusted networks)"
        );
    }
    // Without ticketing there is no ticket to protect: such services link
    // with one key per worker and no key thread runs for them.
    let need_keys = shared.live().config.services.iter().any(|s| !s.open_links());
    let keys = if need_keys {
        keypool::start(workers, per_worker_keys, reuse, key_threads, shared.wakers(), Arc::clone(&stop_keys))
            .map_err(|e| ServeError::Startup(format!("cannot start the key thread: {e}")))?
    } else {
        info!("main", "ticketing off on every service: one RSA key per worker, no per-link key generation");
        (0..workers).map(|_| std::sync::mpsc::sync_channel(1).1).collect()
    };

    // Build every worker first so start-up errors surface before any thread runs.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for (id, k) in keys.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("vmcrelay-w{id}"))
            .spawn(move || -> Result<(), String> {
                // The ring is created on the thread that submits to it
                // (SINGLE_ISSUER).
                let w = match Worker::new(id, shared, k) {
                    Ok(w) => {
                        let _ = ready.send(Ok(()));
                        w
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("{e:#}")));
                        return Err(format!("{e:#}"));
                    }
                };
                w.run().map_err(|e| format!("{e:#}"))
            })
            .map_err(|e| ServeError::Startup(format!("cannot spawn worker {id}: {e}")))?;
        handles.push(h);
    }
    drop(ready_tx);
    let mut startup_err = None;
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => startup_err = Some(e),
            Err(_) => startup_err = Some("a worker exited during start-up".into()),
        }
    }
    if let Some(e) = startup_err {
        shared.stop();
        stop_keys.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.join();
        }
        return Err(ServeError::Startup(e));
    }
    let stop_metrics = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some((addr, listener)) = metrics_listener {
        let addr = listener.local_addr().unwrap_or(addr);
        match status::start(Arc::clone(&shared), listener, Arc::clone(&stop_metrics)) {
            Ok(()) => info!("main", "metrics http://{addr}/metrics status page http://{addr}/"),
            Err(e) => crate::warn!("main", "cannot start the metrics thread: {e}; serving without --metrics"),
        }
    }
    info!("main", "ready workers={workers} pid={}", std::process::id());
    let services = shared.live().config.services.len();
    if systemd::notify(&format!("READY=1\nSTATUS=serving {services} service(s) on {workers} worker(s)")) {
        debug!("main", "sd_notify READY=1 sent");
    }
    let watchdog = start_watchdog(&shared);

    // Wait for SIGTERM/SIGINT, or for a worker to die; SIGHUP reloads.
    let mut reloading = Reloading {
        source,
        locks: listen_locks,
        own: own_sockets,
        keys_started: need_keys,
        stop_keys: Arc::clone(&stop_keys),
    };
    let sig = loop {
        let sig = set.wait();
        if sig != Ok(Signal::SIGHUP) {
            break sig;
        }
        reload_config(&shared, &mut reloading);
    };
    info!("main", "{} received: draining", sig.map_or("signal".to_string(), |s| s.as_str().to_string()));
    systemd::notify("STOPPING=1\nSTATUS=draining");
    drop(watchdog);
    shared.stop();
    stop_keys.store(true, Ordering::SeqCst);
    let mut failed = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e),
            Err(_) => failed = Some("worker panicked".into()),
        }
    }
    stop_metrics.store(true, Ordering::SeqCst);
    let total = |f: fn(&super::worker::WorkerStats) -> u64| shared.stats.iter().map(f).sum::<u64>();
    info!(
        "main",
        "stopped links_ok={} links_failed={} rejected={} e2c_bytes={}",
        total(|s| s.links_ok.load(Ordering::Relaxed)),
        total(|s| s.links_failed.load(Ordering::Relaxed)),
        total(|s| s.conns_rejected.load(Ordering::Relaxed)),
        total(|s| s.e2c_bytes.load(Ordering::Relaxed)),
    );
    match failed {
        Some(e) => {
            error!("main", "{e}");
            Err(ServeError::Worker(e))
        }
        None => Ok(()),
    }
}

/// While `WATCHDOG_USEC` asks for it: a thread that sends `WATCHDOG=1`
/// every half interval while every worker's tick counter moved within
/// [`systemd::WORKER_STALL`]. It stops when the returned sender drops.
fn start_watchdog(shared: &Arc<Shared>) -> Option<std::sync::mpsc::Sender<()>> {
    use std::sync::mpsc::RecvTimeoutError;
    use std::time::{Duration, Instant};
    let interval = systemd::watchdog_interval()?;
    let every = (interval / 2).max(Duration::from_millis(50));
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new().name("vmcrelay-watchdog".into()).spawn(move || {
        let now = Instant::now();
        let mut seen: Vec<(u64, Instant)> =
            shared.stats.iter().map(|s| (s.ticks.load(Ordering::Relaxed), now)).collect();
        let mut stalled_logged = false;
        systemd::notify("WATCHDOG=1");
        loop {
            match stop_rx.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = Instant::now();
            let mut stuck = None;
            for (i, (s, (last, when))) in shared.stats.iter().zip(seen.iter_mut()).enumerate() {
                let t = s.ticks.load(Ordering::Relaxed);
                if t != *last {
                    (*last, *when) = (t, now);
                } else if now.duration_since(*when) > systemd::WORKER_STALL {
                    stuck = Some((i, now.duration_since(*when)));
                }
            }
            match stuck {
                None => {
                    stalled_logged = false;
                    systemd::notify("WATCHDOG=1");
                }
                Some((i, d)) if !stalled_logged => {
                    stalled_logged = true;
                    error!(
                        "main",
                        "watchdog: worker w{i} has not ticked for {} s: no WATCHDOG=1 until it does (systemd \
                         restarts vmcrelay after WatchdogSec=)",
                        d.as_secs()
                    );
                }
                Some(_) => {}
            }
        }
    });
    match spawned {
        Ok(_) => {
            info!("main", "watchdog interval_ms={} ping_ms={}", interval.as_millis(), every.as_millis());
            Some(stop_tx)
        }
        Err(e) => {
            error!("main", "cannot start the watchdog thread: {e}; systemd will time the service out");
            None
        }
    }
}

/// Runs `connect`: one worker (a SPICE client session), until a signal or
/// a fatal error such as a wrong password.
pub fn run_connect(config: ServeConfig, opts: super::worker::ConnectOptions) -> Result<(), ServeError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGUSR1);
    let mut blocked = set;
    blocked.add(Signal::SIGPIPE);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).map_err(|e| ServeError::Startup(e.to_string()))?;
    for c in config.services.iter().flat_map(|s| &s.channels) {
        info!("main", "channel {} ends in {}", c.label(), c.endpoint);
    }
    let (shared, _own_sockets) = make_shared(config, systemd::Activated::new())?;
    let s2 = Arc::clone(&shared);
    let h = std::thread::Builder::new()
        .name("vmcrelay-connect".into())
        .spawn(move || {
            let r = super::worker::run_connect_worker(s2, opts).map_err(|e| format!("{e:#}"));
            // Wake the main thread whatever happened.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGUSR1);
            r
        })
        .map_err(|e| ServeError::Startup(format!("cannot spawn the worker: {e}")))?;
    let sig = set.wait();
    if sig.is_ok_and(|s| s != Signal::SIGUSR1) {
        info!("main", "{} received: closing", sig.map_or("signal".to_string(), |s| s.as_str().to_string()));
    }
    shared.stop();
    let joined = h.join();
    let fatal = shared.fatal.lock().ok().and_then(|f| f.clone());
    match (fatal, joined) {
        (Some((super::worker::FatalKind::TlsVerify, f)), _) => Err(ServeError::TlsVerify(f)),
        (Some((_, f)), _) => Err(ServeError::Fatal(f)),
        (None, Ok(Ok(()))) => Ok(()),
        (None, Ok(Err(e))) => Err(ServeError::Startup(e)),
        (None, Err(_)) => Err(ServeError::Worker("worker panicked".into())),
    }
}
