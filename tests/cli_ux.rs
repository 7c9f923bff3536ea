//! What a user sees from the command line: exit codes, error messages,
//! unix-listen socket permissions and clean-up, and the help text. Real
//! sockets and the real binary throughout; every wait has a deadline.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vmcrelay::relay::sync_client::Session;

/// One finished `vmcrelay` run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `vmcrelay ARGS` to its end; killed (and `code` None) after `timeout`.
fn vmcrelay(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Run {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmcrelay");
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    Run { code, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), took }
}

/// A TCP server on 127.0.0.1 that accepts, sends `greeting` and then keeps
/// every connection open in silence until dropped.
struct FakeServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl FakeServer {
    fn start(greeting: &'static [u8]) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(greeting);
                        held.push(c);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeServer { port, stop }
    }

    fn uri(&self) -> String {
        format!("spice://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_args(port: u16, channel: &str) -> Vec<String> {
    ["--listen", &format!("127.0.0.1:{port}"), "--disable-ticketing", "--channel", channel]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// item 3: a held port

#[test]
fn second_serve_on_a_port_another_vmcrelay_holds_exits_3() {
    let port = free_port();
    let first = Relay::start(&serve_args(port, "128=echo:"));
    let listen = format!("127.0.0.1:{port}");
    let r = vmcrelay(
        &["serve", "--listen", &listen, "--disable-ticketing", "--channel", "128=echo:"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(3), "second serve must fail at start-up: {r:?}");
    assert!(r.stderr.contains("address in use"), "{}", r.stderr);
    assert!(r.stderr.contains(&listen), "the message names the address: {}", r.stderr);
    assert!(r.took < Duration::from_secs(5), "took {:?}", r.took);
    // Same port on the wildcard address: still refused.
    let r = vmcrelay(
        &["serve", "--listen", &format!("0.0.0.0:{port}"), "--disable-ticketing", "--channel", "128=echo:"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(r.stderr.contains("address in use"), "{}", r.stderr);
    // The first one is unharmed: it accepts and serves every new session
    // (with SO_REUSEPORT shared, some would have gone to the second).
    for _ in 0..4 {
        let s = Session::connect(&first.addr(), b"", Duration::from_secs(10)).expect("first still serves");
        assert!(s.channels.contains(&(128, 0)), "{:?}", s.channels);
        s.close();
    }
    assert_eq!(first.stop(), Some(0));
}

#[test]
fn serve_on_a_port_another_process_holds_exits_3() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let r = vmcrelay(
        &["serve", "--listen", &format!("127.0.0.1:{port}"), "--disable-ticketing", "--channel", "128=echo:"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(3), "{r:?}");
    assert!(r.stderr.contains("address in use"), "{}", r.stderr);
}

#[test]
fn serve_restarts_on_its_port_after_a_session() {
    // TIME_WAIT connections left by a previous run must not count as "in use".
    let port = free_port();
    let first = Relay::start(&serve_args(port, "128=echo:"));
    let s = Session::connect(&first.addr(), b"", Duration::from_secs(10)).expect("session");
    s.close();
    assert_eq!(first.stop(), Some(0));
    let again = Relay::start(&serve_args(port, "128=echo:"));
    assert_eq!(again.stop(), Some(0));
}

// ---------------------------------------------------------------------------
// item 7: messages and exit codes

#[test]
fn list_against_a_silent_port_says_no_answer() {
    let srv = FakeServer::start(b"");
    let r = vmcrelay(&["connect", &srv.uri(), "--list", "--timeout-secs", "2"], &[], Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{r:?}");
    let want = format!("no answer from 127.0.0.1:{} within 2 s: not a SPICE server, or it is stuck", srv.port);
    assert!(r.stderr.contains(&want), "{}", r.stderr);
    assert!(!r.stderr.contains("os error 11"), "{}", r.stderr);
    assert!(r.took >= Duration::from_secs(2) && r.took < Duration::from_secs(8), "took {:?}", r.took);
}

#[test]
fn list_against_an_ssh_server_says_not_spice() {
    let srv = FakeServer::start(b"SSH-2.0-OpenSSH_9.2\r\n");
    let r = vmcrelay(&["connect", &srv.uri(), "--list", "--timeout-secs", "5"], &[], Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not a SPICE server: it sent `SSH-`"), "{}", r.stderr);
    assert!(!r.stderr.contains("bad magic"), "{}", r.stderr);
}

#[test]
fn list_against_binary_garbage_shows_hex() {
    let srv = FakeServer::start(b"\x16\x03\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00");
    let r = vmcrelay(&["connect", &srv.uri(), "--list", "--timeout-secs", "5"], &[], Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("not a SPICE server: it sent bytes 16 03 01 00 (hex)"), "{}", r.stderr);
}

#[test]
fn list_against_a_closed_port_says_cannot_connect() {
    let port = free_port();
    let r = vmcrelay(&["connect", &format!("spice://127.0.0.1:{port}"), "--list"], &[], Duration::from_secs(20));
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains(&format!("cannot connect to 127.0.0.1:{port}")), "{}", r.stderr);
}

#[test]
fn a_bad_uri_is_a_server_address_mistake_exit_2_in_every_mode() {
    let dir = TempDir::new("cli-uri");
    let sock = dir.path("x.sock");
    let channel = format!("128=unix-listen:{}", sock.display());
    for args in [
        vec!["connect", "spice://nohost:notaport", "--list"],
        vec!["connect", "spice://nohost:notaport", "--channel", &channel],
    ] {
        let r = vmcrelay(&args, &[], Duration::from_secs(10));
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert!(r.stderr.contains("server address `nohost:notaport`"), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("listen address"), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("spice://HOST:PORT"), "says what to write: {}", r.stderr);
    }
    assert!(!sock.exists(), "nothing is created for a bad configuration");
    // Not a URI at all.
    let r = vmcrelay(&["connect", "127.0.0.1:5930", "--list"], &[], Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("write spice://HOST:PORT"), "{}", r.stderr);
}

#[test]
fn configuration_mistakes_exit_2_with_and_without_list() {
    let srv = FakeServer::start(b"");
    let uri = srv.uri();
    let cases: [(&[&str], &str); 3] = [
        (&["--channel", "bogus=echo:"], "unknown channel kind `bogus`"),
        (
            &["--channel", "128=unix-listen:/tmp/x", "--password-file", "/nonexistent/vmcrelay.pass"],
            "cannot read password file",
        ),
        (&["--channel", "128=unix-listen:/tmp/x", "--password-env", "VMCRELAY_TEST_UNSET_VAR"], "is not set"),
    ];
    for (extra, want) in cases {
        for list in [true, false] {
            let mut args = vec!["connect", uri.as_str()];
            if list {
                args.push("--list");
            }
            args.extend_from_slice(extra);
            let r = vmcrelay(&args, &[], Duration::from_secs(10));
            assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
            assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
            assert!(r.took < Duration::from_secs(2), "no network wait for a configuration error: {:?}", r.took);
        }
    }
}

#[test]
fn list_with_a_wrong_password_exits_4() {
    let dir = TempDir::new("cli-pass");
    let good = dir.path("good.pass");
    let bad = dir.path("bad.pass");
    std::fs::write(&good, "s3cret\n").expect("write");
    std::fs::write(&bad, "wrong\n").expect("write");
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--password-file".into(),
        good.display().to_string(),
        "--channel".into(),
        "128=echo:".into(),
    ]);
    let uri = relay.uri();
    let r = vmcrelay(
        &["connect", &uri, "--list", "--password-file", &bad.display().to_string()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(4), "{r:?}");
    assert!(r.stderr.contains("refused the password"), "{}", r.stderr);
    let r = vmcrelay(
        &["connect", &uri, "--list", "--password-file", &good.display().to_string()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("128"), "{}", r.stdout);
}

// ---------------------------------------------------------------------------
// item 8: unix-listen sockets

fn mode_of(p: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn serve_creates_the_socket_directory_sets_the_mode_and_removes_the_socket() {
    let dir = TempDir::new("cli-sock");
    let sub = dir.path("run/vm1");
    let sock = sub.join("app.sock");
    let port = free_port();
    let mut args = serve_args(port, &format!("128=unix-listen:{}", sock.display()));
    args.extend(["--socket-mode".into(), "0640".into()]);
    let gid = std::fs::metadata(&dir.0).expect("stat").gid();
    args.extend(["--socket-group".into(), gid.to_string()]);
    let relay = Relay::start(&args);
    relay.wait_log("created directory", Duration::from_secs(5));
    assert!(sub.is_dir(), "the missing directory is created");
    assert_eq!(mode_of(&sub), 0o755);
    assert_eq!(mode_of(&dir.path("run")), 0o755);
    assert_eq!(mode_of(&sock), 0o640, "--socket-mode applies");
    assert_eq!(std::fs::symlink_metadata(&sock).expect("stat").gid(), gid);
    // It works: a local app connects.
    let _app = connect_unix(&sock, Duration::from_secs(5));
    assert_eq!(relay.stop(), Some(0));
    assert!(!sock.exists(), "the socket is removed on exit");
    assert!(sub.is_dir(), "the directory stays");
}

#[test]
fn serve_default_socket_mode_is_0660_and_config_file_sets_it() {
    let dir = TempDir::new("cli-sock-toml");
    let a = dir.path("a.sock");
    let b = dir.path("b.sock");
    let relay = Relay::start(&serve_args(free_port(), &format!("128=unix-listen:{}", a.display())));
    assert_eq!(mode_of(&a), 0o660, "documented default");
    assert_eq!(relay.stop(), Some(0));
    assert!(!a.exists());
    let port = free_port();
    let toml = dir.path("host.toml");
    std::fs::write(
        &toml,
        format!(
            "[relay]\nworkers = 1\nsocket-mode = \"0600\"\n\n[[service]]\nlisten = [\"127.0.0.1:{port}\"]\n\
             disable-ticketing = true\nchannels = [\"128=unix-listen:{}\"]\n",
            b.display()
        ),
    )
    .expect("write");
    let relay = Relay::start(&["--config".into(), toml.display().to_string()]);
    assert_eq!(mode_of(&b), 0o600);
    assert_eq!(relay.stop(), Some(0));
    assert!(!b.exists());
    // A mistake in the file names its line.
    std::fs::write(&toml, "[relay]\nsocket-group = \"no-such-group-vmcrelay\"\n").expect("write");
    let r = vmcrelay(&["serve", "--config", &toml.display().to_string()], &[], Duration::from_secs(10));
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("host.toml:2: socket group `no-such-group-vmcrelay`: no such group"), "{}", r.stderr);
    let r = vmcrelay(
        &["serve", "--listen", "127.0.0.1:1", "--disable-ticketing", "--channel", "128=echo:", "--socket-mode", "0999"],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("octal"), "{}", r.stderr);
}

#[test]
fn serve_leaves_a_socket_file_that_is_no_longer_its_own() {
    let dir = TempDir::new("cli-sock-replaced");
    let sock = dir.path("app.sock");
    let relay = Relay::start(&serve_args(free_port(), &format!("128=unix-listen:{}", sock.display())));
    // Someone else takes the path over while the relay runs.
    std::fs::remove_file(&sock).expect("rm");
    let _theirs = UnixListener::bind(&sock).expect("bind theirs");
    assert_eq!(relay.stop(), Some(0));
    assert!(sock.exists(), "a socket vmcrelay did not create is not removed");
}

#[test]
fn connect_creates_the_socket_directory_sets_the_mode_and_removes_the_socket() {
    let dir = TempDir::new("cli-sock-connect");
    let sock = dir.path("me/deeper/qmp.sock");
    // No server: connect keeps retrying, its local socket is up meanwhile.
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmcrelay"))
        .args([
            "connect",
            &format!("spice://127.0.0.1:{port}"),
            "--channel",
            &format!("port:org.qemu.monitor.qmp.0=unix-listen:{}", sock.display()),
            "--socket-mode",
            "0640",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut err = child.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    wait_path(&sock, Duration::from_secs(10));
    // The mode is set right after bind; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while mode_of(&sock) != 0o640 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode_of(&sock), 0o640);
    assert_eq!(mode_of(&dir.path("me")), 0o755);
    assert_eq!(mode_of(&dir.path("me/deeper")), 0o755);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log.join().unwrap_or_default();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("created directory"), "{log}");
    assert!(!sock.exists(), "the socket is removed on exit: {log}");
}

// ---------------------------------------------------------------------------
// item 9: help text

/// The lines of the help's EXAMPLES section.
fn examples(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "EXAMPLES")
        .skip(1)
        .take_while(|l| !l.starts_with("Logs go") && !l.starts_with("Exit codes"))
        .map(str::to_string)
        .collect()
}

#[test]
fn help_examples_are_printed_as_written() {
    for (cmd, line) in [
        ("serve", "  vmcrelay serve --listen 127.0.0.1:5930 --disable-ticketing \\"),
        ("connect", "      --channel port:org.qemu.monitor.qmp.0=unix-listen:/run/me/qmp.sock"),
    ] {
        for columns in ["80", "40", "200"] {
            let r = vmcrelay(&[cmd, "--help"], &[("COLUMNS", columns)], Duration::from_secs(10));
            assert_eq!(r.code, Some(0), "{r:?}");
            let ex = examples(&r.stdout);
            assert!(ex.len() >= 5, "{cmd} has examples: {}", r.stdout);
            assert!(ex.iter().any(|l| l == line), "{cmd} COLUMNS={columns}: {line:?} missing:\n{}", ex.join("\n"));
            // Every command line fits 80 columns; a continued line is
            // followed by an indented option, never by a broken word.
            for (i, l) in ex.iter().enumerate() {
                assert!(l.chars().count() <= 80, "{cmd}: too long: {l:?}");
                if l.ends_with('\\') {
                    let next = ex.get(i + 1).map_or("", String::as_str);
                    assert!(next.starts_with("      --"), "{cmd}: after {l:?} comes {next:?}");
                }
                if l.trim_start().starts_with("vmcrelay ") || l.trim_start().starts_with("--") {
                    assert!(l.starts_with("  "), "{cmd}: {l:?} starts at the margin");
                }
            }
        }
    }
}

#[test]
fn help_shows_defaults_and_socket_options() {
    let r = vmcrelay(&["serve", "--help"], &[("COLUMNS", "200")], Duration::from_secs(10));
    let l = vmcrelay::relay::config::Limits::default();
    assert!(r.stdout.contains(&format!("[default: {}]", l.max_conns_per_worker)), "{}", r.stdout);
    let bytes = l.buffer_bytes.to_string();
    let with_commas = format!("{},{}", &bytes[..bytes.len() - 3], &bytes[bytes.len() - 3..]);
    assert!(r.stdout.contains(&format!("[default: {with_commas} bytes")), "{}", r.stdout);
    for opt in ["--socket-mode", "--socket-owner", "--socket-group"] {
        assert!(r.stdout.contains(opt), "serve {opt}");
    }
    assert!(r.stdout.contains("[default: 0660"), "{}", r.stdout);
    let r = vmcrelay(&["connect", "--help"], &[("COLUMNS", "200")], Duration::from_secs(10));
    assert!(r.stdout.contains("--socket-mode"), "{}", r.stdout);
    assert!(r.stdout.contains("4 the server"), "exit codes listed: {}", r.stdout);
}

#[test]
fn buffer_error_names_flags_that_exist() {
    let e = vmcrelay::uring::RingError::Register { count: 2, size: 4096, err: std::io::Error::from_raw_os_error(12) };
    let m = e.to_string();
    assert!(!m.contains("--max-channels"), "{m}");
    assert!(m.contains("--max-conns") && m.contains("--buffer-kib"), "{m}");
    let r = vmcrelay(&["serve", "--help"], &[], Duration::from_secs(10));
    assert!(r.stdout.contains("--max-conns") && r.stdout.contains("--buffer-kib"));
}
