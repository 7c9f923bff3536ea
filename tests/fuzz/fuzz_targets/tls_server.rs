//! The server `tls::Session` fed arbitrary TLS records in arbitrary splits.
//!
//! Input: `[flags][splits…][stream…]`
//! - flags bit 0: put a real ClientHello (from a `tls::Session` client for
//!   the committed test CA, `data/tls/`) in front of the stream, so runs
//!   reach the states after it;
//! - bit 1: report transport EOF at the end;
//! - bit 2: take plaintext into 1-byte buffers (else 16 KiB);
//! - bit 3: offer plaintext to write after each feed.
//!
//! Asserted: no panic; each feed consumes at most its input; a feed that
//! consumes nothing leaves plaintext to take (the progress contract);
//! after an error every feed errs again and `wants_close` holds; the
//! plaintext waiting stays under 64 KiB; the bytes the session keeps
//! allocated (a counting allocator) stay under 192 KiB.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicIsize, Ordering};

use libfuzzer_sys::fuzz_target;
use vmcrelay::tls::{ClientTlsOptions, Limits, ServerTls, ServerTlsFiles, Session, client_config};
use vmcrelay_fuzz::Control;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

fn note(delta: isize) {
    LIVE.fetch_add(delta, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; the
// bookkeeping is two atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size().cast_signed());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-layout.size().cast_signed());
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size.cast_signed() - layout.size().cast_signed());
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_RETAINED_BYTES: isize = 192 * 1024;

fn data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tls").join(name)
}

struct Fixture {
    tls: ServerTls,
    hello: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tls = ServerTls::load(ServerTlsFiles::from_x509_dir(data("")), Limits::default())
            .expect("committed test certificate");
        let client_cfg = client_config(&ClientTlsOptions::with_ca_file(data("ca-cert.pem"))).expect("committed test CA");
        let mut client = Session::client(client_cfg, "127.0.0.1", Limits::default()).expect("client session");
        let mut hello = vec![0u8; 16 * 1024];
        let n = client.poll_output(&mut hello);
        hello.truncate(n);
        Fixture { tls, hello }
    })
}

fuzz_target!(|input: &[u8]| {
    let fx = fixture();
    let mut c = Control::new(input);
    let flags = c.u8();
    let mut splits = c.splits();
    let tail = c.rest();
    let mut stream = Vec::with_capacity(fx.hello.len() + tail.len());
    if flags & 1 != 0 {
        stream.extend_from_slice(&fx.hello);
    }
    stream.extend_from_slice(tail);
    let take_cap = if flags & 4 != 0 { 1 } else { 16 * 1024 };
    let mut plain = vec![0u8; 16 * 1024];
    let mut out = vec![0u8; 16 * 1024];

    let base = LIVE.load(Ordering::Relaxed);
    let mut s = fx.tls.session().expect("server session");
    let mut failed = false;
    let mut fed = 0;
    'feed: while fed < stream.len() {
        let len = splits.next_len(stream.len() - fed);
        let chunk = &stream[fed..fed + len];
        fed += len;
        let mut pos = 0;
        while pos < chunk.len() {
            match s.feed_ciphertext(&chunk[pos..]) {
                Ok(used) => {
                    assert!(!failed, "a failed session accepted input");
                    assert!(used <= chunk.len() - pos, "consumed more than offered");
                    assert!(used > 0 || s.plaintext_len() > 0, "no progress and nothing to take");
                    pos += used;
                }
                Err(_) => {
                    failed = true;
                    assert!(s.wants_close());
                    while s.poll_output(&mut out) > 0 {}
                    break 'feed;
                }
            }
            assert!(s.plaintext_len() < 64 * 1024, "plaintext buffered: {}", s.plaintext_len());
            while s.take_plaintext(&mut plain[..take_cap]) > 0 {}
            if flags & 8 != 0 {
                let _ = s.write_plaintext(&chunk[..chunk.len().min(4096)]);
            }
            while s.poll_output(&mut out) > 0 {}
            assert!(LIVE.load(Ordering::Relaxed) - base < MAX_RETAINED_BYTES, "session memory");
        }
    }
    if failed {
        assert!(s.feed_ciphertext(b"\x16\x03\x01\x00\x00").is_err(), "errors repeat");
    } else if flags & 2 != 0 {
        let _ = s.feed_eof();
        while s.take_plaintext(&mut plain[..take_cap]) > 0 {}
        assert!(s.wants_close(), "EOF ends the session");
    }
});
