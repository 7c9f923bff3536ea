//! spice-gtk ↔ vmcrelay serve ↔ QEMU chardev sockets (QEMU speaks no SPICE
//! here: vmcrelay is the SPICE server, QEMU the device behind it).

mod common;

use std::time::Duration;

use common::*;

/// Test 2: spice-gtk's usbredir channel through vmcrelay to QEMU's usb-redir
/// device on a socket chardev: the usbredir hellos cross both ways.
#[test]
fn gtk_usbredir_to_qemu_usb_redir() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("usbredir");
    let sock = dir.path("ur0.sock");
    let _qemu = Qemu::start(&[
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        "64".into(),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-device".into(),
        "qemu-xhci,id=xhci".into(),
        "-chardev".into(),
        format!("socket,id=ur0,path={},server=on,wait=off", sock.display()),
        "-device".into(),
        "usb-redir,chardev=ur0,id=redir0".into(),
    ]);
    wait_path(&sock, Duration::from_secs(20));
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--disable-ticketing".into(),
        "--channel".into(),
        format!("usbredir:0=unix:{}", sock.display()),
    ]);
    let r = gtk(
        &["usbredir", "--uri", &relay.uri(), "--expect-hello", "--timeout", "30", "--linger", "0.5"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "usbredir through the relay failed: {}\n{}", r.json, r.stderr);
    assert!(r.json.contains("qemu usb-redir guest"), "QEMU's hello reached spice-gtk: {}", r.json);
    // The relay's close line counts the bytes each way: both hellos (80 B each).
    let close = relay.wait_log("close peer=", Duration::from_secs(20));
    let closes = relay.lines("channel=usbredir:0");
    let line = closes.iter().find(|l| l.contains("close ")).unwrap_or(&close);
    let num = |k: &str| -> u64 {
        line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(num("e2c_bytes") >= 80, "QEMU → client bytes: {line}");
    assert!(num("c2e_bytes") >= 80, "client → QEMU bytes: {line}");
}

/// Test 3: spice-gtk ↔ vmcrelay ↔ QEMU `-mon` on a socket chardev: QMP
/// capabilities, version and the ≈200 KB schema complete without a stall.
#[test]
fn gtk_qmp_to_qemu_monitor_no_stall() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("qmp");
    let sock = dir.path("qmp.sock");
    let _qemu = Qemu::start(&[
        "-machine".into(),
        "none".into(),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-chardev".into(),
        format!("socket,id=m0,path={},server=on,wait=off", sock.display()),
        "-mon".into(),
        "chardev=m0,mode=control".into(),
    ]);
    wait_path(&sock, Duration::from_secs(20));
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--disable-ticketing".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix:{}", sock.display()),
    ]);
    let r = gtk(
        &[
            "qmp",
            "--uri",
            &relay.uri(),
            "--commands",
            "qmp_capabilities,query-version,query-qmp-schema",
            "--timeout",
            "30",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code, 0, "QMP through the relay failed: {}\n{}", r.json, r.stderr);
    // The schema reply is large; find its size in the JSON report.
    let schema = r.json.split("query-qmp-schema").nth(1).unwrap_or_default();
    let digits: String = schema.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    let size: u64 = digits.parse().unwrap_or(0);
    assert!(size > 150_000, "query-qmp-schema reply of {size} bytes; report: {}", r.json);
}

fn qemu_usb_redir(sock: &std::path::Path) -> Qemu {
    let args: Vec<String> = [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-display",
        "none",
        "-nodefaults",
        "-device",
        "qemu-xhci,id=xhci",
        "-chardev",
        &format!("socket,id=ur0,path={},server=on,wait=off", sock.display()),
        "-device",
        "usb-redir,chardev=ur0,id=redir0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Qemu::start(&args)
}

/// Issue 8.4: QEMU restarts behind `serve` while spice-gtk is connected:
/// the usbredir channel closes with the old QEMU and is announced again
/// (fresh id) once the new QEMU's socket is there; spice-gtk links it by
/// itself and the new QEMU's usbredir hello reaches it. No user action.
#[test]
fn gtk_usbredir_comes_back_after_qemu_restart() {
    if !peers_available(&["gtk", "qemu-system-x86_64"]) {
        return;
    }
    let dir = TempDir::new("usbrestart");
    let sock = dir.path("ur0.sock");
    let mut q1 = qemu_usb_redir(&sock);
    wait_path(&sock, Duration::from_secs(20));
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--disable-ticketing".into(),
        "--channel".into(),
        format!("usbredir:0=unix:{}", sock.display()),
    ]);
    let uri = relay.uri();
    let client = std::thread::spawn(move || {
        gtk(
            &["usbredir", "--uri", &uri, "--expect-hello", "--timeout", "40", "--linger", "10"],
            Duration::from_secs(80),
        )
    });
    relay.wait_log("channel=usbredir:0 session=", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    q1.kill();
    relay.wait_log("endpoint gone channel=usbredir:0", Duration::from_secs(20));
    let _ = std::fs::remove_file(&sock);
    let _q2 = qemu_usb_redir(&sock);
    let back = relay.wait_log("endpoint back channel=usbredir:0", Duration::from_secs(30));
    assert!(back.contains("as usbredir:1"), "announced under a fresh id: {back}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while relay.lines("result=ok").iter().filter(|l| l.contains("channel=usbredir:0")).count() < 2 {
        assert!(std::time::Instant::now() < deadline, "spice-gtk never linked the announced channel");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = client.join().expect("gtk thread");
    assert_eq!(r.code, 0, "spice-gtk run: {}\n{}", r.json, r.stderr);
    // The harness reports at its verdict (before the restart); the relay's
    // close lines count what crossed on the announced channel: the new
    // QEMU's hello to spice-gtk and spice-gtk's hello to the new QEMU.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let closes = loop {
        let c: Vec<String> =
            relay.lines("close peer=").into_iter().filter(|l| l.contains("channel=usbredir:0")).collect();
        if c.len() >= 2 {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "no close line of the second usbredir link: {c:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let last = closes.last().expect("close line");
    let num = |k: &str| -> u64 {
        last.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(num("e2c_bytes") >= 80, "the new QEMU's usbredir hello reached spice-gtk: {last}");
    assert!(num("c2e_bytes") >= 80, "spice-gtk's usbredir hello reached the new QEMU: {last}");
}
