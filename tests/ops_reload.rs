//! SIGHUP reload of `serve --config FILE`, on the real binary: while a
//! session moves data on a channel, the file gains a channel and a service,
//! loses a channel and changes an endpoint; new sessions see the new
//! configuration (lists compared, bytes echoed), the linked channel keeps
//! echoing; a file with a syntax error is refused with FILE:LINE and the
//! running configuration keeps serving.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vmcrelay::relay::sync_client::{Channel, Session};

const T: Duration = Duration::from_secs(10);

fn hup(relay: &Relay) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("kill -HUP");
}

/// Sends SIGHUP and waits for the `n`th line containing `needle`.
fn hup_and_wait(relay: &Relay, needle: &str, n: usize) -> String {
    hup(relay);
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = relay.lines(needle).get(n - 1) {
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no {needle:?} #{n} after SIGHUP; log:\n{}", relay.lines("").join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes the file in one step (rename), as an editor or config manager does.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// Echoes `total` bytes through a linked channel and checks them.
fn echo(ch: &mut Channel, seed: u64, total: usize) {
    let data = pattern(seed, total);
    for chunk in data.chunks(16 * 1024) {
        ch.writer.send(chunk).expect("send");
    }
    let mut got = vec![0u8; total];
    let mut have = 0;
    while have < total {
        let n = ch.reader.read(&mut got[have..]).expect("read");
        assert!(n > 0, "EOF after {have} of {total} bytes");
        have += n;
    }
    assert!(got == data, "echo differs");
}

fn open_echo(s: &Session, t: u8, seed: u64) {
    let mut ch = s.open(t, 0, false).unwrap_or_else(|e| panic!("open channel {t}: {e}"));
    echo(&mut ch, seed, 256 * 1024);
}

fn config(port1: u16, port2: Option<u16>, workers: usize, channels: &str) -> String {
    let mut t = format!(
        "[relay]\nworkers = {workers}\nstats-secs = 0\n\n[[service]]\nname = \"vm1\"\nlisten = \
         [\"127.0.0.1:{port1}\"]\ndisable-ticketing = true\nchannels = [{channels}]\n"
    );
    if let Some(p) = port2 {
        t.push_str(&format!(
            "\n[[service]]\nname = \"vm2\"\nlisten = [\"127.0.0.1:{p}\"]\ndisable-ticketing = true\nchannels = \
             [\"port:org.example.vm2=echo:\"]\n"
        ));
    }
    t
}

/// The whole story of one reload, then a refused one.
#[test]
fn sighup_adds_removes_changes_and_refuses_a_bad_file() {
    let dir = TempDir::new("reload");
    let app_a = EchoApp::start(dir.path("a.sock"));
    let app_b = EchoApp::start(dir.path("b.sock"));
    let (p1, p2) = (free_port(), free_port());
    let (vm1, vm2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let file = dir.path("vmcrelay.toml");
    let a = format!("unix:{}", app_a.path.display());
    let b = format!("unix:{}", app_b.path.display());
    write_config(&file, &config(p1, None, 2, &format!("\"128=echo:\", \"129=echo:\", \"130={a}\"")));
    let relay = Relay::start(&["--config".into(), file.display().to_string()]);

    // A session linked before the reload, moving data on 129 throughout.
    let s1 = Session::connect(&vm1, b"", T).expect("session 1");
    assert_eq!(s1.channels, [(128, 0), (129, 0), (130, 0)]);
    let mut keep = s1.open(129, 0, false).expect("open 129");
    echo(&mut keep, 1, 64 * 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let moved = Arc::new(AtomicU64::new(0));
    let mover = {
        let (stop, moved) = (Arc::clone(&stop), Arc::clone(&moved));
        std::thread::spawn(move || {
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                echo(&mut keep, seed, 32 * 1024);
                moved.fetch_add(32 * 1024, Ordering::Relaxed);
                seed += 1;
            }
            keep
        })
    };
    open_echo(&s1, 130, 2);
    assert_eq!(app_a.conns.load(Ordering::Relaxed), 1, "130 went to a.sock");

    // The reload: 129 goes, 131 comes, 130 moves to b.sock, vm2 appears on
    // a new address; workers = 1 needs a restart and is kept.
    write_config(&file, &config(p1, Some(p2), 1, &format!("\"128=echo:\", \"130={b}\", \"131=echo:\"")));
    let done = hup_and_wait(&relay, "reload: done", 1);
    assert!(done.contains("changes=4") && done.contains("needs_restart=1"), "{done}");
    assert!(done.contains("workers_updated=2/2"), "both workers kept running: {done}");
    for want in [
        format!("reload: service vm2 added listen={vm2} tls-listen=- channels=[port:org.example.vm2=echo:]"),
        format!("reload: service vm1 channel 130:0 endpoint {a} -> {b} (next link)"),
        "reload: service vm1 channel 131:0 added endpoint=echo:".to_string(),
        "reload: service vm1 channel 129:0 removed (draining 1 links)".to_string(),
        "reload: relay workers 2 -> 1 needs a restart; running with 2".to_string(),
    ] {
        assert_eq!(relay.lines(&want).len(), 1, "one line {want:?}; log:\n{}", relay.lines("reload").join("\n"));
    }

    // New sessions see the new list and echo through the new channel; the
    // removed one is refused; the changed endpoint is used at the next link.
    let before = moved.load(Ordering::Relaxed);
    let s2 = Session::connect(&vm1, b"", T).expect("session 2");
    assert_eq!(s2.channels, [(128, 0), (130, 0), (131, 0)], "129 no longer offered, 131 offered");
    open_echo(&s2, 131, 3);
    assert!(s2.open(129, 0, false).is_err(), "a removed channel links no more");
    open_echo(&s2, 130, 4);
    assert_eq!(app_b.conns.load(Ordering::Relaxed), 1, "130's next link went to b.sock");
    assert_eq!(app_a.conns.load(Ordering::Relaxed), 1, "and not to a.sock");
    // The new service on its new address.
    let v2 = Session::connect(&vm2, b"", T).expect("vm2 session");
    assert_eq!(v2.channels, [(10, 0)]);
    open_echo(&v2, 10, 5);
    // The session linked before kept moving data on the removed channel.
    let deadline = Instant::now() + T;
    while moved.load(Ordering::Relaxed) < before + 256 * 1024 {
        assert!(Instant::now() < deadline, "the linked channel stalled after the reload");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(s1.closed.lock().expect("closed").is_none(), "session 1 untouched");

    // A syntax error: refused with FILE:LINE, nothing changes.
    let good = std::fs::read_to_string(&file).expect("read config");
    write_config(&file, &good.replacen("stats-secs = 0", "stats-secs = = 0", 1));
    let refused = hup_and_wait(&relay, "reload refused", 1);
    assert!(refused.contains(&format!("{}:3", file.display())), "FILE:LINE named: {refused}");
    assert!(refused.contains("keeps serving"), "{refused}");
    assert_eq!(relay.lines("reload: done").len(), 1, "no second reload applied");
    let s3 = Session::connect(&vm1, b"", T).expect("session 3");
    assert_eq!(s3.channels, [(128, 0), (130, 0), (131, 0)], "the running configuration still serves");
    open_echo(&s3, 131, 6);
    let v2 = Session::connect(&vm2, b"", T).expect("vm2 still there");
    assert_eq!(v2.channels, [(10, 0)]);

    // A validation error names its line too.
    write_config(&file, &good.replacen("\"131=echo:\"", "\"bogus=echo:\"", 1));
    let refused = hup_and_wait(&relay, "reload refused", 2);
    assert!(
        refused.contains(&format!("{}:9", file.display())) && refused.contains("unknown channel kind"),
        "{refused}"
    );

    // Removing vm2 closes its listener; vm1 goes on.
    write_config(&file, &config(p1, None, 2, &format!("\"128=echo:\", \"130={b}\", \"131=echo:\"")));
    let done = hup_and_wait(&relay, "reload: done", 2);
    assert!(done.contains("changes=1") && done.contains("needs_restart=0"), "{done}");
    assert_eq!(relay.lines("reload: service vm2 removed (draining").len(), 1);
    // The cancelled accepts complete right after the workers took it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::net::TcpStream::connect(&vm2).is_ok() {
        assert!(Instant::now() < deadline, "vm2's address still accepts after its removal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s4 = Session::connect(&vm1, b"", T).expect("session 4");
    assert_eq!(s4.channels, [(128, 0), (130, 0), (131, 0)]);

    stop.store(true, Ordering::Relaxed);
    let mut keep = mover.join().expect("mover");
    echo(&mut keep, 7, 64 * 1024);
    assert_eq!(relay.stop(), Some(0));
}

/// Without --config, SIGHUP says there is no file and reloads TLS only.
#[test]
fn sighup_without_a_file_says_so() {
    let port = free_port();
    let relay = Relay::start(&[
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--disable-ticketing".into(),
        "--channel".into(),
        "128=echo:".into(),
    ]);
    let l = hup_and_wait(&relay, "SIGHUP: no configuration file to reload", 1);
    assert!(l.contains("started without --config"), "{l}");
    relay.wait_log("SIGHUP: nothing to reload (no TLS service)", T);
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    open_echo(&s, 128, 9);
    assert_eq!(relay.stop(), Some(0));
}

/// A reload that adds the first service with a password starts the RSA
/// key thread (none ran: every service was open) and hands each worker its
/// key queue: the right password links, a wrong one is refused.
#[test]
fn sighup_adds_a_ticketed_service_to_an_open_relay() {
    let dir = TempDir::new("reload-keys");
    let (p1, p3) = (free_port(), free_port());
    let file = dir.path("vmcrelay.toml");
    let pass = dir.path("vm3.pass");
    std::fs::write(&pass, "s3cret\n").expect("password file");
    let base = config(p1, None, 2, "\"128=echo:\"");
    write_config(&file, &base);
    let relay = Relay::start(&["--config".into(), file.display().to_string()]);
    relay.wait_log("ticketing off on every service", T);
    write_config(
        &file,
        &format!(
            "{base}\n[[service]]\nname = \"vm3\"\nlisten = [\"127.0.0.1:{p3}\"]\npassword-file = \"{}\"\nchannels = \
             [\"129=echo:\"]\n",
            pass.display()
        ),
    );
    let done = hup_and_wait(&relay, "reload: done", 1);
    assert!(done.contains("changes=1") && done.contains("workers_updated=2/2"), "{done}");
    relay.wait_log("reload: a service with ticketing: RSA key thread started", T);
    let vm3 = format!("127.0.0.1:{p3}");
    // Several sessions, so both workers' key queues are used.
    for seed in 0..4 {
        let s = Session::connect(&vm3, b"s3cret", T).expect("vm3 session with the password");
        assert_eq!(s.channels, [(129, 0)]);
        open_echo(&s, 129, 20 + seed);
        s.close();
    }
    assert!(Session::connect(&vm3, b"wrong", T).is_err(), "a wrong password is refused");
    // vm1 stays open.
    let s = Session::connect(&format!("127.0.0.1:{p1}"), b"", T).expect("vm1 session");
    open_echo(&s, 128, 30);
    assert_eq!(relay.stop(), Some(0));
}
