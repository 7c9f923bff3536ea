//! Every complete message of an arbitrary data-stage stream through the
//! message codecs: `ServerMsg::parse`, `ClientMsg::parse`, a small
//! `ControlBuf`, the LZ4 decompressor with a small limit, and the ACK
//! window accounting.
//!
//! Input: `[flags][channel type][lz4 limit][lz4 size u32][splits…][stream…]`
//! - flags bit 0: mini header (else full); bit 1: the stream is server →
//!   client (feeds `ClientAck`), else client → server (feeds `ServerAck`).
//! - channel type: `ChannelKind::of`, or for types nobody defines the
//!   table row `type % KINDS.len()`.
//! - lz4 limit: `byte * 40` bytes (0..=10 200; the output buffer is 8 192,
//!   so both bounds get hit).
//! - lz4 size: the announced size for a raw `decompress_lz4` of each body.
//!
//! Asserted (our invariants): no panic; a decoded message reports its own
//! type, emits exactly `encoded_len` bytes and decodes back to itself,
//! framed or not; `ControlBuf` agrees with the whole-body decode (exactly
//! when nothing was cut, PING/DATA/Other/unexpected-type when it was, an
//! error otherwise); LZ4 output is exactly the announced size, within the
//! limit, never written past, and refused early when too large; the ACK
//! counters follow the reference model.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmcrelay::proto::ack::{ClientAck, ServerAck};
use vmcrelay::proto::channel::{ChannelKind, KINDS};
use vmcrelay::proto::consts::MSG_SPICEVMC_COMPRESSED_DATA;
use vmcrelay::proto::framing::{Deframer, Encoder, Event, FrameError, HeaderKind, MsgHeader};
use vmcrelay::proto::msg::{ClientMsg, ControlBuf, ServerMsg, compress_lz4, decompress_lz4, lz4_scratch_len};
use vmcrelay::proto::wire::Writer;
use vmcrelay_fuzz::Control;

/// Small on purpose: most bodies overflow it, exercising truncation.
const CONTROL_LEN: usize = 64;
/// LZ4 output room; the limit byte ranges past it.
const LZ4_OUT: usize = 8192;
/// Sentinel bytes after the output room, to catch writes past the size.
const LZ4_GUARD: usize = 64;
const SENTINEL: u8 = 0xA5;

/// Encodes `emit` into a buffer of exactly `len` bytes; the emitted length
/// must be `len`.
fn encode(len: usize, emit: impl FnOnce(&mut Writer<'_>) -> Result<(), vmcrelay::proto::wire::Truncated>) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut w = Writer::new(&mut buf);
    emit(&mut w).unwrap_or_else(|_| panic!("emit does not fit its own encoded_len {len}"));
    assert_eq!(w.written(), len, "emit wrote less than encoded_len");
    buf
}

/// Frames a message and deframes it again: one header with `msg_type`,
/// body equal to `body`.
fn check_framed(kind: HeaderKind, msg_type: u16, body: &[u8], framed: &[u8]) {
    let mut d = Deframer::new(kind);
    let (n, ev) = d.advance(framed);
    assert_eq!(n, kind.len());
    let Some(Event::Header(h)) = ev else { panic!("framed message has no header") };
    assert_eq!((h.msg_type, h.size as usize), (msg_type, body.len()));
    assert_eq!(&framed[n..], body);
}

fn check_server(kind: ChannelKind, hk: HeaderKind, h: MsgHeader, body: &[u8]) -> Result<(), FrameError> {
    let m = ServerMsg::parse(kind, h.msg_type, body)?;
    assert_eq!(m.msg_type(), h.msg_type, "{m:?} reports another type");
    let bytes = encode(m.encoded_len(), |w| m.emit(w));
    if !matches!(m, ServerMsg::Data | ServerMsg::Other { .. }) {
        assert_eq!(ServerMsg::parse(kind, h.msg_type, &bytes), Ok(m), "server round trip");
    }
    let mut out = vec![0u8; m.framed_len(hk)];
    let n = m.emit_framed(&mut Encoder::new(hk), &mut out).expect("framed_len fits");
    assert_eq!(n, out.len());
    check_framed(hk, h.msg_type, &bytes, &out);
    Ok(())
}

fn check_client(kind: ChannelKind, hk: HeaderKind, h: MsgHeader, body: &[u8]) -> Result<(), FrameError> {
    let m = ClientMsg::parse(kind, h.msg_type, body)?;
    assert_eq!(m.msg_type(), h.msg_type, "{m:?} reports another type");
    assert!(kind.client_msg_allowed(h.msg_type), "decoded a type outside the kind's set");
    let bytes = encode(m.encoded_len(), |w| m.emit(w));
    if !matches!(m, ClientMsg::Data | ClientMsg::Other { .. }) {
        assert_eq!(ClientMsg::parse(kind, h.msg_type, &bytes), Ok(m), "client round trip");
    }
    let mut out = vec![0u8; m.framed_len(hk)];
    let n = m.emit_framed(&mut Encoder::new(hk), &mut out).expect("framed_len fits");
    assert_eq!(n, out.len());
    check_framed(hk, h.msg_type, &bytes, &out);
    Ok(())
}

/// `ControlBuf` must agree with the whole-body decode.
fn check_control<T: PartialEq + std::fmt::Debug>(
    truncated: bool,
    whole: &Result<T, FrameError>,
    collected: Result<T, FrameError>,
    passes_truncated: impl Fn(&T) -> bool,
) {
    if !truncated {
        assert_eq!(&collected, whole, "ControlBuf differs from the whole body");
        return;
    }
    match whole {
        Ok(m) if passes_truncated(m) => assert_eq!(collected.as_ref(), Ok(m), "truncated keeper lost"),
        Err(e @ FrameError::UnexpectedType(_)) => assert_eq!(collected.as_ref().err(), Some(e)),
        _ => assert!(collected.is_err(), "truncated body decoded: {collected:?}"),
    }
}

fn check_lz4(data: &[u8], size: u32, limit: usize) {
    let mut out = [SENTINEL; LZ4_OUT + LZ4_GUARD];
    let (room, guard) = out.split_at_mut(LZ4_OUT);
    let r = decompress_lz4(data, size, limit, room);
    assert!(guard.iter().all(|&b| b == SENTINEL), "wrote past the output slice");
    let fits = (size as usize) <= limit.min(LZ4_OUT);
    match r {
        Ok(n) => {
            assert!(fits && n == size as usize, "{n} bytes for announced {size}, limit {limit}");
            assert!(room[n..].iter().all(|&b| b == SENTINEL), "wrote past the announced size");
            // Our compressor's output decompresses to the same bytes.
            let plain = room[..n].to_vec();
            let mut packed = vec![0u8; lz4_scratch_len(n)];
            if let Some(m) = compress_lz4(&plain, &mut packed) {
                assert!(m < n);
                let mut again = vec![0u8; n];
                assert_eq!(decompress_lz4(&packed[..m], size, n, &mut again), Ok(n));
                assert_eq!(again, plain, "compress/decompress round trip");
            }
        }
        Err(FrameError::TooLarge { msg_type, size: s, .. }) => {
            assert!(!fits, "refused a size that fits");
            assert_eq!((msg_type, s), (MSG_SPICEVMC_COMPRESSED_DATA, size));
            assert!(room.iter().all(|&b| b == SENTINEL), "worked on an oversized block");
        }
        Err(FrameError::BadCompression) => assert!(fits, "oversized block reached the decoder"),
        Err(e) => panic!("unexpected LZ4 error {e:?}"),
    }
}

/// Reference ACK model (both roles), checked against `ClientAck`/`ServerAck`.
#[derive(Default)]
struct AckModel {
    window: u32,
    since_set_ack: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut c = Control::new(data);
    let flags = c.u8();
    let channel_type = c.u8();
    let limit = usize::from(c.u8()) * 40;
    let raw_size = c.take(4).iter().rev().fold(0u32, |acc, &b| acc << 8 | u32::from(b));
    let mut splits = c.splits();
    let stream = c.rest();
    let hk = if flags & 1 != 0 { HeaderKind::Mini } else { HeaderKind::Full };
    let from_server = flags & 2 != 0;
    let kind = ChannelKind::of(channel_type).unwrap_or(KINDS[usize::from(channel_type) % KINDS.len()]);

    let mut d = Deframer::new(hk);
    let mut control = ControlBuf::<CONTROL_LEN>::new();
    let mut header = None;
    let mut body = Vec::new();
    let mut client_ack = ClientAck::new();
    let mut server_ack = ServerAck::new();
    let mut model = AckModel::default();

    let mut fed = 0;
    while fed < stream.len() {
        let len = splits.next_len(stream.len() - fed);
        let chunk = &stream[fed..fed + len];
        let mut pos = 0;
        loop {
            let (n, ev) = d.advance(&chunk[pos..]);
            match ev {
                Some(Event::Header(h)) => {
                    header = Some(h);
                    body.clear();
                    control.start(h);
                    assert_eq!(control.fits(), h.size as usize <= CONTROL_LEN);
                }
                Some(Event::Body { offset, len, last }) => {
                    let part = &chunk[pos + offset..pos + offset + len];
                    body.extend_from_slice(part);
                    control.push(part);
                    if last {
                        let h = header.take().expect("body after a header");
                        assert!(control.is_complete());
                        assert_eq!(control.is_truncated(), body.len() > CONTROL_LEN);
                        assert_eq!(control.body(), &body[..body.len().min(CONTROL_LEN)]);
                        let truncated = control.is_truncated();

                        let server = ServerMsg::parse(kind, h.msg_type, &body);
                        let _ = check_server(kind, hk, h, &body);
                        check_control(truncated, &server, control.server_msg(kind), |m| {
                            matches!(m, ServerMsg::Ping(_) | ServerMsg::Data | ServerMsg::Other { .. })
                        });
                        let client = ClientMsg::parse(kind, h.msg_type, &body);
                        let _ = check_client(kind, hk, h, &body);
                        check_control(truncated, &client, control.client_msg(kind), |m| {
                            matches!(m, ClientMsg::Data | ClientMsg::Other { .. })
                        });

                        for compressed in [
                            server.ok().and_then(|m| if let ServerMsg::CompressedData(c) = m { Some(c) } else { None }),
                            client.ok().and_then(|m| if let ClientMsg::CompressedData(c) = m { Some(c) } else { None }),
                        ]
                        .into_iter()
                        .flatten()
                        {
                            check_lz4(compressed.data, compressed.uncompressed_size, limit);
                        }
                        check_lz4(&body, raw_size, limit);

                        if from_server {
                            if let Ok(m) = &server {
                                let sent = client_ack.on_server_msg(m);
                                if let ServerMsg::SetAck(s) = m {
                                    model = AckModel { window: s.window, since_set_ack: 0 };
                                    assert_eq!(sent, Some(ClientMsg::AckSync { generation: s.generation }));
                                } else {
                                    model.since_set_ack += 1;
                                    let due = model.window != 0 && model.since_set_ack % u64::from(model.window) == 0;
                                    assert_eq!(sent, due.then_some(ClientMsg::Ack), "ACK off the window");
                                }
                                assert_eq!(client_ack.window(), model.window);
                            }
                        } else {
                            // The relay as server: one message out per
                            // message in, a SET_ACK whenever the client
                            // sends a PONG (any trigger will do).
                            server_ack.on_sent();
                            if let Ok(m) = &client {
                                if let ClientMsg::Pong(p) = m {
                                    let before = server_ack.generation();
                                    let _ = server_ack.set_ack(p.id % 8);
                                    assert_eq!(server_ack.generation(), before.wrapping_add(1));
                                    assert_eq!(server_ack.unacked(), 0);
                                }
                                server_ack.on_client_msg(m);
                            }
                            let w = u64::from(server_ack.window());
                            assert_eq!(server_ack.may_send(), w == 0 || u64::from(server_ack.unacked()) <= 2 * w);
                            if w == 0 {
                                assert_eq!(server_ack.unacked(), 0);
                            }
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
        fed += pos;
    }
});
