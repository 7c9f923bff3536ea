//! Data-stage framing: the mini (6 B) and full (18 B) message headers, a
//! zero-copy streaming deframer and a header encoder.
//!
//! The deframer never copies payload bytes. It returns the header of each
//! message, then the ranges of the caller's input buffer that hold the
//! body. The caller decides where body bytes go: into an endpoint write,
//! into a small control-message buffer, or (for a splice data path) it
//! moves them outside and tells the deframer with [`Deframer::skip_body`].

use super::consts::{DATA_HEADER_LEN, MINI_HEADER_LEN};
use super::wire::{Reader, Truncated, Writer};

/// Which data header a connection uses, fixed right after the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKind {
    /// 6 bytes: u16 type, u32 size.
    Mini,
    /// 18 bytes: u64 serial, u16 type, u32 size, u32 sub_list.
    Full,
}

impl HeaderKind {
    /// Mini iff both sides announced `MINI_HEADER`.
    pub fn negotiate(ours: bool, theirs: bool) -> Self {
        if ours && theirs { Self::Mini } else { Self::Full }
    }

    /// Header length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub const fn len(self) -> usize {
        match self {
            Self::Mini => MINI_HEADER_LEN,
            Self::Full => DATA_HEADER_LEN,
        }
    }
}

/// A decoded data header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    /// Message type.
    pub msg_type: u16,
    /// Body length in bytes.
    pub size: u32,
    /// Serial (full header only; 0 with the mini header).
    pub serial: u64,
    /// Sub-message list offset (full header only).
    pub sub_list: u32,
}

impl MsgHeader {
    /// Decodes a header of `kind` from exactly `kind.len()` bytes.
    pub fn parse(kind: HeaderKind, b: &[u8]) -> Result<Self, Truncated> {
        let mut r = Reader::new(b);
        Ok(match kind {
            HeaderKind::Mini => Self { msg_type: r.u16()?, size: r.u32()?, serial: 0, sub_list: 0 },
            HeaderKind::Full => Self { serial: r.u64()?, msg_type: r.u16()?, size: r.u32()?, sub_list: r.u32()? },
        })
    }
}

/// Data-stage protocol errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Message body larger than the limit this connection allows for it.
    #[error("message type {msg_type} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Type.
        msg_type: u16,
        /// Announced size.
        size: u32,
        /// Allowed size.
        limit: u32,
    },
    /// A message type the channel's message set does not contain.
    #[error("message type {0} is not valid on this channel")]
    UnexpectedType(u16),
    /// A body that does not parse.
    #[error("malformed body of message type {0}")]
    Malformed(u16),
    /// LZ4 data that does not decompress to the announced size.
    #[error("bad LZ4 data")]
    BadCompression,
    /// Sub-message lists are only used by display channels.
    #[error("sub-message list on a pass-through channel")]
    SubList,
}

/// One step of deframing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new message starts; its body follows (possibly empty).
    Header(MsgHeader),
    /// `len` body bytes at `offset` of the input slice. `last` is true on
    /// the chunk that completes the body.
    Body {
        /// Start within the input slice passed to `advance`.
        offset: usize,
        /// Length.
        len: usize,
        /// This chunk ends the message.
        last: bool,
    },
}

/// Streaming deframer: feed any split of the byte stream, one byte at a
/// time works. Keeps at most one header (18 bytes) of state.
#[derive(Debug, Clone)]
pub struct Deframer {
    kind: HeaderKind,
    header: [u8; DATA_HEADER_LEN],
    header_have: usize,
    body_remaining: u32,
    in_body: bool,
}

impl Deframer {
    /// A deframer for `kind` headers.
    pub fn new(kind: HeaderKind) -> Self {
        Self { kind, header: [0; DATA_HEADER_LEN], header_have: 0, body_remaining: 0, in_body: false }
    }

    /// The header kind.
    pub fn kind(&self) -> HeaderKind {
        self.kind
    }

    /// Body bytes of the current message not delivered yet.
    pub fn body_remaining(&self) -> u32 {
        if self.in_body { self.body_remaining } else { 0 }
    }

    /// Whether the deframer sits between messages (no partial header or body).
    pub fn at_boundary(&self) -> bool {
        !self.in_body && self.header_have == 0
    }

    /// Consumes a prefix of `input`; returns the bytes consumed and at most
    /// one event. Call again with the rest while it consumes or yields.
    /// Body chunks refer to `input` itself (`offset` is relative to it).
    pub fn advance(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        if self.in_body {
            let avail = input.len().min(self.body_remaining as usize);
            if avail == 0 && self.body_remaining > 0 {
                return (0, None);
            }
            // avail ≤ body_remaining, a u32.
            self.body_remaining -= u32::try_from(avail).unwrap_or(u32::MAX);
            let last = self.body_remaining == 0;
            if last {
                self.in_body = false;
            }
            return (avail, Some(Event::Body { offset: 0, len: avail, last }));
        }
        let hl = self.kind.len();
        let need = hl - self.header_have;
        let n = need.min(input.len());
        self.header[self.header_have..self.header_have + n].copy_from_slice(&input[..n]);
        self.header_have += n;
        if self.header_have < hl {
            return (n, None);
        }
        self.header_have = 0;
        // Exactly `hl` bytes are present: parsing cannot fail.
        let h = match MsgHeader::parse(self.kind, &self.header[..hl]) {
            Ok(h) => h,
            Err(Truncated) => return (n, None),
        };
        self.body_remaining = h.size;
        self.in_body = true;
        if h.size == 0 {
            // Empty body: report header, and the (empty) last chunk next call.
        }
        (n, Some(Event::Header(h)))
    }

    /// Marks `n` body bytes of the current message as delivered by other
    /// means (e.g. spliced straight from the socket). `n` must not exceed
    /// [`Self::body_remaining`]; it is clamped if it does.
    pub fn skip_body(&mut self, n: u32) -> bool {
        let n = n.min(self.body_remaining);
        self.body_remaining -= n;
        if self.body_remaining == 0 && self.in_body {
            self.in_body = false;
            return true;
        }
        false
    }
}

/// Writes data headers into caller-provided headroom, numbering serials
/// from 1 for the full header.
#[derive(Debug, Clone)]
pub struct Encoder {
    kind: HeaderKind,
    next_serial: u64,
}

impl Encoder {
    /// An encoder for `kind` headers.
    pub fn new(kind: HeaderKind) -> Self {
        Self { kind, next_serial: 1 }
    }

    /// The header kind.
    pub fn kind(&self) -> HeaderKind {
        self.kind
    }

    /// Header length.
    pub fn header_len(&self) -> usize {
        self.kind.len()
    }

    /// Writes one header for a body of `size` bytes into `out[..header_len]`.
    pub fn header(&mut self, msg_type: u16, size: u32, out: &mut [u8]) -> Result<usize, Truncated> {
        let mut w = Writer::new(out);
        match self.kind {
            HeaderKind::Mini => {
                w.u16(msg_type)?;
                w.u32(size)?;
            }
            HeaderKind::Full => {
                w.u64(self.next_serial)?;
                w.u16(msg_type)?;
                w.u32(size)?;
                w.u32(0)?;
                self.next_serial += 1;
            }
        }
        Ok(w.written())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(kind: HeaderKind, stream: &[u8], step: usize) -> Vec<(MsgHeader, Vec<u8>)> {
        let mut d = Deframer::new(kind);
        let mut out: Vec<(MsgHeader, Vec<u8>)> = Vec::new();
        for chunk in stream.chunks(step) {
            let mut pos = 0;
            loop {
                let (n, ev) = d.advance(&chunk[pos..]);
                match ev {
                    Some(Event::Header(h)) => out.push((h, Vec::new())),
                    Some(Event::Body { offset, len, .. }) => {
                        let s = &chunk[pos + offset..pos + offset + len];
                        out.last_mut().expect("header first").1.extend_from_slice(s)
                    }
                    None => {}
                }
                pos += n;
                if n == 0 && ev.is_none() {
                    break;
                }
            }
        }
        assert!(d.at_boundary());
        out
    }

    #[test]
    fn any_split_gives_same_messages() {
        for kind in [HeaderKind::Mini, HeaderKind::Full] {
            let mut enc = Encoder::new(kind);
            let mut stream = Vec::new();
            for (t, body) in [(101u16, &b"hello"[..]), (2, b""), (102, &[7u8; 300][..])] {
                let mut h = [0u8; 18];
                let n = enc.header(t, u32::try_from(body.len()).expect("small"), &mut h).expect("fits");
                stream.extend_from_slice(&h[..n]);
                stream.extend_from_slice(body);
            }
            let whole = collect(kind, &stream, stream.len());
            assert_eq!(whole.len(), 3);
            assert_eq!(whole[0].1, b"hello");
            if kind == HeaderKind::Full {
                assert_eq!(whole.iter().map(|m| m.0.serial).collect::<Vec<_>>(), vec![1, 2, 3]);
            }
            for step in [1, 2, 5, 7, 17] {
                assert_eq!(collect(kind, &stream, step), whole);
            }
        }
    }

    #[test]
    fn skip_body_for_splice() {
        let mut d = Deframer::new(HeaderKind::Mini);
        let (n, ev) = d.advance(&[101, 0, 10, 0, 0, 0]);
        assert_eq!(n, 6);
        assert!(matches!(ev, Some(Event::Header(MsgHeader { size: 10, .. }))));
        assert!(!d.skip_body(4));
        assert_eq!(d.body_remaining(), 6);
        let (n, ev) = d.advance(&[0; 9]);
        assert_eq!((n, ev), (6, Some(Event::Body { offset: 0, len: 6, last: true })));
        assert!(d.at_boundary());
    }
}
