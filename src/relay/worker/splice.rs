//! The splice data path (client → endpoint): the body of each DATA
//! message of at least `SPLICE_MIN_BYTES` goes socket → pipe → endpoint
//! without entering user space.
//!
//! The worker calls `splice(2)` itself, non-blocking, and waits on a POLL
//! only when a side would block: io_uring's own `IORING_OP_SPLICE` always
//! runs on an io-wq thread, and that hop (a wake-up and a context switch
//! per op on two vCPUs) cost more than the copies it saved.
//!
//! Endpoint → client stays on the copy path: splicing it (endpoint → pipe,
//! the DATA header sent with `MSG_MORE`, pipe → socket, one push per
//! 256 KiB read) was measured at 0.60× the copy path's MiB/s for 1.9× its
//! CPU per GiB on this kernel (perf/RESULTS.md, 2026-12-08): TCP sending
//! spliced pages over loopback costs more than the two copies it saves.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::SpliceFFlags;

use super::*;

/// Bytes one turn may splice before the worker serves its other
/// connections (a POLL on a readable socket completes at once).
const SPLICE_TURN_BYTES: u64 = 4 * 1024 * 1024;

/// One non-blocking splice; `Ok(0)` is end of input.
fn splice_nb(from: &impl AsFd, to: &impl AsFd, len: u32) -> Result<usize, Errno> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        match nix::fcntl::splice(from.as_fd(), None, to.as_fd(), None, len as usize, flags) {
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

/// A pipe for splice, as large as an unprivileged process may make it.
fn new_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(i32::try_from(PIPE_BYTES).unwrap_or(65536)));
    Ok((r, w))
}

impl Worker {
    /// Moves the rest of the current DATA body socket → pipe → endpoint
    /// until a side would block (then a POLL waits for it), the body ends
    /// (back to reading headers) or the turn's budget is spent.
    pub(super) fn splice_in(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.pipe.is_none() {
            match new_pipe() {
                Ok(p) => ch.pipe = Some(p),
                Err(e) => {
                    // Out of descriptors, say: this channel copies instead.
                    debug!(self.who, "channel={} no splice pipe ({e}): copying", conn.label);
                    ch.splice_off = true;
                    return self.pump_in(slot, conn);
                }
            }
        }
        let mut moved = 0u64;
        loop {
            let Stage::Chan(ch) = &mut conn.stage else { return };
            let (Some((pr, pw)), Some(ep)) = (&ch.pipe, &ch.ep) else {
                // The endpoint went away (its pipe with it): the copy path
                // holds or drops the rest of the body as it does its own.
                return self.pump_in(slot, conn);
            };
            if ch.piped > 0 {
                match splice_nb(pr, ep, ch.piped) {
                    Ok(0) => return self.endpoint_gone(slot, conn, "endpoint closed"),
                    Ok(n) => {
                        ch.piped = ch.piped.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
                        continue;
                    }
                    Err(Errno::EAGAIN) => return self.splice_poll(slot, conn, false),
                    Err(e) => {
                        let r = errno_reason("splice to endpoint", -(e as i32));
                        return self.endpoint_gone(slot, conn, &r);
                    }
                }
            }
            // The pipe is empty: what was read is with the endpoint.
            if self.draining.is_some() {
                // Draining reads nothing more; what was read is written.
                return self.maybe_drained(slot, conn);
            }
            if conn.deframer.body_remaining() == 0 || conn.cur != Cur::Data {
                conn.cur = Cur::None;
                if self.take_flush_close(slot, conn) {
                    return;
                }
                return self.pump_in(slot, conn);
            }
            if moved >= SPLICE_TURN_BYTES {
                return self.splice_poll(slot, conn, true);
            }
            let len = conn.deframer.body_remaining().min(PIPE_BYTES);
            match splice_nb(&conn.fd, pw, len) {
                Ok(0) => return self.close(slot, conn, "client closed"),
                Ok(n) => {
                    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
                    ch.piped = n32;
                    moved += n as u64;
                    conn.st.c2e_bytes += n as u64;
                    self.stats().c2e_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    conn.deframer.skip_body(n32);
                    conn.last_rx = Instant::now();
                }
                Err(Errno::EAGAIN) => return self.splice_poll(slot, conn, true),
                Err(e) => return self.close(slot, conn, &errno_reason("splice from client", -(e as i32))),
            }
        }
    }

    /// A side had nothing to give (or no room): wait for it.
    pub(super) fn splice_poll(&mut self, slot: u32, conn: &mut Conn, input: bool) {
        if input && self.take_flush_close(slot, conn) {
            return;
        }
        let Stage::Chan(ch) = &mut conn.stage else { return };
        ch.poll_in = input;
        let fd = if input { Some(conn.fd.as_raw_fd()) } else { ch.ep.as_ref().map(AsRawFd::as_raw_fd) };
        let Some(fd) = fd else { return };
        let t = self.tok(Op::SplicePoll, slot);
        let r = self.ring.poll(fd, if input { libc::POLLIN } else { libc::POLLOUT }, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    pub(super) fn on_splice_poll(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res == -libc::ECANCELED && self.draining.is_some() {
            // The drain cancelled the wait: the pipe is still flushed.
            return self.splice_in(slot, conn);
        }
        if res < 0 {
            return self.close(slot, conn, &errno_reason("poll", res));
        }
        // POLLERR/POLLHUP: the splice itself says what happened.
        self.splice_in(slot, conn);
    }
}
