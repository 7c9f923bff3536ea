//! TLS against real peers: spice-gtk over `serve --tls-listen`, vmcrelay's
//! own `connect` over TLS to `serve`, and `connect` to QEMU's `tls-port`.
//! Certificates are made at test time with the openssl CLI, in QEMU's
//! x509-dir layout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SUBJECT: &str = "C=XX,O=test,CN=127.0.0.1";

fn tls_relay(plain: Option<u16>, tls: u16, x509: &Path, extra: &[&str]) -> Relay {
    let mut a: Vec<String> = Vec::new();
    if let Some(p) = plain {
        a.extend(["--listen".into(), format!("127.0.0.1:{p}")]);
    }
    a.extend([
        "--tls-listen".into(),
        format!("127.0.0.1:{tls}"),
        "--x509-dir".into(),
        x509.display().to_string(),
        "--workers".into(),
        "2".into(),
    ]);
    a.extend(extra.iter().map(|s| s.to_string()));
    Relay::start(&a)
}

fn ca(x509: &Path) -> String {
    x509.join("ca-cert.pem").display().to_string()
}

/// Regression (CI, 2026-12-03): an echo whose last bytes come back as two
/// DATA messages (65,536 + 4,464 bytes) must arrive whole. When TLS records
/// were cut every 16 KiB regardless of messages, the short last message sat
/// in the record that ended the first one; spice-gtk reads on only while
/// the socket is readable, so it never saw it and the transfer stalled.
#[test]
fn gtk_tls_message_sharing_a_record_is_not_stranded() {
    if !peers_available(&["gtk", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlstail");
    let x509 = make_x509_dir(&dir.path("x509"));
    let app = EchoApp::start(dir.path("app.sock"));
    let tls = free_port();
    let ch = format!("port:com.example.echo=unix:{}", app.path.display());
    let _relay = tls_relay(None, tls, &x509, &["--disable-ticketing", "--channel", &ch]);
    let uri = format!("spice://127.0.0.1?tls-port={tls}");
    let ca = ca(&x509);
    for bytes in ["70000", "200000"] {
        let r = gtk(
            &[
                "port-echo",
                "--uri",
                &uri,
                "--ca-file",
                &ca,
                "--port-name",
                "com.example.echo",
                "--bytes",
                bytes,
                "--chunk",
                bytes,
                "--inflight",
                "1",
                "--timeout",
                "15",
            ],
            Duration::from_secs(40),
        );
        assert_eq!(r.code, 0, "gtk port-echo of one {bytes}-byte write over TLS failed: {}\n{}", r.json, r.stderr);
        assert_eq!(r.field("bytes_received").as_deref(), Some(bytes), "{}", r.json);
        assert_eq!(r.field("sha256_sent"), r.field("sha256_received"));
    }
}

/// spice-gtk over TLS only (`?tls-port=`), checked by CA and subject, with
/// a password: 64 MiB of port echo byte-exact; every link is TLS.
#[test]
fn gtk_tls_port_echo_64mib_with_ca_subject_and_password() {
    if !peers_available(&["gtk", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlsecho");
    let x509 = make_x509_dir(&dir.path("x509"));
    std::fs::write(dir.path("pw"), "s3cret\n").expect("pw");
    let app = EchoApp::start(dir.path("app.sock"));
    let tls = free_port();
    let pw = dir.path("pw").display().to_string();
    let ch = format!("port:com.example.echo=unix:{}", app.path.display());
    let relay = tls_relay(None, tls, &x509, &["--password-file", &pw, "--channel", &ch]);
    let uri = format!("spice://127.0.0.1?tls-port={tls}");
    let ca = ca(&x509);
    let r = gtk(
        &[
            "port-echo",
            "--uri",
            &uri,
            "--ca-file",
            &ca,
            "--cert-subject",
            SUBJECT,
            "--password",
            "s3cret",
            "--port-name",
            "com.example.echo",
            "--bytes",
            "67108864",
            "--timeout",
            "90",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, 0, "gtk port-echo over TLS failed: {}\n{}", r.json, r.stderr);
    assert_eq!(r.field("bytes_received").as_deref(), Some("67108864"), "{}", r.json);
    assert_eq!(r.field("sha256_sent"), r.field("sha256_received"));
    eprintln!("gtk port echo 64 MiB over TLS: {} MiB/s (Python client)", r.field("mib_per_s").unwrap_or_default());
    let links = relay.lines("result=ok");
    assert!(links.iter().any(|l| l.contains("channel=main:0") && l.contains("tls=yes")), "{links:?}");
    assert!(links.iter().any(|l| l.contains("channel=port:com.example.echo") && l.contains("tls=yes")), "{links:?}");
    assert!(links.iter().all(|l| l.contains("tls=yes")), "a plain link on a TLS-only server: {links:?}");

    // A wrong password over TLS: spice-gtk reports an auth error (exit 3).
    let r = gtk(
        &["auth", "--uri", &uri, "--ca-file", &ca, "--password", "wrong", "--timeout", "15"],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 3, "wrong password over TLS: {}\n{}", r.json, r.stderr);
    assert_eq!(relay.stop(), Some(0));
}

/// A wrong CA, a wrong subject, garbage, a truncated ClientHello and a
/// plaintext link on the TLS port each fail that connection only; a good
/// client links afterwards.
#[test]
fn tls_failures_close_one_connection_and_the_relay_keeps_serving() {
    if !peers_available(&["gtk", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlsbad");
    let x509 = make_x509_dir(&dir.path("x509"));
    let other = make_other_ca(&dir.path("other"));
    let tls = free_port();
    let relay = tls_relay(None, tls, &x509, &["--disable-ticketing", "--channel", "port:com.example.echo=echo:"]);
    let uri = format!("spice+tls://127.0.0.1:{tls}");
    let other = other.display().to_string();
    let r = gtk(&["auth", "--uri", &uri, "--ca-file", &other, "--timeout", "15"], Duration::from_secs(30));
    assert_ne!(r.code, 0, "a client with the wrong CA linked: {}", r.json);
    relay.wait_log("kind=\"peer alert\"", Duration::from_secs(10));
    let ca = ca(&x509);
    let r = gtk(
        &["auth", "--uri", &uri, "--ca-file", &ca, "--cert-subject", "C=XX,O=test,CN=not-this-vm", "--timeout", "15"],
        Duration::from_secs(30),
    );
    assert_ne!(r.code, 0, "a client expecting another subject linked: {}", r.json);

    // Garbage, a truncated ClientHello, a plaintext SPICE link.
    let mut hostile = Vec::new();
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03],
        b"REDQ\x02\x00\x00\x00\x02\x00\x00\x00".to_vec(),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", tls)).expect("connect");
        s.write_all(&bytes).expect("send");
        hostile.push(s);
    }
    // The truncated one ends with EOF (half-close): a handshake EOF.
    let _ = hostile[1].shutdown(std::net::Shutdown::Write);
    for s in &mut hostile[..] {
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 4096];
        // Closed by the relay (an alert at most); never a SPICE reply.
        let mut got = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("relay kept a hostile TLS connection open: {e}"),
            }
        }
        assert!(!got.starts_with(b"REDQ"), "a SPICE reply to a connection that never did TLS");
    }
    let r = gtk(
        &[
            "port-echo",
            "--uri",
            &uri,
            "--ca-file",
            &ca,
            "--port-name",
            "com.example.echo",
            "--bytes",
            "1048576",
            "--timeout",
            "30",
        ],
        Duration::from_secs(45),
    );
    assert_eq!(r.code, 0, "a good TLS client after the failures: {}\n{}", r.json, r.stderr);
    let failed = relay.lines("tls peer=");
    assert!(failed.len() >= 4, "each failure is logged: {failed:?}");
    assert_eq!(relay.stop(), Some(0));
}

/// `--tls-channel port` with a plain and a TLS listener: spice-gtk links
/// main plaintext, gets NEED_SECURED for the port and relinks it over TLS.
#[test]
fn gtk_need_secured_relinks_the_port_on_the_tls_port() {
    if !peers_available(&["gtk", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlsneed");
    let x509 = make_x509_dir(&dir.path("x509"));
    let (plain, tls) = (free_port(), free_port());
    let relay = tls_relay(
        Some(plain),
        tls,
        &x509,
        &["--disable-ticketing", "--tls-channel", "port", "--channel", "port:com.example.echo=echo:"],
    );
    let uri = format!("spice://127.0.0.1?port={plain}&tls-port={tls}");
    let ca = ca(&x509);
    let r = gtk(
        &[
            "port-echo",
            "--uri",
            &uri,
            "--ca-file",
            &ca,
            "--port-name",
            "com.example.echo",
            "--bytes",
            "4194304",
            "--timeout",
            "30",
        ],
        Duration::from_secs(45),
    );
    assert_eq!(r.code, 0, "port-echo with NEED_SECURED: {}\n{}", r.json, r.stderr);
    let refused = relay.lines("result=refused");
    assert!(
        refused.iter().any(|l| l.contains("channel=port:") && l.contains("tls=no") && l.contains("code=5")),
        "the plain port link gets NEED_SECURED: {refused:?}"
    );
    let ok = relay.lines("result=ok");
    assert!(ok.iter().any(|l| l.contains("channel=main:0") && l.contains("tls=no")), "{ok:?}");
    assert!(ok.iter().any(|l| l.contains("channel=port:com.example.echo") && l.contains("tls=yes")), "{ok:?}");
    assert_eq!(relay.stop(), Some(0));
}

/// vmcrelay `connect` ↔ `serve` over TLS on user channel 128 (an echo
/// endpoint): 256 MiB each way at once, byte-exact.
#[test]
fn connect_to_serve_over_tls_256mib_each_way() {
    if !peers_available(&["openssl"]) {
        return;
    }
    let dir = TempDir::new("tlscs");
    let x509 = make_x509_dir(&dir.path("x509"));
    let tls = free_port();
    let relay = tls_relay(None, tls, &x509, &["--disable-ticketing", "--channel", "128=echo:"]);
    let sock = dir.path("c.sock");
    let _c = Connect::start(&[
        format!("spice+tls://127.0.0.1:{tls}"),
        "--ca-file".into(),
        ca(&x509),
        "--channel".into(),
        format!("128=unix-listen:{}", sock.display()),
    ]);
    let s = connect_unix(&sock, Duration::from_secs(20));
    const N: usize = 256 << 20;
    let data = std::sync::Arc::new(pattern(7, N));
    let mut w = s.try_clone().expect("clone");
    let d2 = std::sync::Arc::clone(&data);
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || {
        for chunk in d2.chunks(1 << 20) {
            w.write_all(chunk).expect("write");
        }
    });
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < N {
        let n = r.read(&mut buf).expect("read echo");
        assert!(n > 0, "echo ended after {got} bytes");
        assert!(buf[..n] == data[got..got + n], "byte mismatch near offset {got}");
        got += n;
    }
    writer.join().expect("writer");
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("connect ↔ serve over TLS: 256 MiB each way in {secs:.2} s ({:.0} MiB/s each way)", 256.0 / secs);
    let links = relay.lines("result=ok");
    assert!(links.iter().any(|l| l.contains("channel=128:0") && l.contains("tls=yes")), "{links:?}");
}

/// `connect` to QEMU's own tls-port (x509-dir): QMP through the local
/// socket; with a CA that did not sign QEMU's certificate it exits 5.
#[test]
fn connect_to_qemu_tls_port_qmp_and_wrong_ca_exits_5() {
    if !peers_available(&["qemu-system-x86_64", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlsqemu");
    let x509 = make_x509_dir(&dir.path("x509"));
    let other = make_other_ca(&dir.path("other"));
    let tls = free_port();
    let spice = format!("tls-port={tls},addr=127.0.0.1,disable-ticketing=on,x509-dir={}", x509.display());
    let _q = Qemu::start(
        &[
            "-machine",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-spice",
            &spice,
            "-chardev",
            "spiceport,id=qmp0,name=org.qemu.monitor.qmp.0",
            "-mon",
            "chardev=qmp0,mode=control",
        ]
        .map(String::from),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", tls)).is_err() {
        assert!(Instant::now() < deadline, "QEMU never listened on its tls-port");
        std::thread::sleep(Duration::from_millis(50));
    }
    let uri = format!("spice://127.0.0.1?tls-port={tls}");
    let sock = dir.path("qmp.sock");
    let c = Connect::start(&[
        uri.clone(),
        "--ca-file".into(),
        ca(&x509),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    let s = connect_unix(&sock, Duration::from_secs(20));
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).expect("greeting");
    assert!(line.contains("\"QMP\""), "QMP greeting over TLS, got {line:?}");
    for cmd in ["qmp_capabilities", "query-status"] {
        w.write_all(format!("{{\"execute\":\"{cmd}\"}}\r\n").as_bytes()).expect("send");
        loop {
            line.clear();
            std::io::BufRead::read_line(&mut r, &mut line).expect("reply");
            assert!(!line.is_empty(), "QMP closed");
            if line.contains("\"return\"") {
                break;
            }
        }
    }
    assert!(line.contains("\"status\""), "{line}");
    drop((r, w, c));

    // The wrong CA: exit 5 with a message that says what to check, no retry.
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
        .args(["connect", &uri, "--ca-file", &other.display().to_string(), "--eager", "--channel"])
        .arg(format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", dir.path("q2.sock").display()))
        .output()
        .expect("connect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "wrong CA: {err}");
    assert!(err.contains("--ca-file"), "the message says what to check: {err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "gave up at once, not after retries");
}

/// SIGHUP reloads the certificate for new connections: a client that
/// trusts only the new CA links after it, one that trusts only the old CA
/// no longer does, and a linked channel keeps moving bytes.
#[test]
fn sighup_reloads_the_certificate_for_new_connections() {
    if !peers_available(&["gtk", "openssl"]) {
        return;
    }
    let dir = TempDir::new("tlshup");
    let x509 = make_x509_dir(&dir.path("x509"));
    let old_ca = dir.path("old-ca.pem");
    std::fs::copy(x509.join("ca-cert.pem"), &old_ca).expect("keep old CA");
    let tls = free_port();
    let relay = tls_relay(None, tls, &x509, &["--disable-ticketing", "--channel", "128=echo:"]);
    let sock = dir.path("c.sock");
    let _c = Connect::start(&[
        format!("spice+tls://127.0.0.1:{tls}"),
        "--ca-file".into(),
        old_ca.display().to_string(),
        "--channel".into(),
        format!("128=unix-listen:{}", sock.display()),
    ]);
    let mut linked = connect_unix(&sock, Duration::from_secs(20));
    linked.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let echo = |s: &mut std::os::unix::net::UnixStream| {
        s.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("echo");
        assert_eq!(&b, b"ping");
    };
    echo(&mut linked);
    // A new CA and certificate in place of the old ones, then SIGHUP.
    let fresh = make_x509_dir(&dir.path("fresh"));
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
        std::fs::copy(fresh.join(f), x509.join(f)).expect("replace");
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    relay.wait_log("TLS certificate reloaded", Duration::from_secs(10));
    let uri = format!("spice+tls://127.0.0.1:{tls}");
    let new_ca = ca(&x509);
    let r = gtk(&["auth", "--uri", &uri, "--ca-file", &new_ca, "--timeout", "15"], Duration::from_secs(30));
    assert_eq!(r.code, 0, "the new CA after SIGHUP: {}\n{}", r.json, r.stderr);
    let old = old_ca.display().to_string();
    let r = gtk(&["auth", "--uri", &uri, "--ca-file", &old, "--timeout", "15"], Duration::from_secs(30));
    assert_ne!(r.code, 0, "the old CA still verifies after the reload: {}", r.json);
    echo(&mut linked);
    // A broken file: the reload is refused, the running certificate stays.
    std::fs::write(x509.join("server-key.pem"), "not a key").expect("break");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    relay.wait_log("TLS reload failed", Duration::from_secs(10));
    let r = gtk(&["auth", "--uri", &uri, "--ca-file", &new_ca, "--timeout", "15"], Duration::from_secs(30));
    assert_eq!(r.code, 0, "after a failed reload: {}\n{}", r.json, r.stderr);
    assert_eq!(relay.stop(), Some(0));
}

/// `connect --list` over TLS: the channel table of a TLS-only `serve`
/// (port names included); the wrong CA exits 5 saying what to check.
#[test]
fn connect_list_over_tls() {
    if !peers_available(&["openssl"]) {
        return;
    }
    let dir = TempDir::new("tlslist");
    let x509 = make_x509_dir(&dir.path("x509"));
    let tls = free_port();
    let _relay = tls_relay(
        None,
        tls,
        &x509,
        &["--disable-ticketing", "--channel", "port:com.example.echo=echo:", "--channel", "128=echo:"],
    );
    let list = |uri: &str, ca: &str| {
        Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
            .args(["connect", uri, "--ca-file", ca, "--list", "--timeout-secs", "10"])
            .output()
            .expect("connect --list")
    };
    for uri in [format!("spice+tls://127.0.0.1:{tls}"), format!("spice://127.0.0.1?tls-port={tls}")] {
        let out = list(&uri, &ca(&x509));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{uri}: {text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("com.example.echo"), "the port's name over TLS: {text}");
        assert!(text.lines().any(|l| l.starts_with("128 ")), "channel 128 listed: {text}");
    }
    let other = make_other_ca(&dir.path("other"));
    let out = list(&format!("spice+tls://127.0.0.1:{tls}"), &other.display().to_string());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "wrong CA: {err}");
    assert!(err.contains("--ca-file") && err.contains("subjectAltName"), "what to check: {err}");
}
