//! `ClientLink` fed arbitrary server bytes in arbitrary splits.
//!
//! Input: `[flags][reply caps][channel type][password len][drain][splits…][stream…]`
//! - flags bit 0: offer mini header; bit 1: prepend a valid link reply
//!   (real DER key of the fixed ticket key, common caps word = reply caps
//!   byte, channel caps = bit 0) so the run starts at the result stage;
//!   bit 2: password of 61..=68 bytes, which `ClientLink::new` must refuse.
//! - password len: `% 61` bytes of `'p'`.
//! - drain: output buffer size (0: drain only at the end).
//!
//! Asserted: no panic; consumption never exceeds the offer; progress unless
//! done; one final action; output bounded; a successful link consumed
//! exactly reply + result; a ticket sent for the fixed key decrypts to the
//! password.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrelay::proto::caps::{Caps, KEPT_CAP_WORDS};
use vmcrelay::proto::client_link::{Action, ClientLink, ClientLinkConfig};
use vmcrelay::proto::consts::{
    AUTH_MECH_SPICE, CAP_AUTH_SELECTION, LINK_HEADER_LEN, LINK_MESS_LEN, MAX_PASSWORD_LEN, TICKET_LEN,
};
use vmcrelay::proto::link::LinkReply;
use vmcrelay::proto::wire::Writer;
use vmcrelay_fuzz::{Control, fixed_ticket_key, public_der};

/// Largest client output: header + link mess + caps + mechanism + ticket.
const MAX_OUT: usize = LINK_HEADER_LEN + LINK_MESS_LEN + 4 * 2 * KEPT_CAP_WORDS + 4 + TICKET_LEN;

fuzz_target!(|data: &[u8]| {
    let mut c = Control::new(data);
    let flags = c.u8();
    let reply_caps = c.u8();
    let channel_type = c.u8();
    let password_len = if flags & 4 != 0 {
        MAX_PASSWORD_LEN + 1 + usize::from(c.u8() & 7)
    } else {
        usize::from(c.u8()) % (MAX_PASSWORD_LEN + 1)
    };
    let drain_len = usize::from(c.u8());
    let mut splits = c.splits();
    let rest = c.rest();

    let password = vec![b'p'; password_len];
    let cfg = ClientLinkConfig {
        connection_id: 0x1234_5678,
        channel_type,
        channel_id: 0,
        channel_caps: Caps::from_bits(&[0]),
        password: password.clone(),
        mini_header: flags & 1 != 0,
        defer_ticket: false,
    };
    let link = ClientLink::new(cfg, [2; 32]);
    if password_len > MAX_PASSWORD_LEN {
        assert!(link.is_err(), "a {password_len}-byte password was accepted");
        return;
    }
    let Ok(mut link) = link else { panic!("valid config refused: {link:?}") };

    let mut stream = Vec::with_capacity(rest.len() + 512);
    let mut prepended = None;
    if flags & 2 != 0 {
        let reply = LinkReply {
            error: 0,
            pub_key: *public_der(),
            common_caps: Caps::from_words(&[u32::from(reply_caps)]),
            channel_caps: Caps::from_bits(&[0]),
        };
        let mut buf = [0u8; 512];
        let mut w = Writer::new(&mut buf);
        reply.emit(&mut w).expect("reply fits");
        let n = w.written();
        stream.extend_from_slice(&buf[..n]);
        prepended = Some((n, reply));
    }
    stream.extend_from_slice(rest);

    let mut out = Vec::new();
    let mut final_action = None;
    let drain = |link: &mut ClientLink, out: &mut Vec<u8>, all: bool| {
        if drain_len == 0 && !all {
            return;
        }
        let mut buf = [0u8; 256];
        let step = if drain_len == 0 { buf.len() } else { drain_len };
        loop {
            let pending = link.pending_output().len();
            assert!(out.len() + pending <= MAX_OUT, "output beyond the link stage's bound");
            let n = link.poll_output(&mut buf[..step]);
            assert!(n <= pending);
            out.extend_from_slice(&buf[..n]);
            if n == 0 {
                break;
            }
        }
    };

    let mut fed = 0;
    'feed: while fed < stream.len() {
        let len = splits.next_len(stream.len() - fed);
        let chunk = &stream[fed..fed + len];
        let mut off = 0;
        while off < chunk.len() {
            let used = link.handle_input(&chunk[off..]);
            assert!(used <= chunk.len() - off);
            off += used;
            let mut acted = false;
            while let Some(a) = link.poll_action() {
                acted = true;
                assert!(final_action.is_none(), "second final action {a:?}");
                assert!(link.is_done(), "final action but not done");
                final_action = Some(a);
            }
            drain(&mut link, &mut out, false);
            if used == 0 && !acted {
                assert!(link.is_done(), "no progress on {} bytes while not done", chunk.len() - off);
                fed += off;
                break 'feed;
            }
        }
        fed += off;
    }
    drain(&mut link, &mut out, true);

    // The link message always goes out first, in full.
    let mess_len = LINK_HEADER_LEN + u32::from_le_bytes([out[12], out[13], out[14], out[15]]) as usize;
    assert!(out.len() >= mess_len);

    if let Some(Action::Linked(l)) = final_action {
        assert_eq!(l.channel_type, channel_type);
        let reply_len = LINK_HEADER_LEN + u32::from_le_bytes([stream[12], stream[13], stream[14], stream[15]]) as usize;
        assert_eq!(fed, reply_len + 4, "link stage over-/under-read");
    }

    // With the prepended reply the ticket is ours to check.
    if let Some((reply_len, reply)) = prepended {
        if fed >= reply_len && out.len() > mess_len {
            let mut t = &out[mess_len..];
            if reply.common_caps.has(CAP_AUTH_SELECTION) {
                assert_eq!(&t[..4], &AUTH_MECH_SPICE.to_le_bytes());
                t = &t[4..];
            }
            let ticket: &[u8; TICKET_LEN] = t.try_into().expect("one ticket after the mechanism");
            let plain = fixed_ticket_key().decrypt_ticket(ticket).expect("ticket decrypts with the reply's key");
            assert_eq!(plain, password);
        }
    }

    if link.is_done() {
        let before = out.len();
        assert_eq!(link.handle_input(&[0; 8]), 0);
        assert!(link.poll_action().is_none());
        drain(&mut link, &mut out, true);
        assert_eq!(out.len(), before);
    }
});
