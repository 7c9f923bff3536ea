//! RSA ticket keys, generated off the data path.
//!
//! Key threads (one per core by default) keep each worker's bounded queue
//! full and wake the worker after each key, so a worker never generates a
//! key itself (≈10 ms each) and every link still gets its own key, as with
//! spice-server. They run at nice 10: the data path, the workers' links and
//! everything else on the host come first; they fill the pool at start and
//! refill it between bursts, and the pool (`key-pool-per-worker`) is what
//! absorbs a burst of links.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use crate::proto::auth::TicketKey;

/// Something to poke when a key arrives (the worker's mailbox).
pub trait Wake: Send + Sync {
    /// Wakes the worker.
    fn wake(&self);
}

/// Starts the key thread; returns one receiver per worker. With a `reuse`
/// above 1 each generated key is handed to up to `reuse` links: a
/// deliberate trade of ticket-replay risk for link set-up rate, off by
/// default.
pub fn start(
    workers: usize,
    per_worker: usize,
    reuse: usize,
    threads: usize,
    wakers: Vec<Arc<dyn Wake>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<Receiver<TicketKey>>> {
    let (txs, rxs): (Vec<SyncSender<TicketKey>>, Vec<Receiver<TicketKey>>) =
        (0..workers).map(|_| sync_channel(per_worker.max(1))).unzip();
    let reuse = reuse.max(1);
    let full = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let since = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    for t in 0..threads.max(1) {
        let (txs, wakers, stop) = (txs.clone(), wakers.clone(), Arc::clone(&stop));
        let fill = Fill {
            full: Arc::clone(&full),
            delivered: Arc::clone(&delivered),
            since: Arc::clone(&since),
            per_worker,
            threads,
        };
        std::thread::Builder::new().name(format!("vmcrelay-keys{t}")).spawn(move || {
            idle_priority();
            run(txs, reuse, wakers, stop, t, &fill);
        })?;
    }
    Ok(rxs)
}

/// Nice level of the key threads: below everything else, yet not starved
/// (`SCHED_IDLE` threads got no CPU for a minute on a busy 2-core host, and
/// a link whose pool ran dry then waited that long).
const KEY_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority (Linux: nice is per thread).
/// (nix has no wrapper for setpriority.)
#[allow(unsafe_code)]
fn idle_priority() {
    // SAFETY: a plain syscall on the calling thread (who = 0); failure only
    // leaves the priority as it was.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, KEY_NICE);
    }
}

/// When the pool last became full (one log line per fill, not per key).
struct Fill {
    full: Arc<AtomicBool>,
    /// Keys handed out since the last "full" line.
    delivered: Arc<std::sync::atomic::AtomicUsize>,
    /// When the pool last stopped being full.
    since: Arc<std::sync::Mutex<std::time::Instant>>,
    per_worker: usize,
    threads: usize,
}

fn run(
    txs: Vec<SyncSender<TicketKey>>,
    reuse: usize,
    wakers: Vec<Arc<dyn Wake>>,
    stop: Arc<AtomicBool>,
    first: usize,
    fill: &Fill,
) {
    let mut shares_left = 0usize;
    let mut current: Option<TicketKey> = None;
    use rand::SeedableRng;
    let mut rng = match rand::rngs::StdRng::try_from_rng(&mut rand::rngs::SysRng) {
        Ok(r) => r,
        Err(e) => {
            crate::error!("keys", "cannot seed from the OS random source: {e}; no key will be generated");
            return;
        }
    };
    let mut spare: Option<TicketKey> = None;
    let mut next = first;
    while !stop.load(Ordering::Relaxed) {
        let key = match spare.take() {
            Some(k) => k,
            None if shares_left > 0 && current.is_some() => {
                shares_left -= 1;
                match &current {
                    Some(k) => k.share(),
                    None => continue,
                }
            }
            None => match TicketKey::generate(&mut rng) {
                Ok(k) => {
                    if reuse > 1 {
                        current = Some(k.share());
                        shares_left = reuse - 1;
                    }
                    k
                }
                Err(e) => {
                    crate::error!("keys", "cannot generate an RSA key: {e}; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        // Offer the key to each worker in turn, starting after the last one served.
        let mut key = Some(key);
        for k in 0..txs.len() {
            let w = (next + k) % txs.len();
            let Some(offer) = key.take() else { break };
            match txs[w].try_send(offer) {
                Ok(()) => {
                    wakers[w].wake();
                    next = w + 1;
                    fill.delivered.fetch_add(1, Ordering::Relaxed);
                    if fill.full.swap(false, Ordering::Relaxed)
                        && let Ok(mut t) = fill.since.lock()
                    {
                        *t = std::time::Instant::now();
                    }
                }
                Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => key = Some(back),
            }
        }
        if let Some(k) = key {
            // Every queue is full: keep the key and wait a little.
            // One line per fill after real use (a quarter of a worker's
            // pool), not one per key taken and put back.
            if !fill.full.swap(true, Ordering::Relaxed)
                && fill.delivered.load(Ordering::Relaxed) >= (fill.per_worker / 4).max(1)
            {
                fill.delivered.store(0, Ordering::Relaxed);
                let took = fill.since.lock().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
                crate::info!(
                    "keys",
                    "key pool full: {} keys per worker ready for {} worker(s), filled in {took:.1} s by {} low-priority \
                     thread(s)",
                    fill.per_worker,
                    txs.len(),
                    fill.threads
                );
            }
            spare = Some(k);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
