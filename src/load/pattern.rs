//! The seeded byte pattern both ends of a load run agree on.
//!
//! Byte `p` of a stream is byte `p % 8` (little-endian) of
//! `block(seed, p / 8)`, a splitmix64 mix of the seed and the block index.
//! Any offset can be generated or checked on its own, so a receiver
//! verifies every byte without storing anything, at whatever read sizes the
//! transport hands it, and a mismatch names its exact stream offset.
//! Random-looking bytes also keep LZ4 from flattering the figures.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The 8 pattern bytes of block `index` (stream offsets `8*index..8*index+8`).
#[inline]
pub fn block(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Position of `offset` inside its 8-byte block.
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

/// Fills `out` with the pattern bytes at stream offsets `offset..offset+out.len()`.
pub fn fill(seed: u64, offset: u64, out: &mut [u8]) {
    let head = if lane(offset) == 0 { 0 } else { (8 - lane(offset)).min(out.len()) };
    let (first, rest) = out.split_at_mut(head);
    for (k, b) in first.iter_mut().enumerate() {
        *b = byte_at(seed, offset + k as u64);
    }
    let mut index = (offset + head as u64) / 8;
    let mut chunks = rest.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&block(seed, index).to_le_bytes());
        index += 1;
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&block(seed, index).to_le_bytes()[..n]);
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
    let first_index = (offset + head as u64) / 8;
    let mut chunks = data[head..].chunks_exact(8);
    for (n, c) in (&mut chunks).enumerate() {
        let want = block(seed, first_index + n as u64).to_le_bytes();
        if c != want {
            for (j, &b) in c.iter().enumerate() {
                byte(head + 8 * n + j, b)?;
            }
        }
    }
    let k = data.len() - chunks.remainder().len();
    for (j, &b) in chunks.remainder().iter().enumerate() {
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
    fn seeds_and_blocks_differ() {
        assert_ne!(block(1, 0), block(2, 0));
        assert_ne!(block(1, 0), block(1, 1));
        assert_ne!(block(0, 0), 0);
    }
}
