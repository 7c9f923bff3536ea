//! Micro-bench of the data-stage deframer and the link stage, built to be
//! counted by callgrind (`perf/callgrind`) as well as timed.
//!
//! ```text
//! cargo bench --bench deframe_bench                    # wall-clock figures
//! perf/callgrind                                       # instruction counts
//! target/release/deps/deframe_bench-* callgrind [MIB] [LINKS]
//! ```
//!
//! Each measured piece is its own `#[inline(never)]` function so that
//! callgrind's inclusive cost of that function is exactly the piece:
//! `deframe_64k` / `deframe_64b` (the [`Deframer`] over `MIB` MiB of mini-
//! header DATA messages of 64 KiB or 64 B, fed in reads of one relay
//! buffer), `keygen_once` (one RSA ticket key), and `server_link_input` /
//! `client_link_input` (every byte of one link with a ticket, each side).

use std::hint::black_box;
use std::time::Instant;

use vmcrelay::proto::auth::{TicketKey, seeded_rng};
use vmcrelay::proto::caps::Caps;
use vmcrelay::proto::client_link::{self, ClientLink, ClientLinkConfig};
use vmcrelay::proto::framing::{Deframer, Encoder, Event, HeaderKind};
use vmcrelay::proto::server_link::{self, Decision, ServerLink, ServerLinkConfig};

/// The relay's default buffer: four 64 KiB DATA messages with full headers.
const READ_BYTES: usize = 4 * (64 * 1024 + 18);
/// One MiB of payload per pass over the prepared stream.
const MIB: usize = 1024 * 1024;
/// SPICE DATA message type on spicevmc channels.
const MSG_DATA: u16 = 101;
const PASSWORD: &[u8] = b"bench-secret";

/// A mini-header stream carrying one MiB of payload in `payload`-byte messages.
fn framed_mib(payload: usize) -> Vec<u8> {
    let mut enc = Encoder::new(HeaderKind::Mini);
    let msgs = MIB / payload;
    let mut out = Vec::with_capacity(msgs * (payload + 6));
    let mut hdr = [0u8; 18];
    let size = u32::try_from(payload).unwrap_or(u32::MAX);
    for i in 0..msgs {
        let n = enc.header(MSG_DATA, size, &mut hdr).unwrap_or(0);
        out.extend_from_slice(&hdr[..n]);
        out.extend((0..payload).map(|j| u8::try_from((i ^ j) & 0xff).unwrap_or(0)));
    }
    out
}

/// Feeds `stream` `passes` times through one deframer in reads of
/// READ_BYTES, as the copy path does; returns (messages, payload bytes).
#[inline(always)]
fn deframe_stream(stream: &[u8], passes: usize) -> (u64, u64) {
    let mut d = Deframer::new(HeaderKind::Mini);
    let (mut msgs, mut body) = (0u64, 0u64);
    for _ in 0..passes {
        for read in stream.chunks(READ_BYTES) {
            let mut off = 0;
            while off < read.len() {
                let (used, ev) = d.advance(&read[off..]);
                match ev {
                    Some(Event::Header(h)) => {
                        msgs += 1;
                        black_box(h);
                    }
                    Some(Event::Body { len, .. }) => body += len as u64,
                    None => {}
                }
                if used == 0 && ev.is_none() {
                    break;
                }
                off += used;
            }
        }
    }
    (msgs, body)
}

// The two differ by a marker so that identical-code folding cannot merge
// them into one symbol (callgrind would then report one for both).
#[inline(never)]
fn deframe_64k(stream: &[u8], passes: usize) -> (u64, u64) {
    black_box(0x64_u32);
    deframe_stream(black_box(stream), passes)
}

#[inline(never)]
fn deframe_64b(stream: &[u8], passes: usize) -> (u64, u64) {
    black_box(0x40_u32);
    deframe_stream(black_box(stream), passes)
}

#[inline(never)]
fn keygen_once(rng: &mut rand::rngs::StdRng) -> TicketKey {
    match TicketKey::generate(rng) {
        Ok(k) => k,
        Err(e) => panic!("keygen: {e}"),
    }
}

#[inline(never)]
fn server_link_input(s: &mut ServerLink, input: &[u8]) -> (usize, Option<server_link::Action>) {
    let used = s.handle_input(input);
    let mut act = s.poll_action();
    if let Some(server_link::Action::Request(_)) = act {
        s.decide(Decision::Accept { channel_caps: Caps::from_bits(&[0]) });
        act = s.poll_action();
    }
    (used, act)
}

#[inline(never)]
fn client_link_input(c: &mut ClientLink, input: &[u8]) -> (usize, Option<client_link::Action>) {
    let used = c.handle_input(input);
    (used, c.poll_action())
}

/// One link with a ticket between an in-memory server and client; true if
/// both sides report Linked.
fn link_once(key: TicketKey, seed: u8) -> bool {
    let cfg = ServerLinkConfig { password: Some(PASSWORD.to_vec()), mini_header: true };
    let mut s = ServerLink::new(&cfg, key);
    let client_cfg = ClientLinkConfig {
        connection_id: 0,
        channel_type: 9,
        channel_id: 0,
        channel_caps: Caps::from_bits(&[0]),
        password: PASSWORD.to_vec(),
        mini_header: true,
        defer_ticket: false,
    };
    let Ok(mut c) = ClientLink::new(client_cfg, [seed; 32]) else { return false };
    let mut buf = vec![0u8; 4096];
    let (mut s_done, mut c_done) = (false, false);
    for _ in 0..64 {
        let n = c.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            let (used, act) = server_link_input(&mut s, &buf[off..n]);
            off += used;
            match act {
                Some(server_link::Action::Linked(_)) => s_done = true,
                Some(server_link::Action::Close(_)) => return false,
                _ => {}
            }
            if used == 0 {
                break;
            }
        }
        let n = s.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            let (used, act) = client_link_input(&mut c, &buf[off..n]);
            off += used;
            match act {
                Some(client_link::Action::Linked(_)) => c_done = true,
                Some(client_link::Action::Close(_)) => return false,
                _ => {}
            }
            if used == 0 {
                break;
            }
        }
        if s_done && c_done {
            return true;
        }
    }
    false
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// The counted workload: fixed sizes so instruction counts repeat exactly.
fn callgrind(mib: usize, links: usize) {
    let big = framed_mib(64 * 1024);
    let small = framed_mib(64);
    let (m1, b1) = deframe_64k(&big, mib);
    let (m2, b2) = deframe_64b(&small, mib);
    let mut rng = seeded_rng([7; 32]);
    let mut ok = 0;
    for i in 0..links {
        let key = keygen_once(&mut rng);
        ok += usize::from(link_once(key, u8::try_from(i % 251).unwrap_or(0)));
    }
    println!("deframe_64k: {m1} msgs, {b1} payload bytes; deframe_64b: {m2} msgs, {b2} payload bytes");
    println!("links: {ok}/{links} linked");
    assert_eq!(ok, links, "every link must succeed");
}

/// Wall-clock figures (noisy on shared vCPUs: the callgrind counts are the
/// figures to compare across revisions).
fn timed() {
    let big = framed_mib(64 * 1024);
    let small = framed_mib(64);
    for (name, stream, passes) in [("64 KiB msgs", &big, 2048usize), ("64 B msgs", &small, 64)] {
        let t = Instant::now();
        let (msgs, bytes) =
            if name.starts_with("64 KiB") { deframe_64k(stream, passes) } else { deframe_64b(stream, passes) };
        let s = t.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // figures for humans
        let (mib, m) = (bytes as f64 / MIB as f64, msgs as f64);
        println!("deframe {name:12}: {:9.1} MiB/s  {:7.1} ns/msg  ({passes} MiB)", mib / s, s * 1e9 / m);
    }
    let mut rng = seeded_rng([7; 32]);
    let n: u32 = 10;
    let t = Instant::now();
    let keys: Vec<TicketKey> = (0..n).map(|_| keygen_once(&mut rng)).collect();
    let kg = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ok =
        keys.into_iter().enumerate().map(|(i, k)| link_once(k, u8::try_from(i).unwrap_or(0))).filter(|&b| b).count();
    let lk = t.elapsed().as_secs_f64();
    let nf = f64::from(n);
    println!("RSA-1024 ticket key   : {:9.2} ms/key", kg * 1e3 / nf);
    println!("link with ticket      : {:9.2} ms/link (server + client, key given; {ok}/{n} linked)", lk * 1e3 / nf);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("callgrind") => callgrind(arg(&args, 2, 64), arg(&args, 3, 8)),
        // `cargo bench` passes --bench; anything else: the timed run.
        _ => timed(),
    }
}
