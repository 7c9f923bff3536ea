//! Bounded little-endian reader and writer over byte slices.
//!
//! Every field read from the peer goes through [`Reader`], which never
//! panics: a short buffer is a [`Truncated`] error, not an index panic.

/// The input ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message truncated")]
pub struct Truncated;

/// A cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Number of bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        let end = self.pos.checked_add(n).ok_or(Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(Truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// Takes exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// Reads a u8.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a little-endian u16.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian u32.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// Reads a little-endian u64.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// A cursor writing into a caller-provided buffer.
///
/// Writers are only used on buffers whose size the caller computed from the
/// message (`encoded_len`), so running out of room is our bug, reported as
/// [`Truncated`] rather than a panic.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.pos
    }
    /// Appends raw bytes.
    pub fn put(&mut self, b: &[u8]) -> Result<(), Truncated> {
        let end = self.pos.checked_add(b.len()).ok_or(Truncated)?;
        self.buf.get_mut(self.pos..end).ok_or(Truncated)?.copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    /// Appends a u8.
    pub fn u8(&mut self, v: u8) -> Result<(), Truncated> {
        self.put(&[v])
    }
    /// Appends a little-endian u16.
    pub fn u16(&mut self, v: u16) -> Result<(), Truncated> {
        self.put(&v.to_le_bytes())
    }
    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) -> Result<(), Truncated> {
        self.put(&v.to_le_bytes())
    }
    /// Appends a little-endian u64.
    pub fn u64(&mut self, v: u64) -> Result<(), Truncated> {
        self.put(&v.to_le_bytes())
    }
}

/// Output queued by a link state machine: fixed capacity, sized by the
/// caller for its worst case, drained by copying into the caller's buffer.
#[derive(Debug, Clone)]
pub struct OutBuf<const N: usize> {
    buf: [u8; N],
    start: usize,
    end: usize,
}

impl<const N: usize> OutBuf<N> {
    /// Empty.
    pub const fn new() -> Self {
        Self { buf: [0; N], start: 0, end: 0 }
    }

    /// Appends `b`. `N` is sized for the worst case, so a shortfall is our
    /// bug: it is caught in debug builds and truncates in release.
    pub fn push(&mut self, b: &[u8]) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        debug_assert!(b.len() <= N - self.end, "link output overflow");
        let n = b.len().min(N - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&b[..n]);
        self.end += n;
    }

    /// Appends what `f` writes (at most the free room).
    pub fn push_with(&mut self, f: impl FnOnce(&mut Writer<'_>) -> Result<(), Truncated>) -> Result<(), Truncated> {
        let mut tmp = [0u8; N];
        let mut w = Writer::new(&mut tmp);
        f(&mut w)?;
        let n = w.written();
        self.push(&tmp[..n]);
        Ok(())
    }

    /// Bytes waiting.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Copies waiting bytes into `out`; returns how many.
    pub fn poll(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }
}

impl<const N: usize> Default for OutBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts a length we produced to a u32 wire field.
pub(crate) fn len_u32(n: usize) -> Result<u32, Truncated> {
    u32::try_from(n).map_err(|_| Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_panics_on_short_input() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Ok(0x0201));
        assert_eq!(r.u16(), Err(Truncated));
        assert_eq!(r.u8(), Ok(3));
        assert_eq!(r.u8(), Err(Truncated));
        assert_eq!(r.take(usize::MAX), Err(Truncated));
    }

    #[test]
    fn writer_reports_overflow() {
        let mut b = [0u8; 5];
        let mut w = Writer::new(&mut b);
        assert!(w.u32(7).is_ok());
        assert_eq!(w.u16(1), Err(Truncated));
        assert_eq!(w.written(), 4);
    }
}
