//! The seeded byte pattern both ends of a load run agree on.
//!
//! The stream is cut into 4 KiB pages. Page `p` gets a key, a splitmix64
//! mix of the seed and `p`; 8-byte word `j` of the page is a Weyl step from
//! that key (`key + j·φ`) with one xor-shift on top, written little-endian.
//! Any offset can be generated or checked on its own, so a receiver verifies
//! every byte without storing anything, at whatever read sizes the transport
//! hands it, and a mismatch names its exact stream offset. Every word of a
//! page differs from every other (the Weyl step is a bijection), so a
//! dropped, repeated or shifted chunk shows; LZ4 finds nothing to match.
//!
//! Why not a full mix per word: the generator and the checker must stay far
//! cheaper than the relay they measure. One mix per page and an add, a
//! shift and a xor per word run at several GiB/s per core, where a
//! splitmix per word cost a third of a core at 1.7 GiB/s.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Words per page (4 KiB).
const PAGE_WORDS: u64 = 512;

fn splitmix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[inline]
fn finish(v: u64) -> u64 {
    v ^ (v >> 29)
}

/// The 8 pattern bytes of word `index` (stream offsets `8*index..8*index+8`).
#[inline]
pub fn block(seed: u64, index: u64) -> u64 {
    let key = splitmix(seed, index / PAGE_WORDS);
    finish(key.wrapping_add((index % PAGE_WORDS).wrapping_mul(GOLDEN)))
}

/// Position of `offset` inside its 8-byte word.
#[inline]
#[allow(clippy::cast_possible_truncation)] // masked to 0..8
fn lane(offset: u64) -> usize {
    (offset & 7) as usize
}

/// The pattern byte at stream offset `offset`.
#[inline]
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    block(seed, offset / 8).to_le_bytes()[lane(offset)]
}

/// Splits `count` whole words from word `index` on into runs within one
/// page; calls `f(positions of the run among the words, Weyl value of its
/// first word)`.
#[inline]
fn page_runs(seed: u64, mut index: u64, mut count: usize, mut f: impl FnMut(std::ops::Range<usize>, u64)) {
    let mut done = 0usize;
    while count > 0 {
        let in_page = index % PAGE_WORDS;
        let room = usize::try_from(PAGE_WORDS - in_page).unwrap_or(usize::MAX).min(count);
        let key = splitmix(seed, index / PAGE_WORDS);
        f(done..done + room, key.wrapping_add(in_page.wrapping_mul(GOLDEN)));
        done += room;
        count -= room;
        index += room as u64;
    }
}

/// Fills `out` with the pattern bytes at stream offsets `offset..offset+out.len()`.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let head = if lane(offset) == 0 { 0 } else { (8 - lane(offset)).min(out.len()) };
    let (first, rest) = out.split_at_mut(head);
    for (k, b) in first.iter_mut().enumerate() {
        *b = byte_at(seed, offset + k as u64);
    }
    let index = (offset + head as u64) / 8;
    let (words, tail) = rest.as_chunks_mut::<8>();
    page_runs(seed, index, words.len(), |range, mut v| {
        for w in &mut words[range] {
            *w = finish(v).to_le_bytes();
            v = v.wrapping_add(GOLDEN);
        }
    });
    if !tail.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&block(seed, index + words.len() as u64).to_le_bytes()[..n]);
    }
}

/// The first byte that differs from the pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// Stream offset of the byte.
    pub offset: u64,
    /// What the pattern says.
    pub expected: u8,
    /// What arrived.
    pub got: u8,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "byte at stream offset {} is {:#04x}, expected {:#04x}", self.offset, self.got, self.expected)
    }
}

/// Checks that `data` is the pattern at stream offsets `offset..`.
pub fn check(seed: u64, offset: u64, data: &[u8]) -> Result<(), Mismatch> {
    let byte = |k: usize, got: u8| -> Result<(), Mismatch> {
        let at = offset + k as u64;
        let expected = byte_at(seed, at);
        if got == expected { Ok(()) } else { Err(Mismatch { offset: at, expected, got }) }
    };
    let head = if lane(offset) == 0 { 0 } else { (8 - lane(offset)).min(data.len()) };
    for (k, &b) in data[..head].iter().enumerate() {
        byte(k, b)?;
    }
    let index = (offset + head as u64) / 8;
    let (words, tail) = data[head..].as_chunks::<8>();
    // Branch-free per run: OR the differences, look closer only on a hit.
    let mut bad: Option<usize> = None;
    page_runs(seed, index, words.len(), |range, mut v| {
        if bad.is_some() {
            return;
        }
        let start = range.start;
        let mut diff = 0u64;
        for w in &words[range] {
            diff |= u64::from_le_bytes(*w) ^ finish(v);
            v = v.wrapping_add(GOLDEN);
        }
        if diff != 0 {
            bad = Some(start);
        }
    });
    if let Some(from) = bad {
        // The first differing byte is in this run; find it byte by byte.
        for (k, &b) in data[head + 8 * from..].iter().enumerate() {
            byte(head + 8 * from + k, b)?;
        }
    }
    let k = data.len() - tail.len();
    for (j, &b) in tail.iter().enumerate() {
        byte(k + j, b)?;
    }
    Ok(())
}

/// Verifies a stream as it arrives, in pieces of any size.
#[derive(Debug, Clone)]
pub struct Verifier {
    seed: u64,
    offset: u64,
}

impl Verifier {
    /// A verifier at stream offset 0.
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// Checks the next piece of the stream and advances past it.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Mismatch> {
        check(self.seed, self.offset, data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Bytes verified so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_equal_the_whole_at_every_alignment() {
        let mut whole = vec![0u8; 1000];
        fill(7, 0, &mut whole);
        for start in 0..17usize {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 100] {
                let mut piece = vec![0u8; len];
                fill(7, start as u64, &mut piece);
                assert_eq!(piece, whole[start..start + len], "start {start} len {len}");
                assert_eq!(check(7, start as u64, &piece), Ok(()));
            }
        }
        assert_eq!(byte_at(7, 13), whole[13]);
    }

    #[test]
    fn verifier_accepts_any_split() {
        let mut data = vec![0u8; 4096];
        fill(3, 0, &mut data);
        let mut v = Verifier::new(3);
        let mut pos = 0;
        for step in [1usize, 5, 8, 13, 1000, 3069] {
            v.feed(&data[pos..pos + step]).expect("pattern");
            pos += step;
        }
        assert_eq!(v.offset(), 4096);
    }

    #[test]
    fn mismatch_names_the_exact_offset() {
        let mut data = vec![0u8; 300];
        fill(1, 5, &mut data);
        data[123] ^= 0x40;
        let m = check(1, 5, &data).expect_err("corrupted");
        assert_eq!(m.offset, 128);
        assert_eq!(m.got ^ m.expected, 0x40);
        // Another seed differs at once.
        let e = check(2, 5, &data).expect_err("other seed");
        assert!(e.offset < 13);
    }

    #[test]
    fn page_boundaries() {
        let mut whole = vec![0u8; 4 * 4096];
        fill(9, 0, &mut whole);
        for start in [4090usize, 4095, 4096, 4097, 8191] {
            let mut piece = vec![0u8; 4200];
            fill(9, start as u64, &mut piece);
            assert_eq!(piece, whole[start..start + 4200], "start {start}");
        }
        let mut bad = whole[1..].to_vec();
        bad[9000] ^= 0x80;
        assert_eq!(check(9, 1, &bad).map_err(|m| m.offset), Err(9001));
        // A chunk from the wrong place is caught.
        assert!(check(9, 4096, &whole[..4096]).is_err());
        assert!(check(9, 8, &whole[..64]).is_err());
    }

    #[test]
    fn seeds_and_blocks_differ() {
        assert_ne!(block(1, 0), block(2, 0));
        assert_ne!(block(1, 0), block(1, 1));
        assert_ne!(block(0, 0), 0);
    }
}
