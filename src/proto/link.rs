//! Link-stage wire structures: `SpiceLinkHeader`, `SpiceLinkMess`,
//! `SpiceLinkReply` and the link error codes.

use super::caps::{self, Caps};
use super::consts::*;
use super::wire::{Reader, Truncated, Writer, len_u32};

/// `SpiceLinkErr`: the codes a link can fail with (also used by
/// DISCONNECTING and NOTIFY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum LinkErrorCode {
    /// Generic error.
    Error = 1,
    /// Magic was not "REDQ".
    InvalidMagic = 2,
    /// Bad size, caps, auth mechanism.
    InvalidData = 3,
    /// Major version is not 2.
    VersionMismatch = 4,
    /// Channel requires TLS.
    NeedSecured = 5,
    /// Channel refuses TLS.
    NeedUnsecured = 6,
    /// Bad or undecryptable ticket.
    PermissionDenied = 7,
    /// No session with that connection id.
    BadConnectionId = 8,
    /// Channel went away.
    ChannelNotAvailable = 9,
}

impl LinkErrorCode {
    /// The wire value.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a non-zero wire value (unknown values map to `Error`).
    pub fn from_code(code: u32) -> Self {
        match code {
            2 => Self::InvalidMagic,
            3 => Self::InvalidData,
            4 => Self::VersionMismatch,
            5 => Self::NeedSecured,
            6 => Self::NeedUnsecured,
            7 => Self::PermissionDenied,
            8 => Self::BadConnectionId,
            9 => Self::ChannelNotAvailable,
            _ => Self::Error,
        }
    }

    /// What a user should read in a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Error => "generic link error",
            Self::InvalidMagic => "not a SPICE link (bad magic)",
            Self::InvalidData => "malformed link message",
            Self::VersionMismatch => "SPICE protocol major version mismatch",
            Self::NeedSecured => "channel requires TLS",
            Self::NeedUnsecured => "channel refuses TLS",
            Self::PermissionDenied => "permission denied (wrong or missing password)",
            Self::BadConnectionId => "unknown session (bad connection id)",
            Self::ChannelNotAvailable => "channel not available",
        }
    }
}

impl std::fmt::Display for LinkErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.describe(), self.code())
    }
}

/// `SpiceLinkHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHeader {
    /// Major version (2).
    pub major: u32,
    /// Minor version (2, never checked).
    pub minor: u32,
    /// Bytes that follow the header.
    pub size: u32,
}

/// Why a link header was refused; maps to the error reply spice-server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Magic was not "REDQ".
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// Major version not 2.
    #[error("major version {0}, want 2")]
    Version(u32),
    /// Size outside the allowed range.
    #[error("link body size {0} out of range")]
    Size(u32),
}

impl HeaderError {
    /// The link error code to answer with.
    pub fn code(self) -> LinkErrorCode {
        match self {
            Self::Magic(_) => LinkErrorCode::InvalidMagic,
            Self::Version(_) => LinkErrorCode::VersionMismatch,
            Self::Size(_) => LinkErrorCode::InvalidData,
        }
    }
}

impl LinkHeader {
    /// A header for `size` body bytes.
    pub fn new(size: u32) -> Self {
        Self { major: VERSION_MAJOR, minor: VERSION_MINOR, size }
    }

    /// Parses the 16 header bytes, checking magic and major version only.
    pub fn parse(b: &[u8; LINK_HEADER_LEN]) -> Result<Self, HeaderError> {
        let mut r = Reader::new(b);
        let magic: [u8; 4] = r.array().map_err(|_| HeaderError::Size(0))?;
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        let major = r.u32().map_err(|_| HeaderError::Size(0))?;
        let minor = r.u32().map_err(|_| HeaderError::Size(0))?;
        let size = r.u32().map_err(|_| HeaderError::Size(0))?;
        if major != VERSION_MAJOR {
            return Err(HeaderError::Version(major));
        }
        Ok(Self { major, minor, size })
    }

    /// Writes the 16 header bytes.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        w.put(&MAGIC)?;
        w.u32(self.major)?;
        w.u32(self.minor)?;
        w.u32(self.size)
    }
}

/// `SpiceLinkMess`: the client's link request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkMess {
    /// 0 for a new session's main channel, else the session id.
    pub connection_id: u32,
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// Common caps.
    pub common_caps: Caps,
    /// Channel caps.
    pub channel_caps: Caps,
}

/// Reads `common` then `channel` cap words at `caps_offset` inside `body`
/// (offset counted from the start of the structure), with spice-server's
/// bounds: ≤1024 words each, inside the body, offset past the fixed part.
fn parse_caps(body: &[u8], fixed_len: usize, n_common: u32, n_channel: u32, offset: u32) -> Option<(Caps, Caps)> {
    if !caps::word_count_ok(n_common) || !caps::word_count_ok(n_channel) {
        return None;
    }
    let words = usize::try_from(n_common.checked_add(n_channel)?).ok()?;
    if words == 0 {
        return Some((Caps::EMPTY, Caps::EMPTY));
    }
    let offset = usize::try_from(offset).ok()?;
    if offset < fixed_len {
        return None;
    }
    let bytes = body.get(offset..offset.checked_add(words.checked_mul(4)?)?)?;
    let nc = usize::try_from(n_common).ok()?;
    let keep = caps::KEPT_CAP_WORDS;
    let (mut common, mut channel) = ([0u32; caps::KEPT_CAP_WORDS], [0u32; caps::KEPT_CAP_WORDS]);
    let mut words_iter = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    for (dst, w) in common.iter_mut().zip(words_iter.by_ref().take(nc)) {
        *dst = w;
    }
    // Skip common words we do not keep, then read the channel words.
    let mut words_iter = words_iter.skip(nc.saturating_sub(keep));
    for (dst, w) in channel.iter_mut().zip(words_iter.by_ref()) {
        *dst = w;
    }
    Some((Caps::from_words(&common[..nc.min(keep)]), Caps::from_words(&channel[..(words - nc).min(keep)])))
}

impl LinkMess {
    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        LINK_MESS_LEN + 4 * (self.common_caps.words().len() + self.channel_caps.words().len())
    }

    /// Parses a link body (header already checked). `None` means
    /// `INVALID_DATA`.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        let connection_id = r.u32().ok()?;
        let channel_type = r.u8().ok()?;
        let channel_id = r.u8().ok()?;
        let n_common = r.u32().ok()?;
        let n_channel = r.u32().ok()?;
        let offset = r.u32().ok()?;
        let (common_caps, channel_caps) = parse_caps(body, LINK_MESS_LEN, n_common, n_channel, offset)?;
        Some(Self { connection_id, channel_type, channel_id, common_caps, channel_caps })
    }

    /// Writes header + body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        LinkHeader::new(len_u32(self.encoded_len())?).emit(w)?;
        w.u32(self.connection_id)?;
        w.u8(self.channel_type)?;
        w.u8(self.channel_id)?;
        w.u32(self.common_caps.word_count())?;
        w.u32(self.channel_caps.word_count())?;
        w.u32(len_u32(LINK_MESS_LEN)?)?;
        for &c in self.common_caps.words().iter().chain(self.channel_caps.words()) {
            w.u32(c)?;
        }
        Ok(())
    }
}

/// `SpiceLinkReply`: the server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkReply {
    /// 0, or the error of an error reply (then all else is zero).
    pub error: u32,
    /// DER SubjectPublicKeyInfo of this link's RSA-1024 key.
    pub pub_key: [u8; PUBKEY_LEN],
    /// Server common caps.
    pub common_caps: Caps,
    /// Server channel caps.
    pub channel_caps: Caps,
}

impl LinkReply {
    /// An error reply: everything zero but `error`, no caps.
    pub fn error(code: LinkErrorCode) -> Self {
        Self { error: code.code(), pub_key: [0; PUBKEY_LEN], common_caps: Caps::EMPTY, channel_caps: Caps::EMPTY }
    }

    /// Body length on the wire.
    pub fn encoded_len(&self) -> usize {
        LINK_REPLY_LEN + 4 * (self.common_caps.words().len() + self.channel_caps.words().len())
    }

    /// Parses a reply body. `None` for a malformed reply. An error reply
    /// (non-zero `error`) is returned without looking at the caps.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let mut r = Reader::new(body);
        let error = r.u32().ok()?;
        let pub_key: [u8; PUBKEY_LEN] = r.array().ok()?;
        if error != 0 {
            return Some(Self { error, pub_key, common_caps: Caps::EMPTY, channel_caps: Caps::EMPTY });
        }
        let n_common = r.u32().ok()?;
        let n_channel = r.u32().ok()?;
        let offset = r.u32().ok()?;
        let (common_caps, channel_caps) = parse_caps(body, LINK_REPLY_LEN, n_common, n_channel, offset)?;
        Some(Self { error, pub_key, common_caps, channel_caps })
    }

    /// Writes header + body.
    pub fn emit(&self, w: &mut Writer<'_>) -> Result<(), Truncated> {
        LinkHeader::new(len_u32(self.encoded_len())?).emit(w)?;
        w.u32(self.error)?;
        w.put(&self.pub_key)?;
        w.u32(self.common_caps.word_count())?;
        w.u32(self.channel_caps.word_count())?;
        let any = self.common_caps.word_count() + self.channel_caps.word_count() > 0;
        w.u32(if any || self.error == 0 { len_u32(LINK_REPLY_LEN)? } else { 0 })?;
        for &c in self.common_caps.words().iter().chain(self.channel_caps.words()) {
            w.u32(c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// spice-gtk's main link, byte for byte (reference §1.10).
    const GTK_MAIN_LINK: [u8; 42] = [
        0x52, 0x45, 0x44, 0x51, 2, 0, 0, 0, 2, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x12,
        0, 0, 0, 0x0d, 0, 0, 0, 0x0f, 0, 0, 0,
    ];

    #[test]
    fn parses_spice_gtk_main_link() {
        let h = LinkHeader::parse(GTK_MAIN_LINK[..16].try_into().expect("16")).expect("header");
        assert_eq!(h.size, 26);
        let m = LinkMess::parse(&GTK_MAIN_LINK[16..]).expect("mess");
        assert_eq!((m.connection_id, m.channel_type, m.channel_id), (0, 1, 0));
        assert_eq!(m.common_caps.words(), &[0x0d]);
        assert_eq!(m.channel_caps.words(), &[0x0f]);
        let mut out = [0u8; 42];
        m.emit(&mut Writer::new(&mut out)).expect("fits");
        assert_eq!(out, GTK_MAIN_LINK);
    }

    #[test]
    fn rejects_bad_caps() {
        let mut body = GTK_MAIN_LINK[16..].to_vec();
        body[6] = 3; // 3 common words: past the end
        assert!(LinkMess::parse(&body).is_none());
        body[6] = 1;
        body[14] = 4; // caps_offset inside the fixed part
        assert!(LinkMess::parse(&body).is_none());
        body[14] = 18;
        body[9] = 0x10; // 4096+ channel words
        assert!(LinkMess::parse(&body).is_none());
    }

    #[test]
    fn error_reply_shape() {
        let mut out = [0u8; 16 + 178];
        let mut w = Writer::new(&mut out);
        LinkReply::error(LinkErrorCode::InvalidMagic).emit(&mut w).expect("fits");
        assert_eq!(w.written(), 194);
        assert_eq!(&out[12..16], &178u32.to_le_bytes());
        assert_eq!(&out[16..20], &2u32.to_le_bytes());
        assert!(out[20..].iter().all(|&b| b == 0));
    }

    #[test]
    fn header_checks() {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(b"GET ");
        assert!(matches!(LinkHeader::parse(&h), Err(HeaderError::Magic(_))));
        h[..4].copy_from_slice(&MAGIC);
        h[4] = 3;
        assert_eq!(LinkHeader::parse(&h), Err(HeaderError::Version(3)));
    }
}
