//! `vmcrelay serve` driven by vmcrelay's own client code: user-defined
//! channel types (spice-gtk skips them) and failure handling, with a
//! healthy channel checked byte-exact throughout.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vmcrelay::proto::client_link::ClientLinkFailure;
use vmcrelay::proto::link::LinkErrorCode;
use vmcrelay::relay::sync_client::{ClientError, Session};

/// Echoes `total` bytes through channel `(t, id)` and checks them.
fn echo_through(s: &Session, t: u8, id: u8, total: usize, seed: u64, msg: usize) {
    let ch = s.open(t, id, true).expect("open channel");
    let mut w = ch.writer;
    let mut r = ch.reader;
    let data = pattern(seed, total);
    // Every other message is compressible, so LZ4 COMPRESSED_DATA is used too.
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        for (k, chunk) in sent.chunks(msg).enumerate() {
            if k % 2 == 1 {
                let z = vec![chunk[0]; chunk.len()];
                w.send(&z).expect("send");
            } else {
                w.send(chunk).expect("send");
            }
        }
        w
    });
    let mut want = data.clone();
    for (k, chunk) in want.chunks_mut(msg).enumerate() {
        if k % 2 == 1 {
            let b = chunk[0];
            chunk.fill(b);
        }
    }
    let mut got = vec![0u8; total];
    let mut have = 0;
    while have < total {
        let n = r.read(&mut got[have..]).expect("read");
        assert!(n > 0, "EOF after {have} of {total} bytes");
        have += n;
    }
    let _w = writer.join().expect("writer");
    assert!(got == want, "echo differs");
}

fn start(extra: &[String]) -> Relay {
    let port = free_port();
    let mut a = vec!["--listen".to_string(), format!("127.0.0.1:{port}"), "--disable-ticketing".into()];
    a.extend_from_slice(extra);
    Relay::start(&a)
}

/// Test 6: A user-defined channel type 128 carried end to end (DATA and LZ4).
#[test]
fn user_defined_128_end_to_end() {
    let dir = TempDir::new("u128");
    let app = EchoApp::start(dir.path("app.sock"));
    let relay = start(&["--channel".into(), format!("128=unix:{}", app.path.display())]);
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    assert!(s.channels.contains(&(128, 0)), "CHANNELS_LIST has (128,0): {:?}", s.channels);
    echo_through(&s, 128, 0, 16 << 20, 7, 65536);
    // Small messages too, many per read.
    echo_through(&s, 128, 0, 1 << 20, 8, 100);
    s.close();
}

/// A unix app that accepts one connection at a time and hands it to the test.
fn controlled_app(path: std::path::PathBuf) -> std::sync::mpsc::Receiver<std::os::unix::net::UnixStream> {
    let l = UnixListener::bind(path).expect("bind");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    rx
}

/// Test 7: Endpoint absent, endpoint killed mid-stream, client killed mid-stream:
/// each has its outcome, and a healthy channel stays byte-exact throughout.
#[test]
fn failures_leave_other_channels_intact() {
    let dir = TempDir::new("fail");
    let healthy = EchoApp::start(dir.path("healthy.sock"));
    let dev = dir.path("dev.sock");
    let relay = start(&[
        "--channel".into(),
        format!("128=unix:{}", healthy.path.display()),
        "--channel".into(),
        format!("port:com.example.absent=unix:{}", dir.path("nobody.sock").display()),
        "--channel".into(),
        format!("port:com.example.dev=unix:{}", dev.display()),
    ]);
    let s = Arc::new(Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session"));
    // The healthy channel echoes continuously while the failures happen.
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, stop2) = (Arc::clone(&s), Arc::clone(&stop));
    let healthy_loop = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            echo_through(&s2, 128, 0, 1 << 20, rounds, 16384);
            rounds += 1;
        }
        rounds
    });

    // a) Endpoint absent: link error CHANNEL_NOT_AVAILABLE (9), logged with the path.
    match s.open(10, 0, false) {
        Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable))) => {}
        other => panic!("absent endpoint must refuse the link with 9, got {other:?}"),
    }
    let warn = relay.wait_log("endpoint unavailable", Duration::from_secs(5));
    assert!(warn.contains("nobody.sock"), "{warn}");

    // b) Endpoint killed mid-stream.
    let accepted = controlled_app(dev.clone());
    let ch = s.open(10, 1, false).expect("open dev port");
    let (mut w, mut r) = (ch.writer, ch.reader);
    assert!(r.wait_port_state().expect("port init"), "endpoint connected at link: opened");
    let mut app = accepted.recv_timeout(Duration::from_secs(5)).expect("device connection");
    w.send(b"hello device").expect("send");
    let mut got = [0u8; 12];
    app.read_exact(&mut got).expect("device reads");
    assert_eq!(&got, b"hello device");
    app.write_all(b"from device").expect("device writes");
    let mut back = [0u8; 11];
    let mut have = 0;
    while have < 11 {
        have += r.read(&mut back[have..]).expect("read");
    }
    assert_eq!(&back, b"from device");
    drop(app); // the device goes away
    // b) The port stays linked: PORT_EVENT closed, the relay reopens the
    // endpoint behind it (a restarted device needs no relay or client restart).
    let mut app = accepted.recv_timeout(Duration::from_secs(5)).expect("the relay reconnects the device");
    relay.wait_log("endpoint back channel=port:com.example.dev", Duration::from_secs(5));
    // c) The same SPICE channel carries bytes again, both ways.
    w.send(b"again").expect("send");
    let mut got = [0u8; 5];
    app.read_exact(&mut got).expect("device reads");
    assert_eq!(&got, b"again");
    app.write_all(b"back").expect("device writes");
    let mut back = [0u8; 4];
    let mut have = 0;
    while have < 4 {
        have += r.read(&mut back[have..]).expect("read");
    }
    assert_eq!(&back, b"back");
    assert_eq!(r.events, vec![1, 0], "PORT_EVENT closed, then opened");
    let r2 = r;

    // d) Client killed mid-stream: the endpoint connection closes.
    w.send(&[0u8; 1000]).expect("send");
    drop(w);
    drop(r2); // both halves of the client socket gone
    app.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut sink = vec![0u8; 4096];
    let mut eof = false;
    for _ in 0..100 {
        match app.read(&mut sink) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("device read: {e}"),
        }
    }
    assert!(eof, "endpoint sees EOF after the client went away");
    relay.wait_log("reason=\"client closed\"", Duration::from_secs(5));

    stop.store(true, Ordering::Relaxed);
    let rounds = healthy_loop.join().expect("healthy channel stayed byte-exact");
    assert!(rounds >= 1);
    // The relay is still serving: a fresh session works.
    let s3 = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("new session");
    s.close();
    echo_through(&s3, 128, 0, 1 << 20, 99, 65536);
}

/// Hostile bytes on the link get an error reply or a close; the relay keeps serving.
#[test]
fn garbage_link_is_refused_and_relay_keeps_serving() {
    let relay = start(&["--channel".into(), "128=echo:".into()]);
    let mut c = std::net::TcpStream::connect(relay.addr()).expect("connect");
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut reply = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = c.read_to_end(&mut reply);
    assert_eq!(reply.len(), 16 + 178, "an error reply");
    assert_eq!(&reply[16..20], &2u32.to_le_bytes(), "INVALID_MAGIC");
    // A huge link size is refused too.
    let mut c = std::net::TcpStream::connect(relay.addr()).expect("connect");
    let mut h = b"REDQ".to_vec();
    h.extend_from_slice(&2u32.to_le_bytes());
    h.extend_from_slice(&2u32.to_le_bytes());
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    c.write_all(&h).expect("write");
    let mut reply = Vec::new();
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = c.read_to_end(&mut reply);
    assert_eq!(&reply.get(16..20), &Some(&3u32.to_le_bytes()[..]), "INVALID_DATA");
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("still serving");
    echo_through(&s, 128, 0, 1 << 20, 3, 4096);
}

/// LZ4 toward the client (`--lz4-to-client`): compressible endpoint output
/// arrives as COMPRESSED_DATA and decodes to the same bytes.
#[test]
fn lz4_to_client_round_trip() {
    let dir = TempDir::new("lz4");
    let app = EchoApp::start(dir.path("app.sock"));
    let relay = start(&["--lz4-to-client".into(), "--channel".into(), format!("usbredir=unix:{}", app.path.display())]);
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    let ch = s.open(9, 0, true).expect("open usbredir");
    let (mut w, mut r) = (ch.writer, ch.reader);
    // Text-like data: compressible, and different in every message.
    let msg: Vec<u8> =
        (0..4u32 << 20).map(|i| b"usbredir packet "[(i % 16) as usize] ^ u8::from((i / 4096) % 2 == 1)).collect();
    let sent = msg.clone();
    let t = std::thread::spawn(move || {
        for c in sent.chunks(60_000) {
            w.send(c).expect("send");
        }
        w
    });
    let mut got = vec![0u8; msg.len()];
    let mut have = 0;
    while have < got.len() {
        let n = r.read(&mut got[have..]).expect("read");
        assert!(n > 0, "EOF");
        have += n;
    }
    let _w = t.join().expect("writer");
    assert!(got == msg, "byte-exact through LZ4 both ways");
    assert!(r.compressed_msgs > 0, "the relay sent COMPRESSED_DATA");
    s.close();
}

/// The splice data path (`--data-path splice`) is byte-exact for large and
/// small messages, mixed with LZ4.
#[test]
fn splice_data_path_byte_exact() {
    let dir = TempDir::new("splice");
    let app = EchoApp::start(dir.path("app.sock"));
    let relay =
        start(&["--data-path".into(), "splice".into(), "--channel".into(), format!("128=unix:{}", app.path.display())]);
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    echo_through(&s, 128, 0, 16 << 20, 21, 65536);
    echo_through(&s, 128, 0, 1 << 20, 22, 100);
    echo_through(&s, 128, 0, 8 << 20, 23, 1 << 20);
    s.close();
}

/// A busy channel held by another session: the new session replaces the
/// old one as a whole (the old link closes, the endpoint gets a fresh
/// connection); `--busy refuse` keeps the old session and refuses the new
/// main link. (Same-session cases: tests/hostile.rs.)
#[test]
fn busy_channel_replace_and_refuse() {
    let dir = TempDir::new("busy");
    let app = EchoApp::start(dir.path("app.sock"));
    let relay = start(&["--channel".into(), format!("128=unix:{}", app.path.display())]);
    let s1 = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session 1");
    let c1 = s1.open(128, 0, false).expect("first client");
    let (mut w1, mut r1) = (c1.writer, c1.reader);
    w1.send(b"one").expect("send");
    let mut b = [0u8; 3];
    let mut have = 0;
    while have < 3 {
        have += r1.read(&mut b[have..]).expect("echo");
    }
    let s2 = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session 2");
    echo_through(&s2, 128, 0, 1 << 20, 5, 4096);
    // The first client's channel was closed for it.
    let mut rest = [0u8; 16];
    assert_eq!(r1.read(&mut rest).expect("read"), 0, "replaced link is closed");
    relay.wait_log("reason=\"replaced by a new session\"", Duration::from_secs(5));
    assert!(app.conns.load(Ordering::Relaxed) >= 2, "the endpoint saw a fresh connection");

    let dir2 = TempDir::new("busy2");
    let app2 = EchoApp::start(dir2.path("app.sock"));
    let relay2 =
        start(&["--busy".into(), "refuse".into(), "--channel".into(), format!("128=unix:{}", app2.path.display())]);
    let t1 = Session::connect(&relay2.addr(), b"", Duration::from_secs(10)).expect("session 1");
    let _keep = t1.open(128, 0, false).expect("first client");
    match Session::connect(&relay2.addr(), b"", Duration::from_secs(10)) {
        Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable))) => {}
        other => panic!("--busy refuse must refuse the second session with 9, got {other:?}"),
    }
}

/// Issue 8.4 (ports): the endpoint of a linked port channel goes away and
/// comes back: the client gets PORT_EVENT closed, what it sends meanwhile
/// is dropped, then PORT_EVENT opened and the bytes flow again on the same
/// SPICE channel.
#[test]
fn port_endpoint_restart_keeps_the_channel_linked() {
    let dir = TempDir::new("portrestart");
    let path = dir.path("app.sock");
    // First endpoint: echo one message, then go away.
    let l1 = UnixListener::bind(&path).expect("bind");
    let p1 = path.clone();
    let first = std::thread::spawn(move || {
        let (mut s, _) = l1.accept().expect("accept");
        let mut b = [0u8; 5];
        s.read_exact(&mut b).expect("read");
        s.write_all(&b).expect("echo");
        drop(s);
        drop(l1);
        let _ = std::fs::remove_file(&p1);
    });
    let relay = start(&["--channel".into(), format!("port:org.test.restart=unix:{}", path.display())]);
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    let ch = s.open(10, 0, false).expect("port");
    let (mut w, mut r) = (ch.writer, ch.reader);
    assert!(r.wait_port_state().expect("PORT_INIT"), "opened at link");
    w.send(b"first").expect("send");
    let mut b = [0u8; 5];
    r.read_exact_bytes(&mut b);
    assert_eq!(&b, b"first");
    first.join().expect("first endpoint");
    relay.wait_log("endpoint gone channel=port:org.test.restart", Duration::from_secs(10));
    // Nobody is there: dropped, never delivered to the next endpoint.
    w.send(b"lost!").expect("send while the endpoint is down");
    r.set_read_timeout(Some(Duration::from_millis(1500))).expect("timeout");
    assert!(r.read(&mut b).is_err(), "no data while the endpoint is down");
    assert!(r.events.contains(&vmcrelay::proto::consts::PORT_EVENT_CLOSED), "PORT_EVENT closed: {:?}", r.events);
    // The endpoint comes back; the relay reopens it within its 1 s retry.
    let l2 = UnixListener::bind(&path).expect("bind again");
    let second = std::thread::spawn(move || {
        let (mut s, _) = l2.accept().expect("accept again");
        let mut b = [0u8; 5];
        s.read_exact(&mut b).expect("read");
        s.write_all(&b).expect("echo");
        b
    });
    relay.wait_log("endpoint back channel=port:org.test.restart", Duration::from_secs(10));
    w.send(b"again").expect("send after reopen");
    r.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    r.read_exact_bytes(&mut b);
    assert_eq!(&b, b"again");
    assert_eq!(&second.join().expect("second endpoint"), b"again", "the dropped bytes never reached it");
    assert!(r.events.ends_with(&[vmcrelay::proto::consts::PORT_EVENT_OPENED]), "PORT_EVENT opened: {:?}", r.events);
    s.close();
}

trait ReadExact {
    fn read_exact_bytes(&mut self, out: &mut [u8]);
}

impl ReadExact for vmcrelay::relay::sync_client::ChannelReader {
    fn read_exact_bytes(&mut self, out: &mut [u8]) {
        let mut have = 0;
        while have < out.len() {
            let n = self.read(&mut out[have..]).expect("read");
            assert!(n > 0, "EOF");
            have += n;
        }
    }
}

/// A session that links a usbredir channel while its endpoint is down is
/// refused (9) and, once the endpoint is there, told on its main channel:
/// the channel is announced under a fresh id (as to a session that had it
/// linked when it went away), and that link echoes.
#[test]
fn refused_while_endpoint_down_is_announced_when_it_is_back() {
    let dir = TempDir::new("refused-announce");
    let dev = dir.path("ur.sock");
    let relay = start(&["--channel".into(), format!("usbredir:0=unix:{}", dev.display())]);
    let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
    let r = s.open(9, 0, false);
    assert!(
        matches!(r, Err(ClientError::Link(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable)))),
        "usbredir:0 with its endpoint down: {r:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s.announced.lock().expect("lock").is_empty(), "nothing announced while the endpoint is down");
    let app = EchoApp::start(dev);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        if let Some(&(t, id)) = s.announced.lock().expect("lock").first() {
            assert_eq!(t, 9, "the usbredir channel is announced");
            break id;
        }
        assert!(std::time::Instant::now() < deadline, "no CHANNELS_LIST once the endpoint was back");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_ne!(id, 0, "a fresh id");
    relay.wait_log("endpoint back channel=usbredir:0", Duration::from_secs(5));
    echo_through(&s, 9, id, 1 << 20, 31, 4096);
    assert_eq!(app.conns.load(Ordering::Relaxed), 1, "the endpoint opened for the check is the one the link uses");
    s.close();
}

/// When a session ends (its main channel closes), a channel of it whose
/// endpoint write is still in flight writes what the relay already read
/// before it closes: the endpoint gets exactly the bytes the relay counted
/// as read from the client (the close line's `c2e_bytes`), byte-exact, in
/// both data paths. The endpoint is slow so that a write is in flight.
#[test]
fn session_end_flushes_what_the_relay_read() {
    for (k, path) in ["copy", "splice"].into_iter().enumerate() {
        let dir = TempDir::new("flushend");
        let sock = dir.path("slow.sock");
        let l = UnixListener::bind(&sock).expect("bind endpoint");
        let relay =
            start(&["--data-path".into(), path.into(), "--channel".into(), format!("128=unix:{}", sock.display())]);
        let total = 16 << 20;
        let data = pattern(41 + k as u64, total);
        let s = Session::connect(&relay.addr(), b"", Duration::from_secs(10)).expect("session");
        let ch = s.open(128, 0, false).expect("open 128");
        let (ep, _) = l.accept().expect("the relay connects its endpoint");
        let sent = data.clone();
        let mut w = ch.writer;
        // The client sends until the relay stops taking (it stops reading
        // while its endpoint write waits); errors after the close are expected.
        let writer = std::thread::spawn(move || {
            for chunk in sent.chunks(65536) {
                if w.send(chunk).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        // The session ends while the endpoint has not read anything yet.
        s.close();
        std::thread::sleep(Duration::from_millis(500));
        let reader = std::thread::spawn(move || {
            let mut ep = ep;
            let mut got = Vec::new();
            ep.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            let _ = ep.read_to_end(&mut got);
            got
        });
        let got = reader.join().expect("endpoint reader");
        // The endpoint's EOF can reach the test before the relay's close
        // line reaches its log reader: wait for that line itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            if let Some(l) = relay.lines("close peer").into_iter().find(|l| l.contains("channel=128:0")) {
                break l;
            }
            assert!(Instant::now() < deadline, "{path}: no close line for channel 128:0");
            std::thread::sleep(Duration::from_millis(20));
        };
        let read: usize = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("c2e_bytes="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("c2e_bytes in {line}"));
        assert!(line.contains("reason=\"session closed\""), "{path}: {line}");
        assert!(read > 0 && read < total, "{path}: a partial upload was in flight: {read}");
        assert_eq!(got.len(), read, "{path}: the endpoint got every byte the relay read ({line})");
        assert!(got == data[..got.len()], "{path}: byte-exact");
        drop(s);
        let _ = writer.join();
    }
}
