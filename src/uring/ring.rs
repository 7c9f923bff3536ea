//! Ring set-up, the in-flight op table, one function per SQE kind, and
//! completion reaping.

use std::os::fd::RawFd;
use std::time::Duration;

use std::os::fd::{FromRawFd, OwnedFd};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};

use super::arena::{Arena, BufId};

/// Most iovecs one readv/writev carries.
pub const MAX_IOV: usize = 16;

/// Ring sizing and flags.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// Submission queue entries (completion queue is twice that).
    pub entries: u32,
    /// Registered buffers.
    pub buffers: usize,
    /// Bytes per buffer.
    pub buf_size: usize,
    /// In-flight op table size; pushing past it is refused.
    pub max_ops: usize,
    /// SINGLE_ISSUER | DEFER_TASKRUN (completions run only when we wait).
    pub defer_taskrun: bool,
}

/// Start-up failures, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// io_uring_setup failed.
    #[error(
        "cannot create an io_uring ({0}); vmcrelay needs Linux ≥ 6.1 with io_uring enabled \
         (check `sysctl kernel.io_uring_disabled` is 0, and that seccomp/containers allow io_uring_setup)"
    )]
    Setup(std::io::Error),
    /// An opcode the relay needs is missing.
    #[error("this kernel's io_uring lacks {0}; vmcrelay needs Linux ≥ 6.1")]
    MissingOpcode(&'static str),
    /// Buffer registration failed.
    #[error(
        "cannot register {count} buffers of {size} bytes ({err}); lower --max-conns \
         (max-conns-per-worker) or --buffer-kib, or raise the locked-memory limit (ulimit -l)"
    )]
    Register {
        /// Buffers.
        count: usize,
        /// Bytes each.
        size: usize,
        /// Cause.
        err: std::io::Error,
    },
    /// Arena allocation failed.
    #[error("cannot allocate the buffer arena: {0}")]
    Arena(std::io::Error),
}

/// Why an op could not be pushed. Each is our bug or a bound being hit;
/// none silently drops the op.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The in-flight op table is full.
    #[error("in-flight op table full")]
    OpsFull,
    /// The buffer is lent to the kernel already, or the range is outside it.
    #[error("buffer unavailable or range out of bounds")]
    Buffer,
    /// io_uring_enter failed while making room in the submission queue.
    #[error("io_uring_enter: {0}")]
    Enter(std::io::Error),
}

/// A reaped completion.
#[derive(Debug)]
pub struct Completion {
    /// The caller's token, as pushed.
    pub token: u64,
    /// The CQE result (bytes, fd, or `-errno`).
    pub result: i32,
    /// More CQEs will follow for this op (multishot).
    pub more: bool,
    /// The buffer the op used; it is back in the caller's hands unless `more`.
    pub buf: Option<BufId>,
    /// The eventfd counter read by [`Ring::read_counter`].
    pub counter: u64,
    /// The vector handed to [`Ring::write_owned`] or [`Ring::read_owned`], given back.
    pub owned: Option<Vec<u8>>,
    /// The connection an accept op produced (owned: closed when dropped).
    pub fd: Option<OwnedFd>,
}

/// Everything an in-flight op needs kept alive until its CQE.
struct OpRecord {
    in_use: bool,
    generation: u32,
    token: u64,
    buf: Option<BufId>,
    iov: [libc::iovec; MAX_IOV],
    addr: libc::sockaddr_storage,
    ts: types::Timespec,
    counter: u64,
    owned: Option<Vec<u8>>,
    /// The op is an accept: a non-negative result is a new descriptor.
    accept: bool,
}

/// Op records in chunks allocated on first need, up to `max`: a record
/// never moves once allocated (SQEs point into it), and memory follows the
/// peak number of ops in flight, not the configured maximum.
struct OpTable {
    chunks: Vec<Box<[OpRecord]>>,
    max: usize,
}

/// Records per chunk (about 120 KiB).
const OP_CHUNK: usize = 256;

impl OpTable {
    fn new(max: usize) -> Self {
        Self { chunks: Vec::new(), max: max.max(1) }
    }

    /// Records allocated so far.
    fn allocated(&self) -> usize {
        self.chunks.len() * OP_CHUNK
    }

    /// Adds a chunk; returns the new indices, or `None` at the maximum.
    fn grow(&mut self) -> Option<std::ops::Range<usize>> {
        let start = self.allocated();
        if start >= self.max {
            return None;
        }
        self.chunks.push((0..OP_CHUNK).map(|_| OpRecord::new()).collect());
        Some(start..start + OP_CHUNK)
    }

    fn get(&self, i: usize) -> Option<&OpRecord> {
        self.chunks.get(i / OP_CHUNK).map(|c| &c[i % OP_CHUNK])
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut OpRecord> {
        self.chunks.get_mut(i / OP_CHUNK).map(|c| &mut c[i % OP_CHUNK])
    }

    fn iter(&self) -> impl Iterator<Item = &OpRecord> {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

impl std::ops::Index<usize> for OpTable {
    type Output = OpRecord;
    fn index(&self, i: usize) -> &OpRecord {
        &self.chunks[i / OP_CHUNK][i % OP_CHUNK]
    }
}

impl std::ops::IndexMut<usize> for OpTable {
    fn index_mut(&mut self, i: usize) -> &mut OpRecord {
        &mut self.chunks[i / OP_CHUNK][i % OP_CHUNK]
    }
}

impl OpRecord {
    fn new() -> Self {
        Self {
            in_use: false,
            generation: 0,
            token: 0,
            buf: None,
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addr: unsafe { std::mem::zeroed() },
            ts: types::Timespec::new(),
            counter: 0,
            owned: None,
            accept: false,
        }
    }
}

/// Opcodes the relay uses, probed at start-up.
const NEEDED: &[(u8, &str)] = &[
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Splice::CODE, "SPLICE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Timeout::CODE, "TIMEOUT"),
];

/// One worker's ring with its arena and op table.
pub struct Ring {
    // Field order matters: the ring is dropped (and the kernel lets go of
    // every registered buffer) before the arena frees its memory.
    ring: IoUring,
    ops: OpTable,
    free_ops: Vec<u32>,
    arena: Arena,
    stale_cqes: u64,
    /// Pushes that found the submission queue full (each then flushed it).
    sq_full: u64,
    /// Id of the op taken last (see `last_op`).
    last_ud: u64,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("inflight", &self.inflight()).finish_non_exhaustive()
    }
}

impl Ring {
    /// Creates the ring, probes opcodes, allocates and registers the arena.
    pub fn new(cfg: RingConfig) -> Result<Self, RingError> {
        let mut b = IoUring::builder();
        b.setup_cqsize(cfg.entries.saturating_mul(2)).setup_coop_taskrun();
        if cfg.defer_taskrun {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        let ring = b.build(cfg.entries).map_err(RingError::Setup)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(RingError::Setup)?;
        if let Some((_, name)) = NEEDED.iter().find(|(code, _)| !probe.is_supported(*code)) {
            return Err(RingError::MissingOpcode(name));
        }
        let arena = Arena::new(cfg.buffers, cfg.buf_size).map_err(RingError::Arena)?;
        // Sparse: a buffer is registered (and its pages pinned, so counted
        // in RSS) the first time it is handed out, so memory follows the
        // peak number of connections, not the configured maximum.
        ring.submitter()
            .register_buffers_sparse(u32::try_from(arena.count()).unwrap_or(u32::MAX))
            .map_err(|err| RingError::Register { count: arena.count(), size: arena.buf_size(), err })?;
        let ops = OpTable::new(cfg.max_ops);
        let free_ops = Vec::new();
        Ok(Self { ring, ops, free_ops, arena, stale_cqes: 0, sq_full: 0, last_ud: 0 })
    }

    /// The buffer arena.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// The buffer arena, mutable.
    pub fn arena_mut(&mut self) -> &mut Arena {
        &mut self.arena
    }

    /// Takes a free buffer, registering it with the ring on first use.
    pub fn alloc_buf(&mut self) -> Option<BufId> {
        let id = self.arena.alloc()?;
        if !self.arena.is_registered(id) {
            let iov = self.arena.iovec(id);
            // SAFETY: the iovec describes buffer `id` of the arena, which
            // outlives the registration: `ring` is declared before `arena`
            // in `Ring`, so it is dropped (unregistering every buffer) first.
            let r = unsafe { self.ring.submitter().register_buffers_update(u32::from(id.0), &[iov], None) };
            if r.is_err() {
                self.arena.free(id);
                return None;
            }
            self.arena.mark_registered(id);
        }
        Some(id)
    }

    /// Unregisters free buffers beyond the `keep` most recently used (at
    /// most `max` per call) and gives their pages back, so pinned memory
    /// follows the buffers in use, not the peak. Returns how many.
    pub fn trim_buffers(&mut self, keep: usize, max: usize) -> usize {
        let mut n = 0;
        for id in self.arena.trim_candidates(keep, max) {
            let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
            // SAFETY: an empty iovec clears the sparse slot; buffer `id` is
            // free and not lent, so no op in flight refers to that slot.
            let r = unsafe { self.ring.submitter().register_buffers_update(u32::from(id.0), &[empty], None) };
            if r.is_err() {
                break;
            }
            self.arena.release_pages(id);
            n += 1;
        }
        n
    }

    /// Ops pushed and not yet completed.
    pub fn inflight(&self) -> usize {
        self.ops.allocated() - self.free_ops.len()
    }

    /// Op table capacity.
    pub fn max_ops(&self) -> usize {
        self.ops.max
    }

    /// CQEs whose user_data matched no live op (must stay 0).
    pub fn stale_cqes(&self) -> u64 {
        self.stale_cqes
    }

    /// Times a push found the submission queue full and had to submit
    /// first (a real code path, not an error; many mean a small ring).
    pub fn sq_full_events(&self) -> u64 {
        self.sq_full
    }

    /// Takes an op record for `token`; returns its index and user_data.
    fn take_op(&mut self, token: u64, buf: Option<BufId>) -> Result<(usize, u64), SubmitError> {
        if self.free_ops.is_empty() {
            let more = self.ops.grow().ok_or(SubmitError::OpsFull)?;
            self.free_ops.extend(more.rev().map(|i| u32::try_from(i).unwrap_or(u32::MAX)));
        }
        let i = self.free_ops.pop().ok_or(SubmitError::OpsFull)? as usize;
        let rec = &mut self.ops[i];
        rec.in_use = true;
        rec.generation = rec.generation.wrapping_add(1);
        rec.token = token;
        rec.buf = buf;
        rec.accept = false;
        let ud = (u64::from(rec.generation) << 32) | i as u64;
        self.last_ud = ud;
        Ok((i, ud))
    }

    /// The ring's id of the op pushed last (for [`Ring::cancel_op`]).
    pub fn last_op(&self) -> u64 {
        self.last_ud
    }

    /// Cancels one op by the id [`Ring::last_op`] gave right after its
    /// push; returns whether it was still in flight (then its CQE comes,
    /// usually with `-ECANCELED`, plus one for the cancel itself).
    pub fn cancel_op(&mut self, op: u64, cancel_token: u64) -> Result<bool, SubmitError> {
        let i = (op & 0xffff_ffff) as usize;
        let live = self.ops.get(i).is_some_and(|r| r.in_use && (u64::from(r.generation) << 32 | i as u64) == op);
        if !live {
            return Ok(false);
        }
        let (ci, cud) = self.take_op(cancel_token, None)?;
        let e = opcode::AsyncCancel::new(op).build().user_data(cud);
        self.push(ci, e)?;
        Ok(true)
    }

    /// Gives a record back when its push failed.
    fn put_op(&mut self, i: usize) {
        self.ops[i].owned = None;
        if let Some(b) = self.ops[i].buf.take() {
            self.arena.unlend(b);
        }
        self.ops[i].in_use = false;
        self.free_ops.push(u32::try_from(i).unwrap_or(0));
    }

    /// Pushes an SQE whose memory is kept alive by record `i`. A full
    /// submission queue is flushed to the kernel and the push retried.
    fn push(&mut self, i: usize, entry: squeue::Entry) -> Result<(), SubmitError> {
        for _ in 0..3 {
            // SAFETY: every pointer in `entry` refers to memory owned by the
            // arena (lent until the CQE) or by op record `i`, which stays
            // in use, unmoved (its chunk is a boxed slice, never reallocated
            // or freed while the ring lives), until its CQE is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.sq_full += 1;
            if let Err(e) = self.ring.submit() {
                self.put_op(i);
                return Err(SubmitError::Enter(e));
            }
        }
        self.put_op(i);
        Err(SubmitError::Enter(std::io::Error::other("submission queue stays full")))
    }

    fn lend(&mut self, buf: BufId, offset: usize, len: usize) -> Result<*mut u8, SubmitError> {
        if self.arena.is_lent(buf) {
            return Err(SubmitError::Buffer);
        }
        self.arena.lend(buf, offset, len).ok_or(SubmitError::Buffer)
    }

    /// Multishot accept on a listening socket.
    pub fn accept_multi(&mut self, fd: RawFd, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        self.ops[i].accept = true;
        let e = opcode::AcceptMulti::new(types::Fd(fd)).flags(libc::SOCK_CLOEXEC).build().user_data(ud);
        self.push(i, e)
    }

    /// One accept on a listening socket (result: the new fd).
    pub fn accept(&mut self, fd: RawFd, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        self.ops[i].accept = true;
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(ud);
        self.push(i, e)
    }

    /// Reads into `buf[offset..offset + len]` (registered buffer).
    pub fn read_fixed(
        &mut self,
        fd: RawFd,
        buf: BufId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), SubmitError> {
        let len32 = u32::try_from(len).map_err(|_| SubmitError::Buffer)?;
        let ptr = self.lend(buf, offset, len)?;
        let (i, ud) = self.take_op(token, Some(buf))?;
        // offset u64::MAX (-1): use the file position, as for a stream.
        let e = opcode::ReadFixed::new(types::Fd(fd), ptr, len32, buf.0).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Writes `buf[offset..offset + len]` (registered buffer).
    pub fn write_fixed(
        &mut self,
        fd: RawFd,
        buf: BufId,
        offset: usize,
        len: usize,
        token: u64,
    ) -> Result<(), SubmitError> {
        let len32 = u32::try_from(len).map_err(|_| SubmitError::Buffer)?;
        let ptr = self.lend(buf, offset, len)?;
        let (i, ud) = self.take_op(token, Some(buf))?;
        let e = opcode::WriteFixed::new(types::Fd(fd), ptr, len32, buf.0).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Writes `data[offset..]` from a vector the ring holds until the CQE,
    /// then gives back in [`Completion::owned`] (so it can be reused).
    pub fn write_owned(&mut self, fd: RawFd, data: Vec<u8>, offset: usize, token: u64) -> Result<(), SubmitError> {
        let len = data.len().checked_sub(offset).ok_or(SubmitError::Buffer)?;
        let len32 = u32::try_from(len).map_err(|_| SubmitError::Buffer)?;
        let (i, ud) = self.take_op(token, None)?;
        let rec = &mut self.ops[i];
        rec.owned = Some(data);
        let ptr = rec.owned.as_ref().map_or(std::ptr::null(), |v| v[offset..].as_ptr());
        // The vector's heap block does not move when the Option holding it
        // does; it stays in the record until the CQE is reaped.
        let e = opcode::Write::new(types::Fd(fd), ptr, len32).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Reads into all of `data` (its length, not its capacity), a vector
    /// the ring holds until the CQE, then gives back in
    /// [`Completion::owned`]: the result says how many bytes are valid.
    pub fn read_owned(&mut self, fd: RawFd, data: Vec<u8>, token: u64) -> Result<(), SubmitError> {
        let len32 = u32::try_from(data.len()).map_err(|_| SubmitError::Buffer)?;
        if len32 == 0 {
            return Err(SubmitError::Buffer);
        }
        let (i, ud) = self.take_op(token, None)?;
        let rec = &mut self.ops[i];
        rec.owned = Some(data);
        let ptr = rec.owned.as_mut().map_or(std::ptr::null_mut(), |v| v.as_mut_ptr());
        // The vector's heap block does not move when the Option holding it
        // does, and nobody else can reach it: it stays in the record until
        // the CQE is reaped, then goes back to the caller.
        let e = opcode::Read::new(types::Fd(fd), ptr, len32).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Builds the record's iovec array for `(offset, len)` ranges of `buf`.
    fn vectored(&mut self, buf: BufId, ranges: &[(usize, usize)], token: u64) -> Result<(usize, u64), SubmitError> {
        if ranges.is_empty() || ranges.len() > MAX_IOV || self.arena.is_lent(buf) {
            return Err(SubmitError::Buffer);
        }
        let mut ptrs = [std::ptr::null_mut::<u8>(); MAX_IOV];
        for (p, &(off, len)) in ptrs.iter_mut().zip(ranges) {
            *p = self.arena.range_ptr(buf, off, len).ok_or(SubmitError::Buffer)?;
        }
        self.lend(buf, 0, 0)?;
        let (i, ud) = self.take_op(token, Some(buf))?;
        for (k, &(_, len)) in ranges.iter().enumerate() {
            self.ops[i].iov[k] = libc::iovec { iov_base: ptrs[k].cast(), iov_len: len };
        }
        Ok((i, ud))
    }

    /// Gathers `(offset, len)` ranges of `buf` into one write.
    pub fn writev(&mut self, fd: RawFd, buf: BufId, ranges: &[(usize, usize)], token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.vectored(buf, ranges, token)?;
        let n = u32::try_from(ranges.len()).unwrap_or(0);
        let e = opcode::Writev::new(types::Fd(fd), self.ops[i].iov.as_ptr(), n).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Scatters one read over `(offset, len)` ranges of `buf`.
    pub fn readv(&mut self, fd: RawFd, buf: BufId, ranges: &[(usize, usize)], token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.vectored(buf, ranges, token)?;
        let n = u32::try_from(ranges.len()).unwrap_or(0);
        let e = opcode::Readv::new(types::Fd(fd), self.ops[i].iov.as_ptr(), n).offset(u64::MAX).build().user_data(ud);
        self.push(i, e)
    }

    /// Completes once `fd` has any of `events` (`libc::POLLIN`, `POLLOUT`).
    pub fn poll(&mut self, fd: RawFd, events: i16, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        let mask = u32::from(events.cast_unsigned());
        let e = opcode::PollAdd::new(types::Fd(fd), mask).build().user_data(ud);
        self.push(i, e)
    }

    /// Connects a socket to `addr`.
    pub fn connect(&mut self, fd: RawFd, addr: &SockaddrStorage, token: u64) -> Result<(), SubmitError> {
        let len = addr.len();
        let n = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
        let (i, ud) = self.take_op(token, None)?;
        // SAFETY: `addr.as_ptr()` points at `addr.len()` valid bytes; we copy
        // at most the size of the destination, a sockaddr_storage owned by
        // op record `i`, which lives until the CQE.
        unsafe {
            std::ptr::copy_nonoverlapping(addr.as_ptr().cast::<u8>(), (&raw mut self.ops[i].addr).cast::<u8>(), n)
        };
        let p = (&raw const self.ops[i].addr).cast::<libc::sockaddr>();
        let e = opcode::Connect::new(types::Fd(fd), p, len).build().user_data(ud);
        self.push(i, e)
    }

    /// Completes after `after` (result `-ETIME`).
    pub fn timeout(&mut self, after: Duration, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        self.ops[i].ts = types::Timespec::from(after);
        let e = opcode::Timeout::new(&raw const self.ops[i].ts).build().user_data(ud);
        self.push(i, e)
    }

    /// Reads an eventfd's 8-byte counter (returned in `Completion::counter`).
    pub fn read_counter(&mut self, fd: RawFd, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        let p = (&raw mut self.ops[i].counter).cast::<u8>();
        let e = opcode::Read::new(types::Fd(fd), p, 8).build().user_data(ud);
        self.push(i, e)
    }

    /// Cancels every in-flight op on `fd`. Their CQEs still arrive
    /// (`-ECANCELED` or their real result) and must be reaped before the
    /// owner of those ops lets go of its buffers.
    pub fn cancel_fd(&mut self, fd: RawFd, token: u64) -> Result<(), SubmitError> {
        let (i, ud) = self.take_op(token, None)?;
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build().user_data(ud);
        self.push(i, e)
    }

    /// Cancels every in-flight op whose token satisfies `pred`; each
    /// cancel request completes with `cancel_token`. Returns how many
    /// cancel requests were pushed. Scans the op table: for close paths.
    pub fn cancel_where(&mut self, pred: impl Fn(u64) -> bool, cancel_token: u64) -> Result<usize, SubmitError> {
        let targets: Vec<u64> = self
            .ops
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_use && r.token != cancel_token && pred(r.token))
            .map(|(i, r)| (u64::from(r.generation) << 32) | i as u64)
            .collect();
        for &ud in &targets {
            let (i, cud) = self.take_op(cancel_token, None)?;
            let e = opcode::AsyncCancel::new(ud).build().user_data(cud);
            self.push(i, e)?;
        }
        Ok(targets.len())
    }

    /// Submits pushed SQEs and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> std::io::Result<usize> {
        match self.ring.submit_and_wait(want) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => Ok(0),
            r => r,
        }
    }

    /// Moves every available completion into `out`, releasing op records
    /// (and buffers) of ops that are finished.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            let i = (ud & 0xffff_ffff) as usize;
            let generation = (ud >> 32) as u32;
            let more = cqueue::more(cqe.flags());
            let Some(rec) = self.ops.get_mut(i).filter(|r| r.in_use && r.generation == generation) else {
                self.stale_cqes += 1;
                continue;
            };
            let buf = rec.buf;
            let owned = if more { None } else { rec.owned.take() };
            let res = cqe.result();
            let fd = if rec.accept && res >= 0 {
                // SAFETY: a non-negative accept result is a descriptor the
                // kernel just installed for this process; nothing else
                // knows it, so this Completion owns it.
                Some(unsafe { OwnedFd::from_raw_fd(res) })
            } else {
                None
            };
            let c = Completion { token: rec.token, result: res, more, buf, counter: rec.counter, owned, fd };
            if !more {
                rec.in_use = false;
                rec.buf = None;
                if let Some(b) = buf {
                    self.arena.unlend(b);
                }
                self.free_ops.push(u32::try_from(i).unwrap_or(0));
            }
            out.push(c);
        }
    }
}

/// Copies any socket address into a `SockaddrStorage`.
pub fn sockaddr_storage_of(a: &dyn SockaddrLike) -> SockaddrStorage {
    // SAFETY: `as_ptr()`/`len()` describe a valid socket address of its
    // family; `from_raw` copies at most `len` bytes.
    unsafe { SockaddrStorage::from_raw(a.as_ptr(), Some(a.len())) }.unwrap_or_else(|| {
        // Unreachable for the families we build (unix, inet, inet6).
        SockaddrStorage::from(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    })
}
