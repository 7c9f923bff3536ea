//! Writes the committed seed corpus: real link messages (spice-gtk's main
//! link, links for spicevmc channels), valid tickets for the fuzz key, a
//! server reply carrying the real DER key, and framed data messages.
//!
//! ```text
//! cargo run --manifest-path tests/fuzz/Cargo.toml --example gen_corpus [-- DIR]
//! ```
//! DIR defaults to `tests/fuzz/corpus`. Output is deterministic; rerun it
//! whenever a target's input layout (its doc comment) changes.

use std::path::{Path, PathBuf};

use vmcrelay::proto::auth::{encrypt_ticket, seeded_rng};
use vmcrelay::proto::caps::Caps;
use vmcrelay::proto::consts::*;
use vmcrelay::proto::framing::{Encoder, HeaderKind};
use vmcrelay::proto::link::{LinkErrorCode, LinkMess, LinkReply};
use vmcrelay::proto::wire::Writer;
use vmcrelay_fuzz::public_der;

/// spice-gtk's main link, byte for byte (as in src/proto/link.rs tests):
/// common caps AUTH_SELECTION | AUTH_SASL | MINI_HEADER.
const GTK_MAIN_LINK: [u8; 42] = [
    0x52, 0x45, 0x44, 0x51, 2, 0, 0, 0, 2, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x12,
    0, 0, 0, 0x0d, 0, 0, 0, 0x0f, 0, 0, 0,
];

fn link_mess(channel_type: u8, common: &[u32], channel: &[u32]) -> Vec<u8> {
    let m = LinkMess {
        connection_id: 0x2a,
        channel_type,
        channel_id: 0,
        common_caps: Caps::from_bits(common),
        channel_caps: Caps::from_bits(channel),
    };
    let mut buf = [0u8; 256];
    let mut w = Writer::new(&mut buf);
    m.emit(&mut w).expect("fits");
    let n = w.written();
    buf[..n].to_vec()
}

fn reply(r: &LinkReply) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let mut w = Writer::new(&mut buf);
    r.emit(&mut w).expect("fits");
    let n = w.written();
    buf[..n].to_vec()
}

fn ticket(password: &[u8], seed: u8) -> Vec<u8> {
    encrypt_ticket(&mut seeded_rng([seed; 32]), public_der(), password).expect("encrypts").to_vec()
}

fn frames(kind: HeaderKind, msgs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut enc = Encoder::new(kind);
    let mut out = Vec::new();
    for (t, body) in msgs {
        let mut h = [0u8; DATA_HEADER_LEN];
        let n = enc.header(*t, u32::try_from(body.len()).expect("small"), &mut h).expect("fits");
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(body);
    }
    out
}

/// `[count][sizes…]` as `Control::splits` reads it.
fn splits(sizes: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(sizes.len()).expect("≤ 15 sizes")];
    v.extend_from_slice(sizes);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(d.join(name), bytes).expect("write seed");
}

fn main() {
    let dir: PathBuf = std::env::args().nth(1).map_or_else(|| "tests/fuzz/corpus".into(), PathBuf::from);
    let mech = AUTH_MECH_SPICE.to_le_bytes();

    // server_link: [config][decision][caps u32][drain][splits][stream]
    let accept_lz4 = [0u8, 1, 0, 0, 0];
    let t_empty = ticket(b"", 1);
    let t_hunter = ticket(b"hunter2", 2);
    let gtk = &GTK_MAIN_LINK[..];
    let usb = link_mess(9, &[CAP_AUTH_SELECTION, CAP_AUTH_SPICE, CAP_MINI_HEADER], &[0]);
    let legacy = link_mess(10, &[], &[0]); // no AUTH_SELECTION: ticket follows the link at once
    let s = "server_link";
    write(&dir, s, "gtk-main-linked", &cat(&[&[4], &accept_lz4, &[0], &splits(&[]), gtk, &mech, &t_empty]));
    write(
        &dir,
        s,
        "usbredir-password-split",
        &cat(&[&[2 | 4], &accept_lz4, &[3], &splits(&[3, 1, 7, 200, 0]), &usb, &mech, &t_hunter]),
    );
    write(&dir, s, "usbredir-wrong-password", &cat(&[&[2], &accept_lz4, &[0], &splits(&[]), &usb, &mech, &t_empty]));
    write(
        &dir,
        s,
        "port-no-auth-selection-deferred",
        &cat(&[&[8], &accept_lz4, &[1], &splits(&[16, 1]), &legacy, &t_empty]),
    );
    write(&dir, s, "bad-connection-id", &cat(&[&[0], &[2, 0, 0, 0, 0], &[0], &splits(&[]), &usb, &mech, &t_empty]));
    write(
        &dir,
        s,
        "fail-after-auth-9",
        &cat(&[&[0], &[3 | 9 << 3, 0, 0, 0, 0], &[0], &splits(&[]), &usb, &mech, &t_empty]),
    );
    write(
        &dir,
        s,
        "accept-then-confirm-linked",
        &cat(&[&[4 | 8], &[1, 1, 0, 0, 0], &[9], &splits(&[100, 0]), gtk, &mech, &t_empty]),
    );
    write(
        &dir,
        s,
        "accept-then-confirm-refused-9",
        &cat(&[&[0], &[1 | 9 << 3, 1, 0, 0, 0], &[0], &splits(&[]), &usb, &mech, &t_empty]),
    );
    write(&dir, s, "unknown-channel", &cat(&[&[0], &[4, 0, 0, 0, 0], &[0], &splits(&[]), &link_mess(77, &[0, 1], &[])]));
    let sasl = AUTH_MECH_SASL.to_le_bytes();
    write(&dir, s, "sasl-mechanism-drained", &cat(&[&[0], &accept_lz4, &[128], &splits(&[42, 4]), gtk, &sasl]));
    // Crashes until the error reply after a bad mechanism fits behind an
    // undrained link reply (see tests/fuzz/README.md, "Findings").
    let regressions = dir.parent().map_or_else(|| PathBuf::from("regressions"), |p| p.join("regressions"));
    write(&regressions, s, "reply-overflow-sasl-mechanism", &cat(&[&[0], &accept_lz4, &[0], &splits(&[]), gtk, &sasl]));
    write(&dir, s, "http-garbage", &cat(&[&[0], &[0; 5], &[0], &splits(&[]), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]));

    // client_link: [flags][reply caps][channel type][password len][drain][splits][stream]
    let server_caps = Caps::from_bits(&[CAP_AUTH_SELECTION, CAP_AUTH_SPICE, CAP_MINI_HEADER]);
    let good = reply(&LinkReply {
        error: 0,
        pub_key: *public_der(),
        common_caps: server_caps,
        channel_caps: Caps::from_bits(&[SPICEVMC_CAP_DATA_COMPRESS_LZ4]),
    });
    let ok = 0u32.to_le_bytes();
    let c = "client_link";
    write(&dir, c, "reply-real-key-linked", &cat(&[&[1, 0, 9, 0, 0], &splits(&[]), &good, &ok]));
    write(&dir, c, "reply-real-key-split", &cat(&[&[1, 0, 10, 7, 5], &splits(&[1, 15, 130, 0]), &good, &ok]));
    write(&dir, c, "prepended-reply-result-ok", &cat(&[&[3, 0x0b, 9, 0, 0], &splits(&[]), &ok]));
    write(
        &dir,
        c,
        "prepended-reply-denied",
        &cat(&[&[2, 0x03, 128, 7, 0], &splits(&[2]), &LinkErrorCode::PermissionDenied.code().to_le_bytes()]),
    );
    write(
        &dir,
        c,
        "error-reply",
        &cat(&[&[0, 0, 9, 0, 0], &splits(&[]), &reply(&LinkReply::error(LinkErrorCode::InvalidMagic))]),
    );
    write(&dir, c, "password-too-long", &[4, 0, 9, 3, 0]);

    // deframer: [flags][splits][stream]
    let mini_msgs = frames(
        HeaderKind::Mini,
        &[(101, b"hello usbredir"), (3, &[]), (102, &[1, 0, 0, 0, 14, 0, 0, 0, 0x40, b'x']), (201, &[0])],
    );
    let full_msgs = frames(HeaderKind::Full, &[(101, &[0x55; 300]), (4, &[0; 12]), (2, &[])]);
    let d = "deframer";
    write(&dir, d, "mini-messages", &cat(&[&[1], &splits(&[]), &mini_msgs]));
    write(&dir, d, "mini-messages-bytewise", &cat(&[&[1], &splits(&[1]), &mini_msgs]));
    write(&dir, d, "full-messages-split", &cat(&[&[0], &splits(&[5, 17, 129, 0]), &full_msgs]));
    write(&dir, d, "full-messages-spliced", &cat(&[&[2], &splits(&[40, 7]), &full_msgs]));
    write(&dir, d, "full-truncated", &cat(&[&[0], &splits(&[]), &full_msgs[..full_msgs.len() - 30]]));
    println!("seeds written to {}", dir.display());
}
