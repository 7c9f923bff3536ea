//! What a run reports: one serialisable object (the `--json` file) and its
//! human rendering.

use hdrhistogram::Histogram;
use serde::Serialize;

use super::pattern::Mismatch;

/// Bytes per MiB, as f64.
pub const MIB: f64 = 1024.0 * 1024.0;

/// `x` per second over `secs` (0 when no time passed).
#[allow(clippy::cast_precision_loss)] // figures for humans
pub fn per_sec(x: u64, secs: f64) -> f64 {
    if secs > 0.0 { x as f64 / secs } else { 0.0 }
}

/// MiB per second.
pub fn mib_s(bytes: u64, secs: f64) -> f64 {
    per_sec(bytes, secs) / MIB
}

/// Rounds for JSON and display (3 decimals).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The exact parameters of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunParams {
    /// `spice`, `raw-tcp` or `raw-unix`.
    pub transport: &'static str,
    /// Target URI.
    pub uri: String,
    /// `--channel` selections as given (SPICE).
    pub channels: Vec<String>,
    /// The channel each connection linked.
    pub picked: Vec<String>,
    /// Connections.
    pub connections: usize,
    /// `up`, `down`, `echo` or `rr`.
    pub mode: &'static str,
    /// Size or distribution of messages sent (`down`: read size).
    pub sizes: String,
    /// Bytes per connection (`--bytes`), if bounded by bytes.
    pub bytes_per_connection: Option<u64>,
    /// Seconds (`--duration`), if bounded by time.
    pub duration_s: Option<f64>,
    /// Messages per second per connection (`--rate`).
    pub rate_per_connection: Option<f64>,
    /// LZ4 announced.
    pub lz4: bool,
    /// Pattern seed.
    pub seed: u64,
    /// Whether a password was sent.
    pub password: bool,
    /// Per-connection link timeout.
    pub connect_timeout_s: f64,
    /// Whole-run deadline.
    pub timeout_s: f64,
}

/// Link set-up times across connections.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetupStats {
    /// Connections that linked.
    pub count: usize,
    /// Fastest, µs.
    pub min: u64,
    /// Median, µs.
    pub p50: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// Slowest, µs.
    pub max: u64,
    /// Mean, µs.
    pub mean: f64,
}

impl SetupStats {
    /// From per-connection set-up times in µs.
    #[allow(clippy::cast_precision_loss)]
    pub fn from_samples(mut v: Vec<u64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let rank = (q * v.len() as f64).ceil().max(1.0);
            let i = crate::load::report::f64_to_usize(rank) - 1;
            v[i.min(v.len() - 1)]
        };
        let sum: u64 = v.iter().sum();
        Self {
            count: v.len(),
            min: v[0],
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
            mean: round3(sum as f64 / v.len() as f64),
        }
    }
}

/// Round-trip latency percentiles, µs.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyStats {
    /// Samples.
    pub count: u64,
    /// Fastest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

impl LatencyStats {
    /// From a µs histogram; `None` when empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            min: h.min(),
            mean: round3(h.mean()),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }
}

/// The first integrity failure.
#[derive(Debug, Clone, Serialize)]
pub struct MismatchReport {
    /// Connection index.
    pub connection: usize,
    /// Its channel.
    pub channel: String,
    /// Stream offset within that connection.
    pub offset: u64,
    /// Expected byte.
    pub expected: u8,
    /// Received byte.
    pub got: u8,
}

impl MismatchReport {
    /// From a connection's mismatch.
    pub fn new(connection: usize, channel: &str, m: Mismatch) -> Self {
        Self { connection, channel: channel.to_string(), offset: m.offset, expected: m.expected, got: m.got }
    }
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `vmcload run`.
    pub tool: &'static str,
    /// vmcload version.
    pub version: &'static str,
    /// Parameters.
    pub params: RunParams,
    /// No errors, no mismatch, not timed out.
    pub ok: bool,
    /// `ok` (every byte received was checked), `mismatch`, or `sender-only`
    /// (`up`: this side receives nothing; the endpoint verifies).
    pub integrity: &'static str,
    /// Bytes checked against the pattern on this side.
    pub verified_bytes: u64,
    /// First mismatch.
    pub mismatch: Option<MismatchReport>,
    /// Seconds from the common start to the last connection's last byte.
    pub elapsed_s: f64,
    /// Connections that linked and finished cleanly.
    pub connections_ok: usize,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Messages sent (one per `send`, i.e. one DATA message under SPICE).
    pub msgs_sent: u64,
    /// DATA messages received (SPICE only).
    pub msgs_received: Option<u64>,
    /// The mode's main figure: sent MiB/s for `up`, received for the rest.
    pub throughput_mib_s: f64,
    /// Sent MiB/s.
    pub sent_mib_s: f64,
    /// Received MiB/s.
    pub received_mib_s: f64,
    /// Messages per second in the main direction (`rr`: requests).
    pub msgs_per_s: Option<f64>,
    /// Link set-up (session + channel, or socket connect), µs.
    pub setup_us: SetupStats,
    /// Round trips, µs (`rr`: request → whole response; `echo`: message
    /// sent → its last byte back).
    pub latency_us: Option<LatencyStats>,
    /// Connections that failed.
    pub errors: usize,
    /// The first few failures.
    pub error_messages: Vec<String>,
    /// The run hit its `--timeout`.
    pub timed_out: bool,
    /// Stopped early by SIGINT/SIGTERM.
    pub interrupted: bool,
}

/// µs as `850 µs`, `1.23 ms`, `2.50 s`.
#[allow(clippy::cast_precision_loss)]
pub fn fmt_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// Bytes as `512 B`, `12.0 KiB`, `3.50 MiB`, `1.25 GiB`.
#[allow(clippy::cast_precision_loss)]
pub fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if b < 1024 {
        format!("{b} B")
    } else if f < MIB {
        format!("{:.1} KiB", f / 1024.0)
    } else if f < MIB * 1024.0 {
        format!("{:.2} MiB", f / MIB)
    } else {
        format!("{:.2} GiB", f / MIB / 1024.0)
    }
}

/// Saturating, truncating f64 → usize for ranks and counts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn f64_to_usize(x: f64) -> usize {
    if x.is_nan() || x <= 0.0 { 0 } else { x as usize }
}

/// Saturating, truncating f64 → u64.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn f64_to_u64(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 { 0 } else { x as u64 }
}

impl RunReport {
    /// The human summary printed on stdout.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let p = &self.params;
        let mut s = String::new();
        let limit = match (p.bytes_per_connection, p.duration_s) {
            (Some(b), _) => format!("{} per connection", fmt_bytes(b)),
            (None, Some(d)) => format!("{d} s"),
            _ => String::new(),
        };
        let mut head = vec![format!("vmcload run: mode={}", p.mode), p.uri.clone()];
        if !p.channels.is_empty() {
            head.push(format!("channel {}", p.channels.join(",")));
        }
        head.push(format!("connections={} sizes={}", p.connections, p.sizes));
        head.push(limit);
        if let Some(r) = p.rate_per_connection {
            head.push(format!("rate={r}/s per connection"));
        }
        if p.lz4 {
            head.push("lz4".into());
        }
        let _ = writeln!(s, "{}", head.join(" "));
        let _ = writeln!(s, "  elapsed        {:.3} s", self.elapsed_s);
        let _ = writeln!(
            s,
            "  sent           {:>12}  {:>10.1} MiB/s  {} msgs",
            fmt_bytes(self.bytes_sent),
            self.sent_mib_s,
            self.msgs_sent
        );
        let _ = writeln!(
            s,
            "  received       {:>12}  {:>10.1} MiB/s{}",
            fmt_bytes(self.bytes_received),
            self.received_mib_s,
            self.msgs_received.map(|m| format!("  {m} msgs")).unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  throughput     {:.1} MiB/s{}",
            self.throughput_mib_s,
            self.msgs_per_s.map(|m| format!(", {m:.0} msgs/s")).unwrap_or_default()
        );
        let st = &self.setup_us;
        let _ = writeln!(
            s,
            "  link set-up    p50 {}  p99 {}  max {}  ({} of {} connections)",
            fmt_us(st.p50),
            fmt_us(st.p99),
            fmt_us(st.max),
            st.count,
            p.connections
        );
        if let Some(l) = &self.latency_us {
            let _ = writeln!(
                s,
                "  round trip     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                fmt_us(l.p50),
                fmt_us(l.p90),
                fmt_us(l.p99),
                fmt_us(l.p999),
                fmt_us(l.max),
                l.count
            );
        }
        let integrity = match (&self.mismatch, self.integrity) {
            (Some(m), _) => format!(
                "MISMATCH on connection {} ({}) at stream offset {}: got {:#04x}, expected {:#04x}",
                m.connection, m.channel, m.offset, m.got, m.expected
            ),
            (None, "sender-only") => "not checked here (up: the endpoint verifies what arrives)".to_string(),
            (None, _) => format!("ok, {} verified", fmt_bytes(self.verified_bytes)),
        };
        let _ = writeln!(s, "  integrity      {integrity}");
        let _ = writeln!(s, "  errors         {}", self.errors);
        for e in &self.error_messages {
            let _ = writeln!(s, "    {e}");
        }
        if self.timed_out {
            let _ = writeln!(s, "  TIMED OUT after {} s", p.timeout_s);
        }
        if self.interrupted {
            let _ = writeln!(s, "  interrupted: figures cover the time until the signal");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_percentiles() {
        let s = SetupStats::from_samples((1..=100).collect());
        assert_eq!((s.min, s.p50, s.p99, s.max), (1, 50, 99, 100));
        let one = SetupStats::from_samples(vec![7]);
        assert_eq!((one.p50, one.p99, one.max), (7, 7, 7));
        assert_eq!(SetupStats::from_samples(Vec::new()).count, 0);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_us(850), "850 µs");
        assert_eq!(fmt_us(1500), "1.50 ms");
        assert_eq!(fmt_bytes(4 << 20), "4.00 MiB");
        assert_eq!(f64_to_usize(-1.0), 0);
    }
}
