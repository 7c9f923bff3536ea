//! `vmcrelay serve`: starts the key pool and one worker per core, waits
//! for SIGTERM/SIGINT, drains and exits.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

use super::config::ServeConfig;
use super::keypool;
use super::worker::{Shared, Worker};
use crate::{error, info};

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
}

/// Runs the relay until a signal; returns after every worker drained.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    // Signals: SIGTERM/SIGINT go to the main thread's sigwait, never to a
    // worker (the mask is inherited by every thread spawned below).
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // A peer that goes away must give EPIPE, not kill the relay: SIGPIPE
    // stays blocked (pending, never delivered) in every thread.
    let mut blocked = set;
    blocked.add(Signal::SIGPIPE);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&blocked), None).map_err(|e| ServeError::Startup(e.to_string()))?;

    let workers = config.limits.workers;
    let per_worker_keys = config.limits.key_pool_per_worker;
    for s in &config.services {
        let chans: Vec<String> = s.channels.iter().map(|c| format!("{}={}", c.label(), c.endpoint)).collect();
        let addrs: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        info!(
            "main",
            "service name={} listen={} ticketing={} channels=[{}]",
            s.name,
            addrs.join(","),
            if s.password.is_some() { "on" } else { "off" },
            chans.join(" ")
        );
    }
    let shared = Shared::new(config).map_err(|e| ServeError::Startup(e.to_string()))?;
    let stop_keys = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reuse = shared.config.limits.key_reuse;
    if reuse > 1 {
        crate::warn!(
            "main",
            "key-reuse={reuse}: each RSA ticket key serves up to {reuse} links; a sniffed ticket can be replayed \
             on a link that gets the same key (use 1 on untrusted networks)"
        );
    }
    let keys = keypool::start(workers, per_worker_keys, reuse, shared.wakers(), Arc::clone(&stop_keys))
        .map_err(|e| ServeError::Startup(format!("cannot start the key thread: {e}")))?;

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
    info!("main", "ready workers={workers} pid={}", std::process::id());

    // Wait for SIGTERM/SIGINT, or for a worker to die.
    let sig = set.wait();
    info!("main", "{} received: draining", sig.map_or("signal".to_string(), |s| s.as_str().to_string()));
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
    let shared = Shared::new(config).map_err(|e| ServeError::Startup(e.to_string()))?;
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
        (Some(f), _) => Err(ServeError::Fatal(f)),
        (None, Ok(Ok(()))) => Ok(()),
        (None, Ok(Err(e))) => Err(ServeError::Startup(e)),
        (None, Err(_)) => Err(ServeError::Worker("worker panicked".into())),
    }
}
