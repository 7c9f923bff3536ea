//! `Deframer` fed an arbitrary data-stage stream in arbitrary splits,
//! compared with a naive all-at-once parser.
//!
//! Input: `[flags][splits…][stream…]`
//! - flags bit 0: mini header (else full); bit 1: hand part of each body
//!   to `skip_body`, as the splice path does (how much: the current split
//!   byte).
//!
//! Asserted: no panic; every call consumes at most its input and makes
//! progress on non-empty input; body chunks lie inside the input; no two
//! empty steps in a row; headers and the concatenated bodies (delivered +
//! skipped) equal the reference parse; `body_remaining`/`at_boundary`
//! agree with it at the end; the state is a fixed, small size.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrelay::proto::framing::{Deframer, Event, HeaderKind, MsgHeader};
use vmcrelay_fuzz::{Control, RefFrame, reference_frames};

struct Frame {
    header: MsgHeader,
    body: Vec<u8>,
    complete: bool,
}

fuzz_target!(|data: &[u8]| {
    // Bounded state: one header buffer and a few counters, no heap.
    const _: () = assert!(std::mem::size_of::<Deframer>() <= 64);

    let mut c = Control::new(data);
    let flags = c.u8();
    let mut splits = c.splits();
    let stream = c.rest();
    let mini = flags & 1 != 0;
    let use_skip = flags & 2 != 0;
    let kind = if mini { HeaderKind::Mini } else { HeaderKind::Full };

    let mut d = Deframer::new(kind);
    let mut frames: Vec<Frame> = Vec::new();
    let mut fed = 0;
    while fed < stream.len() {
        let skip_byte = splits.peek_byte();
        let len = splits.next_len(stream.len() - fed);
        let chunk = &stream[fed..fed + len];
        let mut pos = 0;
        let mut empty_steps = 0;
        loop {
            // Splice path: move some body bytes past the deframer.
            if use_skip && d.body_remaining() > 0 && pos < chunk.len() {
                let before = d.body_remaining();
                let want = u32::from(skip_byte).min(u32::try_from(chunk.len() - pos).unwrap_or(u32::MAX));
                let ended = d.skip_body(want);
                let skipped = before - d.body_remaining();
                assert_eq!(skipped, want.min(before), "skip_body clamps to the body");
                assert_eq!(ended, skipped == before, "skip_body reports the end of the body");
                let frame = frames.last_mut().expect("a body has a header");
                let skipped = skipped as usize;
                frame.body.extend_from_slice(&chunk[pos..pos + skipped]);
                frame.complete |= ended;
                pos += skipped;
            }
            let input = &chunk[pos..];
            let (n, ev) = d.advance(input);
            assert!(n <= input.len(), "consumed {n} of {}", input.len());
            match ev {
                Some(Event::Header(h)) => {
                    assert!(frames.last().is_none_or(|f| f.complete), "header inside a body");
                    if mini {
                        assert_eq!((h.serial, h.sub_list), (0, 0));
                    }
                    frames.push(Frame { header: h, body: Vec::new(), complete: false });
                }
                Some(Event::Body { offset, len, last }) => {
                    let end = offset.checked_add(len).expect("no overflow");
                    assert!(end <= n, "body chunk {offset}+{len} outside the {n} consumed bytes");
                    assert!(len > 0 || last, "empty non-final body chunk");
                    let frame = frames.last_mut().expect("body after a header");
                    assert!(!frame.complete, "body after the last chunk");
                    frame.body.extend_from_slice(&input[offset..end]);
                    frame.complete = last;
                    assert_eq!(last, frame.body.len() == frame.header.size as usize, "`last` on the wrong chunk");
                }
                None => {}
            }
            pos += n;
            if n == 0 {
                if ev.is_none() {
                    assert!(input.is_empty(), "no progress on {} bytes", input.len());
                    break;
                }
                empty_steps += 1;
                assert!(empty_steps < 2, "two steps in a row without consuming");
            } else {
                empty_steps = 0;
            }
        }
        fed += pos;
    }

    // Compare with the reference.
    let reference = reference_frames(mini, stream);
    let got: Vec<RefFrame> = frames
        .iter()
        .map(|f| RefFrame {
            msg_type: f.header.msg_type,
            size: f.header.size,
            serial: f.header.serial,
            sub_list: f.header.sub_list,
            body: f.body.clone(),
        })
        .collect();
    assert_eq!(got, reference.frames, "deframer disagrees with the reference parse");
    for (i, f) in frames.iter().enumerate() {
        let is_last = i + 1 == frames.len();
        assert!(f.complete || is_last, "message {i} left incomplete");
        assert_eq!(f.complete, f.body.len() == f.header.size as usize);
    }
    let open_body = frames.last().map_or(0, |f| f.header.size as usize - f.body.len());
    assert_eq!(d.body_remaining() as usize, open_body);
    let boundary = reference.partial_header == 0 && frames.last().is_none_or(|f| f.complete);
    assert_eq!(d.at_boundary(), boundary, "at_boundary disagrees (partial header {})", reference.partial_header);
});
