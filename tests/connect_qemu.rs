//! `vmcrelay connect` against QEMU's real spice-server, and against
//! `vmcrelay serve`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn qemu_qmp_port(port: u16, auth: &[String]) -> Qemu {
    let mut a: Vec<String> =
        vec!["-machine".into(), "none".into(), "-display".into(), "none".into(), "-nodefaults".into()];
    a.extend_from_slice(auth);
    a.push("-spice".into());
    let mut spice = format!("port={port},addr=127.0.0.1");
    if auth.is_empty() {
        spice.push_str(",disable-ticketing=on");
    } else {
        spice.push_str(",password-secret=sec0");
    }
    a.push(spice);
    a.extend(
        ["-chardev", "spiceport,id=qmp0,name=org.qemu.monitor.qmp.0", "-mon", "chardev=qmp0,mode=control"]
            .iter()
            .map(|s| s.to_string()),
    );
    Qemu::start(&a)
}

fn wait_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal QMP client over a unix socket: greeting, then commands.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn open(path: &Path) -> Qmp {
        let s = connect_unix(path, Duration::from_secs(20));
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut q = Qmp { r: BufReader::new(s.try_clone().expect("clone")), w: s };
        let greeting = q.line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting, got {greeting:?}");
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP line");
        l
    }

    /// Sends a command and returns its `return` line (events skipped).
    fn cmd(&mut self, c: &str) -> String {
        self.w.write_all(format!("{{\"execute\":\"{c}\"}}\r\n").as_bytes()).expect("send");
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "QMP closed waiting for {c}");
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    }
}

/// Test 1 (and 6): QMP over SPICE through `connect`'s unix socket; `--list`.
#[test]
fn qmp_over_spice_through_connect() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let _q = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let uri = format!("spice://127.0.0.1:{port}");
    // --list prints main's channels with port names.
    let out = Command::new(env!("CARGO_BIN_EXE_vmcrelay")).args(["connect", &uri, "--list"]).output().expect("--list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "--list failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("port") && text.contains("org.qemu.monitor.qmp.0"), "{text}");
    assert!(text.contains("inputs"), "{text}");

    let dir = TempDir::new("cqmp");
    let sock = dir.path("qmp.sock");
    // --lz4: spice-server then sends replies over 1000 bytes as LZ4 (type 102).
    let mut c = Connect::start(&[
        uri.clone(),
        "--lz4".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
    assert!(q.cmd("query-version").contains("\"qemu\""));
    assert!(q.cmd("query-status").contains("\"status\""));
    // A reply of several KB, compressed by spice-server on the way.
    let cmds = q.cmd("query-commands");
    assert!(cmds.len() > 2000 && cmds.contains("query-status"), "query-commands reply of {} bytes", cmds.len());
    // The QMP round trip through connect, for the record (not asserted).
    let t = Instant::now();
    for _ in 0..50 {
        q.cmd("query-status");
    }
    eprintln!("QMP query-status through connect: {:?} mean", t.elapsed() / 50);
    // A second local app after the first leaves gets a fresh QMP session.
    drop(q);
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
    assert!(c.wait_exit(Duration::from_millis(10)).is_none(), "connect keeps running:\n{}", c.log_text());
}

/// Test 2: with password-secret: right password works; wrong exits non-zero naming the cause.
#[test]
fn connect_password_right_and_wrong() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let _q = qemu_qmp_port(port, &["-object".into(), "secret,id=sec0,data=s3cret".into()]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("cpw");
    let (good, bad) = (dir.path("good"), dir.path("bad"));
    std::fs::write(&good, "s3cret\n").expect("pw");
    std::fs::write(&bad, "nope\n").expect("pw");
    let uri = format!("spice://127.0.0.1:{port}");
    let sock = dir.path("qmp.sock");
    let mut wrong = Connect::start(&[
        uri.clone(),
        "--password-file".into(),
        bad.display().to_string(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", dir.path("x.sock").display()),
    ]);
    let code = wrong.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(4), "wrong password exits 4:\n{}", wrong.log_text());
    assert!(wrong.log_text().contains("refused the password"), "{}", wrong.log_text());
    let _right = Connect::start(&[
        uri,
        "--password-file".into(),
        good.display().to_string(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
}

/// Test 3: two usbredir channels: QEMU's 80-byte usbredir hello arrives on each local socket.
#[test]
fn usbredir_hellos_reach_local_sockets() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let mut a: Vec<String> = [
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
        "spicevmc,name=usbredir,id=ur0",
        "-device",
        "usb-redir,chardev=ur0,id=r0",
        "-chardev",
        "spicevmc,name=usbredir,id=ur1",
        "-device",
        "usb-redir,chardev=ur1,id=r1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(
        ["-chardev", "spiceport,id=qmp0,name=org.qemu.monitor.qmp.0", "-mon", "chardev=qmp0,mode=control"]
            .map(String::from),
    );
    a.push("-spice".into());
    a.push(format!("port={port},addr=127.0.0.1,disable-ticketing=on"));
    let _q = Qemu::start(&a);
    wait_port(port, Duration::from_secs(30));
    // Test 6: --list prints the main, port and usbredir channels.
    let out = Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
        .args(["connect", &format!("spice://127.0.0.1:{port}"), "--list"])
        .output()
        .expect("--list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "--list: {text} {}", String::from_utf8_lossy(&out.stderr));
    for want in ["main", "usbredir     0", "usbredir     1", "org.qemu.monitor.qmp.0"] {
        assert!(text.contains(want), "--list lacks {want:?}:\n{text}");
    }
    let dir = TempDir::new("cusb");
    let (s0, s1) = (dir.path("ur0.sock"), dir.path("ur1.sock"));
    // --eager: linked at session start; QEMU's hello waits in the relay for the app.
    let _c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--eager".into(),
        "--channel".into(),
        format!("usbredir:0=unix-listen:{}", s0.display()),
        "--channel".into(),
        format!("usbredir:1=unix-listen:{}", s1.display()),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    for s in [&s0, &s1] {
        let mut u = connect_unix(s, Duration::from_secs(20));
        u.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut hello = [0u8; 80];
        u.read_exact(&mut hello).expect("usbredir hello");
        assert_eq!(&hello[0..4], &0u32.to_le_bytes(), "usbredir hello type 0");
        assert_eq!(&hello[4..8], &68u32.to_le_bytes(), "hello length 68");
        let version = String::from_utf8_lossy(&hello[12..76]);
        assert!(version.starts_with("qemu usb-redir guest"), "{version}");
    }
}

/// Test 4: kill and restart QEMU on the same port: connect reconnects by itself.
#[test]
fn reconnects_after_qemu_restart() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let mut q1 = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("crestart");
    let sock = dir.path("qmp.sock");
    let mut c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--max-backoff-secs".into(),
        "1".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
    q1.kill();
    // The local app sees a closed connection, never a missing path.
    let mut rest = String::new();
    let _ = q.r.read_to_string(&mut rest);
    assert!(sock.exists(), "the local socket stays");
    let _q2 = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
    assert!(q.cmd("query-status").contains("\"status\""));
    assert!(c.log_text().contains("attempt=2") || c.log_text().contains("reconnecting"), "{}", c.log_text());
    assert!(c.wait_exit(Duration::from_millis(10)).is_none());
}

/// Test 5: connect ↔ serve on channel 128: 256 MiB each way at once, byte-exact.
#[test]
fn connect_to_serve_user_channel_both_ways() {
    let dir = TempDir::new("c128");
    let far = dir.path("far.sock");
    let near = dir.path("near.sock");
    // serve: channel 128 ends in unix-listen far.sock (an app connects there)
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--disable-ticketing".into(),
        "--channel".into(),
        format!("128=unix-listen:{}", far.display()),
    ]);
    let _c = Connect::start(&[relay.uri(), "--channel".into(), format!("128=unix-listen:{}", near.display())]);
    let a = connect_unix(&near, Duration::from_secs(20));
    let b = connect_unix(&far, Duration::from_secs(20));
    const TOTAL: usize = 256 << 20;
    let pump = |mut w: UnixStream, seed: u64| {
        std::thread::spawn(move || {
            let chunk = 1 << 20;
            for k in 0..TOTAL / chunk {
                w.write_all(&pattern(seed + k as u64, chunk)).expect("write");
            }
        })
    };
    let check = |mut r: UnixStream, seed: u64| {
        std::thread::spawn(move || {
            r.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            let chunk = 1 << 20;
            let mut buf = vec![0u8; chunk];
            for k in 0..TOTAL / chunk {
                r.read_exact(&mut buf).expect("read");
                assert!(buf == pattern(seed + k as u64, chunk), "mismatch in MiB {k}");
            }
        })
    };
    let t = Instant::now();
    let w1 = pump(a.try_clone().expect("clone"), 1000);
    let w2 = pump(b.try_clone().expect("clone"), 2000);
    let r1 = check(b, 1000);
    let r2 = check(a, 2000);
    for h in [w1, w2, r1, r2] {
        h.join().expect("byte-exact both ways");
    }
    eprintln!("256 MiB each way through connect+serve: {:?}", t.elapsed());
}

/// Waits until the log of `c` has `needle`, or panics with the log.
fn wait_connect_log(c: &Connect, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !c.log_text().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in the connect log:\n{}", c.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_alive(q: &mut Qemu, what: &str) {
    assert!(q.child.try_wait().expect("try_wait").is_none(), "QEMU died: {what}");
}

/// Issue 8.1: one-shot QMP clients that write and leave at once never
/// crash QEMU (spice-server 0.15.1 does when a channel closes with input
/// unread); clients that wait get their replies; five times each.
#[test]
fn one_shot_qmp_clients_never_crash_qemu() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let mut q = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("coneshot");
    let sock = dir.path("qmp.sock");
    let c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    let both = b"{\"execute\":\"qmp_capabilities\"}\r\n{\"execute\":\"query-status\"}\r\n";
    for round in 0..5 {
        // Like `printf ... | socat -t0 - UNIX-CONNECT:...`: write both commands, leave at once.
        let mut s = connect_unix(&sock, Duration::from_secs(20));
        s.write_all(both).expect("write");
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
        assert_alive(&mut q, &format!("after write-and-leave client {round}\n{}", c.log_text()));
        // A client that half-closes and waits gets the greeting and both replies.
        let mut s = connect_unix(&sock, Duration::from_secs(20));
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        s.write_all(both).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut r = BufReader::new(s);
        let mut got = Vec::new();
        while got.iter().filter(|l: &&String| l.contains("\"return\"")).count() < 2 {
            let mut l = String::new();
            let n = r.read_line(&mut l).expect("reply line");
            assert!(n > 0, "round {round}: replies ended early: {got:?}\n{}", c.log_text());
            got.push(l);
        }
        assert!(got[0].contains("\"QMP\""), "round {round}: a fresh greeting first: {got:?}");
        assert!(got.iter().any(|l| l.contains("\"status\"")), "round {round}: {got:?}");
        drop(r);
        assert_alive(&mut q, &format!("after waiting client {round}\n{}", c.log_text()));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_alive(&mut q, "after the last linger");
    let log = c.log_text();
    assert!(log.contains("closing once the server is quiet"), "{log}");
    assert!(log.contains("server quiet for"), "channels close after the quiet time:\n{log}");
}

/// Issue 8.2: QEMU down, an app writes `stop` and leaves; after QEMU is
/// back and connect relinked, the new QEMU still runs.
#[test]
fn bytes_of_a_departed_app_never_reach_the_next_qemu() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let mut q1 = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("cstale");
    let sock = dir.path("qmp.sock");
    let c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--max-backoff-secs".into(),
        "1".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
    ]);
    wait_connect_log(&c, "server ports:", Duration::from_secs(20));
    q1.kill();
    wait_connect_log(&c, "session ended", Duration::from_secs(20));
    let mut s = connect_unix(&sock, Duration::from_secs(20));
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\r\n{\"execute\":\"stop\"}\r\n").expect("write");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    let mut q2 = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.log_text().matches("server ports:").count() < 2 {
        assert!(Instant::now() < deadline, "no second session:\n{}", c.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut q = Qmp::open(&sock);
    assert_eq!(q.cmd("qmp_capabilities").trim(), "{\"return\": {}}");
    let st = q.cmd("query-status");
    assert!(st.contains("\"running\": true"), "the stale `stop` reached the new QEMU: {st}\n{}", c.log_text());
    assert_alive(&mut q2, "after relink");
    assert!(c.log_text().contains("its bytes are discarded"), "{}", c.log_text());
}

/// Issue 8.5: a missing local `unix:` end makes no SPICE links and one
/// warning; once it exists the channel links and carries bytes.
#[test]
fn missing_local_endpoint_backs_off() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let _q = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("cmissing");
    let sock = dir.path("app.sock");
    let c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--max-backoff-secs".into(),
        "2".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix:{}", sock.display()),
    ]);
    std::thread::sleep(Duration::from_secs(5));
    let log = c.log_text();
    let links = log.matches("link server=").count();
    assert!(links <= 3, "{links} SPICE links in 5 s with the local end missing:\n{log}");
    let warns = log.lines().filter(|l| l.contains(" WARN ") && l.contains("unavailable")).count();
    assert_eq!(warns, 1, "one warning per change of state:\n{log}");
    assert!(log.lines().count() < 20, "log lines in 5 s: {}\n{log}", log.lines().count());
    // The app appears: the channel links within the backoff and QEMU greets it.
    let l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let (s, _) = l.accept().expect("accept within the backoff");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    r.read_line(&mut greeting).expect("greeting");
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    wait_connect_log(&c, "is back", Duration::from_secs(5));
}

/// Issue 8.6: a misspelt port name is reported with the names the server
/// has, and a local app of that channel is closed instead of swallowed.
#[test]
fn misspelt_port_name_is_reported() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let _q = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("cmisspelt");
    let sock = dir.path("qmp.sock");
    let c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--channel".into(),
        format!("port:org.qemu.monitor.qpm.0=unix-listen:{}", sock.display()),
    ]);
    wait_connect_log(&c, "has no port named org.qemu.monitor.qpm.0", Duration::from_secs(20));
    assert!(c.log_text().contains("org.qemu.monitor.qmp.0 (port:0)"), "{}", c.log_text());
    let mut s = connect_unix(&sock, Duration::from_secs(20));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).expect("closed, not stuck"), 0, "the app is told at once");
}

/// Issue 8.10: the stats line comes also when nothing moves, and in
/// `connect` it counts the links made.
#[test]
fn stats_line_counts_connect_links_even_when_idle() {
    if !peers_available(&["qemu-system-x86_64"]) {
        return;
    }
    let port = free_port();
    let _q = qemu_qmp_port(port, &[]);
    wait_port(port, Duration::from_secs(20));
    let dir = TempDir::new("cstats");
    let c = Connect::start(&[
        format!("spice://127.0.0.1:{port}"),
        "--stats-secs".into(),
        "1".into(),
        "--channel".into(),
        format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", dir.path("qmp.sock").display()),
    ]);
    wait_connect_log(&c, "server ports:", Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(2500));
    let log = c.log_text();
    let stats: Vec<&str> = log.lines().filter(|l| l.contains(" stats ")).collect();
    assert!(stats.len() >= 2, "a stats line per second while idle:\n{log}");
    let last = stats.last().expect("stats");
    let links: u64 =
        last.split_whitespace().find_map(|f| f.strip_prefix("links_ok=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(links >= 2, "main and the port probe were linked: {last}");
}
