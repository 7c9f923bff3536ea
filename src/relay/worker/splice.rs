//! The splice data path (client → endpoint): DATA bodies of at least
//! `SPLICE_MIN_BYTES` go socket → pipe → endpoint without entering user
//! space; a POLL waits when either side would block.

use super::*;

impl Worker {
    /// Moves the rest of the current DATA body socket → pipe.
    pub(super) fn splice_in(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.pipe.is_none() {
            match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
                Ok((r, w)) => {
                    let _ = nix::fcntl::fcntl(
                        &w,
                        nix::fcntl::FcntlArg::F_SETPIPE_SZ(i32::try_from(PIPE_BYTES).unwrap_or(65536)),
                    );
                    ch.pipe = Some((r, w));
                }
                Err(e) => return self.close(slot, conn, &format!("cannot create a pipe for splice: {e}")),
            }
        }
        let Some((_, pw)) = &ch.pipe else { return };
        let len = conn.deframer.body_remaining().min(PIPE_BYTES);
        let t = self.tok(Op::SpliceIn, slot);
        let r = self.ring.splice(conn.fd.as_raw_fd(), pw.as_raw_fd(), len, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    pub(super) fn on_splice_in(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res == -libc::EAGAIN {
            return self.splice_poll(slot, conn, true);
        }
        if res <= 0 {
            let reason = if res == 0 { "client closed".to_string() } else { errno_reason("splice from client", res) };
            return self.close(slot, conn, &reason);
        }
        let n = res.cast_unsigned();
        conn.st.c2e_bytes += u64::from(n);
        self.stats().c2e_bytes.fetch_add(u64::from(n), Ordering::Relaxed);
        if let Stage::Chan(ch) = &mut conn.stage {
            ch.piped = n;
        }
        conn.deframer.skip_body(n);
        if conn.deframer.body_remaining() == 0 {
            conn.cur = Cur::None;
        }
        self.splice_out(slot, conn);
    }

    /// Drains the pipe into the endpoint.
    pub(super) fn splice_out(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let (Some((pr, _)), Some(ep)) = (&ch.pipe, &ch.ep) else { return };
        let t = self.tok(Op::SpliceOut, slot);
        let r = self.ring.splice(pr.as_raw_fd(), ep.as_raw_fd(), ch.piped, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    pub(super) fn on_splice_out(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        if res == -libc::EAGAIN {
            return self.splice_poll(slot, conn, false);
        }
        if res <= 0 {
            let r = if res == 0 { "endpoint closed".to_string() } else { errno_reason("splice to endpoint", res) };
            return self.endpoint_gone(slot, conn, &r);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return };
        ch.piped = ch.piped.saturating_sub(res.cast_unsigned());
        if ch.piped > 0 {
            return self.splice_out(slot, conn);
        }
        if self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        // More of this body: splice again; else back to reading headers.
        if self.take_flush_close(slot, conn) {
            return;
        }
        if conn.cur == Cur::Data && conn.deframer.body_remaining() >= SPLICE_MIN_BYTES {
            return self.splice_in(slot, conn);
        }
        self.pump_in(slot, conn);
    }

    /// A non-blocking socket had nothing to give (or no room): wait for it.
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
        if res < 0 {
            return self.close(slot, conn, &errno_reason("poll", res));
        }
        let input = matches!(&conn.stage, Stage::Chan(ch) if ch.poll_in);
        if input { self.splice_in(slot, conn) } else { self.splice_out(slot, conn) }
    }
}
