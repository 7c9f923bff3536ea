//! In-memory server ↔ client sessions past the link: the data stage of every
//! pass-through kind (DATA, LZ4 COMPRESSED_DATA, PORT_INIT / PORT_EVENT,
//! SET_ACK / ACK) with both header kinds, bytes delivered in 1-byte, 7-byte
//! and whole splits, and a main-channel exchange (MAIN_INIT →
//! ATTACH_CHANNELS → CHANNELS_LIST) whose session id then links a
//! user-defined channel.
//!
//! Both sides use only `proto`: the link state machines, the deframer with
//! a [`ControlBuf`] for control bodies (DATA bodies are streamed straight
//! into the reassembled byte stream), the message codecs and the ACK
//! counters.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use vmcrelay::proto::ack::{ClientAck, ServerAck};
use vmcrelay::proto::auth::{TicketKey, seeded_rng};
use vmcrelay::proto::caps::Caps;
use vmcrelay::proto::channel::{CH_MAIN, ChannelClass, ChannelKind};
use vmcrelay::proto::client_link::{self, ClientLink, ClientLinkConfig};
use vmcrelay::proto::consts::*;
use vmcrelay::proto::framing::{Deframer, Encoder, Event, FrameError, HeaderKind};
use vmcrelay::proto::msg::*;
use vmcrelay::proto::server_link::{self, Decision, LinkRequest, Linked, ServerLink, ServerLinkConfig};

// ---------------------------------------------------------------------------
// link stage

/// Links one channel; panics unless both sides end up linked.
fn link(
    channel_type: u8,
    channel_id: u8,
    connection_id: u32,
    mini: bool,
    client_caps: Caps,
    decide: impl Fn(&LinkRequest) -> Decision,
) -> (Linked, Linked) {
    let mut rng = seeded_rng([channel_type; 32]);
    let key = TicketKey::generate(&mut rng).expect("keygen");
    let mut s = ServerLink::new(&ServerLinkConfig { password: None, mini_header: mini }, key);
    let cfg = ClientLinkConfig {
        connection_id,
        channel_type,
        channel_id,
        channel_caps: client_caps,
        password: Vec::new(),
        mini_header: mini,
        defer_ticket: false,
    };
    let mut c = ClientLink::new(cfg, [9; 32]).expect("client");
    let (mut s_done, mut c_done) = (None, None);
    let mut buf = [0u8; 512];
    for _ in 0..1000 {
        let n = c.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            off += s.handle_input(&buf[off..n]);
            match s.poll_action() {
                Some(server_link::Action::Request(r)) => s.decide(decide(&r)),
                Some(server_link::Action::Linked(l)) => s_done = Some(l),
                Some(a) => panic!("server: {a:?}"),
                None => {}
            }
            if let Some(server_link::Action::Close(f)) = s.poll_action() {
                panic!("server closed: {f}");
            }
        }
        let n = s.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            off += c.handle_input(&buf[off..n]);
            match c.poll_action() {
                Some(client_link::Action::Linked(l)) => c_done = Some(l),
                Some(a) => panic!("client: {a:?}"),
                None => {}
            }
        }
        if let (Some(sl), Some(cl)) = (s_done, c_done) {
            return (sl, cl);
        }
    }
    panic!("link did not complete");
}

fn accept(kind: ChannelKind) -> impl Fn(&LinkRequest) -> Decision {
    move |_| Decision::Accept { channel_caps: kind.channel_caps(true) }
}

// ---------------------------------------------------------------------------
// data stage plumbing

/// What a receiver's deframer hands the application.
enum Delivered<'a, const N: usize> {
    /// A DATA message ended (its payload already went to the stream).
    Data,
    /// A control message's whole body is in the buffer.
    Control(&'a ControlBuf<N>),
}

/// One direction's receive path.
struct Rx<const N: usize> {
    de: Deframer,
    ctl: Box<ControlBuf<N>>,
    /// Whether DATA (101) is streamed: pass-through channels only (101 is a
    /// control message on main).
    pass_through: bool,
    /// Reassembled DATA payload (plus whatever the application appends).
    stream: Vec<u8>,
    serials: Vec<u64>,
}

impl<const N: usize> Rx<N> {
    fn new(hk: HeaderKind, pass_through: bool) -> Self {
        Self { de: Deframer::new(hk), ctl: Box::default(), pass_through, stream: Vec::new(), serials: Vec::new() }
    }

    fn feed(&mut self, bytes: &[u8], split: usize, on_msg: &mut dyn FnMut(Delivered<'_, N>, &mut Vec<u8>)) {
        for chunk in bytes.chunks(split) {
            let mut pos = 0;
            loop {
                let (n, ev) = self.de.advance(&chunk[pos..]);
                match ev {
                    Some(Event::Header(h)) => {
                        assert_eq!(h.sub_list, 0);
                        self.serials.push(h.serial);
                        self.ctl.start(h);
                    }
                    Some(Event::Body { offset, len, last }) => {
                        let body = &chunk[pos + offset..pos + offset + len];
                        if self.pass_through && self.ctl.header().msg_type == MSG_SPICEVMC_DATA {
                            self.stream.extend_from_slice(body);
                            if last {
                                on_msg(Delivered::Data, &mut self.stream);
                            }
                        } else {
                            self.ctl.push(body);
                            if last {
                                on_msg(Delivered::Control(&self.ctl), &mut self.stream);
                            }
                        }
                    }
                    None => {}
                }
                pos += n;
                if n == 0 && ev.is_none() {
                    break;
                }
            }
        }
    }
}

/// One direction's send path.
struct Tx {
    enc: Encoder,
    wire: Vec<u8>,
    /// Every payload byte sent as DATA or COMPRESSED_DATA, in order.
    sent: Vec<u8>,
    /// Whether the peer announced LZ4.
    lz4: bool,
    compressor: Lz4Compressor,
    scratch: Vec<u8>,
    compressed: usize,
    messages: usize,
}

impl Tx {
    fn new(hk: HeaderKind, lz4: bool) -> Self {
        Self {
            enc: Encoder::new(hk),
            wire: Vec::new(),
            sent: Vec::new(),
            lz4,
            compressor: Lz4Compressor::new(),
            scratch: vec![0; lz4_scratch_len(SERVER_VMC_MAX_CHUNK)],
            compressed: 0,
            messages: 0,
        }
    }

    fn server(&mut self, m: &ServerMsg<'_>) {
        let start = self.wire.len();
        self.wire.resize(start + m.framed_len(self.enc.kind()), 0);
        let n = m.emit_framed(&mut self.enc, &mut self.wire[start..]).expect("emit");
        assert_eq!(start + n, self.wire.len());
        self.messages += 1;
    }

    fn client(&mut self, m: &ClientMsg<'_>) {
        let start = self.wire.len();
        self.wire.resize(start + m.framed_len(self.enc.kind()), 0);
        let n = m.emit_framed(&mut self.enc, &mut self.wire[start..]).expect("emit");
        assert_eq!(start + n, self.wire.len());
        self.messages += 1;
    }

    /// Sends a payload as spice-server would: LZ4 when the peer can take it,
    /// the payload is over the threshold and the block is smaller.
    fn data(&mut self, payload: &[u8], from_server: bool) {
        self.sent.extend_from_slice(payload);
        if self.lz4 && payload.len() > LZ4_THRESHOLD {
            let mut scratch = std::mem::take(&mut self.scratch);
            if let Some(n) = self.compressor.compress(payload, &mut scratch) {
                let c = CompressedData::lz4(payload.len() as u32, &scratch[..n]);
                if from_server {
                    self.server(&ServerMsg::CompressedData(c))
                } else {
                    self.client(&ClientMsg::CompressedData(c))
                }
                self.compressed += 1;
                self.scratch = scratch;
                return;
            }
            self.scratch = scratch;
        }
        let mut h = [0u8; DATA_HEADER_LEN];
        let hl = self.enc.header(MSG_SPICEVMC_DATA, payload.len() as u32, &mut h).expect("header");
        self.wire.extend_from_slice(&h[..hl]);
        self.wire.extend_from_slice(payload);
        self.messages += 1;
    }
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn text(len: usize, tag: &str) -> Vec<u8> {
    let line = format!("{{\"return\": {{\"status\": \"running\", \"tag\": \"{tag}\"}}}}\r\n");
    line.bytes().cycle().take(len).collect()
}

// ---------------------------------------------------------------------------
// pass-through exchange

/// What the server queues, in order.
enum ServerOut {
    PortInit(Vec<u8>, bool),
    PortEvent(u8),
    SetAck(u32),
    Ping(u32),
    Data(Vec<u8>),
}

/// What the client queues, in order.
enum ClientOut {
    PortEvent(u8),
    Data(Vec<u8>),
}

/// Results seen by each side.
#[derive(Default, Debug)]
struct Seen {
    port_inits: Vec<(Vec<u8>, bool)>,
    port_events: Vec<u8>,
    compressed: usize,
    data: usize,
    pongs: Vec<u32>,
    acks: usize,
}

const CTL: usize = 80 * 1024;

/// Runs the data stage of one linked pass-through channel; returns what
/// each side saw (server side, client side).
fn exchange(kind: ChannelKind, sl: &Linked, cl: &Linked, split: usize) -> (Seen, Seen) {
    let hk = sl.header_kind;
    assert_eq!(cl.header_kind, hk);
    let lz4_cap = SPICEVMC_CAP_DATA_COMPRESS_LZ4;
    // Each side compresses towards the other only if the other announced it.
    let mut s_tx = Tx::new(hk, kind.lz4 && sl.peer_channel_caps.has(lz4_cap));
    let mut c_tx = Tx::new(hk, kind.lz4 && cl.peer_channel_caps.has(lz4_cap));
    let mut c_rx = Rx::<CTL>::new(hk, true);
    let mut s_rx = Rx::<CTL>::new(hk, true);
    let mut s_ack = ServerAck::new();
    let mut c_ack = ClientAck::new();
    let (mut s_seen, mut c_seen) = (Seen::default(), Seen::default());
    let mut decompressed = vec![0u8; SERVER_VMC_MAX_CHUNK];

    let name = format!("com.example.kind{}", kind.channel_type).into_bytes();
    let mut s_queue: Vec<ServerOut> = Vec::new();
    if kind.port_messages {
        s_queue.push(ServerOut::PortInit(name.clone(), true));
    }
    s_queue.extend([
        ServerOut::SetAck(3),
        ServerOut::Data(b"{\"QMP\": {}}\r\n".to_vec()),
        ServerOut::Data(Vec::new()),
        ServerOut::Ping(0x5eed),
        ServerOut::Data(text(5000, "a")),
        ServerOut::Data(noise(1, 3000)),
        ServerOut::Data(text(SERVER_VMC_MAX_CHUNK, "b")),
        ServerOut::Data(noise(2, SERVER_VMC_MAX_CHUNK)),
        ServerOut::Data(text(1001, "c")),
    ]);
    if kind.port_messages {
        s_queue.extend([ServerOut::PortEvent(PORT_EVENT_CLOSED), ServerOut::PortEvent(PORT_EVENT_OPENED)]);
    }
    s_queue.push(ServerOut::Data(b"tail".to_vec()));
    s_queue.reverse();

    let mut c_queue: Vec<ClientOut> = vec![
        ClientOut::Data(b"{\"execute\":\"qmp_capabilities\"}\r\n".to_vec()),
        ClientOut::Data(text(4000, "d")),
        ClientOut::Data(Vec::new()),
        ClientOut::Data(noise(3, 2000)),
    ];
    if kind.port_messages {
        c_queue.push(ClientOut::PortEvent(PORT_EVENT_BREAK));
    }
    c_queue.push(ClientOut::Data(text(20_000, "e")));
    c_queue.reverse();
    let mut c_replies: Vec<ClientMsg<'static>> = Vec::new();

    for _round in 0..1000 {
        // server sends while its ACK window allows
        while s_ack.may_send() {
            let Some(item) = s_queue.pop() else { break };
            match item {
                ServerOut::PortInit(n, o) => s_tx.server(&ServerMsg::PortInit(PortInit { name: &n, opened: o })),
                ServerOut::PortEvent(e) => s_tx.server(&ServerMsg::PortEvent { event: e }),
                ServerOut::SetAck(w) => {
                    let m = s_ack.set_ack(w);
                    s_tx.server(&m);
                    continue; // SET_ACK is not counted
                }
                ServerOut::Ping(id) => {
                    s_tx.server(&ServerMsg::Ping(Ping { id, timestamp: u64::from(id) << 20, padding_len: 100_000 }))
                }
                ServerOut::Data(p) => s_tx.data(&p, true),
            }
            s_ack.on_sent();
        }
        // client sends replies first, then one queued item
        for r in c_replies.drain(..) {
            c_tx.client(&r);
        }
        match c_queue.pop() {
            Some(ClientOut::PortEvent(e)) => c_tx.client(&ClientMsg::PortEvent { event: e }),
            Some(ClientOut::Data(p)) => c_tx.data(&p, false),
            None => {}
        }
        if s_queue.is_empty() && c_queue.is_empty() && s_tx.wire.is_empty() && c_tx.wire.is_empty() {
            break;
        }
        // server → client
        let wire = std::mem::take(&mut s_tx.wire);
        c_rx.feed(&wire, split, &mut |d, stream| {
            let m = match d {
                Delivered::Data => {
                    c_seen.data += 1;
                    ServerMsg::Data
                }
                Delivered::Control(cb) => {
                    let m = cb.server_msg(kind).expect("server message decodes");
                    match m {
                        ServerMsg::CompressedData(c) => {
                            let n = c.decompress(SERVER_VMC_MAX_CHUNK, &mut decompressed).expect("lz4");
                            stream.extend_from_slice(&decompressed[..n]);
                            c_seen.compressed += 1;
                        }
                        ServerMsg::PortInit(p) => c_seen.port_inits.push((p.name.to_vec(), p.opened)),
                        ServerMsg::PortEvent { event } => c_seen.port_events.push(event),
                        ServerMsg::Ping(p) => {
                            assert_eq!(p.padding_len, 100_000);
                            c_replies.push(ClientMsg::Pong(p.pong()));
                        }
                        ServerMsg::SetAck(_) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                    m
                }
            };
            if let Some(r) = c_ack.on_server_msg(&m) {
                c_seen.acks += usize::from(r == ClientMsg::Ack);
                c_replies.push(r);
            }
        });
        // client → server
        let wire = std::mem::take(&mut c_tx.wire);
        s_rx.feed(&wire, split, &mut |d, stream| {
            let Delivered::Control(cb) = d else {
                s_seen.data += 1;
                return;
            };
            // the header alone already says whether the type is allowed
            assert!(kind.client_msg_allowed(cb.header().msg_type));
            let m = cb.client_msg(kind).expect("client message decodes");
            s_ack.on_client_msg(&m);
            match m {
                ClientMsg::CompressedData(c) => {
                    let n = c.decompress(SERVER_VMC_MAX_CHUNK, &mut decompressed).expect("lz4");
                    stream.extend_from_slice(&decompressed[..n]);
                    s_seen.compressed += 1;
                }
                ClientMsg::PortEvent { event } => s_seen.port_events.push(event),
                ClientMsg::Pong(p) => s_seen.pongs.push(p.id),
                ClientMsg::Ack => s_seen.acks += 1,
                ClientMsg::AckSync { generation } => assert_eq!(generation, s_ack.generation()),
                other => panic!("unexpected {other:?}"),
            }
        });
    }
    assert!(s_queue.is_empty() && c_queue.is_empty(), "exchange stalled");
    assert!(c_rx.de.at_boundary() && s_rx.de.at_boundary());

    // the reassembled streams are exactly what was sent
    assert_eq!(c_rx.stream.len(), s_tx.sent.len());
    assert!(c_rx.stream == s_tx.sent, "server → client stream differs");
    assert_eq!(s_rx.stream.len(), c_tx.sent.len());
    assert!(s_rx.stream == c_tx.sent, "client → server stream differs");
    // serials: 1, 2, 3, … per direction with the full header, absent with the mini one
    for (rx_serials, tx_count) in [(&c_rx.serials, s_tx.messages), (&s_rx.serials, c_tx.messages)] {
        assert_eq!(rx_serials.len(), tx_count);
        let want: Vec<u64> = match hk {
            HeaderKind::Full => (1..=tx_count as u64).collect(),
            HeaderKind::Mini => vec![0; tx_count],
        };
        assert_eq!(*rx_serials, want);
    }
    assert_eq!(c_seen.compressed, s_tx.compressed);
    assert_eq!(s_seen.compressed, c_tx.compressed);
    if kind.port_messages {
        assert_eq!(c_seen.port_inits, vec![(name, true)]);
    }
    assert_eq!(c_seen.acks, s_seen.acks);
    assert_eq!(s_seen.pongs, vec![0x5eed]);
    (s_seen, c_seen)
}

#[test]
fn every_pass_through_kind_in_every_split() {
    for channel_type in [8u8, 9, 10, 11, 128] {
        let kind = ChannelKind::of(channel_type).expect("kind");
        assert_eq!(kind.class, ChannelClass::PassThrough);
        for mini in [true, false] {
            let (sl, cl) = link(channel_type, 0, 0x1234, mini, kind.channel_caps(true), accept(kind));
            let hk = if mini { HeaderKind::Mini } else { HeaderKind::Full };
            assert_eq!((sl.header_kind, cl.header_kind), (hk, hk));
            for split in [1, 7, usize::MAX] {
                let (s, c) = exchange(kind, &sl, &cl, split);
                // LZ4 both ways exactly where the kind has it
                assert_eq!(s.compressed > 0, kind.lz4, "{kind} c→s lz4");
                assert_eq!(c.compressed > 0, kind.lz4, "{kind} s→c lz4");
                assert!(c.data > 0 && s.data > 0);
                let events: &[u8] = if kind.port_messages { &[PORT_EVENT_CLOSED, PORT_EVENT_OPENED] } else { &[] };
                assert_eq!(c.port_events, events);
                let events: &[u8] = if kind.port_messages { &[PORT_EVENT_BREAK] } else { &[] };
                assert_eq!(s.port_events, events);
                assert!(c.acks >= 3, "window 3 over ≥ 10 messages");
            }
        }
    }
}

#[test]
fn lz4_only_towards_a_peer_that_announced_it() {
    // The client announces no caps, the server announces LZ4: only the
    // client → server direction may be compressed.
    let kind = ChannelKind::of(10).expect("port");
    let (sl, cl) = link(10, 0, 1, true, Caps::EMPTY, accept(kind));
    assert!(!sl.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4));
    assert!(cl.peer_channel_caps.has(SPICEVMC_CAP_DATA_COMPRESS_LZ4));
    let (s, c) = exchange(kind, &sl, &cl, 7);
    assert_eq!(c.compressed, 0, "server → client stays DATA");
    assert!(s.compressed > 0, "client → server may use LZ4");
}

#[test]
fn messages_outside_the_kind_are_refused() {
    let smartcard = ChannelKind::of(8).expect("smartcard");
    let usbredir = ChannelKind::of(9).expect("usbredir");
    let lz4 = [1u8, 4, 0, 0, 0, 0x40, 1, 2, 3, 4];
    for (kind, t, body) in [
        (smartcard, MSG_SPICEVMC_COMPRESSED_DATA, &lz4[..]),
        (smartcard, MSGC_PORT_EVENT, &[2][..]),
        (usbredir, MSGC_PORT_EVENT, &[2][..]),
        (usbredir, 103, &[][..]),
    ] {
        assert_eq!(ClientMsg::parse(kind, t, body), Err(FrameError::UnexpectedType(t)), "{kind} {t}");
    }
    for (kind, t) in [(smartcard, MSG_PORT_INIT), (usbredir, MSG_PORT_EVENT), (smartcard, 102)] {
        assert_eq!(ServerMsg::parse(kind, t, &[0; 40]), Err(FrameError::UnexpectedType(t)), "{kind} {t}");
    }
}

// ---------------------------------------------------------------------------
// main channel

#[test]
fn main_channel_then_user_defined_channel() {
    const SESSION: u32 = 0xaf49_1d95;
    let main = ChannelKind::of(CH_MAIN).expect("main");
    for (mini, split) in [(true, 1), (false, 7), (true, usize::MAX)] {
        let (sl, cl) = link(CH_MAIN, 0, 0, mini, Caps::from_bits(&[MAIN_CAP_NAME_AND_UUID]), |r| {
            assert_eq!(r.connection_id, 0, "a fresh session links main with 0");
            Decision::Accept { channel_caps: Caps::EMPTY }
        });
        let hk = sl.header_kind;
        assert_eq!(cl.header_kind, hk);
        assert!(sl.peer_channel_caps.has(MAIN_CAP_NAME_AND_UUID));
        let mut s_tx = Tx::new(hk, false);
        let mut c_tx = Tx::new(hk, false);
        let mut c_rx = Rx::<1024>::new(hk, false);
        let mut s_rx = Rx::<1024>::new(hk, false);

        // server: INIT, NAME, UUID, the network-test PINGs, an agent message
        // vmcrelay does not decode, a NOTIFY
        let init = MainInit {
            session_id: SESSION,
            supported_mouse_modes: 3,
            current_mouse_mode: 2,
            agent_tokens: 10,
            ..MainInit::default()
        };
        s_tx.server(&ServerMsg::MainInit(init));
        s_tx.server(&ServerMsg::Name { name: b"vm-under-test" });
        s_tx.server(&ServerMsg::Uuid { uuid: [7; 16] });
        for (id, padding_len) in [(1, 0), (2, 0), (3, 256_000)] {
            s_tx.server(&ServerMsg::Ping(Ping { id, timestamp: 1_000 * u64::from(id), padding_len }));
        }
        let mut h = [0u8; DATA_HEADER_LEN];
        let hl = s_tx.enc.header(MSG_MAIN_AGENT_DATA, 3000, &mut h).expect("header");
        s_tx.wire.extend_from_slice(&h[..hl]);
        s_tx.wire.extend_from_slice(&[0xaa; 3000]);
        let notify = Notify { time_stamp: 5, severity: 0, visibility: 1, what: 0, message: b"hello" };
        s_tx.server(&ServerMsg::Notify(notify));

        // client: answer PINGs, send ATTACH_CHANNELS after INIT
        let mut session = None;
        let mut seen_name = Vec::new();
        let mut others = Vec::new();
        let wire = std::mem::take(&mut s_tx.wire);
        c_rx.feed(&wire, split, &mut |d, _| {
            let Delivered::Control(cb) = d else { panic!("no DATA on main") };
            match cb.server_msg(main).expect("decodes") {
                ServerMsg::MainInit(i) => {
                    session = Some(i.session_id);
                    c_tx.client(&ClientMsg::AttachChannels);
                }
                ServerMsg::Ping(p) => c_tx.client(&ClientMsg::Pong(p.pong())),
                ServerMsg::Name { name } => seen_name = name.to_vec(),
                ServerMsg::Other { msg_type } => others.push(msg_type),
                ServerMsg::Uuid { uuid } => assert_eq!(uuid, [7; 16]),
                ServerMsg::Notify(n) => assert_eq!(n.message, b"hello"),
                m => panic!("unexpected {m:?}"),
            }
        });
        assert_eq!(session, Some(SESSION));
        assert_eq!(seen_name, b"vm-under-test");
        assert_eq!(others, [MSG_MAIN_AGENT_DATA]);

        // server: CHANNELS_LIST only after ATTACH_CHANNELS
        let list: [[u8; 2]; 7] = [[9, 1], [9, 0], [10, 0], [11, 0], [8, 0], [128, 0], [3, 0]];
        let mut pongs = Vec::new();
        let wire = std::mem::take(&mut c_tx.wire);
        s_rx.feed(&wire, split, &mut |d, _| {
            let Delivered::Control(cb) = d else { panic!("no DATA on main") };
            match cb.client_msg(main).expect("decodes") {
                ClientMsg::AttachChannels => s_tx.server(&ServerMsg::ChannelsList(ChannelsList { entries: &list })),
                ClientMsg::Pong(p) => pongs.push((p.id, p.timestamp)),
                m => panic!("unexpected {m:?}"),
            }
        });
        assert_eq!(pongs, [(1, 1000), (2, 2000), (3, 3000)]);

        let mut channels = Vec::new();
        let wire = std::mem::take(&mut s_tx.wire);
        c_rx.feed(&wire, split, &mut |d, _| {
            let Delivered::Control(cb) = d else { panic!("no DATA on main") };
            let ServerMsg::ChannelsList(l) = cb.server_msg(main).expect("decodes") else { panic!("list") };
            channels.extend(l.iter());
        });
        assert!(channels.contains(&(128, 0)), "{channels:?}");
        assert_eq!(channels.len(), list.len());
        assert!(c_rx.de.at_boundary() && s_rx.de.at_boundary());

        // link the user-defined channel with the session id from MAIN_INIT
        let session = session.expect("session");
        let user = ChannelKind::of(128).expect("user");
        let (sl, cl) = link(128, 0, session, mini, user.channel_caps(true), |r| {
            if r.connection_id == SESSION {
                Decision::Accept { channel_caps: user.channel_caps(true) }
            } else {
                Decision::BadConnectionId
            }
        });
        assert_eq!(sl.connection_id, SESSION);
        let (s, c) = exchange(user, &sl, &cl, split);
        assert!(s.compressed > 0 && c.compressed > 0);
    }
}
