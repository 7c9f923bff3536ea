//! In-memory TLS throughput: `tls::Session` (rustls' buffered API) against
//! rustls' unbuffered API driven by hand, 256 MiB client → server on one
//! thread, 64 KiB writes, TLS 1.3 with the ring provider, the committed
//! P-256 test certificate of the fuzz crate (`tests/fuzz/data/tls`).
//!
//! Both paths copy the ciphertext once between the two ends (what the
//! kernel does between a send and a recv buffer); everything else is each
//! API's own work: for the buffered API rustls' copies into its record
//! buffer and out of its plaintext buffer, for the unbuffered one the
//! caller's staging of partial records.
//!
//! `cargo bench --bench tls_bench [-- MIB]`: prints MiB/s (wall) and CPU
//! seconds per GiB (process user + system, from /proc/self/stat) for each,
//! median of 3 runs, and the full-handshake rate of a Session pair.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use vmcrelay::tls::{ClientTlsOptions, Limits, ServerTlsFiles, Session, client_config, server_config};

const BLOCK: usize = 64 * 1024;
/// One recv's worth, and what the "kernel" moves per copy.
const RECV: usize = 64 * 1024;
/// The unbuffered receiver's staging: one recv plus a partial record.
const STAGING: usize = RECV + 18_437;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/data/tls")
}

/// Process CPU time (user + system).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that closes the command name, from field 3
    // (state) on: utime and stime are fields 14 and 15 of proc(5), in clock
    // ticks (100/s).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(14) + field(15);
    Duration::from_millis(ticks * 10)
}

fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let dir = data_dir();
    let server = Arc::new(server_config(&ServerTlsFiles::from_x509_dir(&dir)).expect("test cert"));
    let client = client_config(&ClientTlsOptions::with_ca_file(dir.join("ca-cert.pem"))).expect("test CA");
    (server, client)
}

/// `tls::Session` pair: write, poll into a send buffer, copy into a recv
/// buffer, feed, take.
fn run_buffered(total: u64) -> u64 {
    let (scfg, ccfg) = configs();
    let mut server = Session::server(scfg, Limits::default()).expect("server");
    let mut client = Session::client(ccfg, "127.0.0.1", Limits::default()).expect("client");
    let block = vec![0x5au8; BLOCK];
    let mut send_buf = vec![0u8; 2 * RECV];
    let mut recv_buf = vec![0u8; RECV];
    let mut plain = vec![0u8; BLOCK];
    let mut back = vec![0u8; 4096];
    let (mut sent, mut received) = (0u64, 0u64);
    while received < total {
        if sent < total {
            let n = BLOCK.min(usize::try_from(total - sent).unwrap_or(BLOCK));
            sent += client.write_plaintext(&block[..n]) as u64;
        }
        let k = client.poll_output(&mut send_buf);
        for piece in send_buf[..k].chunks(RECV) {
            recv_buf[..piece.len()].copy_from_slice(piece);
            let mut off = 0;
            while off < piece.len() {
                off += server.feed_ciphertext(&recv_buf[off..piece.len()]).expect("feed");
                loop {
                    let got = server.take_plaintext(&mut plain);
                    if got == 0 {
                        break;
                    }
                    black_box(&plain[..got]);
                    received += got as u64;
                }
            }
        }
        // Handshake replies from the server.
        loop {
            let k = server.poll_output(&mut back);
            if k == 0 {
                break;
            }
            let mut off = 0;
            while off < k {
                off += client.feed_ciphertext(&back[off..k]).expect("client feed");
            }
        }
    }
    received
}

/// One end of the unbuffered pair.
struct End {
    incoming: Vec<u8>,
    used: usize,
    outgoing: Vec<u8>,
    out_len: usize,
    to_send: u64,
    received: u64,
}

impl End {
    fn new(to_send: u64) -> Self {
        Self { incoming: vec![0u8; STAGING], used: 0, outgoing: vec![0u8; 4 * RECV], out_len: 0, to_send, received: 0 }
    }
}

/// Handles one state; returns (bytes to discard, whether to call again).
fn handle<D>(
    status: UnbufferedStatus<'_, '_, D>,
    outgoing: &mut [u8],
    out_len: &mut usize,
    to_send: &mut u64,
    received: &mut u64,
    block: &[u8],
) -> (usize, bool) {
    let mut discard = status.discard;
    let again = match status.state.expect("TLS state") {
        ConnectionState::ReadTraffic(mut rt) => {
            while let Some(rec) = rt.next_record() {
                let rec = rec.expect("record");
                discard += rec.discard;
                black_box(rec.payload);
                *received += rec.payload.len() as u64;
            }
            true
        }
        ConnectionState::EncodeTlsData(mut enc) => {
            let n = enc.encode(&mut outgoing[*out_len..]).expect("encode");
            *out_len += n;
            true
        }
        ConnectionState::TransmitTlsData(tx) => {
            // The caller moves `outgoing` to the peer after this call.
            tx.done();
            true
        }
        ConnectionState::WriteTraffic(mut wt) => {
            let room = outgoing.len() - *out_len;
            if *to_send > 0 && room >= BLOCK + 1024 {
                let n = BLOCK.min(usize::try_from(*to_send).unwrap_or(BLOCK));
                let k = wt.encrypt(&block[..n], &mut outgoing[*out_len..]).expect("encrypt");
                *out_len += k;
                *to_send -= n as u64;
                true
            } else {
                false
            }
        }
        _ => false,
    };
    (discard, again)
}

macro_rules! pump {
    ($conn:expr, $end:expr, $block:expr) => {{
        let end: &mut End = $end;
        for _ in 0..64 {
            let status = $conn.process_tls_records(&mut end.incoming[..end.used]);
            let (discard, again) =
                handle(status, &mut end.outgoing, &mut end.out_len, &mut end.to_send, &mut end.received, $block);
            end.incoming.copy_within(discard..end.used, 0);
            end.used -= discard;
            if !again {
                break;
            }
        }
    }};
}

/// Moves ciphertext from `from.outgoing` into `to.incoming` (the "kernel"
/// copy), as much as the staging buffer holds.
fn transmit(from: &mut End, to: &mut End) -> usize {
    let n = from.out_len.min(to.incoming.len() - to.used).min(RECV);
    to.incoming[to.used..to.used + n].copy_from_slice(&from.outgoing[..n]);
    to.used += n;
    from.outgoing.copy_within(n..from.out_len, 0);
    from.out_len -= n;
    n
}

fn run_unbuffered(total: u64) -> u64 {
    let (scfg, ccfg) = configs();
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut client = UnbufferedClientConnection::new(ccfg, name).expect("client");
    let mut server = UnbufferedServerConnection::new(scfg).expect("server");
    let block = vec![0x5au8; BLOCK];
    let mut c = End::new(total);
    let mut s = End::new(0);
    let mut idle = 0;
    while s.received < total {
        pump!(client, &mut c, &block);
        let a = transmit(&mut c, &mut s);
        pump!(server, &mut s, &block);
        let b = transmit(&mut s, &mut c);
        idle = if a + b == 0 { idle + 1 } else { 0 };
        assert!(idle < 100, "unbuffered pair stuck at {} bytes", s.received);
    }
    s.received
}

fn measure(name: &str, total: u64, f: fn(u64) -> u64) {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let (t0, c0) = (Instant::now(), cpu_time());
        let got = f(total);
        let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
        assert_eq!(got, total);
        runs.push((wall, cpu));
    }
    runs.sort();
    let (wall, cpu) = runs[1];
    let mib = total as f64 / (1024.0 * 1024.0);
    println!(
        "{name:<34} {mib:>5.0} MiB  {:>7.0} MiB/s  {:>5.2} CPU s/GiB (encrypt + decrypt, one thread)  [runs: {}]",
        mib / wall.as_secs_f64(),
        cpu.as_secs_f64() / (mib / 1024.0),
        runs.iter().map(|(w, _)| format!("{:.0}", mib / w.as_secs_f64())).collect::<Vec<_>>().join(", ")
    );
}

fn handshakes_per_second() {
    let (scfg, ccfg) = configs();
    let n = 200;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..n {
        let mut server = Session::server(Arc::clone(&scfg), Limits::default()).expect("server");
        let mut client = Session::client(Arc::clone(&ccfg), "127.0.0.1", Limits::default()).expect("client");
        while client.is_handshaking() || server.is_handshaking() {
            let k = client.poll_output(&mut buf);
            server.feed_ciphertext(&buf[..k]).expect("server feed");
            let k = server.poll_output(&mut buf);
            client.feed_ciphertext(&buf[..k]).expect("client feed");
        }
    }
    let per = t0.elapsed() / n;
    println!(
        "full handshake, P-256, both ends on one thread: {:.2} ms ({:.0}/s)",
        per.as_secs_f64() * 1e3,
        1.0 / per.as_secs_f64()
    );
}

fn main() {
    let mib: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(256);
    let total = mib * 1024 * 1024;
    measure("tls::Session (buffered API)", total, run_buffered);
    measure("rustls unbuffered API", total, run_unbuffered);
    handshakes_per_second();
}
