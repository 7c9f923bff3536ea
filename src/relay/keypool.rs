//! RSA ticket keys, generated off the data path.
//!
//! A helper thread keeps each worker's bounded queue full and wakes the
//! worker after each key, so a worker never generates a key itself (≈10 ms
//! each) and every link still gets its own key, as with spice-server.

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
    wakers: Vec<Arc<dyn Wake>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<Receiver<TicketKey>>> {
    let (txs, rxs): (Vec<SyncSender<TicketKey>>, Vec<Receiver<TicketKey>>) =
        (0..workers).map(|_| sync_channel(per_worker.max(1))).unzip();
    let reuse = reuse.max(1);
    std::thread::Builder::new().name("vmcrelay-keys".into()).spawn(move || run(txs, reuse, wakers, stop))?;
    Ok(rxs)
}

fn run(txs: Vec<SyncSender<TicketKey>>, reuse: usize, wakers: Vec<Arc<dyn Wake>>, stop: Arc<AtomicBool>) {
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
    let mut next = 0usize;
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
                }
                Err(TrySendError::Full(back) | TrySendError::Disconnected(back)) => key = Some(back),
            }
        }
        if let Some(k) = key {
            // Every queue is full: keep the key and wait a little.
            spare = Some(k);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
