//! `vmcload run`: N connections, each on its own thread, linked first and
//! then released together, moving the seeded pattern in one of four modes.
//!
//! The main thread is the watchdog: it waits for every connection with a
//! deadline, prints the progress line, and builds the report. A connection
//! that hangs past the deadline is reported as such; the process exits
//! without it.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::LoadError;
use super::pattern::{Mismatch, Verifier, fill};
use super::report::{
    LatencyStats, MismatchReport, RunParams, RunReport, SetupStats, f64_to_u64, mib_s, per_sec, round3,
};
use super::size::{Rng, SizeDist};
use super::target::{ChannelPick, Link, RxHalf, Target, TxHalf, connect};
use crate::relay::sync_client::Session;

/// Stack of each connection thread: the buffers live on the heap.
const CONN_STACK_BYTES: usize = 256 * 1024;
/// Receive buffer for bulk reads.
const RX_BUF_BYTES: usize = 256 * 1024;
/// Largest latency recorded, µs (larger samples saturate).
const MAX_LATENCY_US: u64 = 600_000_000;

/// What moves where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Client → endpoint bulk; the endpoint verifies. A connection counts as
    /// done once the far side closes after its half-close (the relay closes
    /// a channel only after writing everything it read to the endpoint).
    Up,
    /// Endpoint → client bulk; the client verifies.
    Down,
    /// Both ways at once through an echo endpoint; the client verifies.
    Echo,
    /// One request of SIZE, wait for SIZE bytes back; latency.
    Rr,
}

impl Mode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Echo => "echo",
            Self::Rr => "rr",
        }
    }
}

/// When each connection stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// After this many payload bytes (sent for up/echo/rr, received for down).
    Bytes(u64),
    /// After this long.
    Duration(Duration),
}

/// A run's parameters.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where to connect.
    pub target: Target,
    /// Concurrent connections.
    pub connections: usize,
    /// Message sizes (down: read size).
    pub sizes: SizeDist,
    /// Mode.
    pub mode: Mode,
    /// Per-connection limit.
    pub limit: Limit,
    /// Messages per second per connection (open loop), if paced.
    pub rate: Option<f64>,
    /// Pattern seed; the endpoint must use the same.
    pub seed: u64,
    /// Per-connection link timeout.
    pub connect_timeout: Duration,
    /// Whole-run deadline after the start.
    pub timeout: Duration,
    /// Print the live progress line (stderr).
    pub progress: bool,
}

impl RunConfig {
    fn params(&self, picks: &[ChannelPick]) -> RunParams {
        let (channels, lz4, password) = match &self.target {
            Target::Spice { channels, lz4, password, .. } => {
                (channels.iter().map(ToString::to_string).collect(), *lz4, !password.is_empty())
            }
            _ => (Vec::new(), false, false),
        };
        RunParams {
            transport: self.target.transport(),
            uri: self.target.uri(),
            channels,
            picked: if matches!(self.target, Target::Spice { .. }) {
                picks.iter().map(|p| p.label.clone()).collect()
            } else {
                Vec::new()
            },
            connections: self.connections,
            mode: self.mode.name(),
            sizes: self.sizes.to_string(),
            bytes_per_connection: match self.limit {
                Limit::Bytes(b) => Some(b),
                Limit::Duration(_) => None,
            },
            duration_s: match self.limit {
                Limit::Duration(d) => Some(d.as_secs_f64()),
                Limit::Bytes(_) => None,
            },
            rate_per_connection: self.rate,
            lz4,
            seed: self.seed,
            password,
            connect_timeout_s: self.connect_timeout.as_secs_f64(),
            timeout_s: self.timeout.as_secs_f64(),
        }
    }
}

/// Live per-connection counters, read by the progress line.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    msgs_sent: AtomicU64,
}

impl Counters {
    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.msgs_sent.fetch_add(1, Ordering::Relaxed);
    }
    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Holds connections until all have linked, then starts them together.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(usize, Option<Instant>)>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<Instant>)> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn arrive_and_wait(&self) -> Instant {
        let mut g = self.lock();
        g.0 += 1;
        self.cv.notify_all();
        loop {
            if let Some(t) = g.1 {
                return t;
            }
            g = self.cv.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Waits until `n` arrived or `deadline`; returns how many did.
    fn wait_arrivals(&self, n: usize, deadline: Instant, mut tick: impl FnMut(usize)) -> usize {
        let mut g = self.lock();
        while g.0 < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now).min(Duration::from_millis(250));
            g = self.cv.wait_timeout(g, wait).unwrap_or_else(std::sync::PoisonError::into_inner).0;
            tick(g.0);
        }
        g.0
    }

    fn release(&self) -> Instant {
        let mut g = self.lock();
        let t = Instant::now();
        g.1 = Some(t);
        self.cv.notify_all();
        t
    }
}

/// When a connection stops sending.
#[derive(Debug, Clone, Copy)]
struct Budget {
    bytes: Option<u64>,
    deadline: Option<Instant>,
}

impl Budget {
    /// How much of `want` may go next, after `done` bytes; `None` to stop.
    fn next(&self, done: u64, want: usize, stop: &AtomicBool) -> Option<usize> {
        if stop.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        match self.bytes {
            Some(b) if done >= b => None,
            Some(b) => Some(usize::try_from(b - done).map_or(want, |left| want.min(left))),
            None => Some(want),
        }
    }
}

/// Open-loop pacing: message k is due at `phase + k/rate`.
#[derive(Debug)]
struct Pacer {
    next: Instant,
    interval: Duration,
}

impl Pacer {
    fn new(start: Instant, rate: f64, rng: &mut Rng) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate);
        // A random phase keeps N paced connections from firing in step.
        let phase = interval.mul_f64(rng.next_f64());
        Self { next: start + phase, interval }
    }

    /// Sleeps until the next message is due; returns when it was due.
    fn wait(&mut self, stop: &AtomicBool) -> Instant {
        let due = self.next;
        self.next += self.interval;
        loop {
            let now = Instant::now();
            if now >= due || stop.load(Ordering::Relaxed) {
                return due;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }
}

/// Why a connection failed.
#[derive(Debug, Clone)]
enum Fail {
    Error(String),
    Mismatch(Mismatch),
}

/// What one connection hands back.
#[derive(Debug)]
struct ConnResult {
    index: usize,
    setup_us: Option<u64>,
    end: Option<Instant>,
    latency: Option<Histogram<u64>>,
    verified: u64,
    msgs_received: Option<u64>,
    fail: Option<Fail>,
}

fn new_histogram() -> Result<Histogram<u64>, Fail> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| Fail::Error(format!("histogram: {e}")))
}

fn record(h: &mut Histogram<u64>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// Shared, read-only state of a run.
#[derive(Debug)]
struct Shared {
    cfg: RunConfig,
    stop: Arc<AtomicBool>,
}

struct ModeCtx<'a> {
    sh: &'a Shared,
    counters: &'a Counters,
    budget: Budget,
    rng: Rng,
    start: Instant,
}

fn pacer(ctx: &mut ModeCtx<'_>) -> Option<Pacer> {
    ctx.sh.cfg.rate.map(|r| Pacer::new(ctx.start, r, &mut ctx.rng))
}

fn up(ctx: &mut ModeCtx<'_>, tx: &mut TxHalf, rx: RxHalf) -> (Result<(), Fail>, Option<Instant>, Option<RxHalf>) {
    let seed = ctx.sh.cfg.seed;
    let mut buf = vec![0u8; ctx.sh.cfg.sizes.max()];
    let mut pace = pacer(ctx);
    // Anything that comes back (an echo endpoint, port events) is drained
    // so the far side never blocks on us.
    let (done_tx, done_rx) = mpsc::channel();
    let drainer = std::thread::Builder::new().name("vmcload-drain".into()).stack_size(64 * 1024).spawn(move || {
        let mut rx = rx;
        let mut b = vec![0u8; 64 * 1024];
        let mut n_total = 0u64;
        while let Ok(n) = rx.recv(&mut b) {
            if n == 0 {
                break;
            }
            n_total += n as u64;
        }
        let _ = done_tx.send(n_total);
        rx
    });
    let drainer = match drainer {
        Ok(d) => d,
        Err(e) => return (Err(Fail::Error(format!("drain thread: {e}"))), None, None),
    };
    let mut sent = 0u64;
    let result = loop {
        let want = ctx.sh.cfg.sizes.pick(&mut ctx.rng);
        let Some(n) = ctx.budget.next(sent, want, &ctx.sh.stop) else { break Ok(()) };
        if let Some(p) = pace.as_mut() {
            p.wait(&ctx.sh.stop);
        }
        fill(seed, sent, &mut buf[..n]);
        if let Err(e) = tx.send(&buf[..n]) {
            break Err(Fail::Error(format!("send after {sent} bytes: {e}")));
        }
        sent += n as u64;
        ctx.counters.add_sent(n);
    };
    let end = Instant::now();
    // Half-close and wait for the far side to close: under SPICE the relay
    // closes the channel only once it has written everything it read to
    // the endpoint (and a raw endpoint closes once it has read to EOF), so
    // that close is the only sign that the bytes got there. Closing the
    // session before it would cut the tail off, and a run that stops
    // waiting must not claim the upload arrived. The wait is bounded by the
    // run's deadline (`--timeout`) and the stop flag, not by a guess.
    tx.finish();
    let deadline = ctx.start + ctx.sh.cfg.timeout;
    loop {
        match done_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(n) => {
                ctx.counters.received.fetch_add(n, Ordering::Relaxed);
                return (result, Some(end), drainer.join().ok());
            }
            Err(mpsc::RecvTimeoutError::Timeout)
                if Instant::now() < deadline && !ctx.sh.stop.load(Ordering::Relaxed) => {}
            // The far side never closed; leave the drainer to the process exit.
            Err(_) => {
                let unconfirmed = Fail::Error(format!(
                    "sent {sent} bytes but the far side did not close the channel after the half-close: \
                     no sign that the endpoint got them all (the tail may be lost)"
                ));
                return (result.and(Err(unconfirmed)), Some(end), None);
            }
        }
    }
}

fn down(ctx: &mut ModeCtx<'_>, rx: &mut RxHalf) -> (Result<(), Fail>, Option<Instant>, u64) {
    let mut buf = vec![0u8; ctx.sh.cfg.sizes.max().max(1)];
    let mut v = Verifier::new(ctx.sh.cfg.seed);
    let result = loop {
        let Some(n) = ctx.budget.next(v.offset(), buf.len(), &ctx.sh.stop) else { break Ok(()) };
        match rx.recv(&mut buf[..n]) {
            Ok(0) => break Err(Fail::Error(format!("stream ended after {} bytes", v.offset()))),
            Ok(got) => {
                if let Err(m) = v.feed(&buf[..got]) {
                    break Err(Fail::Mismatch(m));
                }
                ctx.counters.add_received(got);
            }
            Err(e) => break Err(Fail::Error(format!("receive after {} bytes: {e}", v.offset()))),
        }
    };
    (result, Some(Instant::now()), v.offset())
}

enum EchoItem {
    /// A message whose last byte is at stream offset `end - 1`, due at `at`.
    Msg { end: u64, at: Instant },
    /// The writer is done after `total` bytes.
    Done { total: u64 },
    /// The writer failed.
    Failed(String),
}

fn echo(
    ctx: &mut ModeCtx<'_>,
    mut tx: TxHalf,
    rx: &mut RxHalf,
    session: Option<&Session>,
    hist: &mut Histogram<u64>,
) -> (Result<(), Fail>, Option<Instant>, u64, Option<TxHalf>) {
    let (q_tx, q_rx) = mpsc::channel::<EchoItem>();
    let seed = ctx.sh.cfg.seed;
    let sizes = ctx.sh.cfg.sizes.clone();
    let budget = ctx.budget;
    let stop = Arc::clone(&ctx.sh.stop);
    let mut rng = Rng::new(ctx.rng.next_u64());
    let mut pace = pacer(ctx);
    // The counters live as long as the run; the writer only bumps them
    // through this shared handle.
    let counters = Arc::new(Counters::default());
    let c2 = Arc::clone(&counters);
    let writer =
        std::thread::Builder::new().name("vmcload-echo-tx".into()).stack_size(CONN_STACK_BYTES).spawn(move || {
            let mut buf = vec![0u8; sizes.max()];
            let mut sent = 0u64;
            loop {
                let want = sizes.pick(&mut rng);
                let Some(n) = budget.next(sent, want, &stop) else { break };
                let at = match pace.as_mut() {
                    Some(p) => p.wait(&stop),
                    None => Instant::now(),
                };
                fill(seed, sent, &mut buf[..n]);
                // Announce before sending, so the reader never waits for
                // bytes nobody will send.
                if q_tx.send(EchoItem::Msg { end: sent + n as u64, at }).is_err() {
                    return tx;
                }
                if let Err(e) = tx.send(&buf[..n]) {
                    let _ = q_tx.send(EchoItem::Failed(format!("send after {sent} bytes: {e}")));
                    return tx;
                }
                sent += n as u64;
                c2.add_sent(n);
            }
            let _ = q_tx.send(EchoItem::Done { total: sent });
            tx
        });
    let writer = match writer {
        Ok(w) => w,
        Err(e) => return (Err(Fail::Error(format!("echo writer thread: {e}"))), None, 0, None),
    };
    let mut buf = vec![0u8; RX_BUF_BYTES];
    let mut v = Verifier::new(seed);
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut announced = 0u64;
    let mut total: Option<u64> = None;
    let mut last_sent = 0u64;
    let result = 'outer: loop {
        // Mirror the writer's counters into the live ones.
        let s = counters.sent.load(Ordering::Relaxed);
        if s > last_sent {
            ctx.counters.sent.fetch_add(s - last_sent, Ordering::Relaxed);
            ctx.counters.msgs_sent.store(counters.msgs_sent.load(Ordering::Relaxed), Ordering::Relaxed);
            last_sent = s;
        }
        let received = v.offset();
        if total.is_some_and(|t| received >= t) {
            break Ok(());
        }
        let item = if received >= announced {
            // Nothing outstanding: wait for the writer.
            match q_rx.recv() {
                Ok(i) => Some(i),
                Err(_) => break Err(Fail::Error("echo writer vanished".into())),
            }
        } else {
            q_rx.try_recv().ok()
        };
        if let Some(i) = item {
            let mut next = Some(i);
            while let Some(i) = next {
                match i {
                    EchoItem::Msg { end, at } => {
                        announced = end;
                        inflight.push_back((end, at));
                    }
                    EchoItem::Done { total: t } => total = Some(t),
                    EchoItem::Failed(e) => break 'outer Err(Fail::Error(e)),
                }
                next = q_rx.try_recv().ok();
            }
            continue;
        }
        let cap = usize::try_from(announced - received).map_or(buf.len(), |left| left.min(buf.len()));
        match rx.recv(&mut buf[..cap]) {
            Ok(0) => break Err(Fail::Error(format!("stream ended after {received} of {announced} bytes echoed"))),
            Ok(n) => {
                if let Err(m) = v.feed(&buf[..n]) {
                    break Err(Fail::Mismatch(m));
                }
                ctx.counters.add_received(n);
                while inflight.front().is_some_and(|f| f.0 <= v.offset()) {
                    if let Some((_, at)) = inflight.pop_front() {
                        record(hist, at);
                    }
                }
            }
            Err(e) => break Err(Fail::Error(format!("receive after {received} bytes: {e}"))),
        }
    };
    let end = Instant::now();
    if result.is_err() {
        // Wake a writer blocked on a peer that stopped reading (we did).
        rx.abort();
        if let Some(s) = session {
            s.close();
        }
    }
    drop(q_rx);
    let tx = writer.join().ok();
    let s = counters.sent.load(Ordering::Relaxed);
    ctx.counters.sent.fetch_add(s.saturating_sub(last_sent), Ordering::Relaxed);
    ctx.counters.msgs_sent.store(counters.msgs_sent.load(Ordering::Relaxed), Ordering::Relaxed);
    (result, Some(end), v.offset(), tx)
}

fn rr(
    ctx: &mut ModeCtx<'_>,
    tx: &mut TxHalf,
    rx: &mut RxHalf,
    hist: &mut Histogram<u64>,
) -> (Result<(), Fail>, Option<Instant>, u64) {
    let seed = ctx.sh.cfg.seed;
    let max = ctx.sh.cfg.sizes.max();
    let mut out = vec![0u8; max];
    let mut inb = vec![0u8; max];
    let mut v = Verifier::new(seed);
    let mut pace = pacer(ctx);
    let mut sent = 0u64;
    let result = 'outer: loop {
        let want = ctx.sh.cfg.sizes.pick(&mut ctx.rng);
        let Some(n) = ctx.budget.next(sent, want, &ctx.sh.stop) else { break Ok(()) };
        let at = match pace.as_mut() {
            Some(p) => p.wait(&ctx.sh.stop),
            None => Instant::now(),
        };
        fill(seed, sent, &mut out[..n]);
        if let Err(e) = tx.send(&out[..n]) {
            break Err(Fail::Error(format!("send after {sent} bytes: {e}")));
        }
        ctx.counters.add_sent(n);
        sent += n as u64;
        let mut got = 0;
        while got < n {
            match rx.recv(&mut inb[got..n]) {
                Ok(0) => break 'outer Err(Fail::Error(format!("stream ended after {} bytes", v.offset()))),
                Ok(k) => {
                    if let Err(m) = v.feed(&inb[got..got + k]) {
                        break 'outer Err(Fail::Mismatch(m));
                    }
                    got += k;
                    ctx.counters.add_received(k);
                }
                Err(e) => break 'outer Err(Fail::Error(format!("receive after {} bytes: {e}", v.offset()))),
            }
        }
        record(hist, at);
    };
    (result, Some(Instant::now()), v.offset())
}

fn conn_main(index: usize, sh: &Shared, pick: &ChannelPick, counters: &Counters, gate: &Gate) -> ConnResult {
    let mut res =
        ConnResult { index, setup_us: None, end: None, latency: None, verified: 0, msgs_received: None, fail: None };
    // Made before linking so that a failure here leaves nothing open.
    let mut hist: Option<Histogram<u64>> = None;
    if matches!(sh.cfg.mode, Mode::Echo | Mode::Rr) {
        match new_histogram() {
            Ok(h) => hist = Some(h),
            Err(f) => {
                res.fail = Some(f);
                gate.arrive_and_wait();
                return res;
            }
        }
    }
    let t0 = Instant::now();
    let link = connect(&sh.cfg.target, pick, sh.cfg.connect_timeout);
    let setup = t0.elapsed();
    let start = gate.arrive_and_wait();
    let Link { mut tx, mut rx, session } = match link {
        Ok(l) => l,
        Err(e) => {
            res.fail = Some(Fail::Error(format!("link set-up: {e}")));
            return res;
        }
    };
    res.setup_us = Some(u64::try_from(setup.as_micros()).unwrap_or(u64::MAX));
    let budget = Budget {
        bytes: match sh.cfg.limit {
            Limit::Bytes(b) => Some(b),
            Limit::Duration(_) => None,
        },
        deadline: match sh.cfg.limit {
            Limit::Duration(d) => Some(start + d),
            Limit::Bytes(_) => None,
        },
    };
    let mut ctx = ModeCtx {
        sh,
        counters,
        budget,
        rng: Rng::new(sh.cfg.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        start,
    };
    let outcome = match (sh.cfg.mode, hist) {
        (Mode::Up, _) => {
            let (r, end, back) = up(&mut ctx, &mut tx, rx);
            res.end = end;
            res.fail = r.err();
            if let Some(rx) = back {
                res.msgs_received = rx.msgs();
            }
            drop(tx);
            if let Some(s) = &session {
                s.close();
            }
            return res;
        }
        (Mode::Down, _) => {
            let (r, end, verified) = down(&mut ctx, &mut rx);
            res.end = end;
            res.verified = verified;
            r
        }
        (Mode::Echo, Some(mut h)) => {
            let (r, end, verified, back) = echo(&mut ctx, tx, &mut rx, session.as_ref(), &mut h);
            res.end = end;
            res.verified = verified;
            res.latency = Some(h);
            match back {
                Some(t) => tx = t,
                None => {
                    res.fail = Some(r.err().unwrap_or(Fail::Error("echo writer panicked".into())));
                    rx.abort();
                    if let Some(s) = &session {
                        s.close();
                    }
                    return res;
                }
            }
            r
        }
        (Mode::Rr, Some(mut h)) => {
            let (r, end, verified) = rr(&mut ctx, &mut tx, &mut rx, &mut h);
            res.end = end;
            res.verified = verified;
            res.latency = Some(h);
            r
        }
        (Mode::Echo | Mode::Rr, None) => Err(Fail::Error("internal: no histogram".into())),
    };
    res.msgs_received = rx.msgs();
    res.fail = outcome.err();
    rx.abort();
    drop(tx);
    if let Some(s) = &session {
        s.close();
    }
    res
}

/// Progress line on stderr (only when it is a terminal).
#[derive(Debug)]
struct Progress {
    on: bool,
    last: Instant,
    last_bytes: u64,
}

impl Progress {
    fn line(&mut self, text: &str) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{text}");
            let _ = e.flush();
        }
    }

    fn clear(&self) {
        if self.on {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
        }
    }

    fn tick(&mut self, mode: Mode, start: Instant, counters: &[Arc<Counters>], done: usize, errors: usize) {
        if !self.on {
            return;
        }
        let sent: u64 = counters.iter().map(|c| c.sent.load(Ordering::Relaxed)).sum();
        let recv: u64 = counters.iter().map(|c| c.received.load(Ordering::Relaxed)).sum();
        let main = if mode == Mode::Up { sent } else { recv };
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        let rate_now = mib_s(main.saturating_sub(self.last_bytes), dt);
        self.last = now;
        self.last_bytes = main;
        let el = start.elapsed().as_secs_f64();
        self.line(&format!(
            "{el:7.1} s  sent {}  received {}  {rate_now:9.1} MiB/s now  {:9.1} MiB/s avg  done {done}/{}  errors {errors}",
            super::report::fmt_bytes(sent),
            super::report::fmt_bytes(recv),
            mib_s(main, el),
            counters.len(),
        ));
    }
}

/// Runs the load and returns the report. `stop` ends the run early (a
/// signal); the report then says `interrupted`.
pub fn run(cfg: RunConfig, stop: Arc<AtomicBool>) -> Result<RunReport, LoadError> {
    if cfg.connections == 0 {
        return Err(LoadError::Usage("--connections must be at least 1".into()));
    }
    let mut progress =
        Progress { on: cfg.progress && std::io::stderr().is_terminal(), last: Instant::now(), last_bytes: 0 };
    progress.line("linking…");
    let picks = cfg.target.plan(cfg.connections, cfg.connect_timeout)?;
    let n = picks.len();
    let params = cfg.params(&picks);
    let sh = Arc::new(Shared { cfg, stop: Arc::clone(&stop) });
    let gate = Arc::new(Gate::default());
    let counters: Vec<Arc<Counters>> = (0..n).map(|_| Arc::new(Counters::default())).collect();
    let (res_tx, res_rx) = mpsc::channel::<ConnResult>();
    let mut spawn_errors = Vec::new();
    let mut spawned = 0usize;
    for (i, pick) in picks.iter().enumerate() {
        let (sh2, g2, c2, p2, tx2) =
            (Arc::clone(&sh), Arc::clone(&gate), Arc::clone(&counters[i]), pick.clone(), res_tx.clone());
        let r =
            std::thread::Builder::new().name(format!("vmcload-{i}")).stack_size(CONN_STACK_BYTES).spawn(move || {
                let r = conn_main(i, &sh2, &p2, &c2, &g2);
                let _ = tx2.send(r);
            });
        if r.is_ok() {
            spawned += 1;
        }
        if let Err(e) = r {
            // Count it as arrived so the others are not held back.
            spawn_errors.push(format!("connection {i}: thread: {e}"));
            let mut g = gate.lock();
            g.0 += 1;
        }
    }
    drop(res_tx);
    // Set-up: every connection links (or fails) within its own timeouts;
    // the slack covers port probing and busy-channel retries.
    let setup_deadline = Instant::now() + sh.cfg.connect_timeout * 2 + Duration::from_secs(5);
    let arrived = gate.wait_arrivals(n, setup_deadline, |k| progress.line(&format!("linking… {k}/{n}")));
    let start = gate.release();
    let mut errors_text = spawn_errors;
    if arrived < n {
        errors_text.push(format!("{} connections were still linking at the start", n - arrived));
    }
    let run_deadline = start + sh.cfg.timeout;
    let mut results: Vec<ConnResult> = Vec::with_capacity(n);
    let mut timed_out = false;
    let mut failed_live = 0usize;
    let mut next_tick = Instant::now() + Duration::from_millis(250);
    // When the stop flag went up (signal or timeout): connections get two
    // seconds to notice before the run is reported without them.
    let mut stopped_at: Option<Instant> = None;
    while results.len() < spawned {
        let now = Instant::now();
        if now >= run_deadline && !timed_out {
            timed_out = !stop.swap(true, Ordering::Relaxed);
        }
        if stop.load(Ordering::Relaxed) {
            let at = *stopped_at.get_or_insert(now);
            if now >= at + Duration::from_secs(2) {
                break;
            }
        }
        let wait = next_tick.saturating_duration_since(now).min(Duration::from_millis(250));
        match res_rx.recv_timeout(wait) {
            Ok(r) => {
                if r.fail.is_some() {
                    failed_live += 1;
                }
                results.push(r);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_tick {
            progress.tick(sh.cfg.mode, start, &counters, results.len(), failed_live);
            next_tick = Instant::now() + Duration::from_millis(250);
        }
    }
    progress.clear();
    let interrupted = stop.load(Ordering::Relaxed) && !timed_out;
    Ok(build_report(params, &sh.cfg, &picks, start, results, &counters, errors_text, timed_out, interrupted))
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    params: RunParams,
    cfg: &RunConfig,
    picks: &[ChannelPick],
    start: Instant,
    mut results: Vec<ConnResult>,
    counters: &[Arc<Counters>],
    mut error_messages: Vec<String>,
    timed_out: bool,
    interrupted: bool,
) -> RunReport {
    results.sort_by_key(|r| r.index);
    let n = counters.len();
    let mut errors = n - results.len().min(n);
    if results.len() < n {
        let missing: Vec<usize> = (0..n).filter(|i| !results.iter().any(|r| r.index == *i)).take(10).collect();
        error_messages.push(format!(
            "{} connections did not finish (first: {missing:?}){}",
            n - results.len(),
            if timed_out { " before the timeout" } else { "" }
        ));
    }
    let mut latency: Option<Histogram<u64>> = None;
    let mut setup = Vec::new();
    let mut mismatch = None;
    let mut verified = 0u64;
    let mut msgs_received: Option<u64> = None;
    let mut last_end = start;
    for r in &results {
        if let Some(s) = r.setup_us {
            setup.push(s);
        }
        if let Some(h) = &r.latency {
            match latency.as_mut() {
                Some(l) => {
                    let _ = l.add(h);
                }
                None => latency = Some(h.clone()),
            }
        }
        if let Some(e) = r.end {
            last_end = last_end.max(e);
        }
        verified += r.verified;
        if let Some(m) = r.msgs_received {
            msgs_received = Some(msgs_received.unwrap_or(0) + m);
        }
        let label = picks.get(r.index).map_or("?", |p| p.label.as_str());
        match &r.fail {
            None => {}
            Some(Fail::Error(e)) => {
                errors += 1;
                if error_messages.len() < 10 {
                    error_messages.push(format!("connection {} ({label}): {e}", r.index));
                }
            }
            Some(Fail::Mismatch(m)) => {
                errors += 1;
                if error_messages.len() < 10 {
                    error_messages.push(format!("connection {} ({label}): integrity: {m}", r.index));
                }
                if mismatch.is_none() {
                    mismatch = Some(MismatchReport::new(r.index, label, *m));
                }
            }
        }
    }
    let elapsed = last_end.duration_since(start).as_secs_f64();
    let sent: u64 = counters.iter().map(|c| c.sent.load(Ordering::Relaxed)).sum();
    let received: u64 = counters.iter().map(|c| c.received.load(Ordering::Relaxed)).sum();
    let msgs_sent: u64 = counters.iter().map(|c| c.msgs_sent.load(Ordering::Relaxed)).sum();
    let (main_bytes, main_msgs) = match cfg.mode {
        Mode::Up => (sent, Some(msgs_sent)),
        Mode::Echo => (received, Some(msgs_sent)),
        Mode::Rr => (received, Some(latency.as_ref().map_or(0, Histogram::len))),
        Mode::Down => (received, msgs_received),
    };
    let connections_ok = results.iter().filter(|r| r.fail.is_none()).count();
    let integrity = if mismatch.is_some() {
        "mismatch"
    } else if cfg.mode == Mode::Up {
        "sender-only"
    } else {
        "ok"
    };
    RunReport {
        tool: "vmcload run",
        version: env!("CARGO_PKG_VERSION"),
        params,
        ok: errors == 0 && mismatch.is_none() && !timed_out && connections_ok == n,
        integrity,
        verified_bytes: verified,
        mismatch,
        elapsed_s: round3(elapsed),
        connections_ok,
        bytes_sent: sent,
        bytes_received: received,
        msgs_sent,
        msgs_received,
        throughput_mib_s: round3(mib_s(main_bytes, elapsed)),
        sent_mib_s: round3(mib_s(sent, elapsed)),
        received_mib_s: round3(mib_s(received, elapsed)),
        msgs_per_s: main_msgs.map(|m| round3(per_sec(m, elapsed))),
        setup_us: SetupStats::from_samples(setup),
        latency_us: latency.as_ref().and_then(LatencyStats::from_histogram),
        errors,
        error_messages,
        timed_out,
        interrupted,
    }
}

/// A default whole-run deadline: the duration plus set-up slack, or ten
/// minutes for byte-bounded runs.
pub fn default_timeout(limit: Limit, connect_timeout: Duration) -> Duration {
    match limit {
        Limit::Duration(d) => d + connect_timeout + Duration::from_secs(30),
        Limit::Bytes(_) => Duration::from_secs(600),
    }
}

/// Messages per second → a sane value or an error.
pub fn check_rate(rate: f64) -> Result<f64, String> {
    if rate.is_finite() && rate > 0.0 && f64_to_u64(rate) <= 10_000_000 {
        Ok(rate)
    } else {
        Err(format!("--rate {rate} must be between 0 and 10000000 messages per second"))
    }
}
