//! The splice data path, both directions: payloads never enter user
//! space. Client → endpoint: the body of each DATA message of at least
//! `SPLICE_MIN_BYTES` goes socket → pipe → endpoint. Endpoint → client,
//! once the endpoint's reads are bulk: endpoint → pipe (n bytes), the
//! n-byte DATA header sent with `MSG_MORE`, pipe → socket; small reads go
//! back to the copy path, whose one gathered write costs less for them.
//!
//! The worker calls `splice(2)` itself, non-blocking, and waits on a POLL
//! only when a side would block: io_uring's own `IORING_OP_SPLICE` always
//! runs on an io-wq thread, and that hop (a wake-up and a context switch
//! per op on two vCPUs) cost more than the copies it saved.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::fcntl::SpliceFFlags;
use nix::sys::socket::MsgFlags;

use super::*;

/// Bytes one turn may splice before the worker serves its other
/// connections (a POLL on a readable socket completes at once).
const SPLICE_TURN_BYTES: u64 = 4 * 1024 * 1024;

/// Endpoint bytes one splice takes into the pipe (as the copy path's
/// 256 KiB buffer).
const E2C_READ_BYTES: u32 = 256 * 1024;

/// One non-blocking splice; `Ok(0)` is end of input.
fn splice_nb(from: &impl AsFd, to: &impl AsFd, len: u32) -> Result<usize, Errno> {
    splice_flags(from, to, len, SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE)
}

fn splice_flags(from: &impl AsFd, to: &impl AsFd, len: u32, flags: SpliceFFlags) -> Result<usize, Errno> {
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

impl Worker {
    /// Whether the endpoint → client side of `conn` splices its next read.
    pub(super) fn e2c_splices(&self, conn: &Conn) -> bool {
        let Stage::Chan(ch) = &conn.stage else { return false };
        self.live.config.limits.data_path == DataPath::Splice
            && ch.e2c_bulk
            && !ch.splice_off
            && conn.tls.is_none()
            && ch.lz4_send.is_none()
    }

    /// Endpoint → client by splice: one endpoint read of up to
    /// `E2C_READ_BYTES` into the pipe, then for each DATA message of up to
    /// `max_payload_bytes` its header (`MSG_MORE`) and its body from the
    /// pipe (`SPLICE_F_MORE` while more follows: one push per read, as the
    /// copy path's one write), until a side would block, the turn's budget
    /// is spent or something else must go first (control messages, the
    /// ACK window, a drain). While a message is in progress `tx_busy`
    /// holds: nothing may cut into its body. Bytes in the pipe were taken
    /// from the endpoint and go to the client even if the endpoint leaves.
    pub(super) fn splice_e2c(&mut self, slot: u32, conn: &mut Conn) {
        let mut moved = 0u64;
        let chunk = u32::try_from(self.live.config.limits.max_payload_bytes).unwrap_or(u32::MAX).max(1);
        loop {
            let Stage::Chan(ch) = &mut conn.stage else { return };
            if ch.pipe_e2c.is_none() {
                match new_pipe() {
                    Ok(p) => ch.pipe_e2c = Some(p),
                    Err(e) => {
                        debug!(self.who, "channel={} no splice pipe ({e}): copying", conn.label);
                        ch.splice_off = true;
                        return self.read_endpoint(slot, conn);
                    }
                }
            }
            let Some((pr, _)) = &ch.pipe_e2c else { return };
            if ch.e2c_hdr_done < ch.e2c_hdr_len {
                let hdr = &ch.e2c_hdr[usize::from(ch.e2c_hdr_done)..usize::from(ch.e2c_hdr_len)];
                let flags = MsgFlags::from_bits_retain(libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
                match nix::sys::socket::send(conn.fd.as_raw_fd(), hdr, flags) {
                    Ok(k) => ch.e2c_hdr_done += u8::try_from(k).unwrap_or(u8::MAX),
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => return self.splice_e2c_poll(slot, conn),
                    Err(e) => return self.close(slot, conn, &errno_reason("client write", -(e as i32))),
                }
                continue;
            }
            if ch.e2c_msg_left > 0 {
                let more = ch.e2c_piped > ch.e2c_msg_left;
                let mut flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
                if more {
                    flags |= SpliceFFlags::SPLICE_F_MORE;
                }
                match splice_flags(pr, &conn.fd, ch.e2c_msg_left, flags) {
                    Ok(0) => return self.close(slot, conn, "client write: socket closed"),
                    Ok(k) => {
                        let k = u32::try_from(k).unwrap_or(u32::MAX);
                        ch.e2c_msg_left = ch.e2c_msg_left.saturating_sub(k);
                        ch.e2c_piped = ch.e2c_piped.saturating_sub(k);
                    }
                    Err(Errno::EAGAIN) => return self.splice_e2c_poll(slot, conn),
                    Err(e) => return self.close(slot, conn, &errno_reason("client write", -(e as i32))),
                }
                continue;
            }
            // No message in progress: the stream is at a boundary.
            conn.tx_busy = false;
            if !conn.ctl_q.is_empty() || conn.close_after_flush.is_some() {
                return self.pump_out(slot, conn);
            }
            let Stage::Chan(ch) = &mut conn.stage else { return };
            if !ch.ack.may_send() {
                // The client's ACK calls pump_out, which comes back here.
                return;
            }
            if ch.e2c_piped > 0 {
                // The next message from what the pipe holds.
                let n = ch.e2c_piped.min(chunk);
                let hl = conn.enc.header_len();
                let _ = conn.enc.header(MSG_SPICEVMC_DATA, n, &mut ch.e2c_hdr[..hl]);
                ch.e2c_hdr_len = u8::try_from(hl).unwrap_or(0);
                ch.e2c_hdr_done = 0;
                ch.e2c_msg_left = n;
                ch.ack.on_sent();
                conn.tx_busy = true;
                conn.st.e2c_msgs += 1;
                continue;
            }
            if self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            if ch.ep_state != EpState::Open || ch.app_eof {
                return;
            }
            if !ch.e2c_bulk || ch.splice_off {
                // Small reads lately: the copy path takes the next.
                return self.read_endpoint(slot, conn);
            }
            let (Some(ep), Some((_, pw))) = (&ch.ep, &ch.pipe_e2c) else { return };
            if moved >= SPLICE_TURN_BYTES {
                // Let the others run; a readable endpoint polls ready at once.
                return self.ep_poll(slot, conn);
            }
            match splice_nb(ep, pw, E2C_READ_BYTES) {
                Ok(0) if conn.client_role => return self.ctl_app_eof(slot, conn),
                Ok(0) => return self.endpoint_gone(slot, conn, "endpoint closed"),
                Ok(n) => {
                    ch.e2c_piped = u32::try_from(n).unwrap_or(u32::MAX);
                    ch.e2c_bulk = n >= SPLICE_MIN_BYTES as usize;
                    conn.st.e2c_bytes += n as u64;
                    self.stats().e2c_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    conn.lend.tx_hot = true;
                    conn.lend.last_ep = Instant::now();
                    moved += n as u64;
                }
                Err(Errno::EAGAIN) => return self.ep_poll(slot, conn),
                Err(Errno::EINVAL) => {
                    // This endpoint cannot splice (some character devices).
                    debug!(self.who, "channel={} endpoint cannot splice: copying", conn.label);
                    ch.splice_off = true;
                    return self.read_endpoint(slot, conn);
                }
                Err(e) => return self.endpoint_gone(slot, conn, &errno_reason("endpoint read", -(e as i32))),
            }
        }
    }

    /// The client socket has no room for the message in progress: wait.
    fn splice_e2c_poll(&mut self, slot: u32, conn: &mut Conn) {
        let t = self.tok(Op::SpliceOutPoll, slot);
        let r = self.ring.poll(conn.fd.as_raw_fd(), libc::POLLOUT, t);
        self.pushed(slot, conn, r);
    }

    pub(super) fn on_splice_e2c_poll(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        if res < 0 {
            if res == -libc::ECANCELED {
                return;
            }
            return self.close(slot, conn, &errno_reason("poll", res));
        }
        self.splice_e2c(slot, conn);
    }
}
