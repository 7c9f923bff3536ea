//! Decodes a real capture (spice-gtk 0.42 ↔ QEMU 7.2 / spice-server 0.15.1,
//! see `tests/data/README.md`) with `proto` alone: link messages, the link
//! reply and result, then every data-stage message of the main, port and
//! inputs connections, both directions.
//!
//! The pcapng container is read with `pcap-parser`; Ethernet, IPv4 and TCP
//! are decoded here (just the fields needed) and each TCP direction is
//! reassembled by sequence number, so retransmissions and segment
//! boundaries do not matter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;

use pcap_parser::{Block, Linktype, PcapBlockOwned, PcapNGSlice};
use vmcrelay::proto::channel::{CH_INPUTS, CH_MAIN, CH_PORT, ChannelClass, ChannelKind};
use vmcrelay::proto::consts::*;
use vmcrelay::proto::framing::{Deframer, Event, FrameError, HeaderKind, MsgHeader};
use vmcrelay::proto::link::{LinkHeader, LinkMess, LinkReply};
use vmcrelay::proto::msg::*;

const CAPTURE: &[u8] = include_bytes!("data/qemu72-spicegtk042-main-port-inputs.pcapng");
const SPICE_PORT: u16 = 5962;

// ---------------------------------------------------------------------------
// packets → TCP streams

/// One side of a TCP connection.
type Endpoint = ([u8; 4], u16);

#[derive(Debug)]
struct Segment {
    src: Endpoint,
    dst: Endpoint,
    seq: u32,
    syn: bool,
    payload: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The IPv4 packet inside a link-layer frame, if it carries one.
fn ipv4_of(linktype: Linktype, frame: &[u8]) -> Option<&[u8]> {
    match linktype {
        Linktype::ETHERNET => (be16(frame, 12) == 0x0800).then(|| &frame[14..]),
        Linktype::NULL => (u32::from_le_bytes(frame[..4].try_into().ok()?) == 2).then(|| &frame[4..]),
        Linktype::LINUX_SLL => (be16(frame, 14) == 0x0800).then(|| &frame[16..]),
        Linktype::LINUX_SLL2 => (be16(frame, 0) == 0x0800).then(|| &frame[20..]),
        Linktype::RAW | Linktype::IPV4 => Some(frame),
        other => panic!("unsupported link type {other}"),
    }
}

/// A TCP segment inside an IPv4 packet, if it is one.
fn tcp_of(ip: &[u8]) -> Option<Segment> {
    if ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    assert_eq!(be16(ip, 6) & 0x3fff, 0, "no IP fragments on loopback");
    let ip = &ip[..total];
    let src_ip: [u8; 4] = ip[12..16].try_into().ok()?;
    let dst_ip: [u8; 4] = ip[16..20].try_into().ok()?;
    let tcp = &ip[ihl..];
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    Some(Segment {
        src: (src_ip, be16(tcp, 0)),
        dst: (dst_ip, be16(tcp, 2)),
        seq: be32(tcp, 4),
        syn: flags & 0x02 != 0,
        payload: tcp[data_offset..].to_vec(),
    })
}

/// Every TCP segment of the capture, in capture order.
fn segments() -> Vec<Segment> {
    let mut linktypes = Vec::new();
    let mut out = Vec::new();
    for block in PcapNGSlice::from_slice(CAPTURE).expect("pcapng") {
        match block.expect("block") {
            PcapBlockOwned::NG(Block::SectionHeader(_)) => linktypes.clear(),
            PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => linktypes.push(idb.linktype),
            PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                let frame = &epb.data[..epb.caplen as usize];
                assert_eq!(epb.caplen, epb.origlen, "capture not truncated");
                let lt = linktypes[epb.if_id as usize];
                if let Some(seg) = ipv4_of(lt, frame).and_then(tcp_of) {
                    out.push(seg);
                }
            }
            _ => {}
        }
    }
    out
}

/// One TCP connection: both directions reassembled.
#[derive(Debug)]
struct Connection {
    client: Endpoint,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// Reassembles one direction from its segments by sequence number.
fn reassemble(isn: u32, segs: &[&Segment]) -> Vec<u8> {
    let mut by_offset: Vec<(u32, &[u8])> = segs
        .iter()
        .filter(|s| !s.payload.is_empty())
        // data starts one past the SYN's sequence number
        .map(|s| (s.seq.wrapping_sub(isn.wrapping_add(1)), &s.payload[..]))
        .collect();
    by_offset.sort_by_key(|&(off, _)| off);
    let mut stream = Vec::new();
    for (off, data) in by_offset {
        let off = off as usize;
        assert!(off <= stream.len(), "gap in TCP stream at {off} (have {})", stream.len());
        let end = off + data.len();
        if end > stream.len() {
            // a retransmission overlapping what we have must agree with it
            assert_eq!(&stream[off..], &data[..stream.len() - off], "retransmission differs");
            stream.extend_from_slice(&data[stream.len() - off..]);
        }
    }
    stream
}

/// The capture's TCP connections to the SPICE port, in the order they opened.
fn connections() -> Vec<Connection> {
    let segs = segments();
    let mut order: Vec<Endpoint> = Vec::new();
    let mut isn: BTreeMap<(Endpoint, Endpoint), u32> = BTreeMap::new();
    for s in &segs {
        if s.syn {
            isn.insert((s.src, s.dst), s.seq);
            if s.dst.1 == SPICE_PORT && !order.contains(&s.src) {
                order.push(s.src);
            }
        }
    }
    order
        .into_iter()
        .map(|client| {
            let server = segs.iter().find(|s| s.src == client).expect("client segment").dst;
            let dir = |from: Endpoint, to: Endpoint| {
                let list: Vec<&Segment> = segs.iter().filter(|s| s.src == from && s.dst == to).collect();
                reassemble(isn[&(from, to)], &list)
            };
            Connection { client, to_server: dir(client, server), to_client: dir(server, client) }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// SPICE

/// Everything decoded from one connection.
#[derive(Debug, Default)]
struct Decoded {
    channel_type: u8,
    connection_id: u32,
    server_types: Vec<u16>,
    client_types: Vec<u16>,
    /// Client messages a foreign channel carries that vmcrelay does not speak.
    client_foreign: Vec<u16>,
    server_data: Vec<u8>,
    client_data: Vec<u8>,
    session_id: Option<u32>,
    port_name: Option<Vec<u8>>,
    channels: Vec<(u8, u8)>,
    pings: Vec<(u32, u64, u32)>,
    pongs: Vec<(u32, u64)>,
    notify: Vec<Vec<u8>>,
    name: Option<Vec<u8>>,
}

/// Deframes a whole stream; for each message calls `on_msg(header, body)`
/// with the full body (DATA bodies are delivered in chunks to `on_data`
/// and then `on_msg` with an empty body). Returns whether the stream ended
/// on a message boundary.
fn deframe(
    hk: HeaderKind,
    stream: &[u8],
    pass_through: bool,
    on_data: &mut dyn FnMut(&[u8]),
    on_msg: &mut dyn FnMut(MsgHeader, &ControlBuf<4096>),
) -> bool {
    let mut de = Deframer::new(hk);
    let mut cb = Box::new(ControlBuf::<4096>::new());
    let mut pos = 0;
    loop {
        let (n, ev) = de.advance(&stream[pos..]);
        match ev {
            Some(Event::Header(h)) => cb.start(h),
            Some(Event::Body { offset, len, last }) => {
                let body = &stream[pos + offset..pos + offset + len];
                if pass_through && cb.header().msg_type == MSG_SPICEVMC_DATA {
                    on_data(body);
                } else {
                    cb.push(body);
                }
                if last {
                    on_msg(cb.header(), &cb);
                }
            }
            None => {}
        }
        pos += n;
        if n == 0 && ev.is_none() {
            break;
        }
    }
    assert_eq!(pos, stream.len());
    de.at_boundary()
}

fn decode(conn: &Connection) -> Decoded {
    // --- link stage, client → server: header, link message, mechanism, ticket
    let c = &conn.to_server;
    let h = LinkHeader::parse(c[..LINK_HEADER_LEN].try_into().unwrap()).expect("link header");
    let body_end = LINK_HEADER_LEN + h.size as usize;
    let mess = LinkMess::parse(&c[LINK_HEADER_LEN..body_end]).expect("link message");
    // --- server → client: header, reply, result
    let s = &conn.to_client;
    let h = LinkHeader::parse(s[..LINK_HEADER_LEN].try_into().unwrap()).expect("reply header");
    let reply_end = LINK_HEADER_LEN + h.size as usize;
    let reply = LinkReply::parse(&s[LINK_HEADER_LEN..reply_end]).expect("link reply");
    assert_eq!(reply.error, 0);
    assert_eq!(&reply.pub_key[..4], &[0x30, 0x81, 0x9f, 0x30], "DER RSA key");
    assert_eq!(&s[reply_end..reply_end + 4], &[0; 4], "link result OK");
    let s_data = &s[reply_end + 4..];

    let both_select = mess.common_caps.has(CAP_AUTH_SELECTION) && reply.common_caps.has(CAP_AUTH_SELECTION);
    let mut c_pos = body_end;
    if both_select {
        assert_eq!(&c[c_pos..c_pos + 4], &AUTH_MECH_SPICE.to_le_bytes());
        c_pos += 4;
    }
    c_pos += TICKET_LEN;
    let c_data = &c[c_pos..];

    let hk = HeaderKind::negotiate(mess.common_caps.has(CAP_MINI_HEADER), reply.common_caps.has(CAP_MINI_HEADER));
    assert_eq!(hk, HeaderKind::Mini, "README: mini headers on every channel");

    let kind = ChannelKind::of(mess.channel_type).expect("known channel type");
    let pass_through = kind.class == ChannelClass::PassThrough;
    let mut d = Decoded { channel_type: mess.channel_type, connection_id: mess.connection_id, ..Decoded::default() };

    // --- data stage, server → client
    let mut server_data = Vec::new();
    let at_boundary = deframe(hk, s_data, pass_through, &mut |b| server_data.extend_from_slice(b), &mut |h, cb| {
        d.server_types.push(h.msg_type);
        if pass_through && h.msg_type == MSG_SPICEVMC_DATA {
            assert_eq!(ServerMsg::parse(kind, h.msg_type, &[]), Ok(ServerMsg::Data));
            return;
        }
        let m = cb.server_msg(kind).unwrap_or_else(|e| panic!("{kind} server type {}: {e}", h.msg_type));
        assert_eq!(m.msg_type(), h.msg_type);
        match m {
            ServerMsg::MainInit(i) => d.session_id = Some(i.session_id),
            ServerMsg::ChannelsList(l) => d.channels.extend(l.iter()),
            ServerMsg::PortInit(p) => d.port_name = Some(p.name.to_vec()),
            ServerMsg::Ping(p) => d.pings.push((p.id, p.timestamp, p.padding_len)),
            ServerMsg::Notify(n) => d.notify.push(n.message.to_vec()),
            ServerMsg::Name { name } => d.name = Some(name.to_vec()),
            _ => {}
        }
    });
    assert!(at_boundary, "{kind}: server stream ends inside a message");
    d.server_data = server_data;

    // --- data stage, client → server
    let mut client_data = Vec::new();
    let at_boundary = deframe(hk, c_data, pass_through, &mut |b| client_data.extend_from_slice(b), &mut |h, cb| {
        d.client_types.push(h.msg_type);
        if pass_through && h.msg_type == MSG_SPICEVMC_DATA {
            assert_eq!(ClientMsg::parse(kind, h.msg_type, &[]), Ok(ClientMsg::Data));
            return;
        }
        match cb.client_msg(kind) {
            Ok(ClientMsg::Pong(p)) => d.pongs.push((p.id, p.timestamp)),
            Ok(m) => assert_eq!(m.msg_type(), h.msg_type),
            // Inputs messages are not vmcrelay's: framing parses, the type is refused.
            Err(FrameError::UnexpectedType(t)) if kind.class == ChannelClass::Foreign => d.client_foreign.push(t),
            Err(e) => panic!("{kind} client type {}: {e}", h.msg_type),
        }
    });
    assert!(at_boundary, "{kind}: client stream ends inside a message");
    d.client_data = client_data;
    d
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn capture_decodes_end_to_end() {
    let conns = connections();
    let decoded: Vec<Decoded> = conns.iter().map(decode).collect();
    let types: Vec<u8> = decoded.iter().map(|d| d.channel_type).collect();
    assert_eq!(types, [CH_MAIN, CH_PORT, CH_INPUTS]);
    let [main, port, inputs] = &decoded[..] else { unreachable!() };

    // main: a fresh session, whose id every other link carries
    assert_eq!(main.connection_id, 0);
    let session = main.session_id.expect("MAIN_INIT");
    assert_ne!(session, 0);
    assert_eq!(port.connection_id, session);
    assert_eq!(inputs.connection_id, session);
    assert_eq!(main.server_types.first(), Some(&MSG_MAIN_INIT), "MAIN_INIT comes first");
    assert!(main.client_types.contains(&MSGC_MAIN_ATTACH_CHANNELS));
    assert!(main.channels.contains(&(CH_PORT, 0)) && main.channels.contains(&(CH_INPUTS, 0)), "{:?}", main.channels);
    // network test: PINGs 1, 2, 3, the third with 256 000 bytes of padding,
    // each answered with the same id and timestamp
    let test: Vec<(u32, u32)> = main.pings.iter().take(3).map(|&(id, _, pad)| (id, pad)).collect();
    assert_eq!(test, [(1, 0), (2, 0), (3, 256_000)]);
    for (ping, pong) in main.pings.iter().zip(&main.pongs) {
        assert_eq!((ping.0, ping.1), *pong);
    }
    assert_eq!(main.pings.len(), main.pongs.len());

    // port: PORT_INIT first, QMP both ways
    assert_eq!(port.server_types.first(), Some(&MSG_PORT_INIT));
    assert_eq!(port.port_name.as_deref(), Some(&b"org.qemu.monitor.qmp.0"[..]));
    assert!(contains(&port.server_data, b"{\"QMP\""), "QMP greeting");
    assert!(contains(&port.client_data, b"qmp_capabilities"));
    // The QMP client sent exactly three commands …
    assert_eq!(
        port.client_data,
        b"{\"execute\": \"qmp_capabilities\"}\r\n{\"execute\": \"query-version\"}\r\n\
          {\"execute\": \"query-qmp-schema\"}\r\n"
    );
    // … and the 207 KB schema reply stalled after whole 65 568-byte chunks
    // (reference P13): greeting, two replies, then three full device reads.
    assert_eq!(port.server_data.len(), 137 + 16 + 107 + 3 * SERVER_VMC_MAX_CHUNK);

    // Message types, in order, as tshark's SPICE dissector lists them.
    assert_eq!(main.server_types, [103, 113, 114, 4, 4, 4, 104, 7, 4, 4]);
    assert_eq!(main.client_types, [104, 3, 3, 3, 3, 3]);
    assert_eq!(port.server_types, [201, 101, 101, 101, 101, 101, 4, 4, 101]);
    assert_eq!(port.client_types, [101, 101, 101, 3, 3]);
    assert_eq!(inputs.server_types, [101, 4, 4, 102]);
    assert_eq!(inputs.client_types, [103, 3, 3]);
    assert_eq!(main.channels, [(CH_PORT, 0), (CH_INPUTS, 0)]);
    assert_eq!(main.name.as_deref(), Some(&b"QEMU 7.2.22"[..]));
    assert_eq!(main.notify, [b"keyboard channel is insecure".to_vec()]);
    // latency pings: two per channel with one random id, answered in kind
    for d in [main, port, inputs] {
        let latency: Vec<u32> = d.pings.iter().filter(|p| p.0 > 3).map(|p| p.0).collect();
        assert!(latency.len() == 2 && latency[0] == latency[1], "{latency:?}");
    }

    // inputs: framing parses; the inputs-specific client messages are refused
    // as foreign, common ones (PONG) decode
    assert!(!inputs.server_types.is_empty() && !inputs.client_types.is_empty());
    assert_eq!(inputs.client_foreign, [103], "INPUTS_KEY_MODIFIERS");
    assert_eq!(inputs.pings.len(), inputs.pongs.len());
}

#[test]
fn tcp_reassembly_survives_the_retransmitted_ticket() {
    // The port connection's ticket segment appears twice in the capture.
    let segs = segments();
    let tickets = segs.iter().filter(|s| s.dst.1 == SPICE_PORT && s.payload.len() == TICKET_LEN).count();
    assert!(tickets > 3, "three links, one of them retransmitted ({tickets})");
    let conns = connections();
    for c in &conns {
        assert_ne!(c.client.1, SPICE_PORT);
        assert!(c.to_server.starts_with(&MAGIC) && c.to_client.starts_with(&MAGIC));
    }
}
