//! `vmcload idle`: many SPICE sessions, each a main link plus C channels,
//! linked with bounded concurrency and then held open with no traffic, so
//! the server's cost per idle channel can be measured from outside (its
//! RSS and fds). At the end every session and channel is checked to be
//! still open, and a sample of the channels must echo a few bytes (the
//! server's channels go to `echo:` endpoints), so "idle" is proven alive.
//!
//! Each session goes to its own target (`HOST:PORT`, one VM): a SPICE
//! server serves one session at a time (a second one replaces the first).
//! A held channel is one socket and nothing else
//! ([`Session::open_linked`]); a session is its main socket and the thread
//! that answers PINGs.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::LoadError;
use super::pattern;
use super::report::{SetupStats, per_sec, round3};
use crate::proto::channel::ChannelKind;
use crate::relay::sync_client::{LinkedChannel, Session};

/// Most sessions (and targets) one run opens.
pub const MAX_SESSIONS: usize = 100_000;
/// File descriptors a session holds on this side: the main socket and its
/// two clones (reader thread, writer).
pub const FDS_PER_SESSION: u64 = 3;
/// File descriptors beyond the sessions' (std streams, echo checks, slack).
pub const FDS_SLACK: u64 = 64;
/// Time each sampled channel has to echo its bytes.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the whole echo check may take (a stuck server must not hold the
/// run for sample × timeout); channels not reached count as failed.
const ECHO_DEADLINE: Duration = Duration::from_secs(20);
/// Distinct error messages kept in the report.
const MAX_ERRORS: usize = 10;

/// What `vmcload idle` does.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// `HOST:PORT` of every target; session `i` goes to target `i`.
    pub targets: Vec<String>,
    /// Sessions to open (≤ targets).
    pub sessions: usize,
    /// Channels per session.
    pub channels: usize,
    /// Channel type of every channel (128..=255 or a named spicevmc kind).
    pub channel_type: u8,
    /// Id of the first channel; the others follow.
    pub first_id: u8,
    /// Sessions linking at once.
    pub concurrency: usize,
    /// How long to hold once linked (`None`: until SIGINT/SIGTERM).
    pub hold: Option<Duration>,
    /// Ticket password (empty: ticketing off).
    pub password: Vec<u8>,
    /// Timeout of a main link (TCP connect and every read).
    pub connect_timeout: Duration,
    /// Channels that must echo at the end (spread over all of them).
    pub echo_sample: usize,
    /// Bytes each sampled channel sends and must get back.
    pub echo_bytes: usize,
    /// Stop linking once this many links failed (`None`: never).
    pub max_failed: Option<u64>,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// Parses `--target`: comma-separated `HOST:PORT` or `HOST:FIRST-LAST`
/// (a port range, one target per port); `spice://` is accepted.
pub fn parse_targets(specs: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in specs.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        let t = item.strip_prefix("spice://").unwrap_or(item).trim_end_matches('/');
        let Some((host, ports)) = t.rsplit_once(':') else {
            return Err(format!("target `{item}`: write HOST:PORT or HOST:FIRST-LAST"));
        };
        if host.is_empty() {
            return Err(format!("target `{item}`: no host"));
        }
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(|| format!("target `{item}`: bad port `{p}`"))
        };
        let (a, b) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(ports)?;
                (p, p)
            }
        };
        if a > b {
            return Err(format!("target `{item}`: empty port range"));
        }
        for p in a..=b {
            out.push(format!("{host}:{p}"));
        }
        if out.len() > MAX_SESSIONS {
            return Err(format!("more than {MAX_SESSIONS} targets"));
        }
    }
    if out.is_empty() {
        return Err("give --target HOST:PORT[,HOST:PORT...] (or HOST:FIRST-LAST)".into());
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = out.iter().find(|t| !seen.insert(t.as_str())) {
        return Err(format!(
            "target {dup} is given twice: each session needs its own target (a second session replaces the first)"
        ));
    }
    Ok(out)
}

/// This process's open-file limit, and what raising it did.
#[derive(Debug, Clone, Serialize)]
pub struct FdLimit {
    /// File descriptors the run needs here (estimate).
    pub need: u64,
    /// Soft limit at start.
    pub soft_before: u64,
    /// Hard limit at start.
    pub hard_before: u64,
    /// Soft limit now.
    pub soft: u64,
    /// Hard limit now.
    pub hard: u64,
    /// What was done, or why the limit could not be raised.
    pub note: String,
}

impl FdLimit {
    /// Whether the run fits.
    pub fn enough(&self) -> bool {
        self.soft >= self.need
    }
}

/// File descriptors `sessions` sessions of `channels` channels need here.
pub fn fds_needed(sessions: usize, channels: usize) -> u64 {
    let s = u64::try_from(sessions).unwrap_or(u64::MAX);
    let c = u64::try_from(channels).unwrap_or(u64::MAX);
    s.saturating_mul(FDS_PER_SESSION.saturating_add(c)).saturating_add(FDS_SLACK)
}

/// Raises RLIMIT_NOFILE: soft to hard, and the hard limit itself (up to
/// `/proc/sys/fs/nr_open`) when `need` is above it and we may (root).
pub fn raise_nofile(need: u64) -> FdLimit {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft0, hard0) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            return FdLimit {
                need,
                soft_before: 0,
                hard_before: 0,
                soft: 0,
                hard: 0,
                note: format!("cannot read RLIMIT_NOFILE: {e}"),
            };
        }
    };
    let mut notes = Vec::new();
    let mut hard = hard0;
    if need > hard0 {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(hard0);
        let want = need.min(nr_open);
        if want > hard0 {
            match setrlimit(Resource::RLIMIT_NOFILE, want, want) {
                Ok(()) => {
                    hard = want;
                    notes.push(format!("raised the hard limit {hard0} → {want}"));
                }
                Err(e) => notes.push(format!(
                    "cannot raise the hard limit {hard0} → {want} ({e}; needs root or CAP_SYS_RESOURCE)"
                )),
            }
        }
        if need > nr_open {
            notes.push(format!("/proc/sys/fs/nr_open is {nr_open}"));
        }
    }
    let mut soft = soft0;
    if soft0 < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                soft = hard;
                notes.push(format!("raised the soft limit {soft0} → {hard}"));
            }
            Err(e) => notes.push(format!("cannot raise the soft limit {soft0} → {hard}: {e}")),
        }
    }
    if notes.is_empty() {
        notes.push(format!("limit {soft0} (hard {hard0}) is enough"));
    }
    FdLimit { need, soft_before: soft0, hard_before: hard0, soft, hard, note: notes.join("; ") }
}

/// The exact parameters of a run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleParams {
    /// First and last target (all: `targets`).
    pub targets: Vec<String>,
    /// Number of targets given.
    pub target_count: usize,
    /// Sessions.
    pub sessions: usize,
    /// Channels per session.
    pub channels_per_session: usize,
    /// Channel type.
    pub channel_type: u8,
    /// First channel id.
    pub first_id: u8,
    /// Sessions linking at once.
    pub concurrency: usize,
    /// Hold, seconds (`None`: until SIGINT).
    pub hold_s: Option<f64>,
    /// Whether a password was sent.
    pub password: bool,
    /// Channels sampled for the echo check.
    pub echo_sample: usize,
    /// Bytes per echo.
    pub echo_bytes: usize,
    /// Linking stops after this many failed links.
    pub max_failed: Option<u64>,
}

/// The echo check at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EchoStats {
    /// Channels tried.
    pub sampled: usize,
    /// Channels that echoed every byte.
    pub ok: usize,
    /// Channels that did not.
    pub failed: usize,
    /// Bytes sent (and expected back) per channel.
    pub bytes_each: usize,
    /// Round trip of each good echo, µs.
    pub round_trip_us: SetupStats,
    /// Why some failed (first few).
    pub errors: Vec<String>,
}

/// Everything a run found out.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// `holding` (written once linked) or `done`.
    pub phase: &'static str,
    /// Every link made, nothing closed while held, every sampled echo good.
    pub ok: bool,
    /// Parameters.
    pub params: IdleParams,
    /// This side's open-file limit.
    pub fd_limit: FdLimit,
    /// Links wanted: sessions × (1 + channels).
    pub links_wanted: u64,
    /// Links made.
    pub links_ok: u64,
    /// Links tried that failed (a failed main skips its channels).
    pub links_failed: u64,
    /// Sessions whose main and every channel linked.
    pub sessions_linked: usize,
    /// Channels linked (main channels not counted).
    pub channels_linked: usize,
    /// From the first link to the last, seconds.
    pub link_elapsed_s: f64,
    /// Links made per second over that time.
    pub links_per_s: f64,
    /// Per fully linked session: main + all channels, µs.
    pub session_link_us: SetupStats,
    /// SIGINT/SIGTERM came before every session was linked.
    pub interrupted: bool,
    /// Linking stopped at `max_failed` failed links.
    pub gave_up: bool,
    /// Seconds held idle.
    pub held_s: f64,
    /// Sessions whose main channel the server closed while held.
    pub sessions_closed: usize,
    /// Channels the server closed while held.
    pub channels_closed: usize,
    /// The echo check.
    pub echo: EchoStats,
    /// First few link errors.
    pub errors: Vec<String>,
}

impl IdleReport {
    /// For humans.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let p = &self.params;
        let mut s = String::new();
        let targets = match p.targets.as_slice() {
            [one] => one.clone(),
            [a, .., b] => format!("{a} … {b} ({} targets)", p.target_count),
            _ => String::new(),
        };
        let kind = ChannelKind::of(p.channel_type).map_or_else(|| p.channel_type.to_string(), |k| k.to_string());
        let last = usize::from(p.first_id) + p.channels_per_session.saturating_sub(1);
        let _ = writeln!(
            s,
            "vmcload idle: {targets}  sessions={} × (main + {} channels {kind}:{}-{last})  concurrency={}",
            p.sessions, p.channels_per_session, p.first_id, p.concurrency
        );
        let _ = writeln!(
            s,
            "  fd limit       {} (need ≈{}): {}",
            self.fd_limit.soft, self.fd_limit.need, self.fd_limit.note
        );
        let _ = writeln!(
            s,
            "  linked         {}/{} links ({} failed), {}/{} sessions complete, {} channels{}",
            self.links_ok,
            self.links_wanted,
            self.links_failed,
            self.sessions_linked,
            p.sessions,
            self.channels_linked,
            if self.interrupted {
                "  (interrupted)"
            } else if self.gave_up {
                "  (gave up at --max-failed)"
            } else {
                ""
            }
        );
        let st = &self.session_link_us;
        let _ = writeln!(
            s,
            "  link time      {:.3} s for all, {:.1} links/s; per session p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            self.link_elapsed_s,
            self.links_per_s,
            ms(st.p50),
            ms(st.p99),
            ms(st.max)
        );
        let _ = writeln!(
            s,
            "  held idle      {:.1} s; closed by the server meanwhile: {} sessions, {} channels",
            self.held_s, self.sessions_closed, self.channels_closed
        );
        let e = &self.echo;
        let _ = writeln!(
            s,
            "  echo check     {}/{} sampled channels echoed {} B (round trip p50 {:.2} ms, max {:.2} ms)",
            e.ok,
            e.sampled,
            e.bytes_each,
            ms(e.round_trip_us.p50),
            ms(e.round_trip_us.max)
        );
        for m in self.errors.iter().chain(&e.errors) {
            let _ = writeln!(s, "  error          {m}");
        }
        let _ = writeln!(s, "  result         {}", if self.ok { "ok" } else { "FAILED" });
        s
    }
}

#[allow(clippy::cast_precision_loss)] // figures for humans
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A session held open.
struct Held {
    session: Session,
    channels: Vec<(u8, Option<LinkedChannel>)>,
    index: usize,
}

/// Counters shared by the link threads and the progress line.
#[derive(Default)]
struct Shared {
    next: AtomicUsize,
    sessions_done: AtomicUsize,
    links_ok: AtomicU64,
    links_failed: AtomicU64,
    gave_up: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    /// Records a failed link; true when linking should stop (`max_failed`).
    fn failed(&self, max: Option<u64>) -> bool {
        let n = self.links_failed.fetch_add(1, Ordering::Relaxed) + 1;
        if max.is_some_and(|m| n >= m) {
            self.gave_up.store(true, Ordering::Relaxed);
        }
        self.gave_up.load(Ordering::Relaxed)
    }

    fn error(&self, m: String) {
        if let Ok(mut e) = self.errors.lock()
            && e.len() < MAX_ERRORS
            && !e.contains(&m)
        {
            e.push(m);
        }
    }
}

/// Links session `i`: its main, then each channel in turn. `None` when
/// the main link failed.
fn link_session(cfg: &IdleConfig, i: usize, sh: &Shared, stop: &AtomicBool) -> (Option<Held>, Option<u64>) {
    let Some(addr) = cfg.targets.get(i) else { return (None, None) };
    let t0 = Instant::now();
    let session = match Session::connect(addr, &cfg.password, cfg.connect_timeout) {
        Ok(s) => s,
        Err(e) => {
            sh.failed(cfg.max_failed);
            sh.error(format!("{addr}: main: {e}"));
            return (None, None);
        }
    };
    sh.links_ok.fetch_add(1, Ordering::Relaxed);
    let mut held = Held { session, channels: Vec::with_capacity(cfg.channels), index: i };
    let mut complete = true;
    for k in 0..cfg.channels {
        if stop.load(Ordering::Relaxed) || sh.gave_up.load(Ordering::Relaxed) {
            complete = false;
            break;
        }
        let Some(id) = u8::try_from(usize::from(cfg.first_id) + k).ok() else {
            complete = false;
            break;
        };
        let t = cfg.channel_type;
        if !held.session.channels.contains(&(t, id)) {
            sh.failed(cfg.max_failed);
            sh.error(format!(
                "{addr}: does not offer channel {t}:{id} (it announces {} channels)",
                held.session.channels.len()
            ));
            complete = false;
            continue;
        }
        match held.session.open_linked(t, id, false) {
            Ok(ch) => {
                sh.links_ok.fetch_add(1, Ordering::Relaxed);
                held.channels.push((id, Some(ch)));
            }
            Err(e) => {
                sh.failed(cfg.max_failed);
                sh.error(format!("{addr}: channel {t}:{id}: {e}"));
                complete = false;
            }
        }
    }
    let us = complete.then(|| u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
    (Some(held), us)
}

/// Progress on stderr: a rewritten line on a terminal, a line every 5 s
/// otherwise (logs).
struct Progress {
    on: bool,
    tty: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(on: bool) -> Self {
        Self { on, tty: std::io::stderr().is_terminal(), last: None }
    }

    fn show(&mut self, force: bool, text: &str) {
        if !self.on {
            return;
        }
        let every = if self.tty { Duration::from_millis(250) } else { Duration::from_secs(5) };
        if !force && self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let mut e = std::io::stderr().lock();
        let _ = if self.tty { write!(e, "\r\x1b[K{text}") } else { writeln!(e, "vmcload idle: {text}") };
        let _ = e.flush();
    }

    fn done(&mut self, text: &str) {
        if !self.on {
            return;
        }
        let mut e = std::io::stderr().lock();
        let _ = if self.tty { writeln!(e, "\r\x1b[K{text}") } else { writeln!(e, "vmcload idle: {text}") };
    }
}

/// Whether the peer closed `sock` or reset it (whether or not data is
/// waiting). Does not consume anything.
fn peer_closed(sock: &std::net::TcpStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    // Only POLLRDHUP is asked for, so any event (it, or POLLHUP/POLLERR,
    // which are always reported) means closed. (nix's `revents()` drops
    // bits it does not name, POLLRDHUP among them: count, don't decode.)
    let mut p = [PollFd::new(sock.as_fd(), PollFlags::from_bits_retain(libc::POLLRDHUP))];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Sends `bytes` on the channel and reads them back.
fn echo_one(ch: LinkedChannel, seed: u64, bytes: usize) -> Result<u64, String> {
    let mut c = ch.into_channel().map_err(|e| e.to_string())?;
    let mut out = vec![0u8; bytes];
    pattern::fill(seed, 0, &mut out);
    c.reader.set_read_timeout(Some(ECHO_TIMEOUT)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    c.writer.send(&out).map_err(|e| format!("send: {e}"))?;
    let mut got = vec![0u8; bytes];
    let mut n = 0;
    while n < bytes {
        match c.reader.read(&mut got[n..]) {
            Ok(0) => return Err(format!("closed after {n} of {bytes} echoed bytes")),
            Ok(k) => n += k,
            Err(e) => return Err(format!("after {n} of {bytes} echoed bytes: {e}")),
        }
    }
    let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    pattern::check(seed, 0, &got).map_err(|m| format!("echoed bytes differ: {m:?}"))?;
    Ok(us)
}

/// Opens, holds, checks and closes; `on_linked` sees the report once every
/// link is made (phase `holding`), before the hold.
pub fn idle(
    cfg: &IdleConfig,
    fd_limit: FdLimit,
    stop: &AtomicBool,
    on_linked: &mut dyn FnMut(&IdleReport),
) -> Result<IdleReport, LoadError> {
    if cfg.sessions == 0 || cfg.sessions > cfg.targets.len() {
        return Err(LoadError::Usage(format!(
            "{} sessions need {} targets but {} are given: each session goes to its own target (one VM serves one \
             session at a time)",
            cfg.sessions,
            cfg.sessions,
            cfg.targets.len()
        )));
    }
    if cfg.channels == 0 || usize::from(cfg.first_id) + cfg.channels > 256 {
        return Err(LoadError::Usage(format!(
            "channel ids {}..{} do not fit in 0..=255",
            cfg.first_id,
            usize::from(cfg.first_id) + cfg.channels
        )));
    }
    let workers = cfg.concurrency.clamp(1, cfg.sessions);
    let per = u64::try_from(cfg.channels).unwrap_or(0) + 1;
    let wanted = u64::try_from(cfg.sessions).unwrap_or(0) * per;
    let sh = Shared::default();
    let mut progress = Progress::new(cfg.progress);
    let t0 = Instant::now();
    let mut held: Vec<Held> = Vec::with_capacity(cfg.sessions);
    let mut session_us: Vec<u64> = Vec::with_capacity(cfg.sessions);
    let mut last_link = t0;
    let spawn_err = std::thread::scope(|scope| -> Result<(), LoadError> {
        let mut handles = Vec::new();
        for w in 0..workers {
            let (sh, stop) = (&sh, stop);
            let h = std::thread::Builder::new().name(format!("vmcload-link{w}")).stack_size(256 * 1024).spawn_scoped(
                scope,
                move || {
                    let mut mine = Vec::new();
                    loop {
                        if stop.load(Ordering::Relaxed) || sh.gave_up.load(Ordering::Relaxed) {
                            break;
                        }
                        let i = sh.next.fetch_add(1, Ordering::Relaxed);
                        if i >= cfg.sessions {
                            break;
                        }
                        mine.push(link_session(cfg, i, sh, stop));
                        sh.sessions_done.fetch_add(1, Ordering::Relaxed);
                    }
                    (mine, Instant::now())
                },
            );
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    sh.error(format!("cannot start link thread {w}: {e}"));
                    break;
                }
            }
        }
        while !handles.iter().all(|h| h.is_finished()) {
            let el = t0.elapsed().as_secs_f64();
            let ok = sh.links_ok.load(Ordering::Relaxed);
            progress.show(
                false,
                &format!(
                    "linking {el:6.1} s: sessions {}/{}  links {ok}/{wanted}  failed {}  {:.1} links/s",
                    sh.sessions_done.load(Ordering::Relaxed),
                    cfg.sessions,
                    sh.links_failed.load(Ordering::Relaxed),
                    per_sec(ok, el)
                ),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for h in handles {
            match h.join() {
                Ok((v, end)) => {
                    last_link = last_link.max(end);
                    for (h, us) in v {
                        if let Some(h) = h {
                            held.push(h);
                        }
                        if let Some(us) = us {
                            session_us.push(us);
                        }
                    }
                }
                Err(_) => sh.error("a link thread panicked".into()),
            }
        }
        Ok(())
    });
    spawn_err?;
    let link_elapsed = last_link.duration_since(t0).as_secs_f64();
    held.sort_by_key(|h| h.index);
    let interrupted = stop.load(Ordering::Relaxed) && sh.sessions_done.load(Ordering::Relaxed) < cfg.sessions;
    let links_ok = sh.links_ok.load(Ordering::Relaxed);
    let channels_linked: usize = held.iter().map(|h| h.channels.len()).sum();
    let mut rep = IdleReport {
        phase: "holding",
        ok: false,
        params: IdleParams {
            targets: match cfg.targets.as_slice() {
                [a, .., b] => vec![a.clone(), b.clone()],
                t => t.to_vec(),
            },
            target_count: cfg.targets.len(),
            sessions: cfg.sessions,
            channels_per_session: cfg.channels,
            channel_type: cfg.channel_type,
            first_id: cfg.first_id,
            concurrency: workers,
            hold_s: cfg.hold.map(|h| round3(h.as_secs_f64())),
            password: !cfg.password.is_empty(),
            echo_sample: cfg.echo_sample,
            echo_bytes: cfg.echo_bytes,
            max_failed: cfg.max_failed,
        },
        fd_limit,
        links_wanted: wanted,
        links_ok,
        links_failed: sh.links_failed.load(Ordering::Relaxed),
        sessions_linked: session_us.len(),
        channels_linked,
        link_elapsed_s: round3(link_elapsed),
        links_per_s: round3(per_sec(links_ok, link_elapsed)),
        session_link_us: SetupStats::from_samples(session_us),
        interrupted,
        gave_up: sh.gave_up.load(Ordering::Relaxed),
        held_s: 0.0,
        sessions_closed: 0,
        channels_closed: 0,
        echo: EchoStats { bytes_each: cfg.echo_bytes, ..EchoStats::default() },
        errors: Vec::new(),
    };
    progress.done(&format!(
        "linked {links_ok}/{wanted} links ({} failed) in {link_elapsed:.1} s, {:.1} links/s{}",
        rep.links_failed,
        rep.links_per_s,
        if interrupted {
            " (interrupted)"
        } else if rep.gave_up {
            " (gave up: --max-failed)"
        } else {
            ""
        }
    ));
    on_linked(&rep);

    // Hold.
    let h0 = Instant::now();
    if !interrupted {
        match cfg.hold {
            Some(h) => progress.done(&format!(
                "holding {} sessions, {channels_linked} channels idle for {:.0} s",
                held.len(),
                h.as_secs_f64()
            )),
            None => {
                progress.done(&format!("holding {} sessions, {channels_linked} channels idle until SIGINT", held.len()))
            }
        }
        while !stop.load(Ordering::Relaxed) && cfg.hold.is_none_or(|h| h0.elapsed() < h) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    rep.held_s = round3(h0.elapsed().as_secs_f64());

    // Still open?
    for h in &held {
        if h.session.closed.lock().map(|c| c.is_some()).unwrap_or(true) {
            rep.sessions_closed += 1;
        }
        rep.channels_closed +=
            h.channels.iter().filter_map(|(_, c)| c.as_ref()).filter(|c| peer_closed(c.tcp())).count();
    }

    // Echo a sample, spread over all channels.
    let mut all: Vec<(usize, usize)> = Vec::with_capacity(channels_linked);
    for (hi, h) in held.iter().enumerate() {
        all.extend((0..h.channels.len()).map(|ci| (hi, ci)));
    }
    let n = cfg.echo_sample.min(all.len());
    let mut rtt = Vec::with_capacity(n);
    let echo_end = Instant::now() + ECHO_DEADLINE;
    for k in 0..n {
        if Instant::now() > echo_end {
            rep.echo.failed += n - k;
            rep.echo.sampled += n - k;
            rep.echo.errors.push(format!("{} channels not tried: the echo check ran past {ECHO_DEADLINE:?}", n - k));
            break;
        }
        let Some(&(hi, ci)) = all.get(k * all.len() / n) else { continue };
        let Some(h) = held.get_mut(hi) else { continue };
        let Some((id, slot)) = h.channels.get_mut(ci) else { continue };
        let Some(ch) = slot.take() else { continue };
        let seed = (u64::try_from(h.index).unwrap_or(0) << 8) | u64::from(*id);
        rep.echo.sampled += 1;
        match echo_one(ch, seed, cfg.echo_bytes) {
            Ok(us) => {
                rep.echo.ok += 1;
                rtt.push(us);
            }
            Err(e) => {
                rep.echo.failed += 1;
                if rep.echo.errors.len() < MAX_ERRORS {
                    let addr = cfg.targets.get(h.index).map_or("?", String::as_str);
                    rep.echo.errors.push(format!("{addr} channel {}:{id}: {e}", cfg.channel_type));
                }
            }
        }
    }
    rep.echo.round_trip_us = SetupStats::from_samples(rtt);
    for h in &held {
        h.session.close();
    }
    drop(held);
    rep.errors = sh.errors.lock().map(|e| e.clone()).unwrap_or_default();
    rep.phase = "done";
    rep.ok = rep.links_ok == wanted
        && rep.links_failed == 0
        && !interrupted
        && !rep.gave_up
        && rep.sessions_closed == 0
        && rep.channels_closed == 0
        && rep.echo.failed == 0
        && rep.echo.sampled == n
        && (cfg.echo_sample == 0 || rep.echo.ok > 0);
    Ok(rep)
}

/// Writes the report as JSON (`-`: stdout) atomically.
pub fn write_report(path: &Path, rep: &IdleReport) -> Result<(), LoadError> {
    let json = serde_json::to_string_pretty(rep).map_err(|e| LoadError::Run(e.to_string()))?;
    if path.as_os_str() == "-" {
        println!("{json}");
        Ok(())
    } else {
        super::endpoint::write_atomic(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = parse_targets(&["127.0.0.1:6000-6002,spice://h:7".into()]).expect("ok");
        assert_eq!(t, ["127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002", "h:7"]);
        for bad in ["", "h", ":5", "h:0", "h:5-3", "h:x", "h:1,h:1", "h:1-70000"] {
            assert!(parse_targets(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn fd_need() {
        assert_eq!(fds_needed(400, 24), 400 * 27 + FDS_SLACK);
        let l = raise_nofile(16);
        assert!(l.enough(), "{l:?}");
    }
}
