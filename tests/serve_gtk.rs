//! `vmcrelay serve` against real peers: spice-gtk (Python GI) as the
//! client; unix apps and QEMU chardevs behind the relay.

mod common;

use std::time::Duration;

use common::*;

fn relay_args(port: u16, extra: &[String]) -> Vec<String> {
    let mut a = vec!["--listen".to_string(), format!("127.0.0.1:{port}"), "--workers".into(), "2".into()];
    a.extend_from_slice(extra);
    a
}

/// Test 1: spice-gtk ↔ vmcrelay ↔ unix echo app: 64 MiB over a port channel,
/// byte-exact on the way back; `port-opened` seen.
#[test]
fn gtk_port_echo_64mib_through_unix_app() {
    if !peers_available(&["gtk"]) {
        return;
    }
    let dir = TempDir::new("echo");
    let app = EchoApp::start(dir.path("app.sock"));
    let port = free_port();
    let relay = Relay::start(&relay_args(
        port,
        &[
            "--disable-ticketing".into(),
            "--channel".into(),
            format!("port:com.example.echo=unix:{}", app.path.display()),
        ],
    ));
    let r = gtk(
        &[
            "port-echo",
            "--uri",
            &relay.uri(),
            "--port-name",
            "com.example.echo",
            "--bytes",
            "67108864",
            "--timeout",
            "60",
        ],
        Duration::from_secs(90),
    );
    assert_eq!(r.code, 0, "gtk port-echo failed: {}\n{}", r.json, r.stderr);
    assert_eq!(r.field("port_opened_seen").as_deref(), Some("true"), "{}", r.json);
    assert_eq!(r.field("bytes_received").as_deref(), Some("67108864"), "{}", r.json);
    assert_eq!(r.field("sha256_sent"), r.field("sha256_received"));
    assert_eq!(app.bytes.load(std::sync::atomic::Ordering::Relaxed), 64 << 20, "echo app saw every byte");
    eprintln!("gtk port echo 64 MiB: {} MiB/s (Python client)", r.field("mib_per_s").unwrap_or_default());
    let line = relay.wait_log("close peer=", Duration::from_secs(10));
    assert!(line.contains("channel=port:com.example.echo") || !relay.lines("channel=port:com.example.echo").is_empty());
    assert_eq!(relay.stop(), Some(0), "SIGTERM exits 0");
}

/// Test 4: Password: the right one links; a wrong one gets link result 7 and
/// spice-gtk reports an auth error.
#[test]
fn gtk_password_right_and_wrong() {
    if !peers_available(&["gtk"]) {
        return;
    }
    let dir = TempDir::new("pw");
    let pw = dir.path("pw");
    std::fs::write(&pw, "s3cret\n").expect("write pw");
    let port = free_port();
    let relay = Relay::start(&relay_args(
        port,
        &["--password-file".into(), pw.display().to_string(), "--channel".into(), "port:com.example.0=echo:".into()],
    ));
    let ok = gtk(&["auth", "--uri", &relay.uri(), "--password", "s3cret"], Duration::from_secs(30));
    assert_eq!(ok.code, 0, "right password must link: {}", ok.json);
    let bad = gtk(&["auth", "--uri", &relay.uri(), "--password", "wrong"], Duration::from_secs(30));
    assert_eq!(bad.code, 3, "wrong password must be an auth error: {}", bad.json);
    assert_eq!(bad.field("result").as_deref(), Some("auth-error"), "{}", bad.json);
    let refused = relay.wait_log("result=refused", Duration::from_secs(5));
    assert!(refused.contains("code=7"), "{refused}");
    // And the port still works for the right password.
    let echo = gtk(
        &[
            "port-echo",
            "--uri",
            &relay.uri(),
            "--password",
            "s3cret",
            "--port-name",
            "com.example.0",
            "--bytes",
            "1000000",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(echo.code, 0, "{}", echo.json);
}

/// Test 5: Two services at once, each with its own spice-gtk client, both byte-exact.
#[test]
fn gtk_two_services_at_once() {
    if !peers_available(&["gtk"]) {
        return;
    }
    let dir = TempDir::new("two");
    let (a, b) = (EchoApp::start(dir.path("a.sock")), EchoApp::start(dir.path("b.sock")));
    let (pa, pb) = (free_port(), free_port());
    let cfg = dir.path("host.toml");
    std::fs::write(
        &cfg,
        format!(
            "[relay]\nworkers = 2\n\n[[service]]\nname = \"vm-a\"\nlisten = [\"127.0.0.1:{pa}\"]\ndisable-ticketing = true\n\
             channels = [\"port:com.example.a=unix:{}\"]\n\n[[service]]\nname = \"vm-b\"\nlisten = [\"127.0.0.1:{pb}\"]\n\
             disable-ticketing = true\nchannels = [\"port:com.example.b=unix:{}\"]\n",
            a.path.display(),
            b.path.display()
        ),
    )
    .expect("config");
    let relay = Relay::start(&["--config".to_string(), cfg.display().to_string()]);
    let (ua, ub) = (format!("spice://127.0.0.1:{pa}"), format!("spice://127.0.0.1:{pb}"));
    let ta = std::thread::spawn(move || {
        gtk(
            &["port-echo", "--uri", &ua, "--port-name", "com.example.a", "--bytes", "33554432", "--seed", "1"],
            Duration::from_secs(60),
        )
    });
    let tb = std::thread::spawn(move || {
        gtk(
            &["port-echo", "--uri", &ub, "--port-name", "com.example.b", "--bytes", "33554432", "--seed", "2"],
            Duration::from_secs(60),
        )
    });
    let (ra, rb) = (ta.join().expect("a"), tb.join().expect("b"));
    assert_eq!(ra.code, 0, "service a: {}", ra.json);
    assert_eq!(rb.code, 0, "service b: {}", rb.json);
    assert_ne!(ra.field("sha256_sent"), rb.field("sha256_sent"), "different streams");
    assert!(!relay.lines("service=vm-a channel=port:com.example.a").is_empty());
    assert!(!relay.lines("service=vm-b channel=port:com.example.b").is_empty());
}
