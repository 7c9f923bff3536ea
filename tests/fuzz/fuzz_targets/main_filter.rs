//! The whole-VM proxy's main-channel filter fed arbitrary upstream bytes in
//! arbitrary splits (hostile CHANNELS_LIST counts, truncated INIT, huge
//! sizes).
//!
//! Input: `[flags][n hide][n served][entries…][splits…][stream…]`
//! - flags bit 0: full header instead of mini.
//!
//! Asserted: no panic; output per feed bounded by input + one held message;
//! once a feed errs the caller stops (as the relay closes the session); the
//! same stream split differently gives the same output and session id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrelay::proto::framing::HeaderKind;
use vmcrelay::proto::main_filter::{MAX_HELD, MainFilter};

fn run(kind: HeaderKind, hide: &[(u8, u8)], served: &[(u8, u8)], splits: &[u8], stream: &[u8]) -> (Vec<u8>, Option<u32>, bool) {
    let mut f = MainFilter::new(kind, hide.to_vec(), served.to_vec());
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(splits.get(i % splits.len().max(1)).copied().unwrap_or(255)) + 1).min(rest.len());
        i += 1;
        let before = out.len();
        let r = f.feed(&rest[..n], &mut out);
        assert!(out.len() - before <= n + MAX_HELD + 36 + 2 * served.len(), "output bounded");
        rest = &rest[n..];
        if r.is_err() {
            return (out, f.session_id(), true);
        }
    }
    (out, f.session_id(), false)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let kind = if data[0] & 1 == 1 { HeaderKind::Full } else { HeaderKind::Mini };
    let (nh, ns) = (usize::from(data[1] % 8), usize::from(data[2] % 8));
    let mut p = 3;
    let mut take = |n: usize| {
        let v: Vec<(u8, u8)> = data.get(p..p + 2 * n).unwrap_or_default().chunks_exact(2).map(|c| (c[0], c[1])).collect();
        p = (p + 2 * n).min(data.len());
        v
    };
    let hide = take(nh);
    let served = take(ns);
    let nsplit = usize::from(data.get(p).copied().unwrap_or(0) % 16);
    p = (p + 1).min(data.len());
    let splits = data.get(p..p + nsplit).unwrap_or_default().to_vec();
    p = (p + nsplit).min(data.len());
    let stream = &data[p..];
    let (a, sa, ea) = run(kind, &hide, &served, &splits, stream);
    if !ea {
        // Split-independence: one whole feed gives the same bytes and id.
        let (b, sb, eb) = run(kind, &hide, &served, &[255; 1], stream);
        if !eb && stream.len() <= 256 {
            assert_eq!(a, b);
            assert_eq!(sa, sb);
        }
    }
});
