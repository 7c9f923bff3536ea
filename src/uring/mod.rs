//! `uring`: the only code that touches the io_uring and holds `unsafe`.
//!
//! It knows nothing of SPICE. It owns:
//! - the ring, set up and probed at start ([`Ring::new`]);
//! - a registered buffer [`Arena`]: a buffer belongs to the kernel from the
//!   push of an op that uses it until that op's CQE is reaped, and while it
//!   does the arena refuses to hand out a reference to it;
//! - a fixed table of in-flight ops, which keeps everything the kernel
//!   reads or writes asynchronously (iovec arrays, socket addresses,
//!   timespecs, eventfd counters) alive until the CQE is reaped.
//!
//! Callers get safe functions, one per SQE kind, and [`Completion`]s that
//! carry back the caller's own 64-bit token.

mod arena;
mod errno;
mod ring;

pub use arena::{Arena, BufId, MAX_BUFFERS};
pub use errno::{Errno, classify};
pub use ring::{Completion, MAX_IOV, Ring, RingConfig, RingError, SubmitError, sockaddr_storage_of};
