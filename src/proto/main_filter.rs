//! The main channel of a whole-VM proxy, upstream → client: everything
//! passes byte for byte except two messages.
//!
//! - `MAIN_INIT` (103) passes unchanged, but its session id is read: the
//!   relay registers the session *before* the client can see the id (a fast
//!   client links a served channel right after).
//! - Every `CHANNELS_LIST` (104) is rewritten: upstream entries that the
//!   relay serves itself are hidden (the relay's channel takes the place of
//!   QEMU's one with the same type and id), and the relay's own channels are
//!   appended to the first list only. A later one-entry list (a hot-plugged
//!   chardev) gets the same hiding. spice-gtk never sees a `(type, id)`
//!   twice.
//!
//! Sans-IO and bounded: a message that is buffered (INIT, a list) is at most
//! [`MAX_HELD`] bytes; anything else streams through however large it is
//! (the network-test PING carries 256 000 bytes). Malformed INIT or list
//! messages are an error: the caller closes the session.

use super::consts::{MSG_MAIN_CHANNELS_LIST, MSG_MAIN_INIT};
use super::framing::{HeaderKind, MsgHeader};

/// Largest INIT or CHANNELS_LIST body held back (4 + 2 × 255 entries, with slack).
pub const MAX_HELD: usize = 4 + 2 * 256;
const MAX_HELD_U32: u32 = 4 + 2 * 256;

/// Why the main channel cannot be filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MainFilterError {
    /// MAIN_INIT shorter than its session id, or implausibly large.
    #[error("malformed MAIN_INIT of {0} bytes")]
    BadInit(u32),
    /// CHANNELS_LIST whose count does not match its size, or too large.
    #[error("malformed CHANNELS_LIST of {0} bytes")]
    BadList(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Pass { remaining: u32 },
    Hold { msg_type: u16, size: u32 },
}

/// Upstream → client filter of one main channel.
#[derive(Debug)]
pub struct MainFilter {
    kind: HeaderKind,
    /// Upstream entries to hide (the relay serves them).
    hide: Vec<(u8, u8)>,
    /// The relay's own channels, appended to the first list.
    served: Vec<(u8, u8)>,
    first_list_sent: bool,
    state: State,
    header: [u8; 18],
    header_have: usize,
    held: Vec<u8>,
    session_id: Option<u32>,
    lists: u32,
}

impl MainFilter {
    /// A filter for a main channel with this header kind.
    pub fn new(kind: HeaderKind, hide: Vec<(u8, u8)>, served: Vec<(u8, u8)>) -> Self {
        Self {
            kind,
            hide,
            served,
            first_list_sent: false,
            state: State::Header,
            header: [0; 18],
            header_have: 0,
            held: Vec::new(),
            session_id: None,
            lists: 0,
        }
    }

    fn header_len(&self) -> usize {
        match self.kind {
            HeaderKind::Mini => 6,
            HeaderKind::Full => 18,
        }
    }

    /// The session id, once MAIN_INIT went through [`MainFilter::feed`].
    pub fn session_id(&self) -> Option<u32> {
        self.session_id
    }

    /// CHANNELS_LIST messages rewritten so far.
    pub fn lists(&self) -> u32 {
        self.lists
    }

    /// Filters `input` (any split of the stream) and appends what the client
    /// gets to `out`. Appends at most `input.len() + MAX_HELD + 18` bytes.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), MainFilterError> {
        let hl = self.header_len();
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    let n = (hl - self.header_have).min(input.len());
                    self.header[self.header_have..self.header_have + n].copy_from_slice(&input[..n]);
                    self.header_have += n;
                    input = &input[n..];
                    if self.header_have < hl {
                        continue;
                    }
                    self.header_have = 0;
                    let Ok(h) = MsgHeader::parse(self.kind, &self.header[..hl]) else { continue };
                    self.state = match h.msg_type {
                        MSG_MAIN_INIT if (4..=MAX_HELD_U32).contains(&h.size) => {
                            State::Hold { msg_type: h.msg_type, size: h.size }
                        }
                        MSG_MAIN_INIT => return Err(MainFilterError::BadInit(h.size)),
                        MSG_MAIN_CHANNELS_LIST if (4..=MAX_HELD_U32).contains(&h.size) => {
                            State::Hold { msg_type: h.msg_type, size: h.size }
                        }
                        MSG_MAIN_CHANNELS_LIST => return Err(MainFilterError::BadList(h.size)),
                        _ => {
                            out.extend_from_slice(&self.header[..hl]);
                            if h.size == 0 { State::Header } else { State::Pass { remaining: h.size } }
                        }
                    };
                    if let State::Hold { .. } = self.state {
                        self.held.clear();
                    }
                }
                State::Pass { remaining } => {
                    let n = (remaining as usize).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = remaining - u32::try_from(n).unwrap_or(remaining);
                    self.state = if left == 0 { State::Header } else { State::Pass { remaining: left } };
                }
                State::Hold { msg_type, size } => {
                    let n = (size as usize - self.held.len()).min(input.len());
                    self.held.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.held.len() < size as usize {
                        continue;
                    }
                    self.state = State::Header;
                    if msg_type == MSG_MAIN_INIT {
                        self.session_id =
                            Some(u32::from_le_bytes([self.held[0], self.held[1], self.held[2], self.held[3]]));
                        out.extend_from_slice(&self.header[..hl]);
                        out.extend_from_slice(&self.held);
                    } else {
                        self.rewrite_list(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn rewrite_list(&mut self, out: &mut Vec<u8>) -> Result<(), MainFilterError> {
        let size = u32::try_from(self.held.len()).unwrap_or(u32::MAX);
        let b = &self.held;
        let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if b.len() != 4 + 2 * n {
            return Err(MainFilterError::BadList(size));
        }
        let mut entries: Vec<(u8, u8)> =
            b[4..].chunks_exact(2).map(|e| (e[0], e[1])).filter(|e| !self.hide.contains(e)).collect();
        if !self.first_list_sent {
            self.first_list_sent = true;
            for &e in &self.served {
                if !entries.contains(&e) {
                    entries.push(e);
                }
            }
        }
        let body_len = 4 + 2 * entries.len();
        let hl = self.header_len();
        let mut header = self.header;
        // The size field: after the type in the mini header, after serial and type in the full one.
        let at = match self.kind {
            HeaderKind::Mini => 2,
            HeaderKind::Full => 10,
        };
        header[at..at + 4].copy_from_slice(&u32::try_from(body_len).unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&header[..hl]);
        out.extend_from_slice(&u32::try_from(entries.len()).unwrap_or(0).to_le_bytes());
        for (t, id) in entries {
            out.extend_from_slice(&[t, id]);
        }
        self.lists += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mini(t: u16, body: &[u8]) -> Vec<u8> {
        let mut v = t.to_le_bytes().to_vec();
        v.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn list(entries: &[(u8, u8)]) -> Vec<u8> {
        let mut b = u32::try_from(entries.len()).unwrap_or(0).to_le_bytes().to_vec();
        for &(t, i) in entries {
            b.extend_from_slice(&[t, i]);
        }
        b
    }

    #[test]
    fn init_read_lists_rewritten_any_split() {
        let mut init = 0x1234_5678u32.to_le_bytes().to_vec();
        init.resize(32, 0);
        let mut stream = mini(MSG_MAIN_INIT, &init);
        stream.extend(mini(4, &vec![7u8; 300_000]));
        stream.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[(9, 0), (2, 0), (3, 0), (10, 0)])));
        stream.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[(9, 0)])));
        stream.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[(10, 1)])));
        let mut want = mini(MSG_MAIN_INIT, &init);
        want.extend(mini(4, &vec![7u8; 300_000]));
        want.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[(2, 0), (3, 0), (10, 0), (9, 0), (128, 0)])));
        want.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[])));
        want.extend(mini(MSG_MAIN_CHANNELS_LIST, &list(&[(10, 1)])));
        for split in [1usize, 5, 6, 7, 4096, stream.len()] {
            let mut f = MainFilter::new(HeaderKind::Mini, vec![(9, 0)], vec![(9, 0), (128, 0)]);
            let mut out = Vec::new();
            for c in stream.chunks(split) {
                f.feed(c, &mut out).expect("feed");
            }
            assert_eq!(f.session_id(), Some(0x1234_5678));
            assert_eq!(f.lists(), 3);
            assert!(out == want, "split {split}");
        }
    }

    #[test]
    fn full_header_keeps_serial_and_patches_size() {
        let mut h = 42u64.to_le_bytes().to_vec();
        h.extend_from_slice(&MSG_MAIN_CHANNELS_LIST.to_le_bytes());
        let body = list(&[(9, 0), (2, 0)]);
        h.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&body);
        let mut f = MainFilter::new(HeaderKind::Full, vec![(9, 0)], vec![]);
        let mut out = Vec::new();
        f.feed(&h, &mut out).expect("feed");
        assert_eq!(&out[..8], &42u64.to_le_bytes());
        assert_eq!(&out[10..14], &6u32.to_le_bytes());
        assert_eq!(&out[18..], &list(&[(2, 0)])[..]);
    }

    #[test]
    fn hostile_lists_are_errors_not_allocations() {
        let mut f = MainFilter::new(HeaderKind::Mini, vec![], vec![]);
        let mut out = Vec::new();
        let mut huge = MSG_MAIN_CHANNELS_LIST.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(f.feed(&huge, &mut out), Err(MainFilterError::BadList(u32::MAX)));
        let mut f = MainFilter::new(HeaderKind::Mini, vec![], vec![]);
        let mut body = 200u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[1, 2]);
        assert_eq!(f.feed(&mini(MSG_MAIN_CHANNELS_LIST, &body), &mut out), Err(MainFilterError::BadList(6)));
        let mut f = MainFilter::new(HeaderKind::Mini, vec![], vec![]);
        assert_eq!(f.feed(&mini(MSG_MAIN_INIT, &[1, 2]), &mut out), Err(MainFilterError::BadInit(2)));
    }
}
