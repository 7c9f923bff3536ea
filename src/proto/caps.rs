//! Capability bit arrays (`caps[n / 32] & 1 << (n % 32)`).

use super::consts::MAX_CAP_WORDS;

/// Most cap words we keep per array. Real peers send one; spice-server
/// accepts up to 1024 and so does our parser, but only the first words carry
/// bits anyone defines, so we keep a fixed inline array and no allocation.
pub const KEPT_CAP_WORDS: usize = 4;

/// A capability set as announced on the wire (words beyond
/// [`KEPT_CAP_WORDS`] are parsed for bounds but ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Caps {
    words: [u32; KEPT_CAP_WORDS],
    /// Words announced on the wire, clamped to `KEPT_CAP_WORDS` when we
    /// encode (trailing zero words are dropped).
    len: u8,
}

impl Caps {
    /// No capability.
    pub const EMPTY: Caps = Caps { words: [0; KEPT_CAP_WORDS], len: 0 };

    /// Builds a set from bit numbers.
    pub fn from_bits(bits: &[u32]) -> Self {
        let mut c = Self::EMPTY;
        for &b in bits {
            c.set(b);
        }
        c
    }

    /// Builds a set from wire words (extra words are ignored).
    pub fn from_words(words: &[u32]) -> Self {
        let mut c = Self::EMPTY;
        for (dst, src) in c.words.iter_mut().zip(words) {
            *dst = *src;
        }
        c.len = u8::try_from(words.len().min(KEPT_CAP_WORDS)).unwrap_or(0);
        c.trim();
        c
    }

    fn trim(&mut self) {
        while self.len > 0 && self.words[usize::from(self.len) - 1] == 0 {
            self.len -= 1;
        }
    }

    /// Sets bit `n` (bits ≥ 128 are ignored: no such cap exists).
    pub fn set(&mut self, n: u32) {
        let w = (n / 32) as usize;
        if let Some(word) = self.words.get_mut(w) {
            *word |= 1 << (n % 32);
            self.len = self.len.max(u8::try_from(w + 1).unwrap_or(0));
        }
    }

    /// Clears bit `n`.
    pub fn clear(&mut self, n: u32) {
        if let Some(word) = self.words.get_mut((n / 32) as usize) {
            *word &= !(1 << (n % 32));
        }
    }

    /// Whether bit `n` is set.
    pub fn has(&self, n: u32) -> bool {
        self.words.get((n / 32) as usize).is_some_and(|w| w & (1 << (n % 32)) != 0)
    }

    /// Words to put on the wire.
    pub fn words(&self) -> &[u32] {
        &self.words[..usize::from(self.len)]
    }

    /// Number of wire words as a u32.
    pub fn word_count(&self) -> u32 {
        u32::from(self.len)
    }
}

/// Whether a peer's announced word count is acceptable (spice-server's bound).
pub fn word_count_ok(n: u32) -> bool {
    n <= MAX_CAP_WORDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_map_to_words() {
        let c = Caps::from_bits(&[0, 2, 3]);
        assert_eq!(c.words(), &[0x0D]);
        assert!(c.has(3) && !c.has(1) && !c.has(1000));
        let c = Caps::from_bits(&[33]);
        assert_eq!(c.words(), &[0, 2]);
        assert_eq!(Caps::EMPTY.words(), &[] as &[u32]);
    }

    #[test]
    fn trailing_zero_words_trimmed() {
        assert_eq!(Caps::from_words(&[5, 0, 0]).words(), &[5]);
        assert_eq!(Caps::from_words(&[0; 9]).word_count(), 0);
    }
}
