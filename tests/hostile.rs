//! Hostile and faulty clients against `vmcrelay serve` over real sockets:
//! busy channels as spice-server (same session refused, a new session
//! replaces the old one, `--busy refuse`), the failed-ticket throttle per
//! source address, and the SIGTERM drain with a transfer in flight.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

use vmcrelay::proto::client_link::ClientLinkFailure;
use vmcrelay::proto::link::LinkErrorCode;
use vmcrelay::relay::sync_client::{Channel, ClientError, Session};

const T: Duration = Duration::from_secs(10);

/// Runs the relay with 64 descriptors and no way to raise the limit.
const FD_STARVED: [&str; 5] =
    ["setpriv", "--inh-caps=-sys_resource", "--bounding-set=-sys_resource", "prlimit", "--nofile=64:64"];

fn start(extra: &[&str]) -> Relay {
    let port = free_port();
    let mut a = vec!["--listen".to_string(), format!("127.0.0.1:{port}"), "--workers".into(), "2".into()];
    a.extend(extra.iter().map(|s| s.to_string()));
    Relay::start(&a)
}

/// Echoes `total` bytes through an open channel and checks them.
fn echo_on(ch: &mut Channel, total: usize, seed: u64) {
    let data = pattern(seed, total);
    let mut got = vec![0u8; total];
    let (w, r) = (&mut ch.writer, &mut ch.reader);
    std::thread::scope(|sc| {
        let d = &data;
        sc.spawn(move || {
            for chunk in d.chunks(16 * 1024) {
                w.send(chunk).expect("send");
            }
        });
        let mut have = 0;
        while have < total {
            let n = r.read(&mut got[have..]).expect("read");
            assert!(n > 0, "EOF after {have} of {total} bytes");
            have += n;
        }
    });
    assert!(got == data, "echo differs");
}

fn is_not_available(r: &Result<impl std::fmt::Debug, ClientError>) -> bool {
    matches!(r, Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable))))
}

/// A second link of a channel already linked in the same session is
/// refused (9) and the first keeps moving bytes; a channel closed by its
/// client and relinked at once is free again (the close is asynchronous).
#[test]
fn same_session_relink_is_refused_and_the_first_keeps_working() {
    let relay = start(&["--disable-ticketing", "--channel", "128=echo:"]);
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    let mut c1 = s.open(128, 0, false).expect("first link");
    echo_on(&mut c1, 64 * 1024, 1);
    for _ in 0..3 {
        let second = s.open(128, 0, false);
        assert!(is_not_available(&second), "a second link in the same session gets 9, got {second:?}");
    }
    relay.wait_log("already linked in this session", T);
    echo_on(&mut c1, 4 << 20, 2);
    assert!(s.closed.lock().expect("lock").is_none(), "the session is untouched");
    drop(c1);
    // Close and relink at once, many times: always free.
    for k in 0..20 {
        let mut c = s.open(128, 0, false).unwrap_or_else(|e| panic!("relink {k} after close: {e}"));
        echo_on(&mut c, 1024, 10 + k);
    }
    s.close();
}

/// A new session linking a channel that a live session holds replaces the
/// old session as a whole: all its channels and its main close, endpoints
/// reset; the new session works.
#[test]
fn new_session_replaces_the_old_one_as_a_whole() {
    let dir = TempDir::new("hostile-replace");
    let app = EchoApp::start(dir.path("app.sock"));
    let relay = start(&[
        "--disable-ticketing",
        "--channel",
        &format!("128=unix:{}", app.path.display()),
        "--channel",
        "129=echo:",
    ]);
    let s1 = Session::connect(&relay.addr(), b"", T).expect("session 1");
    let mut a = s1.open(128, 0, false).expect("s1 128");
    let mut b = s1.open(129, 0, false).expect("s1 129");
    echo_on(&mut a, 4096, 1);
    echo_on(&mut b, 4096, 2);
    // A session that links nothing disturbs nobody (probes, `connect --list`).
    let probe = Session::connect(&relay.addr(), b"", T).expect("probe session");
    probe.close();
    echo_on(&mut a, 4096, 3);
    let s2 = Session::connect(&relay.addr(), b"", T).expect("session 2");
    let mut a2 = s2.open(128, 0, false).expect("s2 takes 128");
    echo_on(&mut a2, 1 << 20, 4);
    let mut rest = [0u8; 16];
    b.reader.set_read_timeout(Some(T)).expect("timeout");
    assert_eq!(b.reader.read(&mut rest).expect("read"), 0, "the old session's other channel closed too");
    a.reader.set_read_timeout(Some(T)).expect("timeout");
    assert_eq!(a.reader.read(&mut rest).expect("read"), 0, "the old session's taken channel closed");
    let deadline = Instant::now() + T;
    while s1.closed.lock().expect("lock").is_none() {
        assert!(Instant::now() < deadline, "the old session's main channel never closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.wait_log("replaced as a whole by session", T);
    relay.wait_log("reason=\"replaced by a new session\"", T);
    assert!(app.conns.load(Ordering::Relaxed) >= 2, "the endpoint got a fresh connection");
    let mut b2 = s2.open(129, 0, false).expect("s2 129");
    echo_on(&mut b2, 1 << 20, 5);
    s2.close();
}

/// `--busy refuse`: while a session is linked, a new main link is refused
/// (9) and the old session keeps working; once it is gone a new one links.
#[test]
fn busy_refuse_keeps_the_old_session() {
    let relay = start(&["--disable-ticketing", "--busy", "refuse", "--channel", "128=echo:"]);
    let s1 = Session::connect(&relay.addr(), b"", T).expect("session 1");
    let mut c1 = s1.open(128, 0, false).expect("s1 128");
    let second = Session::connect(&relay.addr(), b"", T);
    assert!(is_not_available(&second), "refuse: the new main link gets 9, got {second:?}");
    relay.wait_log("--busy refuse keeps it", T);
    echo_on(&mut c1, 1 << 20, 1);
    drop(c1);
    s1.close();
    let deadline = Instant::now() + T;
    let s3 = loop {
        match Session::connect(&relay.addr(), b"", T) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                assert!(is_not_available(&Err::<(), _>(e)), "only 'busy' while the old session closes");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no new session after the old one left: {e}"),
        }
    };
    let mut c3 = s3.open(128, 0, false).expect("s3 128");
    echo_on(&mut c3, 1 << 20, 2);
    s3.close();
}

/// A source guessing passwords (127.0.0.2, four connections in parallel)
/// is held to ≤ 5 tries/s while another source (127.0.0.3) links a session
/// and echoes as usual.
#[test]
fn throttle_holds_a_guesser_while_another_address_links() {
    let dir = TempDir::new("hostile-throttle");
    let pw = dir.path("pw");
    std::fs::write(&pw, "right-password\n").expect("pw");
    let relay = start(&["--password-file", &pw.display().to_string(), "--channel", "128=echo:"]);
    let addr = relay.addr();
    let guesser = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let good = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let window = Duration::from_secs(8);
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let tries = Arc::new(AtomicU64::new(0));
    let others = Arc::new(Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (addr, stop, tries, others) =
                (addr.clone(), Arc::clone(&stop), Arc::clone(&tries), Arc::clone(&others));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let guess = format!("guess-{i}");
                    match Session::connect_from(&addr, Some(guesser), guess.as_bytes(), Duration::from_secs(15)) {
                        Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::PermissionDenied))) => {
                            if t0.elapsed() <= window {
                                tries.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        other => others.lock().expect("lock").push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    // The other source: a fresh session + channel + echo every 300 ms.
    let mut link_ms = Vec::new();
    while t0.elapsed() < window {
        let t = Instant::now();
        let s = Session::connect_from(&addr, Some(good), b"right-password", T).expect("the other source links");
        let mut c = s.open(128, 0, false).expect("the other source's channel");
        link_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        echo_on(&mut c, 64 * 1024, link_ms.len() as u64);
        drop(c);
        s.close();
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let n = tries.load(Ordering::Relaxed);
    let rate = n as f64 / window.as_secs_f64();
    link_ms.sort_by(f64::total_cmp);
    let max_ms = link_ms.last().copied().unwrap_or(0.0);
    let median_ms = link_ms.get(link_ms.len() / 2).copied().unwrap_or(0.0);
    eprintln!(
        "FIGURES throttle: guesser 127.0.0.2 made {n} tries in {} s = {rate:.2} tries/s; other source 127.0.0.3: {} \
         links, median {median_ms:.1} ms, max {max_ms:.1} ms",
        window.as_secs(),
        link_ms.len()
    );
    for t in threads {
        let _ = t.join();
    }
    assert!(rate <= 5.0, "a guessing source is held to ≤ 5 tries/s, made {rate:.2}");
    assert!(n >= 3, "the first tries are not delayed: {n}");
    assert!(max_ms < 1000.0, "the other source links normally (max {max_ms:.1} ms)");
    let lines = relay.lines("throttle addr=127.0.0.2");
    assert!(!lines.is_empty() && lines.len() <= 2, "one rate-limited line per throttling decision: {lines:?}");
    assert!(relay.lines("throttle addr=127.0.0.3").is_empty(), "the other source is never throttled");
    // Held links either got their verdict or timed out on the link stage (closed).
    for o in others.lock().expect("lock").iter() {
        assert!(o.contains("LinkEof") || o.contains("closed") || o.contains("Io"), "unexpected guesser outcome {o}");
    }
}

fn sigterm(relay: &Relay) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(relay.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

fn wait_exit(relay: &mut Relay, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = relay.child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Deterministic stream bytes: chunk `k` (64 KiB) is `pattern(k)`.
fn stream_chunk(k: usize) -> Vec<u8> {
    pattern(0x5eed + k as u64, 64 * 1024)
}

/// SIGTERM with a 256 MiB echo in flight: the transfer completes byte for
/// byte, a new connection is refused meanwhile, and the relay exits 0 soon
/// after the client closes, within the drain time.
#[test]
fn drain_completes_a_transfer_in_flight() {
    const TOTAL: usize = 256 << 20;
    const DRAIN_SECS: u64 = 30;
    let mut relay = start(&["--disable-ticketing", "--channel", "128=echo:", "--drain-secs", "30"]);
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    let ch = s.open(128, 0, false).expect("channel");
    let (mut w, mut r) = (ch.writer, ch.reader);
    let writer = std::thread::spawn(move || {
        for k in 0..TOTAL / (64 * 1024) {
            w.send(&stream_chunk(k)).expect("send during the drain");
        }
        w
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = stream_chunk(0);
    let mut at_term = None;
    let mut refused = false;
    r.set_read_timeout(Some(T)).expect("timeout");
    while got < TOTAL {
        let n = r.read(&mut buf).expect("read during the drain");
        assert!(n > 0, "EOF after {got} of {TOTAL} bytes");
        for &b in &buf[..n] {
            let k = got / (64 * 1024);
            if got.is_multiple_of(64 * 1024) && k > 0 {
                want = stream_chunk(k);
            }
            assert_eq!(b, want[got % (64 * 1024)], "byte {got} differs");
            got += 1;
        }
        if at_term.is_none() && got >= 16 << 20 {
            sigterm(&relay);
            at_term = Some((Instant::now(), got));
        }
        if let Some((t, _)) = at_term
            && !refused
            && t.elapsed() > Duration::from_millis(300)
        {
            let c = std::net::TcpStream::connect(relay.addr());
            assert!(
                c.as_ref().err().is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
                "a new connection is refused while draining: {c:?}"
            );
            refused = true;
        }
    }
    let w = writer.join().expect("writer");
    let (t_term, at) = at_term.expect("SIGTERM was sent");
    assert!(at < TOTAL, "SIGTERM came while the transfer was in flight");
    assert!(refused || t_term.elapsed() <= Duration::from_millis(300), "refusal checked");
    relay.wait_log("stopping: no new connections", T);
    drop(w);
    drop(r);
    s.close();
    let closed = Instant::now();
    let code = wait_exit(&mut relay, Duration::from_secs(DRAIN_SECS + 2));
    eprintln!(
        "FIGURES drain: {} MiB of 256 after SIGTERM, transfer done {:.2} s after it, exit {:.2} s after the client closed",
        (TOTAL - at) >> 20,
        closed.duration_since(t_term).as_secs_f64(),
        closed.elapsed().as_secs_f64()
    );
    assert_eq!(code, Some(0), "exit 0 after the drain");
    assert!(closed.elapsed() < Duration::from_secs(3), "the relay exits once the linked channels ended");
    assert!(t_term.elapsed() < Duration::from_secs(DRAIN_SECS), "within the drain time");
}

/// A channel that never ends does not keep the relay: it exits 0 within
/// `--drain-secs` (+1 s for the tick).
#[test]
fn drain_time_bounds_the_exit() {
    let mut relay = start(&["--disable-ticketing", "--channel", "128=echo:", "--drain-secs", "3"]);
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    let mut ch = s.open(128, 0, false).expect("channel");
    echo_on(&mut ch, 4096, 1);
    let t = Instant::now();
    sigterm(&relay);
    let code = wait_exit(&mut relay, Duration::from_secs(10));
    let secs = t.elapsed().as_secs_f64();
    eprintln!("FIGURES drain bound: exit {secs:.2} s after SIGTERM with --drain-secs 3 and an idle linked channel");
    assert_eq!(code, Some(0));
    assert!(secs < 4.5, "exit within the drain time: {secs:.2} s");
    assert!(secs > 1.5, "linked channels were served meanwhile: {secs:.2} s");
    let mut rest = [0u8; 8];
    ch.reader.set_read_timeout(Some(T)).expect("timeout");
    assert!(matches!(ch.reader.read(&mut rest), Ok(0) | Err(_)), "closed at the end of the drain");
}

/// Half-open floods: 2,000 connections from 127.0.0.2 (half send nothing,
/// half 8 bytes of a link header) held while more keep coming; a fresh
/// source (127.0.0.3) still links a session and echoes, fast. The relay
/// closes the oldest link-stage connections to make room (counted, one log
/// line per second).
#[test]
fn half_open_flood_does_not_lock_out_a_fresh_session() {
    let relay = start(&["--disable-ticketing", "--channel", "128=echo:"]);
    let sa: std::net::SocketAddr = relay.addr().parse().expect("addr");
    let flood = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let fresh = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let open = move |k: usize| -> Option<std::net::TcpStream> {
        let mut s = vmcrelay::relay::sync_client::tcp_from(sa, flood).ok()?;
        if k % 2 == 1 {
            use std::io::Write;
            let _ = s.write_all(b"REDQ\x02\x00\x00\x00");
        }
        Some(s)
    };
    let mut held: Vec<std::net::TcpStream> = (0..2000).filter_map(open).collect();
    assert!(held.len() >= 1900, "the flood opened {} connections", held.len());
    // More keep coming while the fresh source links.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut more = Vec::new();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) && k < 3000 {
                if let Some(s) = open(k) {
                    more.push(s);
                }
                k += 1;
                if k % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            more.len()
        })
    };
    let mut times = Vec::new();
    for k in 0..5 {
        let t = Instant::now();
        let s = Session::connect_from(&relay.addr(), Some(fresh), b"", T).unwrap_or_else(|e| {
            let log = relay.lines("w");
            let tail: Vec<_> = log.iter().rev().take(20).collect();
            panic!("a fresh session links during the flood: {e}; relay log tail: {tail:#?}")
        });
        let mut c = s.open(128, 0, false).expect("its channel links");
        echo_on(&mut c, 64 * 1024, 100 + k);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(c);
        s.close();
    }
    stop.store(true, Ordering::Relaxed);
    let churned = churn.join().expect("churn");
    times.sort_by(f64::total_cmp);
    let max_ms = times.last().copied().unwrap_or(0.0);
    eprintln!(
        "FIGURES flood: {} half-open held + {churned} more during the test; fresh session link+channel+64 KiB echo: \
         median {:.1} ms, max {max_ms:.1} ms",
        held.len(),
        times[times.len() / 2]
    );
    // The goal is 1 s (the FIGURES line reports it: 18–473 ms max over 5
    // quiet runs). The bounds leave room for a loaded 2-core CI machine
    // (one run beside three release builds took 3.9 s for one session out
    // of five, 13.5 ms median). Before the link-stage budget no fresh
    // session linked at all.
    let median = times[times.len() / 2];
    assert!(median < 1000.0, "a fresh session links and echoes during the flood (median {median:.1} ms)");
    assert!(max_ms < 6000.0, "a fresh session links and echoes during the flood ({max_ms:.1} ms)");
    relay.wait_log("throttle evict addr=127.0.0.2", T);
    assert!(relay.lines("throttle evict addr=127.0.0.3").is_empty(), "the fresh source is never evicted");
    let lines = relay.lines("throttle evict");
    assert!(lines.len() <= 30, "evictions are logged at most once per second per worker: {} lines", lines.len());
    held.clear();
    // The relay still serves normally afterwards.
    let s = Session::connect(&relay.addr(), b"", T).expect("session after the flood");
    let mut c = s.open(128, 0, false).expect("channel after the flood");
    echo_on(&mut c, 1 << 20, 999);
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which ends with the last ')').
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Out of file descriptors the relay pauses its accepts (connections wait
/// in the listen backlog) instead of re-arming into EMFILE again and
/// again: little CPU, one log line, and once descriptors are free it
/// serves a fresh session.
#[test]
fn out_of_fds_pauses_accepts_without_spinning() {
    // A 64-descriptor limit the relay cannot raise (no CAP_SYS_RESOURCE).
    // Set from outside once it runs, io_uring's accepts would not see it.
    if !peers_available(&["setpriv", "prlimit"]) {
        return;
    }
    let port = free_port();
    let args: Vec<String> =
        ["--listen", &format!("127.0.0.1:{port}"), "--workers", "2", "--disable-ticketing", "--channel", "128=echo:"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let relay = Relay::start_under(&FD_STARVED, &args);
    let pid = relay.child.id();
    let sa: std::net::SocketAddr = relay.addr().parse().expect("addr");
    // Link-stage connections from four addresses (under each address's
    // cap, so none is evicted): more than 64 descriptors.
    let mut held = Vec::new();
    for a in 2..6u8 {
        for _ in 0..30 {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, a));
            held.push(vmcrelay::relay::sync_client::tcp_from(sa, from).expect("connect (backlog)"));
        }
    }
    relay.wait_log("accept paused", T);
    let c0 = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_secs(pid) - c0;
    eprintln!("FIGURES emfile: relay CPU {used:.2} s over 3 s out of descriptors");
    assert!(used < 0.5, "the relay spins while out of descriptors: {used:.2} s of CPU in 3 s");
    let lines = relay.lines("accept");
    assert!(lines.len() <= 2, "one rate-limited line, not a flood: {lines:#?}");
    assert!(lines[0].contains("LimitNOFILE"), "the line says what to raise: {}", lines[0]);
    held.clear();
    // Descriptors come back as the relay sees those clients go; accepts
    // resume within the pause (at most 1 s) and a fresh session works.
    let s = Session::connect(&relay.addr(), b"", T).expect("session once descriptors are free");
    let mut c = s.open(128, 0, false).expect("channel once descriptors are free");
    echo_on(&mut c, 1 << 20, 4242);
}

/// A connection held until dropped that echoes what it reads.
fn echo_stream(mut s: std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
}

/// Link-stage connections from four addresses (under each address's cap,
/// so none is evicted): more than 64 descriptors.
fn hold_fds(relay: &Relay) -> Vec<std::net::TcpStream> {
    let sa: std::net::SocketAddr = relay.addr().parse().expect("addr");
    let mut held = Vec::new();
    for a in 2..6u8 {
        for _ in 0..30 {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, a));
            held.push(vmcrelay::relay::sync_client::tcp_from(sa, from).expect("connect (backlog)"));
        }
    }
    held
}

/// The accept of a `unix-listen` endpoint backs off as the TCP listener's
/// does: out of descriptors, the local app that connects waits in the
/// backlog while the relay idles (before: the accept was re-armed at once
/// into EMFILE, a busy loop with a warning each time), and once
/// descriptors are free the app is accepted and the channel echoes.
#[test]
fn out_of_fds_pauses_endpoint_accepts_without_spinning() {
    if !peers_available(&["setpriv", "prlimit"]) {
        return;
    }
    let dir = TempDir::new("ep-emfile");
    let sock = dir.path("app.sock");
    let port = free_port();
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--workers",
        "1",
        "--disable-ticketing",
        "--channel",
        &format!("128=unix-listen:{}", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let relay = Relay::start_under(&FD_STARVED, &args);
    let pid = relay.child.id();
    // The channel links first: its endpoint accept is posted, waiting for the app.
    let s = Session::connect(&relay.addr(), b"", T).expect("session");
    let mut c = s.open(128, 0, false).expect("channel");
    let held = hold_fds(&relay);
    relay.wait_log("accept paused", T);
    // The app connects into the backlog; the relay's accept finds no descriptor.
    let app = std::os::unix::net::UnixStream::connect(&sock).expect("app connects (backlog)");
    std::thread::sleep(Duration::from_millis(500));
    let c0 = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_secs(pid) - c0;
    eprintln!("FIGURES endpoint emfile: relay CPU {used:.2} s over 3 s out of descriptors");
    assert!(used < 0.5, "the relay spins while out of descriptors: {used:.2} s of CPU in 3 s");
    let failed = relay.lines("endpoint accept failed");
    assert!(failed.is_empty(), "a shortage is a pause, not a failure a line each: {} lines", failed.len());
    assert!(relay.lines("accept paused").len() <= 2, "one rate-limited line");
    drop(held);
    // Descriptors come back; within the pause the app is accepted.
    echo_stream(app);
    echo_on(&mut c, 1 << 20, 4343);
}

/// Soak finding 2, as documented: parallel links from a throttled address
/// start one delay apart, so those queued past the link timeout are closed
/// unanswered (no ticket judged, so no PERMISSION_DENIED; one `link
/// timeout` line per tick), while those that start get PERMISSION_DENIED.
/// Nothing else: no wrong-password reply without a judged ticket.
#[test]
fn throttled_parallel_links_past_the_link_timeout_close_unanswered() {
    let dir = TempDir::new("hostile-throttle-queue");
    let pw = dir.path("pw");
    std::fs::write(&pw, "right-password\n").expect("pw");
    let pws = pw.display().to_string();
    let relay = start(&[
        "--password-file",
        &pws,
        "--channel",
        "128=echo:",
        "--auth-fail-limit",
        "1",
        "--auth-fail-max-delay-secs",
        "2",
        "--link-timeout-secs",
        "3",
    ]);
    let addr = relay.addr();
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let first = Session::connect_from(&addr, Some(from), b"wrong", T);
    assert!(matches!(first, Err(ClientError::Link(_))), "the first wrong ticket is judged: {first:?}");
    let outcomes: Vec<_> = (0..6)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || Session::connect_from(&addr, Some(from), b"wrong", Duration::from_secs(15)))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let denied = outcomes
        .iter()
        .filter(|r| matches!(r, Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::PermissionDenied)))))
        .count();
    let unanswered =
        outcomes.iter().filter(|r| matches!(r, Err(ClientError::LinkEof) | Err(ClientError::Io(_)))).count();
    eprintln!(
        "FIGURES throttle queue: 6 parallel wrong links: {denied} PERMISSION_DENIED, {unanswered} closed unanswered"
    );
    assert_eq!(denied + unanswered, 6, "only those two outcomes: {outcomes:?}");
    assert!(denied >= 1 && unanswered >= 1, "some start within the timeout, the queued rest do not: {outcomes:?}");
    relay.wait_log("link timeout closed=", T);
}

/// `connect`'s local accepts back off as serve's do: with 40 `unix-listen`
/// channels under a 64-descriptor limit it cannot raise, local apps connect
/// one by one until an accept finds no descriptor; then connect idles (one
/// `accept paused` line naming LimitNOFILE, no `local accept failed`
/// flood), and once four apps leave the waiting app is accepted, linked,
/// and its channel echoes 1 MiB byte-exact.
#[test]
fn out_of_fds_pauses_connect_local_accepts_without_spinning() {
    use std::io::{Read, Write};
    if !peers_available(&["setpriv", "prlimit"]) {
        return;
    }
    let dir = TempDir::new("connect-emfile");
    let mut extra = vec!["--disable-ticketing".to_string()];
    let types = 128u8..168;
    for t in types.clone() {
        extra.extend(["--channel".to_string(), format!("{t}=echo:")]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let relay = start(&extra);
    let mut args = vec![relay.uri()];
    for t in types.clone() {
        args.extend(["--channel".to_string(), format!("{t}=unix-listen:{}", dir.path(&format!("{t}.sock")).display())]);
    }
    let connect = Connect::start_under(&FD_STARVED, &args);
    for t in types.clone() {
        wait_path(&dir.path(&format!("{t}.sock")), T);
    }
    let pid = connect.child.id();
    // One app after another; each is accepted and linked (or its channel
    // socket is refused) before the next, until an accept pauses.
    let progress = || connect.lines("result=ok").len() + connect.lines("cannot create a socket").len();
    let mut apps = Vec::new();
    let mut paused = false;
    for t in types.clone() {
        let before = progress();
        let app = std::os::unix::net::UnixStream::connect(dir.path(&format!("{t}.sock"))).expect("app connects");
        apps.push(app);
        let deadline = Instant::now() + T;
        loop {
            if !connect.lines("accept paused").is_empty() {
                paused = true;
                break;
            }
            assert!(Instant::now() < deadline, "app {t} neither linked nor paused:\n{}", connect.log_text());
            if progress() > before {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if paused {
            break;
        }
    }
    assert!(paused, "40 apps under 64 descriptors never ran out:\n{}", connect.log_text());
    let c0 = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_secs(pid) - c0;
    eprintln!("FIGURES connect emfile: connect CPU {used:.2} s over 3 s out of descriptors, {} apps", apps.len());
    assert!(used < 0.5, "connect spins while out of descriptors: {used:.2} s of CPU in 3 s");
    let failed = connect.lines("local accept failed");
    assert!(failed.is_empty(), "a shortage is a pause, not a failure a line each: {failed:#?}");
    let lines = connect.lines("accept paused");
    assert!(lines.len() <= 2, "one rate-limited line, not a flood: {lines:#?}");
    assert!(lines[0].contains("LimitNOFILE"), "the line says what to raise: {}", lines[0]);
    // Four apps leave: their channels close and free descriptors; the app
    // waiting in the backlog is accepted within the pause and linked.
    let mut waiting = apps.pop().expect("the waiting app");
    apps.drain(..4);
    waiting.set_read_timeout(Some(T)).expect("timeout");
    let data = pattern(77, 1 << 20);
    let mut w = waiting.try_clone().expect("clone");
    let d2 = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&d2).expect("write"));
    let mut got = vec![0u8; data.len()];
    waiting.read_exact(&mut got).unwrap_or_else(|e| panic!("echo of the waiting app: {e}\n{}", connect.log_text()));
    writer.join().expect("writer");
    assert!(got == data, "echo differs");
    drop(apps);
}
