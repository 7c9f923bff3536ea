//! One errno table for every op kind: what a negative CQE result means.

/// A classified failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// Try again (EAGAIN, EINTR, ENOBUFS).
    Retry,
    /// The peer is gone (reset, pipe, not connected, refused, no such path).
    PeerGone(i32),
    /// Our own cancellation (ECANCELED, or ETIME for a timeout firing).
    Cancelled,
    /// A descriptor or argument we passed is wrong: our bug.
    OurBug(i32),
    /// Anything else.
    Unexpected(i32),
}

/// Classifies a CQE result `< 0`.
pub fn classify(res: i32) -> Errno {
    let e = -res;
    match e {
        libc::EAGAIN | libc::EINTR | libc::ENOBUFS => Errno::Retry,
        libc::ECONNRESET
        | libc::EPIPE
        | libc::ENOTCONN
        | libc::ECONNREFUSED
        | libc::ENOENT
        | libc::ECONNABORTED
        | libc::ETIMEDOUT
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH
        | libc::EIO => Errno::PeerGone(e),
        libc::ECANCELED | libc::ETIME => Errno::Cancelled,
        libc::EBADF | libc::EFAULT | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP => Errno::OurBug(e),
        _ => Errno::Unexpected(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        assert_eq!(classify(-libc::EAGAIN), Errno::Retry);
        assert_eq!(classify(-libc::ECONNRESET), Errno::PeerGone(libc::ECONNRESET));
        assert_eq!(classify(-libc::ECANCELED), Errno::Cancelled);
        assert_eq!(classify(-libc::EBADF), Errno::OurBug(libc::EBADF));
        assert_eq!(classify(-libc::EMFILE), Errno::Unexpected(libc::EMFILE));
    }
}
