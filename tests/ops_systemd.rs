//! `serve` under systemd, without systemd as PID 1: socket activation
//! through `systemd-socket-activate` (the sockets systemd would pass),
//! sd_notify READY=1 / WATCHDOG=1 / STOPPING=1 to a datagram socket the
//! test binds, and the units in dist/systemd checked by `systemd-analyze
//! verify`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_vmcrelay");

/// A child whose stderr lines are collected; killed on drop.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
        let err = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                log2.lock().expect("log").push(line);
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().expect("log").iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "log never showed {needle:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn term(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits for the exit code (None: killed after the deadline).
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next datagram, or None after `timeout`.
fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let mut b = [0u8; 4096];
    let n = sock.recv(&mut b).ok()?;
    Some(String::from_utf8_lossy(&b[..n]).into_owned())
}

/// Datagrams until one contains `want`; returns them all.
fn recv_until(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !got.iter().any(|m: &String| m.lines().any(|l| l == want)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {want} within {timeout:?}; got {got:?}");
        if let Some(m) = recv(sock, left) {
            got.push(m);
        }
    }
    got
}

/// Connects to 127.0.0.1:`port` until something listens there.
fn wait_listening(port: u16, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "systemd-socket-activate never listened:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vmcrelay connect URI --list` (vmcrelay's own SPICE client): stdout.
fn list(uri: &str) -> String {
    let out = Command::new(BIN)
        .args(["connect", uri, "--list", "--timeout-secs", "10"])
        .stdin(Stdio::null())
        .output()
        .expect("run connect --list");
    assert!(out.status.success(), "connect --list failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Through the socket `systemd-socket-activate` opened and passed (fd 3,
/// LISTEN_FDNAMES=vm1): the service named vm1 serves on it with no
/// --listen, a SPICE client links through it twice (two sessions), and
/// READY=1 then STOPPING=1 reach an abstract NOTIFY_SOCKET.
#[test]
fn socket_activation_serves_on_the_inherited_socket() {
    if !peers_available(&["systemd-socket-activate"]) {
        return;
    }
    let port = free_port();
    let name = format!("vmcrelay-test-notify-{}-{port}", std::process::id());
    let notify = {
        use std::os::linux::net::SocketAddrExt as _;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        UnixDatagram::bind_addr(&a).expect("bind notify socket")
    };
    let mut p = Proc::spawn(Command::new("systemd-socket-activate").args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=vm1",
        "-E",
        &format!("NOTIFY_SOCKET=@{name}"),
        BIN,
        "serve",
        "--name",
        "vm1",
        "--disable-ticketing",
        "--workers",
        "2",
        "--channel",
        "port:org.vmcrelay.test.0=echo:",
    ]));
    // systemd-socket-activate execs vmcrelay on the first connection: a
    // probe once it listens (vmcrelay closes the probe, which never links).
    wait_listening(port, &p);
    let uri = format!("spice://127.0.0.1:{port}");
    let first = list(&uri);
    assert!(first.contains("org.vmcrelay.test.0"), "the port channel through the activated socket:\n{first}");
    let second = list(&uri);
    assert!(second.contains("org.vmcrelay.test.0"), "a second session:\n{second}");
    let l = p.wait_log("from=systemd", Duration::from_secs(10));
    assert!(l.contains("service=vm1") && l.contains("fd=3") && l.contains("fdname=vm1"), "{l}");
    p.wait_log(&format!("service name=vm1 listen=127.0.0.1:{port}"), Duration::from_secs(5));
    // `connect --list` returns once it has read the port's name; the
    // relay's link line for that channel may still be on its way.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while p.lines_with("result=ok").len() < 4 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.lines_with("result=ok").len(), 4, "main + port, twice:\n{}", p.log());
    recv_until(&notify, "READY=1", Duration::from_secs(10));
    p.term();
    recv_until(&notify, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0), "exit after SIGTERM:\n{}", p.log());
}

impl Proc {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log.lock().expect("log").iter().filter(|l| l.contains(needle)).cloned().collect()
    }
}

/// With two services, a socket whose FileDescriptorName= names neither is
/// a start-up failure (exit 3) that says what to set.
#[test]
fn an_inherited_socket_naming_no_service_exits_3() {
    if !peers_available(&["systemd-socket-activate"]) {
        return;
    }
    let dir = TempDir::new("sa-names");
    let cfg = dir.path("two.toml");
    let spare = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[relay]\nworkers = 1\n\
             [[service]]\nname = \"vm1\"\ndisable-ticketing = true\nchannels = [\"128=echo:\"]\n\
             [[service]]\nname = \"vm2\"\nlisten = [\"127.0.0.1:{spare}\"]\ndisable-ticketing = true\nchannels = [\"128=echo:\"]\n"
        ),
    )
    .expect("config");
    let port = free_port();
    let mut p = Proc::spawn(Command::new("systemd-socket-activate").args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=vm3",
        BIN,
        "serve",
        "--config",
        cfg.to_str().expect("utf-8"),
    ]));
    // The first connection makes systemd-socket-activate exec vmcrelay.
    wait_listening(port, &p);
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(3), "{}", p.log());
    let log = p.log();
    assert!(
        log.contains("named \"vm3\", which is no service")
            && log.contains("FileDescriptorName=")
            && log.contains("vm1, vm2"),
        "{log}"
    );
}

/// READY=1 once the listeners are up (a client can link right after it),
/// WATCHDOG=1 every half WATCHDOG_USEC while the workers tick, STOPPING=1
/// when SIGTERM starts the drain; to a NOTIFY_SOCKET path.
#[test]
fn notify_ready_watchdog_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.path("notify.sock");
    let notify = UnixDatagram::bind(&path).expect("bind notify socket");
    let port = free_port();
    let mut p = Proc::spawn(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--disable-ticketing", "--workers", "2"])
            .args(["--channel", "port:org.vmcrelay.test.0=echo:"])
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "600000"),
    );
    let got = recv_until(&notify, "READY=1", Duration::from_secs(20));
    assert!(got.iter().any(|m| m.contains("STATUS=serving 1 service(s) on 2 worker(s)")), "{got:?}");
    // Listening by now: no retry needed.
    let out = list(&format!("spice://127.0.0.1:{port}"));
    assert!(out.contains("org.vmcrelay.test.0"), "{out}");
    // Pings every 300 ms: at least 4 within 3 s.
    let t = Instant::now();
    let mut pings = 0;
    while t.elapsed() < Duration::from_secs(3) {
        if recv(&notify, Duration::from_millis(500)).is_some_and(|m| m == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} WATCHDOG=1 in 3 s with WATCHDOG_USEC=600000; log:\n{}", p.log());
    p.wait_log("watchdog interval_ms=600 ping_ms=300", Duration::from_secs(1));
    p.term();
    let got = recv_until(&notify, "STOPPING=1", Duration::from_secs(10));
    assert!(!got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0), "{}", p.log());
    let draining = p.log.lock().expect("log").iter().position(|l| l.contains("received: draining"));
    assert!(draining.is_some(), "{}", p.log());
}

/// The units in dist/systemd pass `systemd-analyze verify` (directive
/// names and values; the binary path pointed at the one under test).
#[test]
fn units_pass_systemd_analyze_verify() {
    if !peers_available(&["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("units");
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let mut units = Vec::new();
    for name in ["vmcrelay.socket", "vmcrelay.service", "vmcrelay@.service"] {
        let text = std::fs::read_to_string(src.join(name)).expect("unit");
        assert!(text.contains("/usr/local/bin/vmcrelay") || name.ends_with(".socket"), "{name}");
        let text = text.replace("/usr/local/bin/vmcrelay", BIN);
        let to = dir.path(name);
        std::fs::write(&to, text).expect("write unit");
        units.push(to);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
    for name in ["vmcrelay.service", "vmcrelay@.service"] {
        let t = std::fs::read_to_string(src.join(name)).expect("unit");
        for d in ["Type=notify", "WatchdogSec=", "ProtectSystem=strict", "NoNewPrivileges=yes", "RuntimeDirectory="] {
            assert!(t.contains(d), "{name} has {d}");
        }
    }
}
