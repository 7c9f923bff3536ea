//! Writes the committed seed corpus: real link messages (spice-gtk's main
//! link, links for spicevmc channels), valid tickets for the fuzz key, a
//! server reply carrying the real DER key, and framed data messages.
//!
//! ```text
//! cargo run --manifest-path tests/fuzz/Cargo.toml --example gen_corpus [-- DIR]
//! ```
//! DIR defaults to `tests/fuzz/corpus`. Output is deterministic; rerun it
//! whenever a target's input layout (its doc comment) changes, together
//! with `tests/fuzz/capture_seeds.py` (seeds cut from the real capture in
//! `tests/data/`, which need tshark).

use std::path::{Path, PathBuf};

use vmcrelay::proto::auth::{encrypt_ticket, seeded_rng};
use vmcrelay::proto::caps::Caps;
use vmcrelay::proto::consts::*;
use vmcrelay::proto::framing::{Encoder, HeaderKind};
use vmcrelay::proto::link::{LinkErrorCode, LinkMess, LinkReply};
use vmcrelay::proto::msg::{
    ChannelsList, ClientMsg, CompressedData, Disconnecting, MainInit, MouseMode, Notify, Ping, PortInit, Pong,
    ServerMsg, SetAck, WaitChannel, WaitForChannels, compress_lz4, lz4_scratch_len,
};
use vmcrelay::proto::wire::Writer;
use vmcrelay_fuzz::public_der;

/// spice-gtk's main link, byte for byte (as in src/proto/link.rs tests):
/// common caps AUTH_SELECTION | AUTH_SASL | MINI_HEADER.
const GTK_MAIN_LINK: [u8; 42] = [
    0x52, 0x45, 0x44, 0x51, 2, 0, 0, 0, 2, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x12,
    0, 0, 0, 0x0d, 0, 0, 0, 0x0f, 0, 0, 0,
];

/// spice-gtk 0.42's port-channel link from tests/data's capture (session
/// 0xdbd7186f, common caps AUTH_SELECTION | AUTH_SASL | MINI_HEADER, no
/// channel caps).
const GTK_PORT_LINK: [u8; 38] = [
    0x52, 0x45, 0x44, 0x51, 2, 0, 0, 0, 2, 0, 0, 0, 0x16, 0, 0, 0, 0x6f, 0x18, 0xd7, 0xdb, 0x0a, 0, 1, 0, 0, 0, 0,
    0, 0, 0, 0x12, 0, 0, 0, 0x0d, 0, 0, 0,
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
    write(
        &dir,
        s,
        "capture-port-link-our-ticket",
        &cat(&[&[4], &accept_lz4, &[0], &splits(&[]), &GTK_PORT_LINK, &mech, &t_empty]),
    );
    write(&dir, s, "usbredir-wrong-password", &cat(&[&[2], &accept_lz4, &[0], &splits(&[]), &usb, &mech, &t_empty]));
    write(
        &dir,
        s,
        "port-no-auth-selection-deferred",
        &cat(&[&[8], &accept_lz4, &[1], &splits(&[16, 1]), &legacy, &t_empty]),
    );
    // Deferred decision, stream ends right after the link message: no reply.
    write(&dir, s, "deferred-decision-eof", &cat(&[&[8], &accept_lz4, &[0], &splits(&[]), gtk]));
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

    // messages: [flags][channel type][lz4 limit][lz4 size u32][splits][stream]
    let plain: Vec<u8> = (0..2000u32).map(|i| b"usbredir packet "[(i % 16) as usize]).collect();
    let mut packed = vec![0u8; lz4_scratch_len(plain.len())];
    let n = compress_lz4(&plain, &mut packed).expect("repetitive data compresses");
    let lz4 = CompressedData::lz4(u32::try_from(plain.len()).expect("small"), &packed[..n]);
    let entries = [WaitChannel { channel_type: 9, channel_id: 0, message_serial: 7 }.to_bytes()];
    let m = "messages";
    let main_server = [
        ServerMsg::SetAck(SetAck { generation: 1, window: 2 }),
        ServerMsg::MainInit(MainInit { session_id: 0x2a, supported_mouse_modes: 3, current_mouse_mode: 2, ..MainInit::default() }),
        ServerMsg::ChannelsList(ChannelsList { entries: &[[1, 0], [9, 0], [10, 0], [200, 1]] }),
        ServerMsg::Name { name: b"vm-under-test" },
        ServerMsg::Uuid { uuid: *b"0123456789abcdef" },
        ServerMsg::Notify(Notify { time_stamp: 1, severity: 1, visibility: 2, what: 0, message: b"keyboard grab" }),
        ServerMsg::Ping(Ping { id: 5, timestamp: 99, padding_len: 100 }),
        ServerMsg::WaitForChannels(WaitForChannels { entries: &entries }),
        ServerMsg::MouseMode(MouseMode { supported: 3, current: 1 }),
        ServerMsg::MultiMediaTime { time: 1234 },
        ServerMsg::AgentToken { num_tokens: 10 },
        ServerMsg::Disconnecting(Disconnecting { time_stamp: 3, reason: 8 }),
    ];
    let framed = |kind, msgs: &[ServerMsg<'_>]| {
        let mut enc = Encoder::new(kind);
        let mut out = Vec::new();
        for msg in msgs {
            let mut buf = vec![0u8; msg.framed_len(kind)];
            let n = msg.emit_framed(&mut enc, &mut buf).expect("fits");
            out.extend_from_slice(&buf[..n]);
        }
        out
    };
    let framed_client = |kind, msgs: &[ClientMsg<'_>]| {
        let mut enc = Encoder::new(kind);
        let mut out = Vec::new();
        for msg in msgs {
            let mut buf = vec![0u8; msg.framed_len(kind)];
            let n = msg.emit_framed(&mut enc, &mut buf).expect("fits");
            out.extend_from_slice(&buf[..n]);
        }
        out
    };
    let lz4_size = 2000u32.to_le_bytes();
    write(&dir, m, "main-server", &cat(&[&[2, 1, 60], &lz4_size, &splits(&[]), &framed(HeaderKind::Full, &main_server)]));
    let port_server = cat(&[
        &framed(
            HeaderKind::Mini,
            &[
                ServerMsg::PortInit(PortInit { name: b"org.qemu.monitor.qmp.0", opened: true }),
                ServerMsg::PortEvent { event: PORT_EVENT_OPENED },
                ServerMsg::CompressedData(lz4),
            ],
        ),
        &frames(HeaderKind::Mini, &[(MSG_SPICEVMC_DATA, b"{\"execute\":\"qmp_capabilities\"}")]),
    ]);
    write(&dir, m, "port-server-split", &cat(&[&[3, 10, 60], &lz4_size, &splits(&[7, 1, 130]), &port_server]));
    let usb_client = cat(&[
        &framed_client(
            HeaderKind::Mini,
            &[
                ClientMsg::AckSync { generation: 1 },
                ClientMsg::Ack,
                ClientMsg::Pong(Pong { id: 5, timestamp: 99 }),
                ClientMsg::CompressedData(lz4),
                ClientMsg::Disconnecting(Disconnecting { time_stamp: 4, reason: 0 }),
            ],
        ),
        &frames(HeaderKind::Mini, &[(MSG_SPICEVMC_DATA, &[0x55; 40])]),
    ]);
    write(&dir, m, "usbredir-client", &cat(&[&[1, 9, 250], &lz4_size, &splits(&[]), &usb_client]));
    let main_client = framed_client(
        HeaderKind::Full,
        &[
            ClientMsg::ClientInfo { cache_size: 0 },
            ClientMsg::AttachChannels,
            ClientMsg::MouseModeRequest { mode: 2 },
            ClientMsg::AgentStart { num_tokens: u32::MAX },
            ClientMsg::AgentToken { num_tokens: 3 },
        ],
    );
    write(&dir, m, "main-client", &cat(&[&[0, 1, 0], &[0; 4], &splits(&[]), &main_client]));
    let port_client = framed_client(HeaderKind::Full, &[ClientMsg::PortEvent { event: PORT_EVENT_BREAK }]);
    write(&dir, m, "port-client-event", &cat(&[&[0, 10, 1], &[9, 0, 0, 0], &splits(&[]), &port_client]));
    println!("seeds written to {}", dir.display());
}
