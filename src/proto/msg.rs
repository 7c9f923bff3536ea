//! Typed codecs for data-stage message bodies (headers are [`framing`]'s job).
//!
//! Shaped like smoltcp's `Repr`s: every message is a plain value with
//! `encoded_len()` and `emit(&mut Writer)`, and [`ServerMsg::parse`] /
//! [`ClientMsg::parse`] turn `(channel kind, msg_type, body)` into one.
//! Variable-length fields (NOTIFY text, channel lists, port names, LZ4
//! blocks) borrow from the body, so decoding never allocates.
//!
//! Design choices:
//!
//! - **DATA payload is not part of the repr.** The deframer streams DATA
//!   bodies straight to their destination; [`ServerMsg::Data`] only says
//!   "this type is DATA here". Frame a DATA message with
//!   [`Encoder::header`] and write the payload yourself.
//! - **Bodies are parsed leniently at the end, strictly inside.** A body
//!   shorter than its fixed part, a length field pointing past the body or
//!   a count that the body cannot hold is [`FrameError::Malformed`];
//!   trailing bytes after a complete message are ignored, as spice-gtk's
//!   generated demarshallers do. The one exception is the client's
//!   PORT_EVENT, which spice-server requires to be exactly one byte.
//! - **Unknown is not malformed.** Server messages vmcrelay does not decode
//!   on the main channel (agent data, migration) or on foreign channels
//!   (inputs, display) come back as `Other { msg_type }` so a client can
//!   skip them. On pass-through channels a type outside the kind's message
//!   set is [`FrameError::UnexpectedType`]: spice-server would never send
//!   it, and for client messages spice-server disconnects, so we do too.
//! - **Control bodies are collected into a fixed inline buffer**
//!   ([`ControlBuf`]). A PING may carry 256 000 bytes of padding nobody
//!   reads, so PING is the one control message that may be truncated.
//!
//! [`framing`]: super::framing
//! [`Encoder::header`]: super::framing::Encoder::header

use super::channel::{ChannelClass, ChannelKind};
use super::consts::*;
use super::framing::{Encoder, FrameError, HeaderKind, MsgHeader};
use super::wire::{Reader, Truncated, Writer, len_u32};

// ---------------------------------------------------------------------------
// helpers

/// `SPICE_MSG_BASE_LAST`: an empty marker type (not in `consts`).
const MSG_BASE_LAST: u16 = 100;

/// Maps a short read inside `msg_type`'s body to `Malformed`.
fn malformed(msg_type: u16) -> impl Fn(Truncated) -> FrameError {
    move |_| FrameError::Malformed(msg_type)
}

/// Writes `n` zero bytes (PING padding) without a buffer of that size.
fn put_zeros(w: &mut Writer<'_>, mut n: usize) -> Result<(), Truncated> {
    const ZEROS: [u8; 256] = [0; 256];
    while n > 0 {
        let k = n.min(ZEROS.len());
        w.put(ZEROS.get(..k).ok_or(Truncated)?)?;
        n -= k;
    }
    Ok(())
}

/// Strips one trailing NUL, if present.
fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

// ---------------------------------------------------------------------------
// common server → client messages

/// `SPICE_MSG_SET_ACK`: start of ACK window accounting (§2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetAck {
    /// Generation the client must echo in ACK_SYNC.
    pub generation: u32,
    /// Messages per ACK; 0 disables ACKs.
    pub window: u32,
}

impl SetAck {
    /// Body length: two u32.
    pub const LEN: usize = 8;

    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(Self { generation: r.u32()?, window: r.u32()? })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::LEN
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u32(self.generation)?;
        w.u32(self.window)
    }
}

/// `SPICE_MSG_PING`: `u32 id, u64 timestamp`, then padding nobody reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    /// Echoed in PONG.
    pub id: u32,
    /// Echoed in PONG (µs for the network test, ns for latency pings).
    pub timestamp: u64,
    /// Zero bytes after the fixed part (256 000 in the network test).
    /// Not stored: `emit` writes zeros, `parse` only counts them.
    pub padding_len: u32,
}

impl Ping {
    /// Fixed part: u32 id, u64 timestamp.
    pub const FIXED_LEN: usize = 12;

    /// Accepts a body of any length ≥ 12: the padding may have been
    /// truncated by the caller (see [`ControlBuf`]).
    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let id = r.u32()?;
        let timestamp = r.u64()?;
        let padding_len = u32::try_from(r.remaining()).unwrap_or(u32::MAX);
        Ok(Self { id, timestamp, padding_len })
    }
    /// The answer this PING asks for.
    pub fn pong(&self) -> Pong {
        Pong { id: self.id, timestamp: self.timestamp }
    }
    /// Body length on the wire, padding included.
    pub fn encoded_len(&self) -> usize {
        Self::FIXED_LEN + self.padding_len as usize
    }
    /// Writes the body, padding included.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u32(self.id)?;
        w.u64(self.timestamp)?;
        put_zeros(w, self.padding_len as usize)
    }
}

const WAIT_ENTRY_LEN: usize = 10;

/// One entry of WAIT_FOR_CHANNELS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitChannel {
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// Serial that channel must have processed.
    pub message_serial: u64,
}

impl WaitChannel {
    /// The 10 wire bytes of this entry.
    pub fn to_bytes(&self) -> [u8; WAIT_ENTRY_LEN] {
        let mut b = [0u8; WaitForChannels::ENTRY_LEN];
        b[0] = self.channel_type;
        b[1] = self.channel_id;
        b[2..].copy_from_slice(&self.message_serial.to_le_bytes());
        b
    }
    /// Decodes 10 wire bytes.
    pub fn from_bytes(b: &[u8; WAIT_ENTRY_LEN]) -> Self {
        let [channel_type, channel_id, s @ ..] = *b;
        Self { channel_type, channel_id, message_serial: u64::from_le_bytes(s) }
    }
}

/// `SPICE_MSG_WAIT_FOR_CHANNELS`: `u8 count`, then `count` 10-byte entries.
/// The count is a u8, so at most 255 entries (2 550 bytes) ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitForChannels<'a> {
    /// Raw entries (see [`WaitChannel::from_bytes`]); at most 255.
    pub entries: &'a [[u8; WAIT_ENTRY_LEN]],
}

impl<'a> WaitForChannels<'a> {
    /// Bytes per entry: u8 type, u8 id, u64 serial.
    pub const ENTRY_LEN: usize = WAIT_ENTRY_LEN;

    fn parse(b: &'a [u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let count = usize::from(r.u8()?);
        let raw = r.take(count * Self::ENTRY_LEN)?;
        let (entries, _) = raw.as_chunks::<WAIT_ENTRY_LEN>();
        Ok(Self { entries })
    }
    /// The entries, decoded.
    pub fn iter(&self) -> impl Iterator<Item = WaitChannel> + 'a {
        self.entries.iter().map(WaitChannel::from_bytes)
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        1 + self.entries.len() * Self::ENTRY_LEN
    }
    /// Writes the body; more than 255 entries cannot be encoded.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u8(u8::try_from(self.entries.len()).map_err(|_| Truncated)?)?;
        self.entries.iter().try_for_each(|e| w.put(e))
    }
}

/// `SPICE_MSG_DISCONNECTING` and `SPICE_MSGC_DISCONNECTING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnecting {
    /// Sender's clock.
    pub time_stamp: u64,
    /// A `SpiceLinkErr` code.
    pub reason: u32,
}

impl Disconnecting {
    /// Body length: u64 + u32.
    pub const LEN: usize = 12;

    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(Self { time_stamp: r.u64()?, reason: r.u32()? })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::LEN
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u64(self.time_stamp)?;
        w.u32(self.reason)
    }
}

/// `SPICE_MSG_NOTIFY`: a text notification.
///
/// spice-server writes one NUL after the text that `message_len` does not
/// count; parsing ([`ServerMsg::parse`]) accepts the body with or without it and
/// [`Notify::emit`] writes it, as spice-server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify<'a> {
    /// Sender's clock.
    pub time_stamp: u64,
    /// 0 info, 1 warning, 2 error.
    pub severity: u32,
    /// 0 low, 1 medium, 2 high.
    pub visibility: u32,
    /// What happened (a `SpiceLinkErr` for errors).
    pub what: u32,
    /// The text, `message_len` bytes, without the extra NUL.
    pub message: &'a [u8],
}

impl<'a> Notify<'a> {
    /// Fixed part before the text.
    pub const FIXED_LEN: usize = 24;

    fn parse(b: &'a [u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let time_stamp = r.u64()?;
        let severity = r.u32()?;
        let visibility = r.u32()?;
        let what = r.u32()?;
        let len = r.u32()?;
        let message = r.take(usize::try_from(len).map_err(|_| Truncated)?)?;
        Ok(Self { time_stamp, severity, visibility, what, message })
    }
    /// Body length on the wire (with the trailing NUL).
    pub fn encoded_len(&self) -> usize {
        Self::FIXED_LEN + self.message.len() + 1
    }
    /// Writes the body and spice-server's trailing NUL.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u64(self.time_stamp)?;
        w.u32(self.severity)?;
        w.u32(self.visibility)?;
        w.u32(self.what)?;
        w.u32(len_u32(self.message.len())?)?;
        w.put(self.message)?;
        w.u8(0)
    }
}

// ---------------------------------------------------------------------------
// main channel

/// `SPICE_MSG_MAIN_INIT` (§3.2): eight u32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MainInit {
    /// Non-zero; the `connection_id` of every other link of the session.
    pub session_id: u32,
    /// Number of display channels.
    pub display_channels_hint: u32,
    /// Mouse mode flags (1 server, 2 client).
    pub supported_mouse_modes: u32,
    /// Current mouse mode.
    pub current_mouse_mode: u32,
    /// 1 if a vdagent is attached.
    pub agent_connected: u32,
    /// Agent tokens granted to the client.
    pub agent_tokens: u32,
    /// Server multimedia clock (ms).
    pub multi_media_time: u32,
    /// QXL RAM size.
    pub ram_hint: u32,
}

impl MainInit {
    /// Body length: 8 × u32.
    pub const LEN: usize = 32;

    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(Self {
            session_id: r.u32()?,
            display_channels_hint: r.u32()?,
            supported_mouse_modes: r.u32()?,
            current_mouse_mode: r.u32()?,
            agent_connected: r.u32()?,
            agent_tokens: r.u32()?,
            multi_media_time: r.u32()?,
            ram_hint: r.u32()?,
        })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::LEN
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        for v in [
            self.session_id,
            self.display_channels_hint,
            self.supported_mouse_modes,
            self.current_mouse_mode,
            self.agent_connected,
            self.agent_tokens,
            self.multi_media_time,
            self.ram_hint,
        ] {
            w.u32(v)?;
        }
        Ok(())
    }
}

/// `SPICE_MSG_MAIN_CHANNELS_LIST`: `u32 n`, then `n` × `{u8 type, u8 id}`.
/// `n` is bounded by the body: a count the body cannot hold is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelsList<'a> {
    /// `[channel_type, channel_id]` pairs, in wire order.
    pub entries: &'a [[u8; 2]],
}

impl<'a> ChannelsList<'a> {
    fn parse(b: &'a [u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let n = usize::try_from(r.u32()?).map_err(|_| Truncated)?;
        // n ≤ u32::MAX, so on 64-bit the product cannot overflow; checked
        // anyway for 32-bit targets.
        let raw = r.take(n.checked_mul(2).ok_or(Truncated)?)?;
        let (entries, _) = raw.as_chunks::<2>();
        Ok(Self { entries })
    }
    /// `(channel_type, channel_id)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (u8, u8)> + 'a {
        self.entries.iter().map(|&[t, id]| (t, id))
    }
    /// Whether `(channel_type, channel_id)` is listed.
    pub fn contains(&self, channel_type: u8, channel_id: u8) -> bool {
        self.entries.contains(&[channel_type, channel_id])
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        4 + 2 * self.entries.len()
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u32(len_u32(self.entries.len())?)?;
        self.entries.iter().try_for_each(|e| w.put(e))
    }
}

/// `SPICE_MSG_MAIN_MOUSE_MODE`: two u16 (not u32, whatever the prose spec says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MouseMode {
    /// Supported modes (1 server, 2 client).
    pub supported: u16,
    /// Current mode.
    pub current: u16,
}

impl MouseMode {
    /// Body length.
    pub const LEN: usize = 4;

    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(Self { supported: r.u16()?, current: r.u16()? })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::LEN
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u16(self.supported)?;
        w.u16(self.current)
    }
}

// ---------------------------------------------------------------------------
// spicevmc / port

/// `SpiceMsgCompressedData` (type 102, both directions).
///
/// Only LZ4 (`kind == 1`) exists in practice; spice-server disconnects on
/// anything else and so does [`ServerMsg::parse`]/[`ClientMsg::parse`]
/// ([`FrameError::BadCompression`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedData<'a> {
    /// `SpiceDataCompressionType`; always [`COMPRESSION_LZ4`] once parsed.
    pub kind: u8,
    /// Exact size the block decompresses to.
    pub uncompressed_size: u32,
    /// Raw LZ4 block.
    pub data: &'a [u8],
}

impl<'a> CompressedData<'a> {
    /// `u8 kind` + `u32 uncompressed_size` before the block.
    pub const PREFIX_LEN: usize = 5;

    /// An LZ4 message for `data` compressed from `uncompressed_size` bytes.
    pub fn lz4(uncompressed_size: u32, data: &'a [u8]) -> Self {
        Self { kind: COMPRESSION_LZ4, uncompressed_size, data }
    }

    fn parse(b: &'a [u8]) -> Result<Self, FrameError> {
        const T: u16 = MSG_SPICEVMC_COMPRESSED_DATA;
        let mut r = Reader::new(b);
        let kind = r.u8().map_err(malformed(T))?;
        if kind != COMPRESSION_LZ4 {
            return Err(FrameError::BadCompression);
        }
        let uncompressed_size = r.u32().map_err(malformed(T))?;
        Ok(Self { kind, uncompressed_size, data: r.rest() })
    }

    /// Decompresses into `out` (see [`decompress_lz4`]).
    pub fn decompress(&self, limit: usize, out: &mut [u8]) -> Result<usize, FrameError> {
        decompress_lz4(self.data, self.uncompressed_size, limit, out)
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::PREFIX_LEN + self.data.len()
    }
    /// Writes the 5-byte prefix only, for a caller that compresses straight
    /// into the bytes after it.
    pub fn emit_prefix(kind: u8, uncompressed_size: u32, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u8(kind)?;
        w.u32(uncompressed_size)
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        Self::emit_prefix(self.kind, self.uncompressed_size, w)?;
        w.put(self.data)
    }
}

/// Decompresses a raw LZ4 block that must expand to exactly
/// `uncompressed_size` bytes into the front of `out`.
///
/// The size is checked against `limit` and `out.len()` before any work, so
/// a hostile size costs nothing; nothing is allocated.
pub fn decompress_lz4(data: &[u8], uncompressed_size: u32, limit: usize, out: &mut [u8]) -> Result<usize, FrameError> {
    let room = limit.min(out.len());
    let size = usize::try_from(uncompressed_size).unwrap_or(usize::MAX);
    if size > room {
        return Err(FrameError::TooLarge {
            msg_type: MSG_SPICEVMC_COMPRESSED_DATA,
            size: uncompressed_size,
            limit: u32::try_from(room).unwrap_or(u32::MAX),
        });
    }
    let dst = out.get_mut(..size).ok_or(FrameError::BadCompression)?;
    match lz4_flex::block::decompress_into(data, dst) {
        Ok(n) if n == size => Ok(n),
        _ => Err(FrameError::BadCompression),
    }
}

/// Scratch size [`compress_lz4`] needs for `input_len` bytes (the LZ4
/// worst case, slightly more than the input).
pub const fn lz4_scratch_len(input_len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(input_len)
}

/// LZ4-compresses `input` into `out` (at least [`lz4_scratch_len`] bytes).
/// `None` when the block would not be strictly smaller than the input (then
/// send DATA, as spice-server does), when `out` is too small, or when the
/// input is too large for the u32 size field.
///
/// Allocates lz4_flex's hash table per call; use [`Lz4Compressor`] on a
/// data path.
pub fn compress_lz4(input: &[u8], out: &mut [u8]) -> Option<usize> {
    u32::try_from(input.len()).ok()?;
    let n = lz4_flex::block::compress_into(input, out).ok()?;
    (n < input.len()).then_some(n)
}

/// [`compress_lz4`] with a reusable hash table: no allocation per call.
pub struct Lz4Compressor {
    table: lz4_flex::block::CompressTable,
}

impl std::fmt::Debug for Lz4Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lz4Compressor").finish_non_exhaustive()
    }
}

impl Default for Lz4Compressor {
    fn default() -> Self {
        Self::new()
    }
}

impl Lz4Compressor {
    /// A compressor with a table for any input size.
    pub fn new() -> Self {
        Self { table: lz4_flex::block::CompressTable::large() }
    }
    /// As [`compress_lz4`].
    pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
        u32::try_from(input.len()).ok()?;
        let n = lz4_flex::block::compress_into_with_table(input, out, &mut self.table).ok()?;
        (n < input.len()).then_some(n)
    }
}

/// `SPICE_MSG_PORT_INIT` (§4.5): the port's name and host-side state.
///
/// Wire: `u32 name_size` (with NUL), `u32 name_ptr` (offset of the name from
/// the body start; spice-server writes 9), `u8 opened`, name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInit<'a> {
    /// The port name without its NUL (e.g. `org.qemu.monitor.qmp.0`).
    pub name: &'a [u8],
    /// Whether the host-side frontend has the chardev open.
    pub opened: bool,
}

impl<'a> PortInit<'a> {
    /// Fixed part before the name; also the `name_ptr` we write.
    pub const FIXED_LEN: usize = 9;

    fn parse(b: &'a [u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        let name_size = usize::try_from(r.u32()?).map_err(|_| Truncated)?;
        let name_ptr = usize::try_from(r.u32()?).map_err(|_| Truncated)?;
        let opened = r.u8()? != 0;
        // The pointer must lie past the fixed part (0 would be a NULL
        // pointer in the protocol's encoding) and the name inside the body.
        if name_ptr < Self::FIXED_LEN {
            return Err(Truncated);
        }
        let end = name_ptr.checked_add(name_size).ok_or(Truncated)?;
        let name = b.get(name_ptr..end).ok_or(Truncated)?;
        Ok(Self { name: strip_nul(name), opened })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::FIXED_LEN + self.name.len() + 1
    }
    /// Writes the body, name NUL-terminated, `name_ptr = 9`.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u32(len_u32(self.name.len() + 1)?)?;
        w.u32(len_u32(Self::FIXED_LEN)?)?;
        w.u8(u8::from(self.opened))?;
        w.put(self.name)?;
        w.u8(0)
    }
}

// ---------------------------------------------------------------------------
// client → server

/// `SPICE_MSGC_PONG`: the PING's id and timestamp, no padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    /// PING id.
    pub id: u32,
    /// PING timestamp.
    pub timestamp: u64,
}

impl Pong {
    /// Body length.
    pub const LEN: usize = 12;

    fn parse(b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(Self { id: r.u32()?, timestamp: r.u64()? })
    }
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        Self::LEN
    }
    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.u32(self.id)?;
        w.u64(self.timestamp)
    }
}

// ---------------------------------------------------------------------------
// top-level decoders

/// A server → client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerMsg<'a> {
    /// `MIGRATE` (1): `u32 flags`.
    Migrate {
        /// Bit 0 NEED_FLUSH, bit 1 NEED_DATA_TRANSFER.
        flags: u32,
    },
    /// `SET_ACK` (3).
    SetAck(SetAck),
    /// `PING` (4).
    Ping(Ping),
    /// `WAIT_FOR_CHANNELS` (5).
    WaitForChannels(WaitForChannels<'a>),
    /// `DISCONNECTING` (6).
    Disconnecting(Disconnecting),
    /// `NOTIFY` (7).
    Notify(Notify<'a>),
    /// `MAIN_INIT` (103).
    MainInit(MainInit),
    /// `MAIN_CHANNELS_LIST` (104).
    ChannelsList(ChannelsList<'a>),
    /// `MAIN_MOUSE_MODE` (105).
    MouseMode(MouseMode),
    /// `MAIN_MULTI_MEDIA_TIME` (106): ms.
    MultiMediaTime {
        /// Server multimedia clock (ms).
        time: u32,
    },
    /// `MAIN_AGENT_CONNECTED` (107), empty.
    AgentConnected,
    /// `MAIN_AGENT_DISCONNECTED` (108).
    AgentDisconnected {
        /// A `SpiceLinkErr` code.
        error_code: u32,
    },
    /// `MAIN_AGENT_TOKEN` (110).
    AgentToken {
        /// Tokens granted.
        num_tokens: u32,
    },
    /// `MAIN_NAME` (113): `u32 len` + name with its NUL.
    Name {
        /// VM name without the NUL.
        name: &'a [u8],
    },
    /// `MAIN_UUID` (114).
    Uuid {
        /// VM UUID.
        uuid: [u8; 16],
    },
    /// `MAIN_AGENT_CONNECTED_TOKENS` (115).
    AgentConnectedTokens {
        /// Tokens granted.
        num_tokens: u32,
    },
    /// `SPICEVMC_DATA` (101) on a pass-through channel: the payload is
    /// streamed by the caller and is not part of this value.
    Data,
    /// `SPICEVMC_COMPRESSED_DATA` (102).
    CompressedData(CompressedData<'a>),
    /// `PORT_INIT` (201).
    PortInit(PortInit<'a>),
    /// `PORT_EVENT` (202).
    PortEvent {
        /// `PORT_EVENT_*`.
        event: u8,
    },
    /// A message this module does not decode (MIGRATE_DATA, agent data,
    /// migration, any type on a foreign channel). Its body is not kept;
    /// `emit` writes none.
    Other {
        /// The type.
        msg_type: u16,
    },
}

impl<'a> ServerMsg<'a> {
    /// Decodes a server message of `msg_type` on a channel of `kind`.
    ///
    /// For DATA, `body` is ignored (pass what you have, or nothing).
    pub fn parse(kind: ChannelKind, msg_type: u16, body: &'a [u8]) -> Result<Self, FrameError> {
        let bad = malformed(msg_type);
        let le32 = |b: &[u8]| Reader::new(b).u32().map_err(malformed(msg_type));
        // Common messages, valid on every channel.
        match msg_type {
            MSG_MIGRATE => return Ok(Self::Migrate { flags: le32(body)? }),
            MSG_SET_ACK => return SetAck::parse(body).map(Self::SetAck).map_err(bad),
            MSG_PING => return Ping::parse(body).map(Self::Ping).map_err(bad),
            MSG_WAIT_FOR_CHANNELS => return WaitForChannels::parse(body).map(Self::WaitForChannels).map_err(bad),
            MSG_DISCONNECTING => return Disconnecting::parse(body).map(Self::Disconnecting).map_err(bad),
            MSG_NOTIFY => return Notify::parse(body).map(Self::Notify).map_err(bad),
            // Sub-message lists belong to display channels; vmcrelay's
            // pass-through path has no way to honour one.
            MSG_LIST if kind.class == ChannelClass::PassThrough => return Err(FrameError::SubList),
            MSG_MIGRATE_DATA | MSG_LIST | MSG_BASE_LAST => return Ok(Self::Other { msg_type }),
            _ => {}
        }
        match kind.class {
            ChannelClass::Main => Ok(match msg_type {
                MSG_MAIN_INIT => Self::MainInit(MainInit::parse(body).map_err(bad)?),
                MSG_MAIN_CHANNELS_LIST => Self::ChannelsList(ChannelsList::parse(body).map_err(bad)?),
                MSG_MAIN_MOUSE_MODE => Self::MouseMode(MouseMode::parse(body).map_err(bad)?),
                MSG_MAIN_MULTI_MEDIA_TIME => Self::MultiMediaTime { time: le32(body)? },
                MSG_MAIN_AGENT_CONNECTED => Self::AgentConnected,
                MSG_MAIN_AGENT_DISCONNECTED => Self::AgentDisconnected { error_code: le32(body)? },
                MSG_MAIN_AGENT_TOKEN => Self::AgentToken { num_tokens: le32(body)? },
                MSG_MAIN_NAME => {
                    let mut r = Reader::new(body);
                    let len = usize::try_from(r.u32().map_err(&bad)?).map_err(|_| FrameError::Malformed(msg_type))?;
                    Self::Name { name: strip_nul(r.take(len).map_err(bad)?) }
                }
                MSG_MAIN_UUID => Self::Uuid { uuid: Reader::new(body).array().map_err(bad)? },
                MSG_MAIN_AGENT_CONNECTED_TOKENS => Self::AgentConnectedTokens { num_tokens: le32(body)? },
                _ => Self::Other { msg_type },
            }),
            ChannelClass::PassThrough => match msg_type {
                MSG_SPICEVMC_DATA => Ok(Self::Data),
                MSG_SPICEVMC_COMPRESSED_DATA if kind.lz4 => CompressedData::parse(body).map(Self::CompressedData),
                MSG_PORT_INIT if kind.port_messages => PortInit::parse(body).map(Self::PortInit).map_err(bad),
                MSG_PORT_EVENT if kind.port_messages => {
                    Ok(Self::PortEvent { event: Reader::new(body).u8().map_err(bad)? })
                }
                _ => Err(FrameError::UnexpectedType(msg_type)),
            },
            ChannelClass::Foreign => Ok(Self::Other { msg_type }),
        }
    }

    /// The wire type.
    pub fn msg_type(&self) -> u16 {
        match self {
            Self::Migrate { .. } => MSG_MIGRATE,
            Self::SetAck(_) => MSG_SET_ACK,
            Self::Ping(_) => MSG_PING,
            Self::WaitForChannels(_) => MSG_WAIT_FOR_CHANNELS,
            Self::Disconnecting(_) => MSG_DISCONNECTING,
            Self::Notify(_) => MSG_NOTIFY,
            Self::MainInit(_) => MSG_MAIN_INIT,
            Self::ChannelsList(_) => MSG_MAIN_CHANNELS_LIST,
            Self::MouseMode(_) => MSG_MAIN_MOUSE_MODE,
            Self::MultiMediaTime { .. } => MSG_MAIN_MULTI_MEDIA_TIME,
            Self::AgentConnected => MSG_MAIN_AGENT_CONNECTED,
            Self::AgentDisconnected { .. } => MSG_MAIN_AGENT_DISCONNECTED,
            Self::AgentToken { .. } => MSG_MAIN_AGENT_TOKEN,
            Self::Name { .. } => MSG_MAIN_NAME,
            Self::Uuid { .. } => MSG_MAIN_UUID,
            Self::AgentConnectedTokens { .. } => MSG_MAIN_AGENT_CONNECTED_TOKENS,
            Self::Data => MSG_SPICEVMC_DATA,
            Self::CompressedData(_) => MSG_SPICEVMC_COMPRESSED_DATA,
            Self::PortInit(_) => MSG_PORT_INIT,
            Self::PortEvent { .. } => MSG_PORT_EVENT,
            Self::Other { msg_type } => *msg_type,
        }
    }

    /// Body length on the wire (0 for [`Self::Data`] and [`Self::Other`]).
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Migrate { .. }
            | Self::MultiMediaTime { .. }
            | Self::AgentDisconnected { .. }
            | Self::AgentToken { .. }
            | Self::AgentConnectedTokens { .. } => 4,
            Self::SetAck(m) => m.encoded_len(),
            Self::Ping(m) => m.encoded_len(),
            Self::WaitForChannels(m) => m.encoded_len(),
            Self::Disconnecting(m) => m.encoded_len(),
            Self::Notify(m) => m.encoded_len(),
            Self::MainInit(m) => m.encoded_len(),
            Self::ChannelsList(m) => m.encoded_len(),
            Self::MouseMode(m) => m.encoded_len(),
            Self::Name { name } => 4 + name.len() + 1,
            Self::Uuid { .. } => 16,
            Self::CompressedData(m) => m.encoded_len(),
            Self::PortInit(m) => m.encoded_len(),
            Self::PortEvent { .. } => 1,
            Self::AgentConnected | Self::Data | Self::Other { .. } => 0,
        }
    }

    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        match self {
            Self::Migrate { flags: v }
            | Self::MultiMediaTime { time: v }
            | Self::AgentDisconnected { error_code: v }
            | Self::AgentToken { num_tokens: v }
            | Self::AgentConnectedTokens { num_tokens: v } => w.u32(*v),
            Self::SetAck(m) => m.emit(w),
            Self::Ping(m) => m.emit(w),
            Self::WaitForChannels(m) => m.emit(w),
            Self::Disconnecting(m) => m.emit(w),
            Self::Notify(m) => m.emit(w),
            Self::MainInit(m) => m.emit(w),
            Self::ChannelsList(m) => m.emit(w),
            Self::MouseMode(m) => m.emit(w),
            Self::Name { name } => {
                w.u32(len_u32(name.len() + 1)?)?;
                w.put(name)?;
                w.u8(0)
            }
            Self::Uuid { uuid } => w.put(uuid),
            Self::CompressedData(m) => m.emit(w),
            Self::PortInit(m) => m.emit(w),
            Self::PortEvent { event } => w.u8(*event),
            Self::AgentConnected | Self::Data | Self::Other { .. } => Ok(()),
        }
    }

    /// Header plus body length with `kind` headers.
    pub fn framed_len(&self, kind: HeaderKind) -> usize {
        kind.len() + self.encoded_len()
    }

    /// Writes header and body into `out`; returns the bytes written.
    pub fn emit_framed(&self, enc: &mut Encoder, out: &mut [u8]) -> Result<usize, Truncated> {
        emit_framed(enc, self.msg_type(), self.encoded_len(), |w| self.emit(w), out)
    }
}

/// A client → server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMsg<'a> {
    /// `ACK_SYNC` (1).
    AckSync {
        /// The SET_ACK generation.
        generation: u32,
    },
    /// `ACK` (2), empty.
    Ack,
    /// `PONG` (3).
    Pong(Pong),
    /// `MIGRATE_FLUSH_MARK` (4), empty.
    MigrateFlushMark,
    /// `DISCONNECTING` (6).
    Disconnecting(Disconnecting),
    /// `MAIN_CLIENT_INFO` (101).
    ClientInfo {
        /// Unused by every server.
        cache_size: u64,
    },
    /// `MAIN_ATTACH_CHANNELS` (104), empty.
    AttachChannels,
    /// `MAIN_MOUSE_MODE_REQUEST` (105).
    MouseModeRequest {
        /// Wanted mode (u16).
        mode: u16,
    },
    /// `MAIN_AGENT_START` (106).
    AgentStart {
        /// Tokens granted to the server (spice-gtk: `0xFFFF_FFFF`).
        num_tokens: u32,
    },
    /// `MAIN_AGENT_TOKEN` (108).
    AgentToken {
        /// Tokens granted.
        num_tokens: u32,
    },
    /// `SPICEVMC_DATA` (101) on a pass-through channel; payload streamed.
    Data,
    /// `SPICEVMC_COMPRESSED_DATA` (102).
    CompressedData(CompressedData<'a>),
    /// `PORT_EVENT` (201).
    PortEvent {
        /// `PORT_EVENT_*` (spice-gtk only sends BREAK).
        event: u8,
    },
    /// An allowed message this module does not decode (MIGRATE_DATA, agent
    /// data, migration, quality indicator). Body not kept.
    Other {
        /// The type.
        msg_type: u16,
    },
}

impl<'a> ClientMsg<'a> {
    /// Decodes a client message of `msg_type` on a channel of `kind`.
    /// Types outside [`ChannelKind::client_msg_allowed`] are
    /// [`FrameError::UnexpectedType`] (spice-server disconnects on them).
    pub fn parse(kind: ChannelKind, msg_type: u16, body: &'a [u8]) -> Result<Self, FrameError> {
        if !kind.client_msg_allowed(msg_type) {
            return Err(FrameError::UnexpectedType(msg_type));
        }
        let bad = malformed(msg_type);
        let le32 = |b: &[u8]| Reader::new(b).u32().map_err(malformed(msg_type));
        match msg_type {
            MSGC_ACK_SYNC => return Ok(Self::AckSync { generation: le32(body)? }),
            MSGC_ACK => return Ok(Self::Ack),
            MSGC_PONG => return Pong::parse(body).map(Self::Pong).map_err(bad),
            MSGC_MIGRATE_FLUSH_MARK => return Ok(Self::MigrateFlushMark),
            MSGC_DISCONNECTING => return Disconnecting::parse(body).map(Self::Disconnecting).map_err(bad),
            MSGC_MIGRATE_DATA => return Ok(Self::Other { msg_type }),
            _ => {}
        }
        match kind.class {
            ChannelClass::Main => Ok(match msg_type {
                MSGC_MAIN_CLIENT_INFO => Self::ClientInfo { cache_size: Reader::new(body).u64().map_err(bad)? },
                MSGC_MAIN_ATTACH_CHANNELS => Self::AttachChannels,
                MSGC_MAIN_MOUSE_MODE_REQUEST => Self::MouseModeRequest { mode: Reader::new(body).u16().map_err(bad)? },
                MSGC_MAIN_AGENT_START => Self::AgentStart { num_tokens: le32(body)? },
                MSGC_MAIN_AGENT_TOKEN => Self::AgentToken { num_tokens: le32(body)? },
                _ => Self::Other { msg_type },
            }),
            ChannelClass::PassThrough => match msg_type {
                MSG_SPICEVMC_DATA => Ok(Self::Data),
                MSG_SPICEVMC_COMPRESSED_DATA => CompressedData::parse(body).map(Self::CompressedData),
                // spice-server disconnects unless the body is exactly 1 byte.
                MSGC_PORT_EVENT => match *body {
                    [event] => Ok(Self::PortEvent { event }),
                    _ => Err(FrameError::Malformed(msg_type)),
                },
                _ => Err(FrameError::UnexpectedType(msg_type)),
            },
            // client_msg_allowed admits only common types on foreign channels.
            ChannelClass::Foreign => Err(FrameError::UnexpectedType(msg_type)),
        }
    }

    /// The wire type.
    pub fn msg_type(&self) -> u16 {
        match self {
            Self::AckSync { .. } => MSGC_ACK_SYNC,
            Self::Ack => MSGC_ACK,
            Self::Pong(_) => MSGC_PONG,
            Self::MigrateFlushMark => MSGC_MIGRATE_FLUSH_MARK,
            Self::Disconnecting(_) => MSGC_DISCONNECTING,
            Self::ClientInfo { .. } => MSGC_MAIN_CLIENT_INFO,
            Self::AttachChannels => MSGC_MAIN_ATTACH_CHANNELS,
            Self::MouseModeRequest { .. } => MSGC_MAIN_MOUSE_MODE_REQUEST,
            Self::AgentStart { .. } => MSGC_MAIN_AGENT_START,
            Self::AgentToken { .. } => MSGC_MAIN_AGENT_TOKEN,
            Self::Data => MSG_SPICEVMC_DATA,
            Self::CompressedData(_) => MSG_SPICEVMC_COMPRESSED_DATA,
            Self::PortEvent { .. } => MSGC_PORT_EVENT,
            Self::Other { msg_type } => *msg_type,
        }
    }

    /// Body length on the wire (0 for [`Self::Data`] and [`Self::Other`]).
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::AckSync { .. } | Self::AgentStart { .. } | Self::AgentToken { .. } => 4,
            Self::Pong(m) => m.encoded_len(),
            Self::Disconnecting(m) => m.encoded_len(),
            Self::ClientInfo { .. } => 8,
            Self::MouseModeRequest { .. } => 2,
            Self::CompressedData(m) => m.encoded_len(),
            Self::PortEvent { .. } => 1,
            Self::Ack | Self::MigrateFlushMark | Self::AttachChannels | Self::Data | Self::Other { .. } => 0,
        }
    }

    /// Writes the body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        match self {
            Self::AckSync { generation: v }
            | Self::AgentStart { num_tokens: v }
            | Self::AgentToken { num_tokens: v } => w.u32(*v),
            Self::Pong(m) => m.emit(w),
            Self::Disconnecting(m) => m.emit(w),
            Self::ClientInfo { cache_size } => w.u64(*cache_size),
            Self::MouseModeRequest { mode } => w.u16(*mode),
            Self::CompressedData(m) => m.emit(w),
            Self::PortEvent { event } => w.u8(*event),
            Self::Ack | Self::MigrateFlushMark | Self::AttachChannels | Self::Data | Self::Other { .. } => Ok(()),
        }
    }

    /// Header plus body length with `kind` headers.
    pub fn framed_len(&self, kind: HeaderKind) -> usize {
        kind.len() + self.encoded_len()
    }

    /// Writes header and body into `out`; returns the bytes written.
    pub fn emit_framed(&self, enc: &mut Encoder, out: &mut [u8]) -> Result<usize, Truncated> {
        emit_framed(enc, self.msg_type(), self.encoded_len(), |w| self.emit(w), out)
    }
}

fn emit_framed(
    enc: &mut Encoder,
    msg_type: u16,
    body_len: usize,
    body: impl FnOnce(&mut Writer<'_>) -> Result<(), Truncated>,
    out: &mut [u8],
) -> Result<usize, Truncated> {
    let hl = enc.header_len();
    let total = hl.checked_add(body_len).ok_or(Truncated)?;
    let out = out.get_mut(..total).ok_or(Truncated)?;
    let (head, rest) = out.split_at_mut(hl);
    // Check the body fits before the header consumes a serial.
    let mut w = Writer::new(rest);
    body(&mut w)?;
    if w.written() != body_len {
        return Err(Truncated);
    }
    enc.header(msg_type, len_u32(body_len)?, head)?;
    Ok(total)
}

// ---------------------------------------------------------------------------
// control-message collector

/// Collects one control message body from the deframer's chunks into an
/// inline `N`-byte array (no heap), keeping the first `N` bytes.
///
/// Use: [`start`](Self::start) on `Event::Header`, [`push`](Self::push) every
/// body chunk, decode on the last chunk. Bytes beyond `N` are counted, not
/// kept: a PING decodes from its first 12 bytes whatever its padding, and
/// DATA or undecoded (`Other`) messages ignore their bodies; any other
/// message that did not fit is [`FrameError::TooLarge`]. Check
/// [`fits`](Self::fits) at the header to refuse early.
#[derive(Debug, Clone)]
pub struct ControlBuf<const N: usize> {
    buf: [u8; N],
    kept: usize,
    received: u64,
    header: MsgHeader,
}

impl<const N: usize> Default for ControlBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> ControlBuf<N> {
    /// An empty collector.
    pub const fn new() -> Self {
        Self { buf: [0; N], kept: 0, received: 0, header: MsgHeader { msg_type: 0, size: 0, serial: 0, sub_list: 0 } }
    }

    /// Starts collecting the body of the message `header` announces.
    pub fn start(&mut self, header: MsgHeader) {
        self.header = header;
        self.kept = 0;
        self.received = 0;
    }

    /// The header of the message being collected.
    pub fn header(&self) -> MsgHeader {
        self.header
    }

    /// Whether the announced body fits without truncation.
    pub fn fits(&self) -> bool {
        usize::try_from(self.header.size).is_ok_and(|s| s <= N)
    }

    /// Appends a body chunk, keeping what fits.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = N - self.kept;
        let n = room.min(chunk.len());
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.kept..self.kept + n), chunk.get(..n)) {
            dst.copy_from_slice(src);
            self.kept += n;
        }
        self.received = self.received.saturating_add(chunk.len() as u64);
    }

    /// The kept body bytes (at most `N`).
    pub fn body(&self) -> &[u8] {
        self.buf.get(..self.kept).unwrap_or_default()
    }

    /// Whether body bytes were dropped.
    pub fn is_truncated(&self) -> bool {
        self.received > self.kept as u64
    }

    /// Whether the whole announced body has been pushed.
    pub fn is_complete(&self) -> bool {
        self.received == u64::from(self.header.size)
    }

    fn check(&self) -> Result<(), FrameError> {
        if self.is_complete() { Ok(()) } else { Err(FrameError::Malformed(self.header.msg_type)) }
    }

    fn too_large(&self) -> FrameError {
        FrameError::TooLarge {
            msg_type: self.header.msg_type,
            size: self.header.size,
            limit: u32::try_from(N).unwrap_or(u32::MAX),
        }
    }

    /// Decodes the collected body as a server message on `kind`.
    pub fn server_msg(&self, kind: ChannelKind) -> Result<ServerMsg<'_>, FrameError> {
        self.check()?;
        let t = self.header.msg_type;
        let msg = ServerMsg::parse(kind, t, self.body());
        if !self.is_truncated() {
            return msg;
        }
        match msg {
            Ok(ServerMsg::Ping(mut p)) => {
                let total = usize::try_from(self.header.size).unwrap_or(usize::MAX);
                let padding = total.saturating_sub(Ping::FIXED_LEN);
                p.padding_len = u32::try_from(padding).unwrap_or(u32::MAX);
                Ok(ServerMsg::Ping(p))
            }
            Ok(m @ (ServerMsg::Data | ServerMsg::Other { .. })) => Ok(m),
            Err(e @ FrameError::UnexpectedType(_)) => Err(e),
            _ => Err(self.too_large()),
        }
    }

    /// Decodes the collected body as a client message on `kind`.
    pub fn client_msg(&self, kind: ChannelKind) -> Result<ClientMsg<'_>, FrameError> {
        self.check()?;
        let msg = ClientMsg::parse(kind, self.header.msg_type, self.body());
        if !self.is_truncated() {
            return msg;
        }
        match msg {
            Ok(m @ (ClientMsg::Data | ClientMsg::Other { .. })) => Ok(m),
            Err(e @ FrameError::UnexpectedType(_)) => Err(e),
            _ => Err(self.too_large()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::proto::channel::{CH_INPUTS, CH_MAIN, CH_PORT, CH_SMARTCARD, CH_USBREDIR};

    fn kind(t: u8) -> ChannelKind {
        ChannelKind::of(t).expect("known kind")
    }

    /// QEMU 7.2's PORT_INIT for the QMP port (reference §4.5).
    const QMP_PORT_INIT: &[u8] = b"\x17\0\0\0\x09\0\0\0\x01org.qemu.monitor.qmp.0\0";

    #[test]
    fn port_init_from_qemu() {
        let m = ServerMsg::parse(kind(CH_PORT), MSG_PORT_INIT, QMP_PORT_INIT).expect("parses");
        assert_eq!(m, ServerMsg::PortInit(PortInit { name: b"org.qemu.monitor.qmp.0", opened: true }));
        let mut out = [0u8; 64];
        let mut w = Writer::new(&mut out);
        m.emit(&mut w).expect("fits");
        let n = w.written();
        assert_eq!(&out[..n], QMP_PORT_INIT);
    }

    #[test]
    fn port_init_pointer_checks() {
        let k = kind(CH_PORT);
        let mut b = QMP_PORT_INIT.to_vec();
        b[4] = 0; // NULL pointer
        assert_eq!(ServerMsg::parse(k, MSG_PORT_INIT, &b), Err(FrameError::Malformed(MSG_PORT_INIT)));
        b[4] = 10; // name runs one byte past the body
        assert!(ServerMsg::parse(k, MSG_PORT_INIT, &b).is_err());
        // name without NUL, pointer past a gap
        let b = b"\x03\0\0\0\x0a\0\0\0\x00Xabc";
        assert_eq!(
            ServerMsg::parse(k, MSG_PORT_INIT, b),
            Ok(ServerMsg::PortInit(PortInit { name: b"abc", opened: false }))
        );
        // PORT_INIT is not part of usbredir's set
        assert_eq!(
            ServerMsg::parse(kind(CH_USBREDIR), MSG_PORT_INIT, QMP_PORT_INIT),
            Err(FrameError::UnexpectedType(MSG_PORT_INIT))
        );
    }

    #[test]
    fn main_init_from_qemu() {
        // Reference §3.2, QEMU 7.2 without display.
        let b = b"\x95\x1d\x49\xaf\0\0\0\0\x01\0\0\0\x01\0\0\0\0\0\0\0\x0a\0\0\0\x6e\x2b\x08\0\0\0\0\0";
        let Ok(ServerMsg::MainInit(m)) = ServerMsg::parse(kind(CH_MAIN), MSG_MAIN_INIT, b) else { panic!() };
        assert_eq!(m.session_id, 0xaf49_1d95);
        assert_eq!((m.supported_mouse_modes, m.agent_tokens, m.multi_media_time), (1, 10, 0x82b6e));
    }

    #[test]
    fn channels_list_bounded_by_body() {
        let k = kind(CH_MAIN);
        let b = b"\x05\0\0\0\x09\x01\x09\x00\x0a\x01\x0a\x00\x03\x00";
        let Ok(ServerMsg::ChannelsList(l)) = ServerMsg::parse(k, MSG_MAIN_CHANNELS_LIST, b) else { panic!() };
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![(9, 1), (9, 0), (10, 1), (10, 0), (3, 0)]);
        assert!(l.contains(3, 0) && !l.contains(3, 1));
        let huge = b"\xff\xff\xff\xff\x09\x00";
        assert_eq!(
            ServerMsg::parse(k, MSG_MAIN_CHANNELS_LIST, huge),
            Err(FrameError::Malformed(MSG_MAIN_CHANNELS_LIST))
        );
    }

    #[test]
    fn notify_with_and_without_extra_nul() {
        let k = kind(CH_MAIN);
        let mut b = vec![0u8; 20];
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(b"hello");
        let want = ServerMsg::Notify(Notify { time_stamp: 0, severity: 0, visibility: 0, what: 0, message: b"hello" });
        assert_eq!(ServerMsg::parse(k, MSG_NOTIFY, &b), Ok(want));
        b.push(0);
        assert_eq!(ServerMsg::parse(k, MSG_NOTIFY, &b), Ok(want));
        b.truncate(27);
        assert_eq!(ServerMsg::parse(k, MSG_NOTIFY, &b), Err(FrameError::Malformed(MSG_NOTIFY)));
    }

    #[test]
    fn client_port_event_exactly_one_byte() {
        let k = kind(CH_PORT);
        assert_eq!(ClientMsg::parse(k, MSGC_PORT_EVENT, &[2]), Ok(ClientMsg::PortEvent { event: 2 }));
        assert_eq!(ClientMsg::parse(k, MSGC_PORT_EVENT, &[]), Err(FrameError::Malformed(MSGC_PORT_EVENT)));
        assert_eq!(ClientMsg::parse(k, MSGC_PORT_EVENT, &[2, 0]), Err(FrameError::Malformed(MSGC_PORT_EVENT)));
        assert_eq!(
            ClientMsg::parse(kind(CH_USBREDIR), MSGC_PORT_EVENT, &[2]),
            Err(FrameError::UnexpectedType(MSGC_PORT_EVENT))
        );
        assert_eq!(
            ClientMsg::parse(kind(CH_SMARTCARD), MSG_SPICEVMC_COMPRESSED_DATA, &[1, 0, 0, 0, 0]),
            Err(FrameError::UnexpectedType(MSG_SPICEVMC_COMPRESSED_DATA))
        );
        assert_eq!(ClientMsg::parse(kind(CH_INPUTS), 101, &[]), Err(FrameError::UnexpectedType(101)));
    }

    #[test]
    fn compressed_data_kind_checked() {
        let k = kind(CH_USBREDIR);
        for t in [0u8, 2, 255] {
            assert_eq!(
                ClientMsg::parse(k, MSG_SPICEVMC_COMPRESSED_DATA, &[t, 0, 0, 0, 0]),
                Err(FrameError::BadCompression)
            );
        }
        assert_eq!(
            ServerMsg::parse(k, MSG_SPICEVMC_COMPRESSED_DATA, &[1, 0, 0]),
            Err(FrameError::Malformed(MSG_SPICEVMC_COMPRESSED_DATA))
        );
    }

    #[test]
    fn lz4_round_trip_and_limits() {
        let input: Vec<u8> = b"{\"execute\":\"query-status\"}\r\n".repeat(100);
        let mut scratch = vec![0u8; lz4_scratch_len(input.len())];
        let n = compress_lz4(&input, &mut scratch).expect("compressible");
        assert!(n < input.len());
        let mut c = Lz4Compressor::new();
        let mut scratch2 = vec![0u8; lz4_scratch_len(input.len())];
        let n2 = c.compress(&input, &mut scratch2).expect("compressible");
        let mut out2 = vec![0u8; input.len()];
        assert_eq!(decompress_lz4(&scratch2[..n2], input.len() as u32, 1 << 20, &mut out2), Ok(input.len()));
        assert_eq!(out2, input);
        let size = input.len() as u32;
        let mut out = vec![0u8; input.len() + 10];
        assert_eq!(decompress_lz4(&scratch[..n], size, 1 << 20, &mut out), Ok(input.len()));
        assert_eq!(out[..input.len()], input[..]);
        // one byte off either way
        assert_eq!(decompress_lz4(&scratch[..n], size + 1, 1 << 20, &mut out), Err(FrameError::BadCompression));
        assert_eq!(decompress_lz4(&scratch[..n], size - 1, 1 << 20, &mut out), Err(FrameError::BadCompression));
        // over the limit / the buffer: refused before decoding
        assert!(matches!(decompress_lz4(&scratch[..n], size, 100, &mut out), Err(FrameError::TooLarge { .. })));
        assert!(matches!(decompress_lz4(&[], u32::MAX, usize::MAX, &mut out), Err(FrameError::TooLarge { .. })));
        // incompressible input is not sent compressed
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        let mut scratch = vec![0u8; lz4_scratch_len(noise.len())];
        assert_eq!(compress_lz4(&noise, &mut scratch), None);
        assert_eq!(compress_lz4(&input, &mut [0u8; 10]), None, "scratch too small");
    }

    #[test]
    fn control_buf_truncates_only_ping() {
        let k = kind(CH_MAIN);
        let mut cb = ControlBuf::<64>::new();
        // network-test PING: 12 + 256 000 bytes
        let size = 12 + 256_000u32;
        cb.start(MsgHeader { msg_type: MSG_PING, size, serial: 0, sub_list: 0 });
        assert!(!cb.fits());
        cb.push(&3u32.to_le_bytes());
        cb.push(&7u64.to_le_bytes());
        for _ in 0..1000 {
            cb.push(&[0; 256]);
        }
        assert!(cb.is_truncated() && cb.is_complete());
        assert_eq!(cb.server_msg(k), Ok(ServerMsg::Ping(Ping { id: 3, timestamp: 7, padding_len: 256_000 })));
        // a NOTIFY that does not fit is refused
        cb.start(MsgHeader { msg_type: MSG_NOTIFY, size: 100, serial: 0, sub_list: 0 });
        cb.push(&[0; 100]);
        assert_eq!(cb.server_msg(k), Err(FrameError::TooLarge { msg_type: MSG_NOTIFY, size: 100, limit: 64 }));
        // agent data is skipped whatever its size
        cb.start(MsgHeader { msg_type: MSG_MAIN_AGENT_DATA, size: 100, serial: 0, sub_list: 0 });
        cb.push(&[0; 100]);
        assert_eq!(cb.server_msg(k), Ok(ServerMsg::Other { msg_type: MSG_MAIN_AGENT_DATA }));
        // incomplete body
        cb.start(MsgHeader { msg_type: MSG_SET_ACK, size: 8, serial: 0, sub_list: 0 });
        cb.push(&[0; 4]);
        assert_eq!(cb.server_msg(k), Err(FrameError::Malformed(MSG_SET_ACK)));
    }

    #[test]
    fn emit_framed_writes_header_and_body() {
        let mut enc = Encoder::new(HeaderKind::Full);
        let m = ClientMsg::Pong(Pong { id: 1, timestamp: 2 });
        let mut out = [0u8; 64];
        assert_eq!(m.emit_framed(&mut enc, &mut out[..10]), Err(Truncated));
        let n = m.emit_framed(&mut enc, &mut out).expect("fits");
        assert_eq!(n, 18 + 12);
        let h = MsgHeader::parse(HeaderKind::Full, &out[..18]).expect("header");
        assert_eq!((h.serial, h.msg_type, h.size), (1, MSGC_PONG, 12), "failed emit took no serial");
        assert_eq!(ClientMsg::parse(kind(CH_PORT), h.msg_type, &out[18..n]), Ok(m));
    }
}
