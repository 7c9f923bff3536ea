//! The `--metrics` HTTP endpoint: `/metrics` (Prometheus text), `/`
//! (a live status page) and `/status.json` (the page's data), served by
//! one thread of its own, far from the workers.
//!
//! The HTTP side is deliberately tiny and bounded, because anybody who can
//! reach the address can talk to it: HTTP/1.0, `GET` (and `HEAD`) only, one
//! request per connection, at most [`MAX_REQUEST_BYTES`] of request head,
//! [`REQUEST_DEADLINE`] to send it, [`MAX_CLIENTS`] connections served at
//! once (each on a short-lived thread; any more are closed at accept). It
//! reads only what the workers already published (atomics, and a snapshot
//! behind a mutex held for a clone), so a hostile or slow client costs the
//! relay nothing but this thread's time.
//!
//! The status page is rendered on the server (no script, no external
//! assets) and refreshes itself every [`REFRESH_SECS`]. Rates and the
//! sparklines come from a ring of per-second samples of the channel
//! counters kept by this thread ([`HISTORY_SECS`] long).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::metrics::{
    Exposition, LINK_BUCKETS_SECS, LINK_RESULTS, REJECT_REASONS, STAGES, StageKind, Which, WorkerSnapshot,
    stage_counts, which_label,
};
use super::worker::{Shared, WorkerStats};

/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CLIENTS: usize = 4;
/// Largest request head (request line and headers) read.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(3);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-second samples kept for rates and sparklines.
pub const HISTORY_SECS: usize = 300;
/// The status page reloads itself this often.
pub const REFRESH_SECS: u32 = 2;

/// Per-second samples of every counter set's (c2e, e2c) byte totals.
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<(Instant, Vec<(u64, u64)>)>,
}

impl History {
    fn push(&mut self, at: Instant, totals: Vec<(u64, u64)>) {
        if self.samples.len() == HISTORY_SECS + 1 {
            self.samples.pop_front();
        }
        self.samples.push_back((at, totals));
    }

    /// MiB/s each way of counter set `i` over the last `span` samples.
    fn rate(&self, i: usize, span: usize) -> (f64, f64) {
        let n = self.samples.len();
        if n < 2 {
            return (0.0, 0.0);
        }
        let k = span.min(n - 1);
        let (t1, v1) = &self.samples[n - 1];
        let (t0, v0) = &self.samples[n - 1 - k];
        let secs = t1.duration_since(*t0).as_secs_f64().max(0.001);
        let (a1, b1) = v1.get(i).copied().unwrap_or_default();
        let (a0, b0) = v0.get(i).copied().unwrap_or_default();
        (mib(a1.saturating_sub(a0)) / secs, mib(b1.saturating_sub(b0)) / secs)
    }

    /// MiB/s both ways of counter set `i`, one point per sample interval,
    /// oldest first.
    fn series(&self, i: usize) -> Vec<f64> {
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|((t0, v0), (t1, v1))| {
                let secs = t1.duration_since(*t0).as_secs_f64().max(0.001);
                let (a0, b0) = v0.get(i).copied().unwrap_or_default();
                let (a1, b1) = v1.get(i).copied().unwrap_or_default();
                mib(a1.saturating_sub(a0) + b1.saturating_sub(b0)) / secs
            })
            .collect()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The endpoint thread's state.
#[derive(Debug)]
struct Server {
    shared: Arc<Shared>,
    started: Instant,
    history: Mutex<History>,
    active: AtomicUsize,
    /// Connections closed at accept because [`MAX_CLIENTS`] were busy.
    turned_away: AtomicU64,
    /// Requests answered, by any status.
    requests: AtomicU64,
}

impl Server {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn snapshots(&self) -> Vec<WorkerSnapshot> {
        (0..self.shared.stats.len()).map(|i| self.shared.snapshot(i)).collect()
    }

    fn sample(&self) {
        let live = self.shared.live();
        let m = &live.metrics;
        let totals = (0..m.len())
            .filter_map(|i| m.at(i))
            .map(|c| (c.c2e_bytes.load(Ordering::Relaxed), c.e2c_bytes.load(Ordering::Relaxed)))
            .collect();
        self.history().push(Instant::now(), totals);
    }
}

/// Binds `--metrics` (start-up errors surface before the workers run).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} (--metrics): {e}")))
}

/// Starts the endpoint thread on `listener`; it runs until `stop` is set.
pub fn start(shared: Arc<Shared>, listener: TcpListener, stop: Arc<AtomicBool>) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let server = Arc::new(Server {
        shared,
        started: Instant::now(),
        history: Mutex::new(History::default()),
        active: AtomicUsize::new(0),
        turned_away: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    std::thread::Builder::new().name("vmcrelay-metrics".into()).spawn(move || run(&server, &listener, &stop))?;
    Ok(())
}

/// A sample is taken once every worker folded its counters since the
/// last one (their ticks are about 1 s apart but not in step with each
/// other or with us: sampling on our own clock would see zero or two folds
/// in some intervals), or after this long without (a stuck worker).
const SAMPLE_AT_LATEST: Duration = Duration::from_millis(2500);

fn run(server: &Arc<Server>, listener: &TcpListener, stop: &AtomicBool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let workers = server.shared.snapshots.len();
    let mut last_folds: Vec<Option<Instant>> = vec![None; workers];
    let mut last_sample = Instant::now();
    server.sample();
    while !stop.load(Ordering::Relaxed) {
        let folds: Vec<Option<Instant>> = (0..workers).map(|i| server.shared.snapshot_time(i)).collect();
        let all_folded = folds.iter().zip(&last_folds).all(|(now, was)| now.is_some() && now != was);
        if all_folded || last_sample.elapsed() >= SAMPLE_AT_LATEST {
            server.sample();
            last_sample = Instant::now();
            last_folds = folds;
        }
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::from(100u8);
        if poll(&mut fds, timeout).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => dispatch(server, stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    // EMFILE and friends: back off rather than spin.
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}

/// Serves `stream` on a thread of its own, unless [`MAX_CLIENTS`] are busy.
fn dispatch(server: &Arc<Server>, stream: TcpStream) {
    if server.active.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        server.active.fetch_sub(1, Ordering::AcqRel);
        server.turned_away.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let s = Arc::clone(server);
    let spawned = std::thread::Builder::new().name("vmcrelay-http".into()).spawn(move || {
        serve_one(&s, stream);
        s.active.fetch_sub(1, Ordering::AcqRel);
    });
    if spawned.is_err() {
        server.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A parsed request head: method and path (query dropped).
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    path: &'a str,
}

/// Parses the request line; `None` for anything that is not HTTP.
fn parse_request(head: &[u8]) -> Option<Request<'_>> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(Request { method, path })
}

/// Where the request head ends, if it did.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
}

fn serve_one(server: &Server, mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut n = 0;
    let head = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return respond(server, &mut stream, 408, "text/plain", b"request timeout\n", false);
        }
        match stream.read(&mut buf[n..]) {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
        if let Some(end) = head_end(&buf[..n]) {
            break &buf[..end];
        }
        if n == buf.len() {
            return respond(server, &mut stream, 431, "text/plain", b"request header too large\n", false);
        }
    };
    let Some(req) = parse_request(head) else {
        return respond(server, &mut stream, 400, "text/plain", b"bad request\n", false);
    };
    let with_body = match req.method {
        "GET" => true,
        "HEAD" => false,
        _ => return respond(server, &mut stream, 405, "text/plain", b"only GET\n", false),
    };
    match req.path {
        "/metrics" => {
            let body = render_metrics(server);
            respond(server, &mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", body.as_bytes(), with_body);
        }
        "/" | "/index.html" => {
            let body = render_html(&status_view(server));
            respond(server, &mut stream, 200, "text/html; charset=utf-8", body.as_bytes(), with_body);
        }
        "/status.json" => {
            let body = serde_json::to_vec_pretty(&status_view(server)).unwrap_or_default();
            respond(server, &mut stream, 200, "application/json", &body, with_body);
        }
        _ => {
            respond(server, &mut stream, 404, "text/plain", b"not found: try /, /metrics or /status.json\n", with_body)
        }
    }
}

fn respond(server: &Server, stream: &mut TcpStream, code: u16, ctype: &str, body: &[u8], with_body: bool) {
    server.requests.fetch_add(1, Ordering::Relaxed);
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.0 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'\r\n\
         {}Connection: close\r\n\r\n",
        body.len(),
        if code == 405 { "Allow: GET, HEAD\r\n" } else { "" }
    );
    if stream.write_all(head.as_bytes()).is_ok() && with_body {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // A lingering close: closing with unread input would reset the
    // connection and could destroy the response before the client read
    // it. What the client still sends is read and dropped, bounded.
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// How long, and how much, a closing connection's input is drained.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

// ---------------------------------------------------------------------------
// /metrics

/// The worker counters of `WorkerStats` as families: (name, type, help, field).
type StatField = fn(&WorkerStats) -> &AtomicU64;
const WORKER_FAMILIES: [(&str, &str, &str, StatField); 17] = [
    ("vmcrelay_worker_links_ok_total", "counter", "Links completed.", |s| &s.links_ok),
    ("vmcrelay_worker_links_failed_total", "counter", "Links refused or failed.", |s| &s.links_failed),
    (
        "vmcrelay_worker_connections_rejected_total",
        "counter",
        "Connections refused at accept (table or buffers full).",
        |s| &s.conns_rejected,
    ),
    ("vmcrelay_worker_connections", "gauge", "Connections open now.", |s| &s.conns_open),
    ("vmcrelay_worker_ticks_total", "counter", "Ticks of the worker's 1 s timer (its liveness).", |s| &s.ticks),
    ("vmcrelay_worker_c2e_bytes_total", "counter", "Payload bytes client to endpoint (live).", |s| &s.c2e_bytes),
    ("vmcrelay_worker_e2c_bytes_total", "counter", "Payload bytes endpoint to client (live).", |s| &s.e2c_bytes),
    ("vmcrelay_worker_protocol_errors_total", "counter", "Protocol errors that closed a connection.", |s| {
        &s.protocol_errors
    }),
    ("vmcrelay_worker_tls_errors_total", "counter", "TLS sessions that failed.", |s| &s.tls_errors),
    ("vmcrelay_worker_auth_failures_total", "counter", "Tickets refused (wrong password).", |s| &s.auth_failures),
    ("vmcrelay_worker_links_throttled_total", "counter", "Link starts held back by the failed-ticket throttle.", |s| {
        &s.links_throttled
    }),
    ("vmcrelay_worker_links_busy_total", "counter", "Links refused as busy.", |s| &s.links_busy),
    (
        "vmcrelay_worker_sessions_replaced_total",
        "counter",
        "Sessions closed as a whole because a new session replaced them.",
        |s| &s.sessions_replaced,
    ),
    (
        "vmcrelay_worker_links_evicted_total",
        "counter",
        "Link-stage connections closed to make room for newer ones (--max-link-stage).",
        |s| &s.links_evicted,
    ),
    (
        "vmcrelay_worker_buffer_waits_total",
        "counter",
        "Times a connection found its worker's buffer pool empty and waited (--buffers-per-worker).",
        |s| &s.buffer_waits,
    ),
    (
        "vmcrelay_worker_buffers_reclaimed_total",
        "counter",
        "Idle connections whose posted read was cancelled to give its buffer back (--idle-buffer-secs).",
        |s| &s.buffers_reclaimed,
    ),
    (
        "vmcrelay_worker_accepts_starved_total",
        "counter",
        "Accepts that failed for want of file descriptors or memory; the listener paused (raise LimitNOFILE=).",
        |s| &s.accepts_starved,
    ),
];

fn render_metrics(server: &Server) -> String {
    let shared = &server.shared;
    let live = shared.live();
    let cfg = &live.config;
    let m = &live.metrics;
    let snaps = server.snapshots();
    let mut e = Exposition::default();
    e.family("vmcrelay_build_info", "gauge", "Always 1; the version is a label.");
    e.sample("vmcrelay_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);
    e.family("vmcrelay_uptime_seconds", "gauge", "Seconds since the metrics endpoint started.");
    e.sample("vmcrelay_uptime_seconds", &[], server.started.elapsed().as_secs());

    e.family("vmcrelay_connections", "gauge", "Connections by stage, as the workers saw them at their last 1 s tick.");
    let stages = stage_counts(cfg.services.len(), &snaps);
    for (s, row) in cfg.services.iter().zip(&stages) {
        for (stage, n) in STAGES.iter().zip(row) {
            e.sample("vmcrelay_connections", &[("service", &s.name), ("stage", stage)], n);
        }
    }
    e.family("vmcrelay_sessions", "gauge", "Live sessions (linked main channels) at the last tick.");
    for (si, s) in cfg.services.iter().enumerate() {
        let n = snaps
            .iter()
            .flat_map(|w| &w.conns)
            .filter(|c| c.service == si && c.which == Some(Which::Main) && c.stage != StageKind::Upstream)
            .count();
        e.sample("vmcrelay_sessions", &[("service", &s.name)], n);
    }

    e.family("vmcrelay_links_total", "counter", "Link attempts by channel and result (ok, failed, busy, auth).");
    for (si, s) in cfg.services.iter().enumerate() {
        for (w, i) in m.sets_of(si) {
            let Some(c) = m.at(i) else { continue };
            let ch = which_label(cfg, si, w);
            for (r, name) in LINK_RESULTS.iter().enumerate() {
                let v = c.links[r].load(Ordering::Relaxed);
                e.sample("vmcrelay_links_total", &[("service", &s.name), ("channel", &ch), ("result", name)], v);
            }
        }
    }
    for (family, help, pick) in [
        (
            "vmcrelay_channel_bytes_total",
            "Payload bytes by channel and direction (c2e: client to endpoint, e2c: endpoint to client); folded \
             from the connections at each 1 s tick and at close.",
            0usize,
        ),
        ("vmcrelay_channel_messages_total", "SPICE messages by channel and direction.", 1),
    ] {
        e.family(family, "counter", help);
        for (si, s) in cfg.services.iter().enumerate() {
            for (w, i) in m.sets_of(si) {
                if w == Which::Other || (w == Which::Proxy && s.upstream.is_none()) {
                    continue;
                }
                let Some(c) = m.at(i) else { continue };
                let ch = which_label(cfg, si, w);
                let (c2e, e2c) = if pick == 0 { (&c.c2e_bytes, &c.e2c_bytes) } else { (&c.c2e_msgs, &c.e2c_msgs) };
                for (dir, v) in [("c2e", c2e), ("e2c", e2c)] {
                    let labels = [("service", s.name.as_str()), ("channel", &ch), ("direction", dir)];
                    e.sample(family, &labels, v.load(Ordering::Relaxed));
                }
            }
        }
    }

    e.family("vmcrelay_link_duration_seconds", "histogram", "Accept to link OK (includes key wait and throttle).");
    let (buckets, count, sum) = m.link_duration.read();
    for (le, v) in LINK_BUCKETS_SECS.iter().zip(&buckets) {
        e.sample("vmcrelay_link_duration_seconds_bucket", &[("le", &le.to_string())], v);
    }
    e.sample("vmcrelay_link_duration_seconds_bucket", &[("le", "+Inf")], count);
    e.sample("vmcrelay_link_duration_seconds_sum", &[], sum);
    e.sample("vmcrelay_link_duration_seconds_count", &[], count);

    e.family("vmcrelay_rejected_total", "counter", "Connections turned away before a link, by reason.");
    for (si, s) in cfg.services.iter().enumerate() {
        for (reason, v) in REJECT_REASONS.iter().zip(m.rejected(si)) {
            e.sample("vmcrelay_rejected_total", &[("service", &s.name), ("reason", reason)], v);
        }
    }

    let keys = shared.keys_ready();
    type SnapField = fn(&WorkerSnapshot) -> u64;
    let per_worker: [(&str, &str, &str, SnapField); 5] = [
        ("vmcrelay_buffers_in_use", "gauge", "Registered buffers held by connections (last tick).", |s| {
            s.buffers_in_use
        }),
        ("vmcrelay_buffers", "gauge", "Registered buffers in the worker's arena.", |s| s.buffers_total),
        (
            "vmcrelay_buffers_pinned",
            "gauge",
            "Buffers registered with the ring now, their pages pinned (last tick).",
            |s| s.buffers_pinned,
        ),
        ("vmcrelay_ring_ops_inflight", "gauge", "io_uring ops in the kernel's hands (last tick).", |s| s.ops_inflight),
        (
            "vmcrelay_ring_sq_full_total",
            "counter",
            "Pushes that found the submission queue full and submitted first.",
            |s| s.sq_full_events,
        ),
    ];
    for (name, kind, help, f) in per_worker {
        e.family(name, kind, help);
        for (i, s) in snaps.iter().enumerate() {
            e.sample(name, &[("worker", &format!("w{i}"))], f(s));
        }
    }
    e.family("vmcrelay_key_pool_keys", "gauge", "RSA ticket keys ready in the worker's queue.");
    for (i, k) in keys.iter().enumerate() {
        e.sample("vmcrelay_key_pool_keys", &[("worker", &format!("w{i}"))], k);
    }
    e.family("vmcrelay_key_pool_capacity", "gauge", "Most RSA ticket keys queued per worker.");
    e.sample("vmcrelay_key_pool_capacity", &[], cfg.limits.key_pool_per_worker.max(1));
    for (name, kind, help, f) in WORKER_FAMILIES {
        e.family(name, kind, help);
        for (i, s) in shared.stats.iter().enumerate() {
            e.sample(name, &[("worker", &format!("w{i}"))], f(s).load(Ordering::Relaxed));
        }
    }
    e.family("vmcrelay_metrics_requests_total", "counter", "HTTP requests answered by this endpoint.");
    e.sample("vmcrelay_metrics_requests_total", &[], server.requests.load(Ordering::Relaxed));
    e.family(
        "vmcrelay_metrics_turned_away_total",
        "counter",
        "HTTP connections closed at accept because enough were being served.",
    );
    e.sample("vmcrelay_metrics_turned_away_total", &[], server.turned_away.load(Ordering::Relaxed));
    e.out
}

// ---------------------------------------------------------------------------
// status page

/// What `/status.json` returns and `/` shows.
#[derive(Debug, Serialize)]
struct StatusView {
    version: &'static str,
    uptime_s: u64,
    workers: usize,
    refresh_s: u32,
    services: Vec<ServiceView>,
}

#[derive(Debug, Serialize)]
struct ServiceView {
    name: String,
    listen: Vec<String>,
    upstream: Option<String>,
    sessions: Vec<SessionView>,
    channels: Vec<ChannelView>,
}

#[derive(Debug, Serialize)]
struct SessionView {
    session: String,
    peer: String,
    age_s: u64,
    channels: usize,
}

#[derive(Debug, Serialize)]
struct ChannelView {
    channel: String,
    endpoint: String,
    /// The session and client address that hold it now.
    linked: Option<LinkedView>,
    c2e_bytes: u64,
    e2c_bytes: u64,
    c2e_mib_s: f64,
    e2c_mib_s: f64,
    /// MiB/s both ways, one point per second, oldest first.
    history_mib_s: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct LinkedView {
    session: String,
    peer: String,
    age_s: u64,
}

fn status_view(server: &Server) -> StatusView {
    let shared = &server.shared;
    let live = shared.live();
    let cfg = &live.config;
    let m = &live.metrics;
    let snaps = server.snapshots();
    let conns: Vec<_> = snaps.iter().flat_map(|s| &s.conns).collect();
    let history = server.history();
    let now = Instant::now();
    let services = cfg
        .services
        .iter()
        .enumerate()
        .map(|(si, s)| {
            let mine: Vec<_> = conns.iter().filter(|c| c.service == si).collect();
            let sessions = mine
                .iter()
                .filter(|c| c.which == Some(Which::Main) && c.stage != StageKind::Upstream && c.session != 0)
                .map(|c| SessionView {
                    session: format!("{:#010x}", c.session),
                    peer: c.peer.clone(),
                    age_s: now.duration_since(c.since).as_secs(),
                    channels: mine
                        .iter()
                        .filter(|o| o.session == c.session && matches!(o.stage, StageKind::Channel | StageKind::Proxy))
                        .filter(|o| o.which != Some(Which::Main))
                        .count(),
                })
                .collect();
            let upstream = s.upstream.as_ref().map(ToString::to_string);
            let channels = m
                .sets_of(si)
                .into_iter()
                .filter(|(w, _)| match w {
                    Which::Channel(_) => true,
                    Which::Main | Which::Proxy => upstream.is_some(),
                    Which::Other => false,
                })
                .map(|(w, i)| {
                    let endpoint = match w {
                        Which::Channel(ci) => s
                            .channels
                            .get(ci)
                            .map(|c| {
                                if c.removed {
                                    format!("{} (removed by reload)", c.endpoint)
                                } else {
                                    c.endpoint.to_string()
                                }
                            })
                            .unwrap_or_default(),
                        _ => upstream.clone().unwrap_or_default(),
                    };
                    let linked = mine
                        .iter()
                        .filter(|c| c.which == Some(w) && c.stage == StageKind::Channel)
                        .max_by_key(|c| c.since)
                        .map(|c| LinkedView {
                            session: format!("{:#010x}", c.session),
                            peer: c.peer.clone(),
                            age_s: now.duration_since(c.since).as_secs(),
                        });
                    let (c2e_bytes, e2c_bytes) = m
                        .at(i)
                        .map(|c| (c.c2e_bytes.load(Ordering::Relaxed), c.e2c_bytes.load(Ordering::Relaxed)))
                        .unwrap_or_default();
                    let (c2e_mib_s, e2c_mib_s) = history.rate(i, 3);
                    ChannelView {
                        channel: which_label(cfg, si, w),
                        endpoint,
                        linked,
                        c2e_bytes,
                        e2c_bytes,
                        c2e_mib_s,
                        e2c_mib_s,
                        history_mib_s: history.series(i),
                    }
                })
                .collect();
            ServiceView {
                name: if s.removed { format!("{} (removed by reload)", s.name) } else { s.name.clone() },
                listen: s.listen.iter().chain(&s.tls_listen).map(ToString::to_string).collect(),
                upstream,
                sessions,
                channels,
            }
        })
        .collect();
    StatusView {
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: server.started.elapsed().as_secs(),
        workers: shared.stats.len(),
        refresh_s: REFRESH_SECS,
        services,
    }
}

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1.5 MiB`, `12 KiB`, `300 B`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

fn human_age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// A small SVG sparkline of `points` (oldest first), the newest at the right edge.
fn sparkline(points: &[f64]) -> String {
    const W: f64 = 240.0;
    const H: f64 = 28.0;
    let slots = HISTORY_SECS.max(2) as f64;
    let peak = points.iter().copied().fold(0.0f64, f64::max);
    let mut path = String::new();
    let start = slots - points.len() as f64;
    for (k, v) in points.iter().enumerate() {
        let x = (start + k as f64) / (slots - 1.0) * W;
        let y = if peak > 0.0 { H - 1.0 - v / peak * (H - 3.0) } else { H - 1.0 };
        let _ = write!(path, "{}{x:.1},{y:.1}", if k == 0 { "M" } else { " L" });
    }
    let area = if points.is_empty() {
        String::new()
    } else {
        let x0 = start / (slots - 1.0) * W;
        format!("<path d=\"{path} L{W:.1},{H:.1} L{x0:.1},{H:.1} Z\" fill=\"#cfe3fb\" stroke=\"none\"/>")
    };
    format!(
        "<svg class=\"spark\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\
         <title>last {} s, peak {peak:.2} MiB/s</title><rect width=\"{W}\" height=\"{H}\" fill=\"#f4f7fb\"/>{area}\
         <path d=\"{path}\" fill=\"none\" stroke=\"#1f6fd1\" stroke-width=\"1.5\"/></svg>",
        points.len()
    )
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;background:#fff}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 6px}.meta{color:#5b6678;font-size:12px}\
table{border-collapse:collapse;margin:6px 0 12px;min-width:640px}th,td{padding:4px 10px;text-align:left;\
border-bottom:1px solid #e3e8ef;vertical-align:middle}th{background:#f0f3f8;font-weight:600;font-size:12px;\
color:#39445a}td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}.idle{color:#8a94a6}\
.svc{border:1px solid #dbe2ec;border-radius:6px;padding:4px 16px 8px;margin:14px 0}code{font-size:13px}";

fn render_html(v: &StatusView) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" \
         content=\"{}\"><title>vmcrelay status</title><style>{STYLE}</style></head><body>\
         <h1>vmcrelay status</h1><div class=\"meta\">version {} · up {} · {} worker(s) · refreshes every {} s · \
         <code>/metrics</code> · <code>/status.json</code></div>",
        v.refresh_s,
        esc(v.version),
        human_age(v.uptime_s),
        v.workers,
        v.refresh_s
    );
    for s in &v.services {
        let _ = write!(
            h,
            "<div class=\"svc\" data-service=\"{0}\"><h2>Service {0}</h2><div class=\"meta\">listen {1}{2} · {3} \
             session(s)</div>",
            esc(&s.name),
            esc(&s.listen.join(", ")),
            s.upstream.as_ref().map_or_else(String::new, |u| format!(" · upstream {}", esc(u))),
            s.sessions.len()
        );
        if !s.sessions.is_empty() {
            h.push_str(
                "<table class=\"sessions\"><tr><th>session</th><th>client</th><th>age</th><th>channels</th></tr>",
            );
            for x in &s.sessions {
                let _ = write!(
                    h,
                    "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                    esc(&x.session),
                    esc(&x.peer),
                    human_age(x.age_s),
                    x.channels
                );
            }
            h.push_str("</table>");
        }
        h.push_str(
            "<table class=\"channels\"><tr><th>channel</th><th>endpoint</th><th>linked by</th><th>client → \
             endpoint</th><th>endpoint → client</th><th>MiB/s now (c→e / e→c)</th><th>last 5 min</th></tr>",
        );
        for c in &s.channels {
            let linked = c.linked.as_ref().map_or_else(
                || "<span class=\"idle\">not linked</span>".to_string(),
                |l| format!("{} <code>{}</code> for {}", esc(&l.peer), esc(&l.session), human_age(l.age_s)),
            );
            let _ = write!(
                h,
                "<tr data-channel=\"{0}\"><td><code>{0}</code></td><td><code>{1}</code></td><td>{2}</td>\
                 <td class=\"n\" data-bytes=\"{3}\">{4}</td><td class=\"n\" data-bytes=\"{5}\">{6}</td>\
                 <td class=\"n\">{7:.2} / {8:.2}</td><td>{9}</td></tr>",
                esc(&c.channel),
                esc(&c.endpoint),
                linked,
                c.c2e_bytes,
                human_bytes(c.c2e_bytes),
                c.e2c_bytes,
                human_bytes(c.e2c_bytes),
                c.c2e_mib_s,
                c.e2c_mib_s,
                sparkline(&c.history_mib_s)
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(Request { method: "GET", path: "/metrics" })
        );
        assert_eq!(parse_request(b"GET / HTTP/1.0\n\n"), Some(Request { method: "GET", path: "/" }));
        assert_eq!(parse_request(b"GET metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00\r\n"), None);
        assert_eq!(parse_request(b"GET / SPICE\r\n\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost"), None);
    }

    #[test]
    fn history_rates_and_series() {
        let mut h = History::default();
        let t0 = Instant::now();
        for k in 0..(HISTORY_SECS as u64 + 10) {
            h.push(t0 + Duration::from_secs(k), vec![(k * 1024 * 1024, 2 * k * 1024 * 1024)]);
        }
        assert_eq!(h.samples.len(), HISTORY_SECS + 1);
        let (a, b) = h.rate(0, 3);
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9, "{a} {b}");
        let s = h.series(0);
        assert_eq!(s.len(), HISTORY_SECS);
        assert!(s.iter().all(|v| (v - 3.0).abs() < 1e-9));
        assert_eq!(h.rate(7, 3), (0.0, 0.0));
    }

    #[test]
    fn html_escapes_and_draws() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(human_bytes(300), "300 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.00 MiB");
        let svg = sparkline(&[0.0, 1.0, 4.0]);
        assert!(svg.starts_with("<svg") && svg.contains("peak 4.00 MiB/s"), "{svg}");
        assert!(sparkline(&[]).contains("<svg"));
    }
}
