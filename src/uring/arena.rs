//! The registered buffer arena.
//!
//! One page-aligned allocation of `count × size` bytes, registered with
//! the ring as `count` fixed buffers at start-up. Buffers are handed out by
//! id; a buffer that an in-flight op uses is *lent* to the kernel and the
//! arena returns `None` for it until the op's CQE is reaped.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// A buffer index in the arena (also its fixed-buffer index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufId(pub(crate) u16);

impl BufId {
    /// The index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// Most buffers an arena holds: the kernel registers at most 16384 per
/// ring (`IORING_MAX_REG_BUFFERS`).
pub const MAX_BUFFERS: usize = 1 << 14;

/// A region of registered buffers.
#[derive(Debug)]
pub struct Arena {
    base: NonNull<u8>,
    layout: Layout,
    size: usize,
    count: usize,
    /// Buffer lent to the kernel (an op using it is in flight).
    lent: Vec<bool>,
    /// Buffer handed out to a caller (not on the free list).
    taken: Vec<bool>,
    /// Buffer registered with the ring (registration is lazy).
    registered: Vec<bool>,
    free: Vec<u16>,
}

impl Arena {
    /// Allocates `count` buffers of `size` bytes (size rounded up to 4 KiB).
    pub(crate) fn new(count: usize, size: usize) -> std::io::Result<Self> {
        let size = size.max(4096).next_multiple_of(4096);
        if count == 0 || count > MAX_BUFFERS {
            return Err(std::io::Error::other(format!("buffer count {count} out of range 1..={MAX_BUFFERS}")));
        }
        let total = count.checked_mul(size).ok_or_else(|| std::io::Error::other("arena size overflows"))?;
        let layout = Layout::from_size_align(total, 4096).map_err(std::io::Error::other)?;
        // SAFETY: `layout` has a non-zero size (count ≥ 1, size ≥ 4096).
        let ptr = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(ptr).ok_or_else(|| std::io::Error::other("out of memory for buffer arena"))?;
        // Hand out low ids first (pop from the end).
        let free = (0..count).rev().map(|i| u16::try_from(i).unwrap_or(0)).collect();
        Ok(Self {
            base,
            layout,
            size,
            count,
            lent: vec![false; count],
            taken: vec![false; count],
            registered: vec![false; count],
            free,
        })
    }

    /// Size of every buffer.
    pub fn buf_size(&self) -> usize {
        self.size
    }

    /// Buffers not handed out.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Total buffers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Takes a free buffer.
    pub fn alloc(&mut self) -> Option<BufId> {
        let i = self.free.pop()?;
        self.taken[usize::from(i)] = true;
        Some(BufId(i))
    }

    /// Returns a buffer. A buffer still lent to the kernel must not be
    /// freed: the caller cancels its ops and waits for their CQEs first.
    /// Freeing a lent buffer is our bug; it is refused and reported.
    pub fn free(&mut self, id: BufId) -> bool {
        let i = id.index();
        if i >= self.count || !self.taken[i] || self.lent[i] {
            debug_assert!(false, "freeing buffer {i} that is not ours to free");
            return false;
        }
        self.taken[i] = false;
        self.free.push(id.0);
        true
    }

    /// The buffer's bytes, unless the kernel owns them right now.
    pub fn get(&self, id: BufId) -> Option<&[u8]> {
        let i = id.index();
        if i >= self.count || self.lent[i] || !self.taken[i] {
            return None;
        }
        // SAFETY: `i < count`, so the range lies inside the allocation; the
        // buffer is not lent to the kernel (no in-flight op writes it), and
        // the returned borrow of `self` prevents lending it meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(i * self.size), self.size) })
    }

    /// The buffer's bytes, mutable, unless the kernel owns them right now.
    pub fn get_mut(&mut self, id: BufId) -> Option<&mut [u8]> {
        let i = id.index();
        if i >= self.count || self.lent[i] || !self.taken[i] {
            return None;
        }
        // SAFETY: as in `get`; `&mut self` makes this the only reference.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(i * self.size), self.size) })
    }

    /// Pointer to `offset` inside a taken buffer, if `offset + len` fits.
    pub(crate) fn range_ptr(&self, id: BufId, offset: usize, len: usize) -> Option<*mut u8> {
        let i = id.index();
        if i >= self.count || !self.taken[i] || offset.checked_add(len)? > self.size {
            return None;
        }
        // SAFETY: `offset + len ≤ size` was checked, so the pointer stays
        // inside buffer `i`, which lies inside the allocation.
        Some(unsafe { self.base.as_ptr().add(i * self.size + offset) })
    }

    /// Pointer to `offset` inside a buffer, for an SQE. Marks the buffer lent.
    pub(crate) fn lend(&mut self, id: BufId, offset: usize, len: usize) -> Option<*mut u8> {
        let p = self.range_ptr(id, offset, len)?;
        self.lent[id.index()] = true;
        Some(p)
    }

    /// Back from the kernel (its CQE was reaped).
    pub(crate) fn unlend(&mut self, id: BufId) {
        if let Some(l) = self.lent.get_mut(id.index()) {
            *l = false;
        }
    }

    /// Whether the kernel owns the buffer.
    pub fn is_lent(&self, id: BufId) -> bool {
        self.lent.get(id.index()).copied().unwrap_or(false)
    }

    /// The iovec of one buffer, to register it.
    pub(crate) fn iovec(&self, id: BufId) -> libc::iovec {
        let i = id.index().min(self.count - 1);
        // SAFETY: `i < count`: the start of buffer `i` lies inside the allocation.
        libc::iovec { iov_base: unsafe { self.base.as_ptr().add(i * self.size) }.cast(), iov_len: self.size }
    }

    /// Whether the buffer is registered with the ring.
    pub(crate) fn is_registered(&self, id: BufId) -> bool {
        self.registered.get(id.index()).copied().unwrap_or(false)
    }

    /// Records a successful registration.
    pub(crate) fn mark_registered(&mut self, id: BufId) {
        if let Some(r) = self.registered.get_mut(id.index()) {
            *r = true;
        }
    }

    /// Buffers registered with the ring now: their pages are pinned, so
    /// resident whether or not a connection holds them.
    pub fn registered_count(&self) -> usize {
        self.registered.iter().filter(|&&r| r).count()
    }

    /// Free, registered buffers beyond the `keep` most recently freed, the
    /// least recently used first (the bottom of the free stack).
    pub(crate) fn trim_candidates(&self, keep: usize, max: usize) -> Vec<BufId> {
        let n = self.free.len().saturating_sub(keep);
        self.free[..n].iter().map(|&i| BufId(i)).filter(|&b| self.is_registered(b)).take(max).collect()
    }

    /// Gives a free buffer's pages back to the kernel (the caller has
    /// unregistered it); it reads as zeros when used again.
    pub(crate) fn release_pages(&mut self, id: BufId) {
        let i = id.index();
        if i >= self.count || self.taken[i] || self.lent[i] {
            return;
        }
        if let Some(r) = self.registered.get_mut(i) {
            *r = false;
        }
        // SAFETY: buffer `i` lies inside the allocation, is on the free list
        // (no caller holds it) and not lent (no op uses it, and it is no
        // longer registered): nothing reads or writes these pages now, and
        // MADV_DONTNEED on private anonymous memory only zeroes them.
        unsafe {
            libc::madvise(self.base.as_ptr().add(i * self.size).cast(), self.size, libc::MADV_DONTNEED);
        }
    }

    /// Whether every buffer is home (none lent, none handed out).
    pub fn all_home(&self) -> bool {
        self.free.len() == self.count && self.lent.iter().all(|l| !l)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // The ring is dropped first (field order in `Ring`), so the kernel
        // holds no reference to this memory any more.
        // SAFETY: `base` came from `alloc_zeroed(layout)` and is freed once.
        unsafe { dealloc(self.base.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lent_buffers_are_unreachable() {
        let mut a = Arena::new(2, 100).expect("arena");
        assert_eq!(a.buf_size(), 4096);
        let b = a.alloc().expect("buf");
        assert!(a.get(b).is_some());
        assert!(a.lend(b, 4000, 97).is_none(), "past the end");
        assert!(a.lend(b, 0, 4096).is_some());
        assert!(a.get(b).is_none() && a.get_mut(b).is_none());
        a.unlend(b);
        assert!(a.get_mut(b).is_some());
        assert!(a.free(b));
        assert!(a.all_home());
    }
}
