//! Endpoint → client, top to bottom: link output and control messages
//! first, then one scattered endpoint read into `tx` with a header gap
//! before each chunk, headers written into the gaps (or LZ4 framing), one
//! client write. A read that fills the buffer is followed at once by
//! another: a source is read until it would block.

use super::*;

impl Worker {
    /// Queues a control message toward the client.
    pub(super) fn queue(&mut self, slot: u32, conn: &mut Conn, msg: &ServerMsg<'_>) {
        let mut body = vec![0u8; msg.encoded_len()];
        let mut w = crate::proto::wire::Writer::new(&mut body);
        if msg.emit(&mut w).is_ok() {
            self.queue_body(slot, conn, msg.msg_type(), body);
        }
    }

    /// Queues a control message toward the server (`connect`).
    pub(super) fn queue_client(&mut self, slot: u32, conn: &mut Conn, msg: &ClientMsg<'_>) {
        let mut body = vec![0u8; msg.encoded_len()];
        let mut w = crate::proto::wire::Writer::new(&mut body);
        if msg.emit(&mut w).is_ok() {
            self.queue_body(slot, conn, msg.msg_type(), body);
        }
    }

    pub(super) fn queue_body(&mut self, slot: u32, conn: &mut Conn, msg_type: u16, body: Vec<u8>) {
        if conn.ctl_q.len() >= MAX_CTL_QUEUE {
            return self.close(slot, conn, "peer does not read its control messages");
        }
        conn.ctl_q.push_back((msg_type, body));
        self.pump_out(slot, conn);
    }

    /// Drives the client-bound side: link output, control messages, then
    /// endpoint data.
    pub(super) fn pump_out(&mut self, slot: u32, conn: &mut Conn) {
        if conn.closing.is_some() || conn.tx_busy {
            return;
        }
        let hl = conn.enc.header_len();
        // A link stage with nothing to send takes no buffer (a connection
        // that has not linked never touches one: see `link_read`).
        let linking = match &conn.stage {
            Stage::Link { link, .. } => !link.pending_output().is_empty(),
            Stage::CLink { link, .. } | Stage::ULink { link, hold: false, .. } => !link.pending_output().is_empty(),
            _ => false,
        };
        if !linking && conn.ctl_q.is_empty() {
            // Nothing to send: the buffer goes back until data comes.
            self.put_tx(conn);
            if let Some(r) = conn.close_after_flush.take() {
                return self.close(slot, conn, &r);
            }
            if self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            return self.read_endpoint(slot, conn);
        }
        let Some(txb) = self.take_tx(slot, conn) else { return };
        let Some(tx) = self.ring.arena_mut().get_mut(txb) else { return };
        let mut n = 0;
        match &mut conn.stage {
            Stage::Link { link, .. } => n = link.poll_output(tx),
            Stage::CLink { link, .. } => n = link.poll_output(tx),
            Stage::ULink { link, hold: false, .. } => n = link.poll_output(tx),
            _ => {}
        }
        let tls = conn.tls.is_some();
        let mut raw_out = n > 0;
        // Control messages, framed now so serials follow the send order.
        while n == 0 || !conn.ctl_q.is_empty() {
            let Some((t, body)) = conn.ctl_q.front() else { break };
            if tls && n > 0 && (raw_out || *t == u16::MAX) {
                // Under TLS link bytes go out alone (see below).
                break;
            }
            let need = if *t == u16::MAX { body.len() } else { hl + body.len() };
            if n + need > tx.len() {
                break;
            }
            if *t == u16::MAX {
                tx[n..n + body.len()].copy_from_slice(body);
            } else {
                let _ = conn.enc.header(*t, u32::try_from(body.len()).unwrap_or(0), &mut tx[n..n + hl]);
                tx[n + hl..n + need].copy_from_slice(body);
                conn.st.e2c_msgs += 1;
            }
            n += need;
            let raw = *t == u16::MAX;
            raw_out |= raw;
            conn.ctl_q.pop_front();
            if raw && tls {
                // Link bytes end their TLS record: spice-gtk reads the link
                // result, then waits for the socket to become readable
                // again; a first message in the same record would sit in
                // OpenSSL's buffer, unseen.
                break;
            }
        }
        if n > 0 {
            conn.tx_len = n;
            conn.tx_done = 0;
            conn.tx_raw = raw_out;
            return self.write_client(slot, conn);
        }
        self.put_tx(conn);
        if let Some(r) = conn.close_after_flush.take() {
            return self.close(slot, conn, &r);
        }
        if self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        self.read_endpoint(slot, conn);
    }

    pub(super) fn write_client(&mut self, slot: u32, conn: &mut Conn) {
        if conn.tls.is_some() {
            return self.tls_write(slot, conn, None);
        }
        let Some(tx) = conn.tx else { return };
        let t = self.tok(Op::ClientWrite, slot);
        let r = self.ring.write_fixed(conn.fd.as_raw_fd(), tx, conn.tx_done, conn.tx_len - conn.tx_done, t);
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
        }
    }

    pub(super) fn on_client_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.tx_busy = false;
        if res < 0 {
            if let (Some(v), Stage::Chan(ch)) = (owned, &mut conn.stage) {
                ch.lz4_tx = Some(v);
            }
            return self.close(slot, conn, &errno_reason("client write", res));
        }
        conn.tx_done += usize::try_from(res).unwrap_or(0);
        if let Some(v) = owned {
            if conn.tx_done < conn.tx_len {
                return self.write_client_owned(slot, conn, v);
            }
            if let Stage::Chan(ch) = &mut conn.stage {
                ch.lz4_tx = Some(v);
            }
        } else if conn.tx_done < conn.tx_len {
            return self.write_client(slot, conn);
        }
        // The link stage may now continue (e.g. after the reply went out).
        if matches!(conn.stage, Stage::Link { .. } | Stage::CLink { .. } | Stage::ULink { .. }) {
            self.pump_out(slot, conn);
            return self.pump_in(slot, conn);
        }
        self.pump_out(slot, conn);
    }

    /// Scattered read from the endpoint into `tx`, one header gap before
    /// each chunk.
    pub(super) fn read_endpoint(&mut self, slot: u32, conn: &mut Conn) {
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.ep_state != EpState::Open || conn.tx_busy || !ch.ack.may_send() || ch.app_eof {
            return;
        }
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else { return };
        if conn.lend.ep_polling {
            return;
        }
        if !conn.lend.tx_ready && !conn.lend.tx_hot {
            // Quiet endpoint: wait for bytes without holding a buffer.
            self.put_tx(conn);
            let t = self.tok(Op::EpPoll, slot);
            let r = self.ring.poll(fd, libc::POLLIN, t);
            let op = self.ring.last_op();
            if self.pushed(slot, conn, r) {
                conn.lend.ep_polling = true;
                conn.lend.ep_op = op;
            }
            return;
        }
        let Some(txb) = self.take_tx(slot, conn) else { return };
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let hl = conn.enc.header_len();
        let size = self.ring.arena().buf_size();
        let chunk = self.live.config.limits.max_payload_bytes.min(size - hl);
        ch.e2c_chunk = chunk;
        let mut ranges = [(0usize, 0usize); MAX_IOV];
        let mut k = 0;
        let mut off = 0;
        while k < MAX_IOV && off + hl < size {
            let len = chunk.min(size - off - hl);
            ranges[k] = (off + hl, len);
            off += hl + len;
            k += 1;
        }
        let t = self.tok(Op::EpRead, slot);
        let r = self.ring.readv(fd, txb, &ranges[..k], t);
        let op = self.ring.last_op();
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
            conn.lend.ep_reading = true;
            conn.lend.ep_op = op;
        }
    }

    /// The endpoint is readable (or in error: the read says which).
    pub(super) fn on_ep_poll(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.lend.ep_polling = false;
        if res == -libc::ECANCELED {
            if self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            // Cancelled with its endpoint (dropped or replaced): the next
            // endpoint arms its own.
            return;
        }
        conn.lend.tx_ready = true;
        self.pump_out(slot, conn);
    }

    pub(super) fn on_ep_read(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.tx_busy = false;
        conn.lend.ep_reading = false;
        conn.lend.tx_ready = false;
        if res == -libc::ECANCELED && conn.lend.tx_demote && self.draining.is_none() {
            // The tick took the buffer back from an idle endpoint.
            conn.lend.tx_demote = false;
            self.stats().buffers_reclaimed.fetch_add(1, Ordering::Relaxed);
            return self.pump_out(slot, conn);
        }
        conn.lend.tx_demote = false;
        if res <= 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                return self.pump_out(slot, conn);
            }
            if res == -libc::ECANCELED && self.draining.is_some() {
                return self.maybe_drained(slot, conn);
            }
            if res == 0 && conn.client_role {
                return self.ctl_app_eof(slot, conn);
            }
            let r = if res == 0 { "endpoint closed".to_string() } else { errno_reason("endpoint read", res) };
            return self.endpoint_gone(slot, conn, &r);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return };
        let chunk = ch.e2c_chunk.max(1);
        let hl = conn.enc.header_len();
        let mut n = usize::try_from(res).unwrap_or(0);
        conn.st.e2c_bytes += n as u64;
        self.stats().e2c_bytes.fetch_add(n as u64, Ordering::Relaxed);
        conn.lend.tx_hot = true;
        conn.lend.last_ep = Instant::now();
        let Some(tx) = conn.tx.and_then(|b| self.ring.arena_mut().get_mut(b)) else { return };
        if let (Some(comp), Some(mut out)) = (ch.lz4_send.as_mut(), ch.lz4_tx.take()) {
            // Compressing: frame into a separate vector (LZ4 reads every
            // byte anyway); chunks that do not shrink go as DATA.
            out.clear();
            let mut off = 0;
            while n > 0 {
                let len = n.min(chunk);
                let data = &tx[off + hl..off + hl + len];
                let start = out.len();
                let pre = CompressedData::PREFIX_LEN;
                out.resize(start + hl + pre + lz4_scratch_len(len), 0);
                let packed = if len > LZ4_THRESHOLD { comp.compress(data, &mut out[start + hl + pre..]) } else { None };
                match packed {
                    Some(c) => {
                        let size = u32::try_from(pre + c).unwrap_or(0);
                        let _ = conn.enc.header(MSG_SPICEVMC_COMPRESSED_DATA, size, &mut out[start..start + hl]);
                        let mut w = crate::proto::wire::Writer::new(&mut out[start + hl..start + hl + pre]);
                        let _ = CompressedData::emit_prefix(COMPRESSION_LZ4, u32::try_from(len).unwrap_or(0), &mut w);
                        out.truncate(start + hl + pre + c);
                    }
                    None => {
                        out.truncate(start + hl);
                        let _ = conn.enc.header(MSG_SPICEVMC_DATA, u32::try_from(len).unwrap_or(0), &mut out[start..]);
                        out.extend_from_slice(data);
                    }
                }
                ch.ack.on_sent();
                conn.st.e2c_msgs += 1;
                off += hl + len;
                n -= len;
            }
            conn.tx_len = out.len();
            conn.tx_done = 0;
            conn.tx_raw = false;
            return self.write_client_owned(slot, conn, out);
        }
        let mut off = 0;
        while n > 0 {
            let len = n.min(chunk);
            let _ = conn.enc.header(MSG_SPICEVMC_DATA, u32::try_from(len).unwrap_or(0), &mut tx[off..off + hl]);
            ch.ack.on_sent();
            conn.st.e2c_msgs += 1;
            off += hl + len;
            n -= len;
        }
        conn.tx_len = off;
        conn.tx_done = 0;
        conn.tx_raw = false;
        self.write_client(slot, conn);
    }

    pub(super) fn write_client_owned(&mut self, slot: u32, conn: &mut Conn, out: Vec<u8>) {
        if conn.tls.is_some() {
            return self.tls_write(slot, conn, Some(out));
        }
        let t = self.tok(Op::ClientWrite, slot);
        let r = self.ring.write_owned(conn.fd.as_raw_fd(), out, conn.tx_done, t);
        if self.pushed(slot, conn, r) {
            conn.tx_busy = true;
        }
    }

    /// The endpoint went away: tell a port client, then close.
    pub(super) fn endpoint_gone(&mut self, slot: u32, conn: &mut Conn, reason: &str) {
        if conn.client_role {
            return self.ctl_app_gone(slot, conn, reason);
        }
        let Stage::Chan(ch) = &mut conn.stage else { return self.close(slot, conn, reason) };
        let (service, ci, session) = (conn.service, ch.conf, conn.session);
        let generation = self.slots[slot as usize].generation;
        let label =
            self.conf(service, ci).map_or_else(String::new, |c| format!("{} endpoint={}", c.label(), c.endpoint));
        if ch.kind.port_messages {
            // The port stays linked; its endpoint is reopened behind it.
            ch.drop_endpoint();
            self.cancel_ep_poll(slot, conn);
            warn!(
                self.who,
                "endpoint gone channel={label} reason=\"{reason}\": port closed for the client, reopening it every \
                 second while the session lives"
            );
            self.queue(slot, conn, &ServerMsg::PortEvent { event: PORT_EVENT_CLOSED });
            self.revive_add(service, ci, session, revive::Then::Reattach { slot, generation });
            self.pump_in(slot, conn);
        } else {
            warn!(
                self.who,
                "endpoint gone channel={label} reason=\"{reason}\": channel closed; it is announced to the client \
                 again once the endpoint is back"
            );
            self.close(slot, conn, reason);
            self.revive_add(service, ci, session, revive::Then::Announce);
        }
    }
}
