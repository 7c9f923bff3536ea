//! Counters behind `serve --metrics`, and their Prometheus text exposition.
//!
//! The data path pays nothing new: a connection keeps its own plain
//! counters (`ConnStats`) as before, and its worker folds what changed into
//! the shared atomics here at its 1 s tick and at close (relaxed adds, one
//! per counter that moved). Links, rejections and link durations are
//! counted where they happen, off the data path. Everything that is a
//! state rather than a count (connections per stage, live sessions, ring
//! buffers) comes from a [`WorkerSnapshot`] each worker publishes at its
//! tick; the metrics thread only reads it.
//!
//! Counter sets are indexed flat: per service, one [`ChannelCounters`] per
//! configured channel, then `main`, `proxy` (whole-VM mode: every channel
//! proxied to QEMU) and `other` (links of channels the service does not
//! have). The label set is therefore fixed at start-up and bounded by the
//! configuration, never by what clients send.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::config::ServeConfig;

/// Connection stages, the `stage` label of `vmcrelay_connections`.
pub const STAGES: [&str; 5] = ["link", "main", "channel", "proxy", "upstream"];

/// Where a connection is, as an index into [`STAGES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    /// Accepted, waiting for a key, or in the link stage (ours or QEMU's).
    Link = 0,
    /// A session's main channel.
    Main = 1,
    /// A linked pass-through channel (vmcrelay's own endpoint).
    Channel = 2,
    /// Whole-VM mode: a client connection proxied to QEMU.
    Proxy = 3,
    /// Whole-VM mode: vmcrelay's own connection to QEMU.
    Upstream = 4,
}

/// The `result` label of `vmcrelay_links_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkResult {
    /// Linked.
    Ok = 0,
    /// Refused or failed for any other reason (unknown channel, endpoint
    /// unavailable, protocol error, timeout of the upstream, ...).
    Failed = 1,
    /// Refused because the channel (or, `--busy refuse`, the service) is busy.
    Busy = 2,
    /// A wrong or undecryptable ticket.
    Auth = 3,
}

/// Label values of [`LinkResult`], by index.
pub const LINK_RESULTS: [&str; 4] = ["ok", "failed", "busy", "auth"];

/// The `reason` label of `vmcrelay_rejected_total`: connections turned
/// away before (or instead of) a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Connection table or buffers full (`--max-conns`).
    TableFull = 0,
    /// Held back by the failed-ticket throttle (one count per hold).
    Throttled = 1,
    /// The link stage took longer than `--link-timeout-secs`.
    LinkTimeout = 2,
    /// No TLS session could start on a TLS listener.
    Tls = 3,
    /// Closed in the link stage to make room (`--max-link-stage`,
    /// `--max-link-stage-per-addr`).
    LinkStageFull = 4,
}

/// Label values of [`Reject`], by index.
pub const REJECT_REASONS: [&str; 5] = ["table_full", "throttled", "link_timeout", "tls", "link_stage_full"];

/// Which counter set of a service a connection counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Configured channel `i` of the service.
    Channel(usize),
    /// The main channel.
    Main,
    /// Whole-VM mode: channels proxied to QEMU.
    Proxy,
    /// A channel the service does not have.
    Other,
}

/// Counters of one (service, channel).
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Payload bytes client → endpoint.
    pub c2e_bytes: AtomicU64,
    /// Messages client → endpoint.
    pub c2e_msgs: AtomicU64,
    /// Payload bytes endpoint → client.
    pub e2c_bytes: AtomicU64,
    /// Messages endpoint → client.
    pub e2c_msgs: AtomicU64,
    /// Links by [`LinkResult`].
    pub links: [AtomicU64; 4],
}

/// Upper bounds of the link-duration histogram buckets, in seconds (the
/// last bucket, `+Inf`, is the count). The link stage includes waiting for
/// an RSA key and any throttle hold, so the range reaches the 10 s timeout.
pub const LINK_BUCKETS_SECS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A histogram of durations with fixed buckets (non-cumulative counts).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LINK_BUCKETS_SECS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LINK_BUCKETS_SECS.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative bucket counts (one per [`LINK_BUCKETS_SECS`]), the count
    /// and the sum in seconds.
    pub fn read(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        // The count is read last: it is never below the largest bucket.
        let count = self.count.load(Ordering::Relaxed).max(acc);
        (cumulative, count, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Where one service's counter sets are in the flat list.
#[derive(Debug, Clone, Default)]
struct Layout {
    /// Flat index of each configured channel's set, by channel index.
    channels: Vec<usize>,
    /// Flat indexes of the main, proxy and other sets.
    extra: [usize; EXTRA_SETS],
}

/// Everything `--metrics` counts, shared by the workers.
///
/// A reload builds the next `Counters` with [`Counters::grown`]: the sets
/// of what was configured are shared (their counts go on) and keep their
/// flat index; sets of new services and channels are appended.
#[derive(Debug)]
pub struct Counters {
    /// Flat counter sets; see the module docs for the layout.
    channels: Vec<std::sync::Arc<ChannelCounters>>,
    /// Per service: where its sets are.
    runs: Vec<Layout>,
    /// Per service: rejections by [`Reject`].
    rejected: Vec<std::sync::Arc<[AtomicU64; 5]>>,
    /// Accept to link OK, every service and channel.
    pub link_duration: std::sync::Arc<Histogram>,
}

/// Counter sets per service beyond its configured channels: main, proxy, other.
const EXTRA_SETS: usize = 3;

impl Counters {
    /// Counter sets for every service and channel of `config`.
    pub fn new(config: &ServeConfig) -> Self {
        let empty = Self {
            channels: Vec::new(),
            runs: Vec::new(),
            rejected: Vec::new(),
            link_duration: std::sync::Arc::default(),
        };
        empty.grown(config)
    }

    /// The counters for `config`, a reload of the configuration these
    /// count: services and channels (by index) already counted share their
    /// sets; the others get new ones at the end of the flat list.
    pub fn grown(&self, config: &ServeConfig) -> Self {
        let mut channels = self.channels.clone();
        let mut fresh = || {
            channels.push(std::sync::Arc::default());
            channels.len() - 1
        };
        let mut runs = Vec::new();
        for (si, s) in config.services.iter().enumerate() {
            let old = self.runs.get(si);
            let (mut ch, extra) = match old {
                Some(l) => (l.channels.clone(), l.extra),
                None => {
                    // Channels first, then main, proxy, other: the layout of
                    // the module docs for the services configured at start.
                    let ch: Vec<usize> = (0..s.channels.len()).map(|_| fresh()).collect();
                    (ch, [fresh(), fresh(), fresh()])
                }
            };
            while ch.len() < s.channels.len() {
                ch.push(fresh());
            }
            runs.push(Layout { channels: ch, extra });
        }
        let mut rejected = self.rejected.clone();
        rejected.resize_with(config.services.len().max(rejected.len()), std::sync::Arc::default);
        Self { channels, runs, rejected, link_duration: std::sync::Arc::clone(&self.link_duration) }
    }

    /// The flat index of `which` in `service`.
    pub fn index(&self, service: usize, which: Which) -> Option<usize> {
        let l = self.runs.get(service)?;
        Some(match which {
            Which::Channel(i) => *l.channels.get(i)?,
            Which::Main => l.extra[0],
            Which::Proxy => l.extra[1],
            Which::Other => l.extra[2],
        })
    }

    /// The counter set at flat index `i`.
    pub fn at(&self, i: usize) -> Option<&ChannelCounters> {
        self.channels.get(i).map(|c| &**c)
    }

    /// The counter set of `which` in `service`.
    pub fn get(&self, service: usize, which: Which) -> Option<&ChannelCounters> {
        self.index(service, which).and_then(|i| self.at(i))
    }

    /// Counts a link result.
    pub fn link(&self, service: usize, which: Which, result: LinkResult) {
        if let Some(c) = self.get(service, which) {
            c.links[result as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a rejected connection.
    pub fn reject(&self, service: usize, reason: Reject) {
        if let Some(r) = self.rejected.get(service) {
            r[reason as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rejections of `service` by [`Reject`] index.
    pub fn rejected(&self, service: usize) -> [u64; 5] {
        let mut out = [0; 5];
        if let Some(r) = self.rejected.get(service) {
            for (o, a) in out.iter_mut().zip(r.iter()) {
                *o = a.load(Ordering::Relaxed);
            }
        }
        out
    }

    /// Number of flat counter sets.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// Whether there is no counter set (no service).
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Every counter set of `service` with its [`Which`].
    pub fn sets_of(&self, service: usize) -> Vec<(Which, usize)> {
        let Some(l) = self.runs.get(service) else { return Vec::new() };
        (0..l.channels.len())
            .map(Which::Channel)
            .chain([Which::Main, Which::Proxy, Which::Other])
            .filter_map(|w| Some((w, self.index(service, w)?)))
            .collect()
    }
}

/// One connection as its worker saw it at its last tick.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Service index.
    pub service: usize,
    /// Stage.
    pub stage: StageKind,
    /// Session id (0 before the link).
    pub session: u32,
    /// `main:0`, `usbredir:0`, `port:NAME`, ...
    pub label: String,
    /// The client's (or upstream's) address.
    pub peer: String,
    /// When the connection was accepted.
    pub since: Instant,
    /// Its counter set, once linked.
    pub which: Option<Which>,
    /// Payload bytes client → endpoint so far.
    pub c2e_bytes: u64,
    /// Payload bytes endpoint → client so far.
    pub e2c_bytes: u64,
}

/// What a worker publishes at its tick.
#[derive(Debug, Clone, Default)]
pub struct WorkerSnapshot {
    /// Its connections.
    pub conns: Vec<ConnInfo>,
    /// Registered buffers held by connections.
    pub buffers_in_use: u64,
    /// Registered buffers in the arena.
    pub buffers_total: u64,
    /// Of those, registered with the ring now (pages pinned: resident).
    pub buffers_pinned: u64,
    /// Ops in the kernel's hands.
    pub ops_inflight: u64,
    /// Pushes that found the submission queue full, since start.
    pub sq_full_events: u64,
    /// When this snapshot was taken (`None`: never yet).
    pub at: Option<Instant>,
}

/// Appends `s` as a Prometheus label value (backslash, quote, newline escaped).
fn label_value(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A Prometheus text-format writer: one family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    /// The text so far.
    pub out: String,
}

impl Exposition {
    /// Starts a family with its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                label_value(&mut self.out, v);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The `channel` label of a counter set.
pub fn which_label(config: &ServeConfig, service: usize, which: Which) -> String {
    match which {
        Which::Channel(i) => config
            .services
            .get(service)
            .and_then(|s| s.channels.get(i))
            .map_or_else(|| format!("#{i}"), super::config::ChannelConf::label),
        Which::Main => "main".into(),
        Which::Proxy => "proxy".into(),
        Which::Other => "other".into(),
    }
}

/// Counts of live connections per (service, stage) from worker snapshots.
pub fn stage_counts(services: usize, snaps: &[WorkerSnapshot]) -> Vec<[u64; STAGES.len()]> {
    let mut out = vec![[0u64; STAGES.len()]; services];
    for c in snaps.iter().flat_map(|s| &s.conns) {
        if let Some(row) = out.get_mut(c.service) {
            row[c.stage as usize] += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(30));
        let (b, count, sum) = h.read();
        assert_eq!(b[0], 1);
        assert_eq!(b[2], 2);
        assert_eq!(*b.last().expect("buckets"), 2);
        assert_eq!(count, 3);
        assert!((sum - 30.0035).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn exposition_escapes_label_values() {
        let mut e = Exposition::default();
        e.sample("x_total", &[("a", "q\"b\\c\nd")], 7);
        assert_eq!(e.out, "x_total{a=\"q\\\"b\\\\c\\nd\"} 7\n");
    }

    #[test]
    fn flat_index_layout() {
        let text = "[[service]]\nlisten = [\"127.0.0.1:1\"]\ndisable-ticketing = true\nchannels = [\"128=echo:\", \"129=sink:\"]\n\
                    [[service]]\nname = \"b\"\nlisten = [\"127.0.0.1:2\"]\ndisable-ticketing = true\nchannels = [\"128=echo:\"]\n";
        let cfg = ServeConfig::from_toml(text, "t").expect("config");
        let c = Counters::new(&cfg);
        assert_eq!(c.len(), 2 + 3 + 1 + 3);
        assert_eq!(c.index(0, Which::Channel(1)), Some(1));
        assert_eq!(c.index(0, Which::Other), Some(4));
        assert_eq!(c.index(1, Which::Channel(0)), Some(5));
        assert_eq!(c.index(1, Which::Channel(1)), None);
        assert_eq!(c.index(2, Which::Main), None);
        assert_eq!(c.sets_of(1).len(), 4);
        assert_eq!(which_label(&cfg, 0, Which::Channel(1)), "129:0");
    }

    #[test]
    fn grown_keeps_counts_and_indexes() {
        let text = "[[service]]\nlisten = [\"127.0.0.1:1\"]\ndisable-ticketing = true\nchannels = [\"128=echo:\"]\n";
        let mut cfg = ServeConfig::from_toml(text, "t").expect("config");
        let c = Counters::new(&cfg);
        c.link(0, Which::Channel(0), LinkResult::Ok);
        c.reject(0, Reject::TableFull);
        let mut more = cfg.services[0].channels[0].clone();
        more.id = 1;
        cfg.services[0].channels.push(more);
        let mut second = cfg.services[0].clone();
        second.name = "b".into();
        cfg.services.push(second);
        let g = c.grown(&cfg);
        assert_eq!(g.index(0, Which::Channel(0)), Some(0), "kept sets keep their flat index");
        assert_eq!(g.index(0, Which::Main), c.index(0, Which::Main));
        assert_eq!(g.index(0, Which::Channel(1)), Some(4), "a new channel is appended");
        assert_eq!(g.index(1, Which::Channel(0)), Some(5));
        assert_eq!(g.len(), 4 + 1 + 2 + 3);
        assert_eq!(g.get(0, Which::Channel(0)).map(|s| s.links[0].load(Ordering::Relaxed)), Some(1));
        assert_eq!(g.rejected(0)[0], 1);
        g.link(0, Which::Channel(0), LinkResult::Ok);
        assert_eq!(c.get(0, Which::Channel(0)).map(|s| s.links[0].load(Ordering::Relaxed)), Some(2), "shared");
    }
}
