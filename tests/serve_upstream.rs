//! `vmcrelay serve --upstream`: one address for a whole VM. spice-gtk talks
//! only to vmcrelay; QEMU's spice-server keeps the display, inputs and its
//! own ports, vmcrelay serves its usbredir channel itself.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// QEMU with a SeaBIOS display (qxl), QMP on a spiceport, and a usb-redir
/// device on a socket chardev that vmcrelay serves; `spice` is the -spice value.
fn qemu_vm(spice: &str, password: Option<&str>, ur_sock: &Path) -> Qemu {
    let mut a: Vec<String> =
        // The boot menu prompt waits 15 s, so ESC has a visible effect (SeaBIOS's boot menu).
        [
            "-machine", "pc", "-accel", "tcg", "-m", "128", "-vga", "qxl", "-display", "none", "-nic", "none",
            "-boot", "menu=on,splash-time=15000",
        ]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let mut spice = spice.to_string();
    match password {
        Some(pw) => {
            a.push("-object".into());
            a.push(format!("secret,id=sec0,data={pw}"));
            spice.push_str(",password-secret=sec0");
        }
        None => spice.push_str(",disable-ticketing=on"),
    }
    a.push("-spice".into());
    a.push(spice);
    for s in [
        "-chardev",
        "spiceport,id=qmp0,name=org.qemu.monitor.qmp.0",
        "-mon",
        "chardev=qmp0,mode=control",
        "-device",
        "qemu-xhci",
    ] {
        a.push(s.into());
    }
    a.push("-chardev".into());
    a.push(format!("socket,id=ur0,path={},server=on,wait=off", ur_sock.display()));
    a.push("-device".into());
    a.push("usb-redir,chardev=ur0".into());
    Qemu::start(&a)
}

fn wait_tcp(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn relay_for(upstream: &str, ur_sock: &Path) -> Relay {
    Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--upstream".into(),
        upstream.into(),
        "--channel".into(),
        format!("usbredir:0=unix:{}", ur_sock.display()),
    ])
}

/// QMP over QEMU's own port channel and the usbredir hello on vmcrelay's
/// channel, in one session through one address, with QEMU's password; a
/// wrong password gets auth-error and does not kick the connected client.
#[test]
fn whole_vm_session_with_qemus_password() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("upstream");
    let ur = dir.path("ur0.sock");
    let qport = free_port();
    let _q = qemu_vm(&format!("port={qport},addr=127.0.0.1"), Some("s3cret"), &ur);
    wait_tcp(qport);
    wait_path(&ur, Duration::from_secs(20));
    let relay = relay_for(&format!("spice://127.0.0.1:{qport}"), &ur);
    let uri = relay.uri();

    let r = gtk(
        &[
            "qmp",
            "--uri",
            &uri,
            "--password",
            "s3cret",
            "--commands",
            "qmp_capabilities,query-status",
            "--timeout",
            "20",
        ],
        Duration::from_secs(40),
    );
    assert_eq!(r.code, 0, "QMP over QEMU's port through vmcrelay: {}\n{}", r.json, r.stderr);
    assert!(r.json.contains("\\\"status\\\"") || r.json.contains("status"), "{}", r.json);
    // The merged list: QEMU's display, inputs, cursor and port, vmcrelay's usbredir 0.
    for want in ["\"display\"", "\"inputs\"", "\"cursor\"", "\"usbredir\"", "org.qemu.monitor.qmp.0"] {
        assert!(r.json.contains(want), "channel list lacks {want}: {}", r.json);
    }

    // `vmcrelay connect --list` sees the merged session too.
    let pw = dir.path("pw");
    std::fs::write(&pw, "s3cret\n").expect("password file");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
        .args(["connect", &uri, "--list", "--password-file", &pw.display().to_string()])
        .output()
        .expect("connect --list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "--list through the proxy: {text} {}", String::from_utf8_lossy(&out.stderr));
    for want in ["display", "inputs", "usbredir", "org.qemu.monitor.qmp.0"] {
        assert!(text.contains(want), "--list lacks {want}:\n{text}");
    }

    // vmcrelay's own channel in the same kind of session; keep it while a wrong password tries.
    let uri2 = uri.clone();
    let held = std::thread::spawn(move || {
        gtk(
            &["usbredir", "--uri", &uri2, "--password", "s3cret", "--expect-hello", "--timeout", "30", "--linger", "4"],
            Duration::from_secs(60),
        )
    });
    relay.wait_log("channel=usbredir:0 session=", Duration::from_secs(30));
    let bad = gtk(&["auth", "--uri", &uri, "--password", "wrong", "--timeout", "10"], Duration::from_secs(30));
    assert_eq!(bad.code, 3, "wrong password: auth-error: {}", bad.json);
    let r = held.join().expect("gtk thread");
    assert_eq!(r.code, 0, "usbredir through vmcrelay's own channel: {}\n{}", r.json, r.stderr);
    assert!(r.json.contains("qemu usb-redir guest"), "QEMU's usbredir hello via vmcrelay: {}", r.json);
    // The held session ended only when its client left (after the wrong
    // password), never by a kick: its usbredir channel closed with its client.
    let deadline = Instant::now() + Duration::from_secs(10);
    let close = loop {
        let c: Vec<String> =
            relay.lines("close peer=").into_iter().filter(|l| l.contains("channel=usbredir:0")).collect();
        if let Some(l) = c.first() {
            break l.clone();
        }
        assert!(Instant::now() < deadline, "no close line of the usbredir channel");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(close.contains("reason=\"client closed\""), "closed by its own client, not by a kick: {close}");
    assert!(relay.lines("result=refused").iter().any(|l| l.contains("code=7")), "the refusal is logged");

    // Cached-caps order: once QEMU's caps are known, a client gets its link
    // reply before QEMU sees any link message (a client that never sends a
    // ticket costs QEMU nothing). Shown with QEMU stopped: the reply still comes.
    let pid = _q.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let reply = raw_main_link_reply(&relay.addr());
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    let (error, key_der_tag) = reply.expect("a link reply while QEMU is stopped");
    assert_eq!(error, 0, "the reply is a success reply from the cached caps");
    assert_eq!(key_der_tag, 0x30, "it carries vmcrelay's own RSA key (DER SEQUENCE)");
}

/// Sends a main-channel link message and returns (error, first byte of the
/// public key) of the reply, or None if none came within 3 s.
fn raw_main_link_reply(addr: &str) -> Option<(u32, u8)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let caps: [u32; 1] = [(1 << 0) | (1 << 1) | (1 << 3)]; // AUTH_SELECTION, AUTH_SPICE, MINI_HEADER
    let mut mess = Vec::new();
    mess.extend_from_slice(&0u32.to_le_bytes()); // connection id
    mess.extend_from_slice(&[1, 0]); // main, id 0
    mess.extend_from_slice(&1u32.to_le_bytes()); // common caps words
    mess.extend_from_slice(&0u32.to_le_bytes()); // channel caps words
    mess.extend_from_slice(&18u32.to_le_bytes()); // caps offset
    mess.extend_from_slice(&caps[0].to_le_bytes());
    let mut msg = b"REDQ".to_vec();
    msg.extend_from_slice(&2u32.to_le_bytes());
    msg.extend_from_slice(&2u32.to_le_bytes());
    msg.extend_from_slice(&u32::try_from(mess.len()).ok()?.to_le_bytes());
    msg.extend_from_slice(&mess);
    s.write_all(&msg).ok()?;
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    let size = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    let mut body = vec![0u8; size.min(4096)];
    s.read_exact(&mut body).ok()?;
    Some((u32::from_le_bytes([body[0], body[1], body[2], body[3]]), body[4]))
}

/// A unix upstream; QEMU killed: a link error in the reply (not a silent
/// close) and a log line naming the upstream; QEMU restarted: the next
/// session works without restarting vmcrelay.
#[test]
fn unix_upstream_down_and_back() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("upunix");
    let ur = dir.path("ur0.sock");
    let spice_sock = dir.path("spice.sock");
    let spice = format!("unix=on,addr={}", spice_sock.display());
    let mut q = qemu_vm(&spice, None, &ur);
    wait_path(&spice_sock, Duration::from_secs(20));
    wait_path(&ur, Duration::from_secs(20));
    let relay = relay_for(&format!("spice+unix://{}", spice_sock.display()), &ur);
    let uri = relay.uri();
    let qmp = ["qmp", "--uri", &uri, "--commands", "qmp_capabilities,query-status", "--timeout", "20"];
    let r = gtk(&qmp, Duration::from_secs(40));
    assert_eq!(r.code, 0, "QMP through a unix upstream: {}\n{}", r.json, r.stderr);

    q.kill();
    let _ = std::fs::remove_file(&spice_sock);
    let down = gtk(&["auth", "--uri", &uri, "--timeout", "10"], Duration::from_secs(30));
    assert_eq!(down.code, 5, "QEMU down: a link error, not a password prompt: {}", down.json);
    let line = relay.wait_log("unavailable for channel=main:0", Duration::from_secs(5));
    assert!(line.contains(&spice_sock.display().to_string()), "names the upstream: {line}");

    let _q2 = qemu_vm(&spice, None, &ur);
    wait_path(&spice_sock, Duration::from_secs(20));
    let r = gtk(&qmp, Duration::from_secs(40));
    assert_eq!(r.code, 0, "after QEMU's restart, without restarting vmcrelay: {}\n{}", r.json, r.stderr);
}

/// A second client replaces the first as spice-server does: QEMU kicks the
/// first session, and vmcrelay closes that session's own channels too.
#[test]
fn second_client_replaces_the_first_whole_session() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("upkick");
    let ur = dir.path("ur0.sock");
    let qport = free_port();
    let _q = qemu_vm(&format!("port={qport},addr=127.0.0.1"), None, &ur);
    wait_tcp(qport);
    wait_path(&ur, Duration::from_secs(20));
    let relay = relay_for(&format!("spice://127.0.0.1:{qport}"), &ur);
    let uri = relay.uri();
    let uri1 = uri.clone();
    let first = std::thread::spawn(move || {
        gtk(
            &["usbredir", "--uri", &uri1, "--expect-hello", "--timeout", "30", "--linger", "8"],
            Duration::from_secs(60),
        )
    });
    relay.wait_log("channel=usbredir:0 session=", Duration::from_secs(30));
    let s1 = relay.wait_log("from upstream", Duration::from_secs(5));
    let second = gtk(&["auth", "--uri", &uri, "--timeout", "10", "--linger", "1"], Duration::from_secs(30));
    assert_eq!(second.code, 0, "the second client links: {}", second.json);
    // The first session's own (served) usbredir channel closed with it.
    let id = s1.split_whitespace().find(|w| w.starts_with("0x")).unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let closed = relay.lines("close peer=").iter().any(|l| {
            l.contains("channel=usbredir:0") && l.contains(&format!("session={id}")) && l.contains("session closed")
        });
        if closed {
            break;
        }
        assert!(Instant::now() < deadline, "session {id}'s usbredir channel did not close: {:?}", relay.lines("close"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = first.join();
}

/// The VM's screen through vmcrelay: spice-gtk, connected only to vmcrelay,
/// gets QEMU's primary surface (SeaBIOS, 720×400) drawn, ESC on the inputs
/// channel opens SeaBIOS's boot menu, QMP runs on QEMU's port and the
/// usbredir hello arrives on vmcrelay's own channel, all in one session.
#[test]
fn display_inputs_qmp_and_usbredir_in_one_session() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("updisplay");
    let ur = dir.path("ur0.sock");
    let qport = free_port();
    let _q = qemu_vm(&format!("port={qport},addr=127.0.0.1"), Some("pw"), &ur);
    wait_tcp(qport);
    wait_path(&ur, Duration::from_secs(20));
    let relay = relay_for(&format!("spice://127.0.0.1:{qport}"), &ur);
    let uri = relay.uri();
    let png = dir.path("screen.png");
    let png_s = png.display().to_string();
    whole_vm_display(&uri, &[], Some(&png_s), "display through vmcrelay");
    assert!(std::fs::metadata(&png).map(|m| m.len() > 1000).unwrap_or(false), "screenshot written");
    // The display went through the proxy, the usbredir channel through vmcrelay's own path.
    let ok = relay.lines("result=ok");
    assert!(ok.iter().any(|l| l.contains("channel=display:0") && l.contains("upstream=")), "{ok:?}");
    assert!(ok.iter().any(|l| l.contains("channel=usbredir:0") && !l.contains("upstream=")), "{ok:?}");
}

/// Real remote-viewer under Xvfb, connected only to vmcrelay, shows the VM:
/// the display area of its window is not blank (SeaBIOS's text).
#[test]
fn remote_viewer_shows_the_vm_through_vmcrelay() {
    if !peers_available(&["gtk", "qemu-system-x86_64", "remote-viewer", "Xvfb", "import"]) {
        return;
    }
    let dir = TempDir::new("uprv");
    let ur = dir.path("ur0.sock");
    let qport = free_port();
    let _q = qemu_vm(&format!("port={qport},addr=127.0.0.1"), Some("pw"), &ur);
    wait_tcp(qport);
    wait_path(&ur, Duration::from_secs(20));
    let relay = relay_for(&format!("spice://127.0.0.1:{qport}"), &ur);
    let pw = dir.path("pw.txt");
    std::fs::write(&pw, "pw\n").expect("password file");
    let png = dir.path("rv.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/remote-viewer-shot");
    let out = std::process::Command::new("timeout")
        .args(["-k", "5", "90"])
        .arg(script)
        .args(["--password-file", &pw.display().to_string(), "-v", &relay.uri(), &png.display().to_string()])
        .output()
        .expect("remote-viewer-shot");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "remote-viewer through vmcrelay: {text}");
    assert!(text.contains("display=720x400"), "the guest display area: {text}");
    assert!(std::fs::metadata(&png).map(|m| m.len() > 1000).unwrap_or(false), "screenshot written");
    assert!(
        relay.lines("result=ok").iter().any(|l| l.contains("channel=display:0")),
        "display linked through vmcrelay"
    );
}

/// QEMU with only a TLS port (x509-dir made here) and its password; vmcrelay
/// fronts it on a plain address.
fn qemu_tls_vm(dir: &TempDir, ur: &Path) -> (Qemu, u16, std::path::PathBuf) {
    let x509 = make_x509_dir(&dir.path("x509"));
    let tport = free_port();
    let q = qemu_vm(&format!("tls-port={tport},addr=127.0.0.1,x509-dir={}", x509.display()), Some("pw"), ur);
    wait_tcp(tport);
    wait_path(ur, Duration::from_secs(20));
    (q, tport, x509)
}

fn tls_relay_for(upstream: &str, ca: &Path, ur_sock: &Path) -> Relay {
    Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--upstream".into(),
        upstream.into(),
        "--upstream-ca-file".into(),
        ca.display().to_string(),
        "--channel".into(),
        format!("usbredir:0=unix:{}", ur_sock.display()),
    ])
}

/// A TLS upstream (QEMU's tls-port only): spice-gtk, connected in plain to
/// vmcrelay, gets QEMU's screen (primary surface, drawn, ESC reaches the
/// guest), QMP on QEMU's port channel and the usbredir hello on vmcrelay's
/// own channel, QEMU's password applying; the `?tls-port=` form works too.
#[test]
fn tls_upstream_whole_vm_session() {
    if !peers_available(&["gtk", "qemu-system-x86_64", "openssl"]) {
        return;
    }
    let dir = TempDir::new("uptls");
    let ur = dir.path("ur0.sock");
    let (_q, tport, x509) = qemu_tls_vm(&dir, &ur);
    let ca = x509.join("ca-cert.pem");
    let relay = tls_relay_for(&format!("spice+tls://127.0.0.1:{tport}"), &ca, &ur);
    let uri = relay.uri();
    whole_vm_display(&uri, &[], None, "display over a TLS upstream");
    let ok = relay.lines("result=ok");
    for ch in ["main:0", "display:0", "inputs:0", "port:"] {
        assert!(
            ok.iter().any(|l| l.contains(&format!("channel={ch}")) && l.contains("upstream=spice+tls://")),
            "{ch} proxied over TLS: {ok:?}"
        );
    }
    assert!(ok.iter().any(|l| l.contains("channel=usbredir:0") && !l.contains("upstream=")), "{ok:?}");

    // A wrong password over TLS is still QEMU's verdict: auth-error.
    // 20 s: QEMU answers this link over TLS from its main loop, which the
    // TCG guests of the tests running beside it can starve under CI load.
    let bad = gtk(&["auth", "--uri", &uri, "--password", "wrong", "--timeout", "20"], Duration::from_secs(45));
    assert_eq!(bad.code, 3, "wrong password through a TLS upstream: {}", bad.json);
    drop(relay);

    // spice://HOST?tls-port=T, QMP on QEMU's port.
    let relay = tls_relay_for(&format!("spice://127.0.0.1?tls-port={tport}"), &ca, &ur);
    let r = gtk(
        &[
            "qmp",
            "--uri",
            &relay.uri(),
            "--password",
            "pw",
            "--commands",
            "qmp_capabilities,query-status",
            "--timeout",
            "20",
        ],
        Duration::from_secs(40),
    );
    assert_eq!(r.code, 0, "QMP over a ?tls-port= upstream: {}\n{}", r.json, r.stderr);
    assert!(r.json.contains("status"), "{}", r.json);
}

/// A CA that did not sign QEMU's certificate: the client's link fails with
/// a link error (not a password prompt, not a silent close), the log says
/// what to check, nothing is retried, and the relay keeps serving.
#[test]
fn tls_upstream_wrong_ca_is_a_link_error() {
    if !peers_available(&["gtk", "qemu-system-x86_64", "openssl"]) {
        return;
    }
    let dir = TempDir::new("uptlsca");
    let ur = dir.path("ur0.sock");
    let (_q, tport, _x509) = qemu_tls_vm(&dir, &ur);
    let other = make_other_ca(&dir.path("other"));
    let relay = tls_relay_for(&format!("spice+tls://127.0.0.1:{tport}"), &other, &ur);
    let uri = relay.uri();
    let t0 = Instant::now();
    let r = gtk(&["auth", "--uri", &uri, "--password", "pw", "--timeout", "10"], Duration::from_secs(30));
    assert_eq!(r.code, 5, "wrong CA: a link error: {}\n{}", r.json, r.stderr);
    assert!(t0.elapsed() < Duration::from_secs(8), "failed at once, not after a timeout");
    let line = relay.wait_log("check upstream-ca-file", Duration::from_secs(5));
    assert!(line.contains("ERROR") || line.contains("error"), "{line}");
    assert!(line.contains("subjectAltName") && line.contains("upstream-cert-subject"), "what to check: {line}");
    assert!(line.contains(&format!("127.0.0.1:{tport}")), "names the upstream: {line}");
    // The relay still answers: a raw link gets an error reply at once.
    let (error, _) = raw_main_link_reply(&relay.addr()).expect("the relay still answers links");
    assert_ne!(error, 0, "an error reply, not a success");
    // One line per attempt, no retry loop.
    std::thread::sleep(Duration::from_secs(2));
    let n = relay.lines("check upstream-ca-file").len();
    assert!((1..=3).contains(&n), "one failure per link attempt, not a loop: {n}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(relay.lines("check upstream-ca-file").len(), n, "no retries");
    // Still serving: a second client gets the same clear error.
    let r = gtk(&["auth", "--uri", &uri, "--password", "pw", "--timeout", "10"], Duration::from_secs(30));
    assert_eq!(r.code, 5, "the relay keeps serving: {}", r.json);
}

/// A TLS upstream without a CA file is a configuration error (exit 2)
/// that says what to give; a CA file without TLS too.
#[test]
fn tls_upstream_needs_a_ca_file() {
    let bin = env!("CARGO_BIN_EXE_vmcrelay");
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(bin)
        .args(["serve", "--channel", "128=echo:", "--listen", &listen, "--upstream", "spice+tls://127.0.0.1:5931"])
        .output()
        .expect("run vmcrelay");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--upstream-ca-file"), "says what to give: {err}");
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--channel",
            "128=echo:",
            "--listen",
            &listen,
            "--upstream",
            "spice://127.0.0.1:5930",
            "--upstream-ca-file",
            "/x.pem",
        ])
        .output()
        .expect("run vmcrelay");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("TLS upstream only"), "{err}");
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--channel",
            "128=echo:",
            "--listen",
            &listen,
            "--upstream",
            "spice+tls://127.0.0.1:5931",
            "--upstream-ca-file",
            "/nonexistent/ca.pem",
        ])
        .output()
        .expect("run vmcrelay");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "an unreadable CA file: {err}");
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// QEMU on a unix socket with its password, vmcrelay in front of it on a
/// plain and a TLS address (certificates in QEMU's x509-dir layout).
fn tls_listen_relay(dir: &TempDir, extra: &[&str]) -> (Qemu, Relay, u16, u16, String) {
    let ur = dir.path("ur0.sock");
    let spice_sock = dir.path("spice.sock");
    let q = qemu_vm(&format!("unix=on,addr={}", spice_sock.display()), Some("pw"), &ur);
    wait_path(&spice_sock, Duration::from_secs(20));
    wait_path(&ur, Duration::from_secs(20));
    let x509 = make_x509_dir(&dir.path("x509"));
    let (plain, tls) = (free_port(), free_port());
    let mut a: Vec<String> = [
        "--listen".to_string(),
        format!("127.0.0.1:{plain}"),
        "--tls-listen".into(),
        format!("127.0.0.1:{tls}"),
        "--x509-dir".into(),
        x509.display().to_string(),
        "--upstream".into(),
        format!("spice+unix://{}", spice_sock.display()),
        "--channel".into(),
        format!("usbredir:0=unix:{}", ur.display()),
    ]
    .into();
    a.extend(extra.iter().map(|s| s.to_string()));
    let relay = Relay::start(&a);
    (q, relay, plain, tls, x509.join("ca-cert.pem").display().to_string())
}

/// vmcrelay's own TLS listener in front of a whole VM (issue 10 with
/// issue 9): spice-gtk over TLS only (`?tls-port=`, checked by CA) gets
/// QEMU's screen, ESC, QMP over QEMU's port and the usbredir hello on
/// vmcrelay's channel; every channel, proxied or served, linked over TLS;
/// QEMU's password applies (a wrong one is QEMU's auth error).
#[test]
fn tls_listen_whole_vm_session() {
    if !peers_available(&["gtk", "qemu-system-x86_64", "openssl"]) {
        return;
    }
    let dir = TempDir::new("uptlsl");
    let (_q, relay, _plain, tls, ca) = tls_listen_relay(&dir, &[]);
    let uri = format!("spice://127.0.0.1?tls-port={tls}");
    whole_vm_display(&uri, &["--ca-file", &ca], None, "display through vmcrelay's TLS listener");
    let ok = relay.lines("result=ok");
    for ch in ["main:0", "display:0", "inputs:0", "port:", "usbredir:0"] {
        assert!(
            ok.iter().any(|l| l.contains(&format!("channel={ch}")) && l.contains("tls=yes")),
            "{ch} linked over vmcrelay's TLS listener: {ok:?}"
        );
    }
    assert!(!ok.iter().any(|l| l.contains("tls=no")), "nothing in plain: {ok:?}");
    let bad = gtk(
        &["auth", "--uri", &uri, "--ca-file", &ca, "--password", "wrong", "--timeout", "10"],
        Duration::from_secs(30),
    );
    assert_eq!(bad.code, 3, "a wrong password over TLS is QEMU's auth error: {}", bad.json);
}

/// `--tls-channel display` on a whole VM: spice-gtk, given both ports, links
/// main in plain, gets NEED_SECURED for the display and relinks it on the
/// TLS port, as with QEMU's own tls-channel; the screen still arrives.
#[test]
fn tls_listen_need_secured_relinks_a_proxied_channel() {
    if !peers_available(&["gtk", "qemu-system-x86_64", "openssl"]) {
        return;
    }
    let dir = TempDir::new("uptlsn");
    let (_q, relay, plain, tls, ca) = tls_listen_relay(&dir, &["--tls-channel", "display"]);
    let uri = format!("spice://127.0.0.1?port={plain}&tls-port={tls}");
    whole_vm_display(&uri, &["--ca-file", &ca], None, "display relinked over TLS");
    let refused = relay.lines("result=refused");
    assert!(
        refused.iter().any(|l| l.contains("channel=display:0") && l.contains("tls=no") && l.contains("code=5")),
        "the plain display link gets NEED_SECURED: {refused:?}"
    );
    let ok = relay.lines("result=ok");
    assert!(ok.iter().any(|l| l.contains("channel=main:0") && l.contains("tls=no")), "{ok:?}");
    assert!(ok.iter().any(|l| l.contains("channel=display:0") && l.contains("tls=yes")), "{ok:?}");
}

/// spice-gtk connected only to vmcrelay (password `pw`): the 720×400
/// primary surface is drawn, ESC through the inputs channel changes it,
/// QMP `query-status` answers over QEMU's port and the usbredir hello
/// arrives on vmcrelay's own channel.
fn whole_vm_display(uri: &str, extra: &[&str], png: Option<&str>, what: &str) {
    let mut args = vec!["display"];
    args.extend_from_slice(extra);
    args.extend([
        "--uri",
        uri,
        "--password",
        "pw",
        "--expect-size",
        "720x400",
        "--press-key",
        "esc",
        "--qmp-command",
        "query-status",
        "--expect-usbredir-hello",
        "--timeout",
        "60",
    ]);
    if let Some(p) = png {
        args.extend(["--save-png", p]);
    }
    let r = gtk(&args, Duration::from_secs(90));
    assert_eq!(r.code, 0, "{what}: {}\n{}", r.json, r.stderr);
    assert_eq!(r.field("width").as_deref(), Some("720"), "{}", r.json);
    assert_eq!(r.field("height").as_deref(), Some("400"), "{}", r.json);
    assert_eq!(r.field("drawn").as_deref(), Some("true"), "{}", r.json);
    assert_eq!(r.field("changed_after_key").as_deref(), Some("true"), "ESC reached the guest: {}", r.json);
    assert!(r.json.contains("\"running\""), "QMP query-status over QEMU's port: {}", r.json);
    if uri.contains("tls-port=") {
        // No wire tap under TLS: spice-gtk's own count of what arrived
        // after the channel opened (at least the hello's size).
        assert!(r.json.contains("\"hello\": true"), "usbredir hello on vmcrelay's channel: {}", r.json);
    } else {
        assert!(r.json.contains("qemu usb-redir guest"), "usbredir hello on vmcrelay's channel: {}", r.json);
    }
}
