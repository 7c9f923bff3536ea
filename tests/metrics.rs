//! `serve --metrics`: `/metrics` parsed as Prometheus text (every family of
//! the README present, byte counters equal to a known transfer and to the
//! close log line), the endpoint's bounds against hostile HTTP clients
//! while SPICE keeps moving bytes, and the status page loaded in headless
//! Chromium (DOM names the services and channels; the screenshot is not
//! blank and shows the sparkline).
//!
//! `VMCRELAY_STATUS_SHOT=docs/status-page.png cargo test --release --test
//! metrics status_page` keeps the screenshot (after a longer transfer).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vmcrelay::relay::sync_client::{Channel, Session};

const T: Duration = Duration::from_secs(10);

/// One sample line of the exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A strict parser of the Prometheus text format (0.0.4): every line is
/// empty, a comment (`# HELP name text`, `# TYPE name kind`, `# ...`) or a
/// sample `name{label="value",...} value`. Panics with the line otherwise.
/// Returns the samples and each family's TYPE.
fn parse_exposition(text: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .enumerate()
                .all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()))
    };
    let mut samples = Vec::new();
    let mut types = HashMap::new();
    for (no, line) in text.lines().enumerate() {
        macro_rules! bad {
            ($why:expr) => {
                panic!("line {}: {}: {line:?}", no + 1, $why)
            };
        }
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.trim_start().splitn(3, ' ');
            match w.next() {
                Some("TYPE") => {
                    let (Some(name), Some(kind)) = (w.next(), w.next()) else { bad!("TYPE needs a name and a kind") };
                    if !is_name(name) {
                        bad!("bad metric name");
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        bad!("unknown type");
                    }
                    if samples.iter().any(|s: &Sample| family_of(&s.name, &types) == name) {
                        bad!("TYPE after samples of the family");
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        bad!("TYPE given twice");
                    }
                }
                Some("HELP") if !w.next().is_some_and(is_name) => bad!("HELP needs a metric name"),
                _ => {}
            }
            continue;
        }
        let b = line.as_bytes();
        let Some(name_end) = line.find(['{', ' ']) else { bad!("no value") };
        let name = &line[..name_end];
        if !is_name(name) {
            bad!("bad metric name");
        }
        let mut i = name_end;
        let mut labels: Vec<(String, String)> = Vec::new();
        if b.get(i) == Some(&b'{') {
            i += 1;
            loop {
                if b.get(i) == Some(&b'}') {
                    i += 1;
                    break;
                }
                let Some(eq) = line[i..].find('=').map(|e| i + e) else { bad!("label without =") };
                let lname = &line[i..eq];
                if !is_name(lname) || lname.contains(':') {
                    bad!("bad label name");
                }
                i = eq + 1;
                if b.get(i) != Some(&b'"') {
                    bad!("label value not quoted");
                }
                i += 1;
                let mut value = String::new();
                loop {
                    match b.get(i) {
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            match b.get(i + 1) {
                                Some(b'\\') => value.push('\\'),
                                Some(b'"') => value.push('"'),
                                Some(b'n') => value.push('\n'),
                                _ => bad!("bad escape in label value"),
                            }
                            i += 2;
                        }
                        Some(_) => {
                            let Some(c) = line[i..].chars().next() else { bad!("bad text") };
                            value.push(c);
                            i += c.len_utf8();
                        }
                        None => bad!("unterminated label value"),
                    }
                }
                if labels.iter().any(|(k, _)| k == lname) {
                    bad!("label given twice");
                }
                labels.push((lname.to_string(), value));
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => {
                        i += 1;
                        break;
                    }
                    _ => bad!("expected , or } after a label"),
                }
            }
        }
        let rest = &line[i..];
        if !rest.starts_with(' ') {
            bad!("no space before the value");
        }
        let mut parts = rest.split(' ').filter(|p| !p.is_empty());
        let Some(v) = parts.next() else { bad!("no value") };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => match v.parse::<f64>() {
                Ok(x) => x,
                Err(_) => bad!("value is not a number"),
            },
        };
        if let Some(ts) = parts.next()
            && ts.parse::<i64>().is_err()
        {
            bad!("timestamp is not an integer");
        }
        if parts.next().is_some() {
            bad!("trailing text");
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    for s in &samples {
        assert!(types.contains_key(&family_of(&s.name, &types)), "sample {} has no TYPE line", s.name);
    }
    (samples, types)
}

/// The family a sample belongs to (histogram samples carry a suffix).
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram")
        {
            return base.to_string();
        }
    }
    name.to_string()
}

/// The value of the sample `name` whose labels include `want` (exactly one).
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
        .collect();
    assert!(found.len() <= 1, "{name} {want:?} matches {} samples", found.len());
    found.first().map(|s| s.value)
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to --metrics");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len(), "Content-Length matches the body");
    (code, body.to_string())
}

fn scrape(addr: &str) -> (Vec<Sample>, HashMap<String, String>) {
    let (code, body) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    parse_exposition(&body)
}

/// Scrapes until `ok` holds for the samples (the workers publish at their 1 s tick).
fn scrape_until(addr: &str, what: &str, ok: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + T;
    loop {
        let (s, _) = scrape(addr);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "/metrics never showed {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The relay's `close` line of `channel` (waits for it).
fn wait_close_line(relay: &Relay, channel: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = relay.lines("close peer=").into_iter().find(|l| l.contains(channel)) {
            return l;
        }
        assert!(Instant::now() < deadline, "no close line for {channel}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `key=N` of a log line.
fn field(line: &str, key: &str) -> u64 {
    let pat = format!(" {key}=");
    let i = line.find(&pat).unwrap_or_else(|| panic!("{key} in {line}")) + pat.len();
    line[i..].split(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{key} in {line}"))
}

/// Sends `sizes` as one message each through an echo channel and reads
/// every byte back; returns the total.
fn echo_messages(ch: &mut Channel, sizes: &[usize], seed: u64) -> usize {
    let total: usize = sizes.iter().sum();
    let data = pattern(seed, total);
    let mut got = vec![0u8; total];
    let (w, r) = (&mut ch.writer, &mut ch.reader);
    std::thread::scope(|sc| {
        let d = &data;
        sc.spawn(move || {
            let mut at = 0;
            for n in sizes {
                w.send(&d[at..at + n]).expect("send");
                at += n;
            }
        });
        let mut have = 0;
        while have < total {
            let n = r.read(&mut got[have..]).expect("read");
            assert!(n > 0, "EOF after {have} of {total} bytes");
            have += n;
        }
    });
    assert!(got == data, "echo differs");
    total
}

/// Every family the README documents as the interface.
const FAMILIES: [(&str, &str); 29] = [
    ("vmcrelay_build_info", "gauge"),
    ("vmcrelay_uptime_seconds", "gauge"),
    ("vmcrelay_connections", "gauge"),
    ("vmcrelay_sessions", "gauge"),
    ("vmcrelay_links_total", "counter"),
    ("vmcrelay_channel_bytes_total", "counter"),
    ("vmcrelay_channel_messages_total", "counter"),
    ("vmcrelay_link_duration_seconds", "histogram"),
    ("vmcrelay_rejected_total", "counter"),
    ("vmcrelay_buffers_in_use", "gauge"),
    ("vmcrelay_buffers", "gauge"),
    ("vmcrelay_buffers_pinned", "gauge"),
    ("vmcrelay_ring_ops_inflight", "gauge"),
    ("vmcrelay_ring_sq_full_total", "counter"),
    ("vmcrelay_key_pool_keys", "gauge"),
    ("vmcrelay_key_pool_capacity", "gauge"),
    ("vmcrelay_worker_links_ok_total", "counter"),
    ("vmcrelay_worker_links_failed_total", "counter"),
    ("vmcrelay_worker_connections_rejected_total", "counter"),
    ("vmcrelay_worker_connections", "gauge"),
    ("vmcrelay_worker_ticks_total", "counter"),
    ("vmcrelay_worker_c2e_bytes_total", "counter"),
    ("vmcrelay_worker_e2c_bytes_total", "counter"),
    ("vmcrelay_worker_protocol_errors_total", "counter"),
    ("vmcrelay_worker_tls_errors_total", "counter"),
    ("vmcrelay_worker_auth_failures_total", "counter"),
    ("vmcrelay_worker_links_throttled_total", "counter"),
    ("vmcrelay_worker_links_busy_total", "counter"),
    ("vmcrelay_worker_sessions_replaced_total", "counter"),
];

fn start_relay(extra: &[&str]) -> (Relay, String) {
    let port = free_port();
    let maddr = format!("127.0.0.1:{}", free_port());
    let mut a = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
        "--workers".into(),
        "2".into(),
        "--metrics".into(),
        maddr.clone(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    let relay = Relay::start(&a);
    relay.wait_log(&format!("metrics http://{maddr}/metrics"), T);
    (relay, maddr)
}

/// A known transfer through an echo channel shows up exactly in
/// `vmcrelay_channel_bytes_total` (and as in the close line); every family
/// is there; links count by result (ok, failed, busy, auth); connections
/// by stage; the link histogram is cumulative.
#[test]
fn metrics_families_and_exact_counters() {
    let dir = TempDir::new("metrics");
    let pw = dir.path("pass");
    std::fs::write(&pw, "s3cret\n").expect("password file");
    let (relay, maddr) = start_relay(&[
        "--name",
        "vm1",
        "--password-file",
        pw.to_str().expect("path"),
        "--channel",
        "128=echo:",
        "--channel",
        "port:org.qemu.monitor.qmp.0=sink:",
    ]);
    let (first, types) = scrape(&maddr);
    for (family, kind) in FAMILIES {
        assert_eq!(types.get(family).map(String::as_str), Some(kind), "family {family} of type {kind}");
    }
    assert_eq!(value(&first, "vmcrelay_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    for r in ["table_full", "throttled", "link_timeout", "tls"] {
        assert_eq!(value(&first, "vmcrelay_rejected_total", &[("service", "vm1"), ("reason", r)]), Some(0.0), "{r}");
    }

    let s = Session::connect(&relay.addr(), b"s3cret", T).expect("session");
    let mut ch = s.open(128, 0, false).expect("link 128");
    // Each worker publishes its snapshot at its own tick: wait until both
    // the main (linked first, maybe on the other worker) and the channel show.
    let linked = scrape_until(&maddr, "one linked main and channel", |x| {
        value(x, "vmcrelay_connections", &[("service", "vm1"), ("stage", "channel")]) == Some(1.0)
            && value(x, "vmcrelay_connections", &[("service", "vm1"), ("stage", "main")]) == Some(1.0)
    });
    assert_eq!(value(&linked, "vmcrelay_connections", &[("service", "vm1"), ("stage", "main")]), Some(1.0));
    assert_eq!(value(&linked, "vmcrelay_sessions", &[("service", "vm1")]), Some(1.0));
    // Odd sizes, one message each: c2e messages are exactly these.
    let sizes: Vec<usize> = (0..300).map(|k| 1 + (k * 7919) % 65_536).collect();
    let total = echo_messages(&mut ch, &sizes, 13) + echo_messages(&mut ch, &[3 << 20], 14);
    let msgs = sizes.len() + 1;

    // Refusals: busy (same session), unknown channel, wrong password.
    assert!(s.open(128, 0, false).is_err(), "second link in the session is busy");
    assert!(s.open(130, 0, false).is_err(), "no channel 130");
    assert!(Session::connect(&relay.addr(), b"wrong", T).is_err(), "wrong password");
    drop(ch);
    let close = wait_close_line(&relay, "channel=128:0 ");
    assert_eq!(field(&close, "c2e_bytes"), total as u64, "{close}");

    let want = total as f64;
    let bytes = |x: &[Sample], dir: &str| {
        value(x, "vmcrelay_channel_bytes_total", &[("service", "vm1"), ("channel", "128:0"), ("direction", dir)])
    };
    let after = scrape_until(&maddr, "the transfer's bytes", |x| {
        bytes(x, "c2e") == Some(want) && bytes(x, "e2c") == Some(want)
    });
    let msgs_of = |dir: &str| {
        value(
            &after,
            "vmcrelay_channel_messages_total",
            &[("service", "vm1"), ("channel", "128:0"), ("direction", dir)],
        )
    };
    assert_eq!(msgs_of("c2e"), Some(msgs as f64), "one message per send");
    assert_eq!(msgs_of("c2e"), Some(field(&close, "c2e_msgs") as f64), "{close}");
    assert_eq!(msgs_of("e2c"), Some(field(&close, "e2c_msgs") as f64), "{close}");
    assert_eq!(field(&close, "e2c_bytes"), total as u64);
    let idle = bytes(&after, "c2e");
    assert_eq!(
        value(
            &after,
            "vmcrelay_channel_bytes_total",
            &[("channel", "port:org.qemu.monitor.qmp.0"), ("direction", "c2e")]
        ),
        Some(0.0)
    );
    assert_eq!(idle, Some(want));

    let link = |ch: &str, r: &str| {
        value(&after, "vmcrelay_links_total", &[("service", "vm1"), ("channel", ch), ("result", r)]).unwrap_or(-1.0)
    };
    assert_eq!(link("128:0", "ok"), 1.0);
    assert_eq!(link("128:0", "busy"), 1.0);
    assert_eq!(link("main", "ok"), 1.0);
    assert_eq!(link("main", "auth"), 1.0);
    assert_eq!(link("other", "failed"), 1.0);
    assert_eq!(link("port:org.qemu.monitor.qmp.0", "ok"), 0.0);
    let worker_sum = |name: &str| -> f64 { after.iter().filter(|x| x.name == name).map(|x| x.value).sum() };
    assert_eq!(worker_sum("vmcrelay_worker_links_ok_total"), 2.0);
    assert_eq!(worker_sum("vmcrelay_worker_auth_failures_total"), 1.0);
    assert_eq!(worker_sum("vmcrelay_worker_c2e_bytes_total"), want, "live worker counter agrees");

    // Histogram: cumulative, +Inf equals the count, one per link OK.
    let buckets: Vec<&Sample> = after.iter().filter(|x| x.name == "vmcrelay_link_duration_seconds_bucket").collect();
    assert!(buckets.len() >= 5, "histogram buckets");
    let mut prev = (f64::NEG_INFINITY, 0.0);
    for b in &buckets {
        let le = b.labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.as_str()).expect("le label");
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().expect("le is a number") };
        assert!(le > prev.0 && b.value >= prev.1, "buckets grow: {buckets:?}");
        prev = (le, b.value);
    }
    assert_eq!(prev.0, f64::INFINITY, "last bucket is +Inf");
    assert_eq!(value(&after, "vmcrelay_link_duration_seconds_count", &[]), Some(prev.1));
    assert_eq!(prev.1, 2.0, "main and 128:0 linked");
    assert!(value(&after, "vmcrelay_link_duration_seconds_sum", &[]).is_some_and(|v| v > 0.0));
    for w in ["w0", "w1"] {
        assert!(value(&after, "vmcrelay_buffers", &[("worker", w)]).is_some_and(|v| v > 0.0), "{w} buffers");
        assert!(value(&after, "vmcrelay_key_pool_keys", &[("worker", w)]).is_some(), "{w} keys");
    }
    s.close();
    scrape_until(&maddr, "no connection left", |x| {
        STAGE_NAMES.iter().all(|st| value(x, "vmcrelay_connections", &[("service", "vm1"), ("stage", st)]) == Some(0.0))
    });
    // Keys come back: the pool refills to its capacity.
    scrape_until(&maddr, "a full key pool", |x| {
        let cap = value(x, "vmcrelay_key_pool_capacity", &[]).unwrap_or(0.0);
        ["w0", "w1"].iter().all(|w| value(x, "vmcrelay_key_pool_keys", &[("worker", w)]) == Some(cap))
    });
    assert_eq!(relay.stop(), Some(0));
}

const STAGE_NAMES: [&str; 5] = ["link", "main", "channel", "proxy", "upstream"];

/// Reads until the server closes; whether it did within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut sink = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

/// Idle, slow, oversized and non-HTTP clients of the metrics address: the
/// relay keeps moving SPICE bytes, each bad client is answered or cut off
/// within its bound, and a normal scrape works right after.
#[test]
fn hostile_http_clients_do_not_hurt_the_relay() {
    let (relay, maddr) = start_relay(&["--disable-ticketing", "--channel", "128=echo:"]);
    // Idle connections: more than the endpoint serves at once.
    let mut idle: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(&maddr).expect("idle connect")).collect();
    // A slow client trickling a header that never ends.
    let trickle_stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&trickle_stop);
    let maddr2 = maddr.clone();
    let trickler = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&maddr2).expect("slow connect");
        let started = Instant::now();
        while !stop2.load(Ordering::Relaxed) {
            if s.write_all(b"X-A: b\r\n").is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    });
    // SPICE meanwhile: a session and 32 MiB echoed, in good time.
    let started = Instant::now();
    let s = Session::connect(&relay.addr(), b"", T).expect("session while the metrics port is flooded");
    let mut ch = s.open(128, 0, false).expect("link 128");
    let moved = echo_messages(&mut ch, &[64 * 1024; 512], 3);
    assert_eq!(moved, 32 << 20);
    assert!(started.elapsed() < T, "SPICE took {:?} while the metrics port was flooded", started.elapsed());
    // Every idle connection is closed: the busy ones at accept, the
    // served ones when their request deadline (3 s) passes.
    for (k, c) in idle.iter_mut().enumerate() {
        assert!(closed_within(c, Duration::from_secs(6)), "idle connection {k} still open");
    }
    trickle_stop.store(true, Ordering::Relaxed);
    let cut = trickler.join().expect("trickler");
    assert!(cut.is_some_and(|d| d < Duration::from_secs(8)), "the trickling client was cut off: {cut:?}");

    // An oversized head gets 431, a non-HTTP line 400, POST 405, a bad path 404.
    let mut big = TcpStream::connect(&maddr).expect("connect");
    let _ = big.write_all(b"GET /metrics HTTP/1.1\r\n");
    let _ = big.write_all(&vec![b'a'; 64 * 1024]);
    let mut resp = String::new();
    big.set_read_timeout(Some(T)).expect("timeout");
    let _ = big.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.0 431 "), "{resp:.80}");
    for (req, want) in [
        (&b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"[..], "HTTP/1.0 400 "),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.0 405 "),
        (b"GET /../../etc/passwd HTTP/1.0\r\n\r\n", "HTTP/1.0 404 "),
    ] {
        let mut c = TcpStream::connect(&maddr).expect("connect");
        c.set_read_timeout(Some(T)).expect("timeout");
        c.write_all(req).expect("send");
        let mut resp = String::new();
        let _ = c.read_to_string(&mut resp);
        assert!(resp.starts_with(want), "{want}: {resp:.80}");
    }
    // And a normal scrape works, counting the connections it turned away.
    let (samples, _) = scrape(&maddr);
    assert!(value(&samples, "vmcrelay_metrics_turned_away_total", &[]).is_some_and(|v| v >= 1.0));
    let (code, page) = http_get(&maddr, "/");
    assert_eq!(code, 200);
    assert!(page.contains("128:0"));
    let (code, json) = http_get(&maddr, "/status.json");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).expect("status.json is JSON");
    assert_eq!(v["services"][0]["name"], "default");
    echo_messages(&mut ch, &[1000; 10], 4);
    s.close();
}

/// Decodes a PNG (8-bit RGB or RGBA, non-interlaced) with python3's zlib
/// and returns (width, height, distinct colours, share of non-white
/// pixels, blue pixels).
fn png_stats(path: &Path) -> (u64, u64, u64, f64, u64) {
    const SCRIPT: &str = r#"
import sys, struct, zlib
data = open(sys.argv[1], 'rb').read()
assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'
pos, idat, ihdr = 8, b'', None
while pos < len(data):
    n, kind = struct.unpack('>I4s', data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b'IHDR': ihdr = struct.unpack('>IIBBBBB', body)
    if kind == b'IDAT': idat += body
    pos += 12 + n
w, h, depth, ctype, _, _, interlace = ihdr
assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
bpp = 3 if ctype == 2 else 4
raw, stride = zlib.decompress(idat), w * bpp
prev, colours, nonwhite, blue = bytearray(stride), set(), 0, 0
for y in range(h):
    f = raw[y * (stride + 1)]
    line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if f == 1: line[i] = (line[i] + a) & 255
        elif f == 2: line[i] = (line[i] + b) & 255
        elif f == 3: line[i] = (line[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    for x in range(0, stride, bpp):
        r, g, bl = line[x], line[x + 1], line[x + 2]
        colours.add((r, g, bl))
        if (r, g, bl) != (255, 255, 255): nonwhite += 1
        if bl > 150 and bl > r + 80: blue += 1
    prev = line
print(w, h, len(colours), nonwhite / (w * h), blue)
"#;
    let out = Command::new("python3").arg("-c").arg(SCRIPT).arg(path).output().expect("python3");
    assert!(out.status.success(), "png decode: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(v.len(), 5, "{text}");
    (
        v[0].parse().expect("w"),
        v[1].parse().expect("h"),
        v[2].parse().expect("colours"),
        v[3].parse().expect("share"),
        v[4].parse().expect("blue"),
    )
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
fn chromium(profile: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status page in headless Chromium, two services from a TOML config
/// (`[relay] metrics`): the DOM names both services and their channels
/// with endpoints, the busy channel row shows its client and non-zero
/// bytes; the screenshot is a real picture with the blue sparkline.
#[test]
fn status_page_in_headless_chromium() {
    if !peers_available(&["chromium", "python3"]) {
        return;
    }
    let keep = std::env::var_os("VMCRELAY_STATUS_SHOT");
    let dir = TempDir::new("status-page");
    let (p1, p2, pm) = (free_port(), free_port(), free_port());
    let maddr = format!("127.0.0.1:{pm}");
    let toml = format!(
        "[relay]\nworkers = 2\nmetrics = \"{maddr}\"\n\n[[service]]\nname = \"vm1\"\nlisten = [\"127.0.0.1:{p1}\"]\n\
         disable-ticketing = true\nchannels = [\"128=echo:\", \"port:org.qemu.monitor.qmp.0=echo:\", \
         \"usbredir:0=sink:\"]\n\n[[service]]\nname = \"vm2\"\nlisten = [\"127.0.0.1:{p2}\"]\n\
         disable-ticketing = true\nchannels = [\"usbredir:0=sink:\"]\n"
    );
    let cfg = dir.path("host.toml");
    std::fs::write(&cfg, toml).expect("config");
    let relay = Relay::start(&["--config".to_string(), cfg.display().to_string()]);
    relay.wait_log(&format!("metrics http://{maddr}/metrics"), T);

    // vm1: an echo transfer with a varying rate on 128; vm2: usbredir up into a sink.
    let stop = Arc::new(AtomicBool::new(false));
    let secs = if keep.is_some() { 45 } else { 6 };
    let s1 = Session::connect(&format!("127.0.0.1:{p1}"), b"", T).expect("vm1 session");
    let mut c1 = s1.open(128, 0, false).expect("vm1 128");
    let s2 = Session::connect(&format!("127.0.0.1:{p2}"), b"", T).expect("vm2 session");
    let mut c2 = s2.open(9, 0, false).expect("vm2 usbredir");
    let stop1 = Arc::clone(&stop);
    let driver = std::thread::spawn(move || {
        let started = Instant::now();
        let mut k = 0u64;
        while !stop1.load(Ordering::Relaxed) {
            // A slow wave: 4..36 MiB per second.
            let t = started.elapsed().as_secs_f64();
            let mib = 20.0 + 16.0 * (t / 6.0).sin();
            echo_messages(&mut c1, &[64 * 1024; 4], k);
            c2.writer.send(&[7u8; 16 * 1024]).expect("vm2 send");
            std::thread::sleep(Duration::from_secs_f64(0.25 / mib));
            k += 1;
        }
        (c1, c2)
    });
    std::thread::sleep(Duration::from_secs(secs));
    let json = loop {
        let (_, body) = http_get(&maddr, "/status.json");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        if v["services"][0]["channels"][0]["c2e_bytes"].as_u64().unwrap_or(0) > 0 {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(json["services"][0]["sessions"].as_array().map(Vec::len), Some(1));
    assert_eq!(json["services"][1]["name"], "vm2");

    let url = format!("http://{maddr}/");
    let dom = chromium(&dir.path("profile"), &["--dump-dom"], &url);
    for needle in [
        "Service vm1",
        "Service vm2",
        "data-channel=\"128:0\"",
        "data-channel=\"port:org.qemu.monitor.qmp.0\"",
        "data-channel=\"usbredir:0\"",
        "echo:",
        "sink:",
        "<svg",
    ] {
        assert!(dom.contains(needle), "DOM lacks {needle:?}:\n{dom}");
    }
    let row = dom.split("data-channel=\"128:0\"").nth(1).and_then(|r| r.split("</tr>").next()).expect("128:0 row");
    assert!(row.contains("127.0.0.1:"), "the row names its client: {row}");
    let bytes: Vec<u64> =
        row.split("data-bytes=\"").skip(1).filter_map(|p| p.split('"').next().and_then(|n| n.parse().ok())).collect();
    assert_eq!(bytes.len(), 2, "{row}");
    assert!(bytes.iter().all(|b| *b > 0), "the busy channel moved bytes both ways: {row}");

    let shot = dir.path("status.png");
    chromium(&dir.path("profile"), &[&format!("--screenshot={}", shot.display()), "--window-size=1200,800"], &url);
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of {size} bytes");
    let (w, h, colours, nonwhite, blue) = png_stats(&shot);
    assert_eq!((w, h), (1200, 800));
    assert!(colours > 16, "{colours} colours: blank");
    assert!(nonwhite > 0.02, "only {:.1}% of the pixels are not white", nonwhite * 100.0);
    assert!(blue >= 30, "{blue} blue pixels: no sparkline drawn");
    if let Some(p) = keep {
        std::fs::copy(&shot, &p).expect("keep the screenshot");
        eprintln!("kept the screenshot as {}", Path::new(&p).display());
    }
    stop.store(true, Ordering::Relaxed);
    let _ = driver.join().expect("driver");
    s1.close();
    s2.close();
}

/// Buffers belong to traffic: 16 channels move data at once (each holds
/// buffers), then go quiet; after `--idle-buffer-secs` the tick takes the
/// buffers back (`buffers_in_use` drops to 0, `buffers_reclaimed` counts
/// them), and every idle channel still echoes byte-exact afterwards.
#[test]
fn idle_channels_give_their_buffers_back_and_still_echo() {
    let mut args = vec!["--disable-ticketing".to_string(), "--idle-buffer-secs".into(), "1".into()];
    for id in 0..16 {
        args.extend(["--channel".to_string(), format!("128:{id}=echo:")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (relay, maddr) = start_relay(&refs);
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    let mut chans: Vec<Channel> = (0..16).map(|id| s.open(128, id, false).expect("link")).collect();
    let in_use =
        |x: &[Sample]| -> f64 { x.iter().filter(|s| s.name == "vmcrelay_buffers_in_use").map(|s| s.value).sum() };
    std::thread::scope(|sc| {
        for (k, ch) in chans.iter_mut().enumerate() {
            sc.spawn(move || echo_messages(ch, &[256 << 10; 4], 100 + k as u64));
        }
    });
    let reclaimed = |x: &[Sample]| -> f64 {
        x.iter().filter(|s| s.name == "vmcrelay_worker_buffers_reclaimed_total").map(|s| s.value).sum()
    };
    // Both directions of 16 channels had reads posted with buffers.
    let idle = scrape_until(&maddr, "idle reads cancelled and every buffer back", |x| {
        reclaimed(x) >= 16.0 && in_use(x) == 0.0
    });
    eprintln!("FIGURES idle: buffers reclaimed {}, in use {}", reclaimed(&idle), in_use(&idle));
    for (k, ch) in chans.iter_mut().enumerate() {
        assert_eq!(echo_messages(ch, &[70_000, 1, 65_536], 200 + k as u64), 135_537, "channel {k} after idling");
    }
    drop(relay);
}

/// Connections that have not linked register no buffer: 120 half-open
/// link-stage connections (every other one sent 8 bytes of a link header,
/// so the relay read from it) leave `vmcrelay_buffers_pinned` at 0 (before:
/// each link-stage read borrowed a 256 KiB registered buffer, pinned on
/// first use). Once a session moves data, buffers are pinned, and a fresh
/// session still links and echoes beside the half-open ones.
#[test]
fn half_open_links_pin_no_buffers() {
    use std::net::{IpAddr, Ipv4Addr};
    let (relay, maddr) = start_relay(&["--disable-ticketing", "--channel", "128=echo:"]);
    let sum = |x: &[Sample], name: &str| -> f64 { x.iter().filter(|s| s.name == name).map(|s| s.value).sum() };
    let sa: std::net::SocketAddr = relay.addr().parse().expect("addr");
    let mut held = Vec::new();
    for a in 2..6u8 {
        for i in 0..30 {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, a));
            let mut s = vmcrelay::relay::sync_client::tcp_from(sa, from).expect("connect");
            if i % 2 == 1 {
                s.write_all(b"REDQ\x02\x00\x00\x00").expect("partial link header");
            }
            held.push(s);
        }
    }
    let seen =
        scrape_until(&maddr, "the 120 half-open connections", |x| sum(x, "vmcrelay_worker_connections") >= 120.0);
    // One more tick, so the snapshot follows the reads of the partial headers.
    std::thread::sleep(Duration::from_millis(1500));
    let (now, _) = scrape(&maddr);
    eprintln!(
        "FIGURES half-open: {} connections, {} buffers pinned",
        sum(&seen, "vmcrelay_worker_connections"),
        sum(&now, "vmcrelay_buffers_pinned")
    );
    assert_eq!(sum(&now, "vmcrelay_buffers_pinned"), 0.0, "link-stage connections pinned buffers");
    let s = Session::connect(&relay.addr(), b"", T).expect("fresh session beside the half-open ones");
    let mut c = s.open(128, 0, false).expect("channel");
    assert_eq!(echo_messages(&mut c, &[65_536, 100], 7), 65_636);
    scrape_until(&maddr, "buffers pinned by traffic", |x| sum(x, "vmcrelay_buffers_pinned") > 0.0);
    drop(held);
}
