//! The sans-IO TLS layer (`vmcrelay::tls`) against itself and against
//! `openssl s_client`, with certificates made at test time by the openssl
//! CLI in QEMU's `x509-dir` layout (ECDSA P-256 and RSA-3072).
//!
//! - a server and a client `Session` pumped against each other in memory,
//!   random splits everywhere, 16 MiB each way, byte-exact;
//! - spice-gtk's verification rules: wrong CA, wrong host, SAN vs CN,
//!   cert-subject, EKU, chain completion from the CA file;
//! - hostile input (garbage, truncated and oversized ClientHello, random
//!   records): typed errors, never a panic, memory measured by a counting
//!   allocator and bounded;
//! - reload: new sessions get the new certificate, old ones keep theirs;
//! - configuration errors name the file and what is wrong.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::result_large_err
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use vmcrelay::tls::{
    ClientTlsOptions, ConfigError, Limits, PeerClose, ServerTls, ServerTlsFiles, Session, SessionError,
    SessionErrorKind, VerifyErrorKind, client_config, server_config,
};

// ---------------------------------------------------------------------------
// A per-thread counting allocator: tests run in parallel threads, and each
// measures only its own allocations.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: forwards every call to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak of bytes it kept allocated
/// on this thread above the level at the start.
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - start).max(0) as usize)
}

// ---------------------------------------------------------------------------
// Certificates

struct Pki {
    root: PathBuf,
}

impl Pki {
    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl CLI (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn newkey_args(alg: &str) -> Vec<&'static str> {
    match alg {
        "ec" => vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "rsa" => vec!["-newkey", "rsa:3072"],
        "rsa1024" => vec!["-newkey", "rsa:1024"],
        _ => unreachable!(),
    }
}

/// A self-signed CA in `dir` (ca-cert.pem, ca-key.pem).
fn make_ca(dir: &Path, alg: &str, cn: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(newkey_args(alg));
    args.extend([
        "-sha256",
        "-nodes",
        "-days",
        "3650",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-subj",
        &subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
}

/// A certificate in `dir` (`NAME-cert.pem`, `NAME-key.pem`) signed by the CA
/// in `ca_dir`, with the given subject and extension lines.
fn make_cert(dir: &Path, name: &str, alg: &str, ca_dir: &Path, subj: &str, ext: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    let cert = format!("{name}-cert.pem");
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext).unwrap();
    let mut args = vec!["req"];
    args.extend(newkey_args(alg));
    args.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", subj]);
    openssl(dir, &args);
    let ca_cert = ca_dir.join("ca-cert.pem");
    let ca_key = ca_dir.join("ca-key.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "825",
            "-in",
            &csr,
            "-CA",
            ca_cert.to_str().unwrap(),
            "-CAkey",
            ca_key.to_str().unwrap(),
            "-set_serial",
            &next_serial().to_string(),
            "-extfile",
            &extfile,
            "-out",
            &cert,
        ],
    );
}

fn next_serial() -> u64 {
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

const SERVER_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth\n\
    subjectAltName=IP:127.0.0.1,DNS:localhost\n";
const SUBJECT: &str = "/C=XX/O=vmcrelay test/CN=127.0.0.1";
const CERT_SUBJECT: &str = "C=XX,O=vmcrelay test,CN=127.0.0.1";

/// QEMU layout in `dir`: ca-cert.pem, server-cert.pem, server-key.pem.
fn make_x509_dir(dir: &Path, alg: &str, subj: &str, ext: &str) {
    make_ca(dir, alg, &format!("vmcrelay test CA {alg}"));
    make_cert(dir, "server", alg, dir, subj, ext);
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("vmcrelay-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        make_x509_dir(&root.join("ec"), "ec", SUBJECT, SERVER_EXT);
        make_x509_dir(&root.join("rsa"), "rsa", SUBJECT, SERVER_EXT);
        make_ca(&root.join("other-ca"), "ec", "some other CA");
        let ec = root.join("ec");
        // Variants signed by the ec CA.
        make_cert(
            &ec,
            "cn-only",
            "ec",
            &ec,
            "/CN=127.0.0.1",
            "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        make_cert(
            &ec,
            "dns-only",
            "ec",
            &ec,
            "/CN=127.0.0.1",
            "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n",
        );
        make_cert(&ec, "client-eku", "ec", &ec, SUBJECT, "extendedKeyUsage=clientAuth\nsubjectAltName=IP:127.0.0.1\n");
        make_cert(&ec, "reloaded", "ec", &ec, "/C=XX/O=reloaded/CN=127.0.0.1", SERVER_EXT);
        // An intermediate: root (ec CA) -> inter -> leaf; the CA file holds
        // root + intermediate, the cert file only the leaf.
        let inter = root.join("inter");
        make_cert(
            &inter,
            "inter",
            "ec",
            &ec,
            "/CN=vmcrelay intermediate",
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
        );
        std::fs::copy(inter.join("inter-cert.pem"), inter.join("ca-cert.pem")).unwrap();
        std::fs::copy(inter.join("inter-key.pem"), inter.join("ca-key.pem")).unwrap();
        make_cert(&inter, "server", "ec", &inter, SUBJECT, SERVER_EXT);
        let mut cas = std::fs::read(ec.join("ca-cert.pem")).unwrap();
        cas.extend(std::fs::read(inter.join("inter-cert.pem")).unwrap());
        std::fs::write(inter.join("ca-cert.pem"), cas).unwrap();
        // Key formats.
        openssl(&ec, &["ec", "-in", "server-key.pem", "-out", "sec1-key.pem"]);
        openssl(&root.join("rsa"), &["rsa", "-traditional", "-in", "server-key.pem", "-out", "pkcs1-key.pem"]);
        openssl(
            &ec,
            &["pkcs8", "-topk8", "-in", "server-key.pem", "-passout", "pass:hunter2", "-out", "encrypted-key.pem"],
        );
        make_cert(&ec, "rsa1024", "rsa1024", &ec, SUBJECT, SERVER_EXT);
        Pki { root }
    })
}

fn files(dir: &Path, name: &str) -> ServerTlsFiles {
    ServerTlsFiles {
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
        ca: Some(dir.join("ca-cert.pem")),
    }
}

fn server_session(files: &ServerTlsFiles) -> Session {
    let cfg = Arc::new(server_config(files).unwrap());
    Session::server(cfg, Limits::default()).unwrap()
}

fn client_session(ca: &Path, subject: Option<&str>, host: &str) -> Session {
    let opts = ClientTlsOptions { ca_file: ca.to_owned(), cert_subject: subject.map(str::to_owned), client_cert: None };
    Session::client(client_config(&opts).unwrap(), host, Limits::default()).unwrap()
}

// ---------------------------------------------------------------------------
// The in-memory pump

/// xorshift64*: deterministic, cheap, good enough for splits and payloads.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// A split size: mostly small or mid-size, sometimes large.
    fn split(&mut self, max: usize) -> usize {
        let cap = match self.below(4) {
            0 => 64,
            1 => 4096,
            2 => 20_000,
            _ => max,
        };
        1 + self.below(cap.min(max))
    }
}

/// The byte at position `i` of the stream with `seed`.
fn stream_byte(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

/// One direction's bookkeeping.
struct Dir {
    seed: u64,
    total: u64,
    sent: u64,
    received: u64,
    wire: Vec<u8>,
}

impl Dir {
    fn new(seed: u64, total: u64) -> Self {
        Self { seed, total, sent: 0, received: 0, wire: Vec::new() }
    }
}

/// One step of `from` → `to`: write plaintext, poll records onto the wire,
/// feed the wire in random splits, take plaintext and check it. Returns
/// whether anything moved.
fn step(from: &mut Session, to: &mut Session, d: &mut Dir, rng: &mut Rng) -> Result<bool, SessionError> {
    let mut moved = false;
    let mut chunk = vec![0u8; 70_000];
    if d.sent < d.total {
        let n = rng.split(65_536).min((d.total - d.sent) as usize);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = stream_byte(d.seed, d.sent + k as u64);
        }
        let accepted = from.write_plaintext(&chunk[..n]);
        d.sent += accepted as u64;
        moved |= accepted > 0;
    }
    loop {
        let cap = rng.split(chunk.len());
        let k = from.poll_output(&mut chunk[..cap]);
        if k == 0 {
            break;
        }
        d.wire.extend_from_slice(&chunk[..k]);
        moved = true;
    }
    let mut off = 0;
    while off < d.wire.len() {
        let n = rng.split(d.wire.len() - off);
        let used = to.feed_ciphertext(&d.wire[off..off + n])?;
        off += used;
        moved |= used > 0;
        let mut took_any = false;
        loop {
            let cap = rng.split(chunk.len());
            let got = to.take_plaintext(&mut chunk[..cap]);
            if got == 0 {
                break;
            }
            for (k, &b) in chunk[..got].iter().enumerate() {
                let want = stream_byte(d.seed, d.received + k as u64);
                assert_eq!(b, want, "byte {} differs", d.received + k as u64);
            }
            d.received += got as u64;
            took_any = true;
            moved = true;
        }
        if used < n && !took_any {
            break;
        }
    }
    d.wire.drain(..off);
    Ok(moved)
}

/// Handshake only: returns the first error of either side.
fn handshake(client: &mut Session, server: &mut Session) -> Result<(), (Option<SessionError>, Option<SessionError>)> {
    let mut rng = Rng(7);
    let mut c2s = Dir::new(1, 0);
    let mut s2c = Dir::new(2, 0);
    for _ in 0..100 {
        let a = step(client, server, &mut c2s, &mut rng);
        let b = step(server, client, &mut s2c, &mut rng);
        if a.is_err() || b.is_err() {
            // Deliver the alert the failing side queued, like a worker would.
            let _ = step(server, client, &mut s2c, &mut rng);
            let _ = step(client, server, &mut c2s, &mut rng);
            return Err((client.error().cloned().or(b.err()), server.error().cloned().or(a.err())));
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish in 100 rounds");
}

/// Both directions at once, `total` bytes each way, random splits.
fn transfer(client: &mut Session, server: &mut Session, total: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut c2s = Dir::new(seed ^ 0xc2, total);
    let mut s2c = Dir::new(seed ^ 0x5c, total);
    let mut idle = 0;
    while c2s.received < total || s2c.received < total {
        let a = step(client, server, &mut c2s, &mut rng).unwrap();
        let b = step(server, client, &mut s2c, &mut rng).unwrap();
        idle = if a || b { 0 } else { idle + 1 };
        assert!(idle < 10, "no progress: c2s {} / s2c {}", c2s.received, s2c.received);
    }
    assert_eq!(c2s.sent, total);
    assert_eq!(s2c.sent, total);
}

const MIB: u64 = 1024 * 1024;

#[test]
fn ecdsa_16_mib_each_way_byte_exact() {
    let dir = pki().dir("ec");
    let mut server = server_session(&ServerTlsFiles::from_x509_dir(&dir));
    let mut client = client_session(&dir.join("ca-cert.pem"), None, "127.0.0.1");
    transfer(&mut client, &mut server, 16 * MIB, 0x1234);
    assert!(!client.is_handshaking() && !server.is_handshaking());
    let summary = server.summary().unwrap();
    assert!(summary.contains("TLSv1_3"), "{summary}");
}

#[test]
fn rsa3072_16_mib_each_way_byte_exact() {
    let dir = pki().dir("rsa");
    let mut server = server_session(&ServerTlsFiles::from_x509_dir(&dir));
    let mut client = client_session(&dir.join("ca-cert.pem"), None, "localhost");
    transfer(&mut client, &mut server, 16 * MIB, 0x4321);
}

#[test]
fn tls12_transfer_with_the_spice_verifier() {
    let dir = pki().dir("ec");
    let mut server = server_session(&ServerTlsFiles::from_x509_dir(&dir));
    let mut roots = rustls::RootCertStore::empty();
    for c in vmcrelay::tls::config::load_certs(&dir.join("ca-cert.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let verifier =
        vmcrelay::tls::SpiceServerVerifier::new(Arc::new(roots), "ca-cert.pem".into(), None, vmcrelay::tls::provider());
    let cfg = rustls::ClientConfig::builder_with_provider(vmcrelay::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let mut client = Session::client(Arc::new(cfg), "127.0.0.1", Limits::default()).unwrap();
    transfer(&mut client, &mut server, 4 * MIB, 99);
    assert!(server.summary().unwrap().contains("TLSv1_2"));
}

#[test]
fn tiny_splits_and_tiny_output_limit() {
    let dir = pki().dir("ec");
    let cfg = Arc::new(server_config(&ServerTlsFiles::from_x509_dir(&dir)).unwrap());
    let limits = Limits { tls_output_bytes: 100 };
    let mut server = Session::server(cfg, limits).unwrap();
    let opts = ClientTlsOptions::with_ca_file(dir.join("ca-cert.pem"));
    let mut client = Session::client(client_config(&opts).unwrap(), "127.0.0.1", limits).unwrap();
    // Splits of 1..=7 bytes on the wire.
    let mut c2s = Dir::new(5, 256 * 1024);
    let mut s2c = Dir::new(6, 256 * 1024);
    let mut rng = Rng(3);
    let mut rounds = 0;
    while c2s.received < c2s.total || s2c.received < s2c.total {
        rounds += 1;
        assert!(rounds < 2_000_000);
        tiny_step(&mut client, &mut server, &mut c2s, &mut rng);
        tiny_step(&mut server, &mut client, &mut s2c, &mut rng);
    }
}

fn tiny_step(from: &mut Session, to: &mut Session, d: &mut Dir, rng: &mut Rng) {
    let mut chunk = [0u8; 7];
    if d.sent < d.total {
        let n = (1 + rng.below(7)).min((d.total - d.sent) as usize);
        for (k, b) in chunk[..n].iter_mut().enumerate() {
            *b = stream_byte(d.seed, d.sent + k as u64);
        }
        let accepted = from.write_plaintext(&chunk[..n]);
        assert!(accepted <= n);
        d.sent += accepted as u64;
    }
    loop {
        let k = from.poll_output(&mut chunk[..1 + rng.below(7)]);
        if k == 0 {
            break;
        }
        d.wire.extend_from_slice(&chunk[..k]);
    }
    let mut off = 0;
    while off < d.wire.len() {
        let n = (1 + rng.below(7)).min(d.wire.len() - off);
        let used = to.feed_ciphertext(&d.wire[off..off + n]).unwrap();
        off += used;
        let mut took = 0;
        loop {
            let got = to.take_plaintext(&mut chunk[..1 + rng.below(7)]);
            if got == 0 {
                break;
            }
            for (k, &b) in chunk[..got].iter().enumerate() {
                assert_eq!(b, stream_byte(d.seed, d.received + k as u64));
            }
            d.received += got as u64;
            took += got;
        }
        if used < n && took == 0 {
            break;
        }
    }
    d.wire.drain(..off);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, ..ProptestConfig::default() })]

    /// 16 MiB each way under random splits chosen by the seed.
    #[test]
    fn random_splits_16_mib_each_way(seed in any::<u64>()) {
        let dir = pki().dir("ec");
        let mut server = server_session(&ServerTlsFiles::from_x509_dir(&dir));
        let mut client = client_session(&dir.join("ca-cert.pem"), None, "127.0.0.1");
        transfer(&mut client, &mut server, 16 * MIB, seed);
    }
}

#[test]
fn eof_after_handshake_is_a_normal_close_and_close_notify_is_reported() {
    let dir = pki().dir("ec");
    let mut server = server_session(&ServerTlsFiles::from_x509_dir(&dir));
    let mut client = client_session(&dir.join("ca-cert.pem"), None, "127.0.0.1");
    transfer(&mut client, &mut server, 100_000, 1);
    // Leave plaintext unread in the server, then EOF: it is still delivered.
    assert_eq!(client.write_plaintext(b"last words"), 10);
    let mut buf = vec![0u8; 4096];
    let n = client.poll_output(&mut buf);
    assert_eq!(server.feed_ciphertext(&buf[..n]).unwrap(), n);
    server.feed_eof().unwrap();
    assert!(!server.wants_close(), "plaintext still waiting");
    let mut out = [0u8; 64];
    assert_eq!(server.take_plaintext(&mut out), 10);
    assert_eq!(&out[..10], b"last words");
    assert_eq!(server.take_plaintext(&mut out), 0);
    assert_eq!(server.peer_closed(), Some(PeerClose::Eof));
    assert!(server.wants_close());
    // close_notify the other way.
    server.close();
    let n = server.poll_output(&mut buf);
    assert!(n > 0);
    assert_eq!(client.feed_ciphertext(&buf[..n]).unwrap(), n);
    assert_eq!(client.take_plaintext(&mut out), 0);
    assert_eq!(client.peer_closed(), Some(PeerClose::CloseNotify));
    // Input after close_notify is consumed and ignored.
    assert_eq!(client.feed_ciphertext(&[0x17, 3, 3, 0, 1, 0]).unwrap(), 6);
}

// ---------------------------------------------------------------------------
// Verification (spice-gtk's rules)

fn expect_verify_failure(
    server_files: &ServerTlsFiles,
    ca: &Path,
    subject: Option<&str>,
    host: &str,
) -> (VerifyErrorKind, String, SessionError) {
    let mut server = server_session(server_files);
    let mut client = client_session(ca, subject, host);
    let (c, s) = handshake(&mut client, &mut server).expect_err("handshake must fail");
    let c = c.expect("client error");
    assert_eq!(c.kind(), SessionErrorKind::Verification, "{c}");
    let SessionError::Verification(v) = &c else { unreachable!() };
    let s = s.expect("the server sees the client's alert");
    assert_eq!(s.kind(), SessionErrorKind::PeerAlert, "{s}");
    (v.kind(), v.to_string(), s)
}

fn expect_ok(server_files: &ServerTlsFiles, ca: &Path, subject: Option<&str>, host: &str) {
    let mut server = server_session(server_files);
    let mut client = client_session(ca, subject, host);
    if let Err(e) = handshake(&mut client, &mut server) {
        panic!("handshake failed: {e:?}");
    }
}

#[test]
fn wrong_ca_is_a_verification_error() {
    let ec = pki().dir("ec");
    let (kind, msg, server_err) = expect_verify_failure(
        &ServerTlsFiles::from_x509_dir(&ec),
        &pki().dir("other-ca").join("ca-cert.pem"),
        None,
        "127.0.0.1",
    );
    assert_eq!(kind, VerifyErrorKind::UnknownIssuer);
    assert!(msg.contains("--ca-file") && msg.contains("C=XX,O=vmcrelay test,CN=127.0.0.1"), "{msg}");
    assert!(msg.contains("other-ca"), "names the CA file: {msg}");
    eprintln!("client: {msg}\nserver: {server_err}");
    // RSA server, EC CA file: also refused.
    let (kind, _, _) = expect_verify_failure(
        &ServerTlsFiles::from_x509_dir(pki().dir("rsa")),
        &ec.join("ca-cert.pem"),
        None,
        "127.0.0.1",
    );
    assert_eq!(kind, VerifyErrorKind::UnknownIssuer);
}

#[test]
fn host_must_be_in_the_san() {
    let ec = pki().dir("ec");
    let files = ServerTlsFiles::from_x509_dir(&ec);
    let ca = ec.join("ca-cert.pem");
    expect_ok(&files, &ca, None, "127.0.0.1");
    expect_ok(&files, &ca, None, "localhost");
    expect_ok(&files, &ca, None, "LOCALHOST");
    let (kind, msg, _) = expect_verify_failure(&files, &ca, None, "127.0.0.2");
    assert_eq!(kind, VerifyErrorKind::HostMismatch);
    assert!(msg.contains("127.0.0.2") && msg.contains("DNS:localhost") && msg.contains("IP:127.0.0.1"), "{msg}");
    assert!(msg.contains("--cert-subject"), "{msg}");
    eprintln!("{msg}");
    let (kind, _, _) = expect_verify_failure(&files, &ca, None, "other.example");
    assert_eq!(kind, VerifyErrorKind::HostMismatch);
}

#[test]
fn cn_is_used_only_without_a_san() {
    let ec = pki().dir("ec");
    let ca = ec.join("ca-cert.pem");
    let cn_only = files(&ec, "cn-only");
    expect_ok(&cn_only, &ca, None, "127.0.0.1");
    let (kind, msg, _) = expect_verify_failure(&cn_only, &ca, None, "localhost");
    assert_eq!(kind, VerifyErrorKind::HostMismatch);
    assert!(msg.contains("no DNS/IP subjectAltName"), "{msg}");
    // SAN DNS:localhost only, CN=127.0.0.1: the SAN kills the CN fallback.
    let dns_only = files(&ec, "dns-only");
    expect_ok(&dns_only, &ca, None, "localhost");
    let (kind, _, _) = expect_verify_failure(&dns_only, &ca, None, "127.0.0.1");
    assert_eq!(kind, VerifyErrorKind::HostMismatch);
}

#[test]
fn cert_subject_replaces_the_host_check() {
    let ec = pki().dir("ec");
    let files = ServerTlsFiles::from_x509_dir(&ec);
    let ca = ec.join("ca-cert.pem");
    expect_ok(&files, &ca, Some(CERT_SUBJECT), "127.0.0.1");
    // The host is not checked when a subject is given.
    expect_ok(&files, &ca, Some(CERT_SUBJECT), "127.0.0.2");
    expect_ok(&files, &ca, Some("C=XX, O=vmcrelay test, CN=127.0.0.1"), "127.0.0.1");
    expect_ok(&files, &ca, Some("C=xx,O=VMCRELAY  test,CN=127.0.0.1"), "127.0.0.1");
    for wrong in ["CN=127.0.0.1,O=vmcrelay test,C=XX", "C=XX,O=vmcrelay test", "C=XX,O=vmcrelay test,CN=127.0.0.2"] {
        let (kind, msg, _) = expect_verify_failure(&files, &ca, Some(wrong), "127.0.0.1");
        assert_eq!(kind, VerifyErrorKind::SubjectMismatch, "{wrong}");
        assert!(msg.contains(CERT_SUBJECT) && msg.contains(wrong), "{msg}");
    }
    // A right subject does not excuse a wrong CA.
    let (kind, _, _) =
        expect_verify_failure(&files, &pki().dir("other-ca").join("ca-cert.pem"), Some(CERT_SUBJECT), "127.0.0.1");
    assert_eq!(kind, VerifyErrorKind::UnknownIssuer);
}

#[test]
fn eku_without_server_auth_is_refused() {
    let ec = pki().dir("ec");
    let (kind, msg, _) = expect_verify_failure(&files(&ec, "client-eku"), &ec.join("ca-cert.pem"), None, "127.0.0.1");
    assert_eq!(kind, VerifyErrorKind::WrongPurpose, "{msg}");
}

#[test]
fn chain_is_completed_from_the_ca_file() {
    let inter = pki().dir("inter");
    let root_ca = pki().dir("ec").join("ca-cert.pem");
    // server-cert.pem holds the leaf only; ca-cert.pem root + intermediate.
    let x509 = ServerTlsFiles::from_x509_dir(&inter);
    expect_ok(&x509, &root_ca, None, "127.0.0.1");
    // Without the CA file the leaf goes alone and the client cannot build
    // the chain: this is why the chain is completed.
    let leaf_only = ServerTlsFiles { ca: None, ..x509 };
    let (kind, _, _) = expect_verify_failure(&leaf_only, &root_ca, None, "127.0.0.1");
    assert_eq!(kind, VerifyErrorKind::UnknownIssuer);
}

// ---------------------------------------------------------------------------
// Hostile input

/// The bound asserted on what one hostile server session keeps allocated:
/// the session itself, rustls' 64 KiB handshake joining buffer plus one
/// record, and the alert. Measured figures are printed.
const HOSTILE_BOUND_BYTES: usize = 192 * 1024;

fn fresh_server() -> Session {
    let cfg = ec_server_config();
    Session::server(cfg, Limits::default()).unwrap()
}

fn ec_server_config() -> Arc<rustls::ServerConfig> {
    static CFG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CFG.get_or_init(|| Arc::new(server_config(&ServerTlsFiles::from_x509_dir(pki().dir("ec"))).unwrap())).clone()
}

fn client_hello() -> Vec<u8> {
    let ec = pki().dir("ec");
    let mut client = client_session(&ec.join("ca-cert.pem"), None, "127.0.0.1");
    let mut buf = vec![0u8; 16 * 1024];
    let n = client.poll_output(&mut buf);
    assert!(n > 100 && buf[0] == 0x16, "a ClientHello record");
    buf.truncate(n);
    buf
}

/// Feeds `input` in `split`-sized pieces (as a worker would, draining
/// plaintext between feeds); returns the first error.
fn feed_all(s: &mut Session, input: &[u8], split: usize) -> Result<(), SessionError> {
    let mut sink = vec![0u8; 4096];
    let mut out = vec![0u8; 4096];
    for piece in input.chunks(split.max(1)) {
        let mut off = 0;
        while off < piece.len() {
            off += s.feed_ciphertext(&piece[off..])?;
            while s.take_plaintext(&mut sink) > 0 {}
            while s.poll_output(&mut out) > 0 {}
        }
    }
    Ok(())
}

#[test]
fn garbage_is_a_protocol_error() {
    for input in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"REDQ\x02\x00\x00\x00\x02\x00\x00\x00".to_vec(),
        vec![0u8; 64],
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut s = fresh_server();
        let (r, peak) = peak_bytes(|| feed_all(&mut s, &input, 3));
        let e = r.expect_err("garbage must fail");
        assert_eq!(e.kind(), SessionErrorKind::Protocol, "{e}");
        assert!(s.wants_close());
        // rustls may have queued an alert: it can be flushed; errors repeat.
        let mut out = [0u8; 64];
        let _ = s.poll_output(&mut out);
        assert!(s.feed_ciphertext(b"more").is_err());
        assert!(peak < HOSTILE_BOUND_BYTES, "{peak} bytes");
        eprintln!("garbage {:?}: {e}; peak {peak} B", &input[..4]);
    }
}

#[test]
fn truncated_client_hello_then_eof_is_an_error() {
    let hello = client_hello();
    for cut in [1, 5, hello.len() / 2, hello.len() - 1] {
        let mut s = fresh_server();
        feed_all(&mut s, &hello[..cut], 7).unwrap();
        assert!(s.is_handshaking());
        assert!(!s.wants_close());
        let e = s.feed_eof().expect_err("EOF in the handshake");
        assert_eq!(e.kind(), SessionErrorKind::HandshakeEof, "{e}");
        assert!(s.wants_close());
    }
    // The whole ClientHello is fine and gets a ServerHello.
    let mut s = fresh_server();
    assert_eq!(s.feed_ciphertext(&hello).unwrap(), hello.len());
    assert!(s.wants_output() && s.is_handshaking() && !s.wants_close());
}

#[test]
fn oversized_client_hello_is_an_error_with_bounded_memory() {
    // A record announcing 65,535 bytes (over rustls' 16 KiB + 2 KiB limit).
    let mut s = fresh_server();
    let mut big = vec![0x16, 0x03, 0x01, 0xff, 0xff];
    big.resize(5 + 65_535, 0x41);
    let (r, peak) = peak_bytes(|| feed_all(&mut s, &big, 4096));
    assert_eq!(r.unwrap_err().kind(), SessionErrorKind::Protocol);
    assert!(peak < HOSTILE_BOUND_BYTES, "{peak} B");
    // A ClientHello message announcing 16 MiB, sent as valid-sized records.
    let mut s = fresh_server();
    let mut stream = Vec::new();
    let mut first = vec![0x01, 0xff, 0xff, 0xff];
    first.resize(16_000, 0x42);
    push_record(&mut stream, &first);
    for _ in 0..40 {
        push_record(&mut stream, &[0x42; 16_000]);
    }
    let (r, peak) = peak_bytes(|| feed_all(&mut s, &stream, 5000));
    let e = r.unwrap_err();
    assert_eq!(e.kind(), SessionErrorKind::Protocol, "{e}");
    assert!(peak < HOSTILE_BOUND_BYTES, "{peak} B");
    // A ClientHello of 60,000 bytes (under the 64 KiB cap), garbage inside:
    // joined, then refused; the joining buffer is the largest allocation.
    let mut s = fresh_server();
    let mut stream = Vec::new();
    let mut msg = vec![0x01, 0x00, 0xea, 0x60];
    msg.resize(4 + 60_000, 0x43);
    for rec in msg.chunks(16_000) {
        push_record(&mut stream, rec);
    }
    let (r, peak) = peak_bytes(|| feed_all(&mut s, &stream, 1500));
    assert_eq!(r.unwrap_err().kind(), SessionErrorKind::Protocol);
    assert!(peak < HOSTILE_BOUND_BYTES, "{peak} B");
    eprintln!("60 KB garbage ClientHello: peak {peak} B");
}

fn push_record(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&[0x16, 0x03, 0x01]);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Bytes a session keeps allocated: what dropping it frees.
fn retained_bytes(s: Session) -> usize {
    let before = LIVE.with(Cell::get);
    drop(s);
    (before - LIVE.with(Cell::get)).max(0) as usize
}

#[test]
fn memory_of_a_session_in_the_data_phase() {
    // The figures for the worker's per-connection budget (printed).
    let ec = pki().dir("ec");
    let mut client = client_session(&ec.join("ca-cert.pem"), None, "127.0.0.1");
    let mut server = Session::server(ec_server_config(), Limits::default()).unwrap();
    transfer(&mut client, &mut server, MIB, 5);
    let idle = retained_bytes(server);

    // Worst case: the peer keeps sending and nobody takes plaintext.
    let mut client = client_session(&ec.join("ca-cert.pem"), None, "127.0.0.1");
    let mut server = Session::server(ec_server_config(), Limits::default()).unwrap();
    transfer(&mut client, &mut server, 1000, 6);
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let block = vec![0x5a; 60_000];
    let mut sent = 0;
    while sent < 2 * MIB as usize {
        sent += client.write_plaintext(&block);
        loop {
            let k = client.poll_output(&mut buf);
            if k == 0 {
                break;
            }
            wire.extend_from_slice(&buf[..k]);
        }
    }
    let mut off = 0;
    loop {
        let used = server.feed_ciphertext(&wire[off..]).unwrap();
        if used == 0 {
            break;
        }
        off += used;
    }
    let waiting = server.plaintext_len();
    let full = retained_bytes(server);
    eprintln!(
        "server session retained: {idle} B idle after 1 MiB each way; {full} B with {waiting} B \
         of plaintext untaken (ciphertext consumed before backpressure: {off} B)"
    );
    assert!(waiting > 16 * 1024 && waiting < 64 * 1024, "{waiting}");
    assert!(full < HOSTILE_BOUND_BYTES, "{full}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any bytes after (a prefix of) a real ClientHello, in any split: a
    /// result or an error, never a panic, memory bounded.
    #[test]
    fn hostile_records_any_split(
        prefix_frac in 0usize..=100,
        tail in proptest::collection::vec(any::<u8>(), 0..3000),
        records in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..600)), 0..8),
        split in 1usize..2000,
    ) {
        let hello = hello_cached();
        let mut input = hello[..hello.len() * prefix_frac / 100].to_vec();
        for (ty, body) in &records {
            input.extend_from_slice(&[0x14 + (ty % 6), 0x03, 0x03]);
            input.extend_from_slice(&(body.len() as u16).to_be_bytes());
            input.extend_from_slice(body);
        }
        input.extend_from_slice(&tail);
        let mut s = fresh_server();
        let (_, peak) = peak_bytes(|| {
            let _ = feed_all(&mut s, &input, split);
            let _ = s.feed_eof();
        });
        prop_assert!(peak < HOSTILE_BOUND_BYTES, "{} B", peak);
    }
}

fn hello_cached() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(client_hello)
}

// ---------------------------------------------------------------------------
// Reload

#[test]
fn reload_swaps_the_config_for_new_sessions_only() {
    let ec = pki().dir("ec");
    let dir = pki().root.join("reload");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ec.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    std::fs::copy(ec.join("server-cert.pem"), dir.join("server-cert.pem")).unwrap();
    std::fs::copy(ec.join("server-key.pem"), dir.join("server-key.pem")).unwrap();
    let tls = ServerTls::load(ServerTlsFiles::from_x509_dir(&dir), Limits::default()).unwrap();
    assert_eq!(tls.generation(), 0);
    let mut before = tls.session().unwrap();

    std::fs::copy(ec.join("reloaded-cert.pem"), dir.join("server-cert.pem")).unwrap();
    std::fs::copy(ec.join("reloaded-key.pem"), dir.join("server-key.pem")).unwrap();
    assert_eq!(tls.reload().unwrap(), 1);
    let mut after = tls.session().unwrap();

    let ca = dir.join("ca-cert.pem");
    let old_subject = CERT_SUBJECT;
    let new_subject = "C=XX,O=reloaded,CN=127.0.0.1";
    // The session made before the reload still presents the old
    // certificate (its handshake runs only now).
    let mut c = client_session(&ca, Some(old_subject), "127.0.0.1");
    handshake(&mut c, &mut before).unwrap();
    let mut c = client_session(&ca, Some(new_subject), "127.0.0.1");
    handshake(&mut c, &mut after).unwrap();
    let mut c = client_session(&ca, Some(old_subject), "127.0.0.1");
    let mut s = tls.session().unwrap();
    assert!(handshake(&mut c, &mut s).is_err());

    // A broken reload keeps the current configuration.
    std::fs::write(dir.join("server-key.pem"), "not a key\n").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("server-key.pem"), "{err}");
    assert_eq!(tls.generation(), 1);
    let mut c = client_session(&ca, Some(new_subject), "127.0.0.1");
    let mut s = tls.session().unwrap();
    handshake(&mut c, &mut s).unwrap();
}

// ---------------------------------------------------------------------------
// Configuration errors

fn config_err(files: &ServerTlsFiles) -> String {
    let e: ConfigError = server_config(files).unwrap_err();
    e.to_string()
}

#[test]
fn config_errors_name_the_file_and_the_problem() {
    let ec = pki().dir("ec");
    let rsa = pki().dir("rsa");
    let good = ServerTlsFiles::from_x509_dir(&ec);

    let msg = config_err(&ServerTlsFiles::from_x509_dir(pki().root.join("nowhere")));
    assert!(msg.contains("nowhere/server-cert.pem") && msg.contains("No such file"), "{msg}");

    let msg = config_err(&ServerTlsFiles { key: ec.join("server-cert.pem"), ..good.clone() });
    assert!(
        msg.ends_with(
            "server-cert.pem: no private key found (PKCS#8, PKCS#1 or SEC1 PEM expected) \
             (this looks like a certificate file)"
        ),
        "{msg}"
    );

    let msg = config_err(&ServerTlsFiles { cert: ec.join("server-key.pem"), ..good.clone() });
    assert!(msg.contains("server-key.pem: no certificate found"), "{msg}");

    let msg = config_err(&ServerTlsFiles { key: ec.join("encrypted-key.pem"), ..good.clone() });
    assert!(msg.contains("encrypted-key.pem: the private key is encrypted"), "{msg}");

    let msg = config_err(&ServerTlsFiles { key: rsa.join("server-key.pem"), ..good.clone() });
    assert!(msg.contains("does not belong to the certificate"), "{msg}");

    let msg = config_err(&files(&ec, "rsa1024"));
    assert!(msg.contains("rsa1024-key.pem: private key not usable"), "{msg}");

    let garbled = pki().root.join("garbled.pem");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
    let msg = config_err(&ServerTlsFiles { cert: garbled, ..good.clone() });
    assert!(msg.contains("garbled.pem: PEM section not terminated"), "{msg}");

    let msg = client_config(&ClientTlsOptions {
        ca_file: ec.join("ca-cert.pem"),
        cert_subject: Some("C=XX,FOO=bar".into()),
        client_cert: None,
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("unknown attribute `FOO`"), "{msg}");

    let msg = client_config(&ClientTlsOptions::with_ca_file(ec.join("server-key.pem"))).unwrap_err().to_string();
    assert!(msg.contains("server-key.pem: no certificate found"), "{msg}");
}

#[test]
fn pkcs1_and_sec1_keys_load() {
    let ec = pki().dir("ec");
    let rsa = pki().dir("rsa");
    server_config(&ServerTlsFiles { key: ec.join("sec1-key.pem"), ..ServerTlsFiles::from_x509_dir(&ec) }).unwrap();
    server_config(&ServerTlsFiles { key: rsa.join("pkcs1-key.pem"), ..ServerTlsFiles::from_x509_dir(&rsa) }).unwrap();
    assert!(std::fs::read_to_string(rsa.join("pkcs1-key.pem")).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    assert!(std::fs::read_to_string(ec.join("sec1-key.pem")).unwrap().contains("BEGIN EC PRIVATE KEY"));
}

#[test]
fn client_host_must_be_a_name_or_address() {
    let ec = pki().dir("ec");
    let cfg = client_config(&ClientTlsOptions::with_ca_file(ec.join("ca-cert.pem"))).unwrap();
    let e = Session::client(cfg, "not a host!", Limits::default()).unwrap_err();
    assert_eq!(e.kind(), SessionErrorKind::Setup);
}

// ---------------------------------------------------------------------------
// A real peer: openssl s_client against a blocking echo server that drives
// the Session over a std TcpStream (loopback only).

fn echo_server_once(
    listener: TcpListener,
    files: ServerTlsFiles,
    echo_bytes: usize,
) -> std::thread::JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut s = server_session(&files);
        let mut rx = vec![0u8; 65_536];
        let mut plain = vec![0u8; 65_536];
        let mut tx = vec![0u8; 70_000];
        let mut pending: Vec<u8> = Vec::new();
        let mut echoed = 0;
        loop {
            // Send everything TLS wants to send, and echo what we can.
            loop {
                if !pending.is_empty() {
                    let n = s.write_plaintext(&pending);
                    pending.drain(..n);
                    echoed += n;
                }
                let k = s.poll_output(&mut tx);
                if k == 0 {
                    break;
                }
                sock.write_all(&tx[..k]).map_err(|e| e.to_string())?;
            }
            if echoed >= echo_bytes && pending.is_empty() {
                s.close();
                let k = s.poll_output(&mut tx);
                sock.write_all(&tx[..k]).map_err(|e| e.to_string())?;
                return Ok(echoed);
            }
            if s.wants_close() {
                return Err(format!("closed early: {:?} {:?}", s.error(), s.peer_closed()));
            }
            let n = sock.read(&mut rx).map_err(|e| e.to_string())?;
            if n == 0 {
                s.feed_eof().map_err(|e| e.to_string())?;
            }
            let mut off = 0;
            while off < n {
                off += s.feed_ciphertext(&rx[off..n]).map_err(|e| e.to_string())?;
                loop {
                    let got = s.take_plaintext(&mut plain);
                    if got == 0 {
                        break;
                    }
                    pending.extend_from_slice(&plain[..got]);
                }
            }
        }
    })
}

#[test]
fn openssl_s_client_against_a_session_server() {
    for (alg, extra) in [("ec", None), ("rsa", Some("-tls1_2")), ("ec", Some("-tls1_3"))] {
        let dir = pki().dir(alg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let payload = format!("hello vmcrelay over {alg} {extra:?}\n");
        let server = echo_server_once(listener, ServerTlsFiles::from_x509_dir(&dir), payload.len());
        let ca = dir.join("ca-cert.pem");
        let connect = format!("127.0.0.1:{port}");
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
            "-verify_ip",
            "127.0.0.1",
            "-ign_eof",
        ];
        args.extend(extra);
        let mut child = Command::new("openssl")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(payload.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("s_client did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(server.join().unwrap(), Ok(payload.len()));
        assert!(stdout.contains(payload.trim_end()), "echo missing: {stdout}");
        assert!(stdout.contains("Verify return code: 0 (ok)"), "{stdout}");
        let want = if extra == Some("-tls1_2") { "TLSv1.2" } else { "TLSv1.3" };
        assert!(stdout.contains(want), "{stdout}");
    }
}
