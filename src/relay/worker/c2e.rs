//! Client → endpoint, top to bottom: read the client socket into `rx`,
//! deframe, gather DATA payload ranges into one endpoint write (or
//! decompress LZ4, or hand the body to splice), handle control messages.
//! While the endpoint write is in flight `rx` belongs to the kernel and the
//! client is not read: back-pressure.

use super::*;

impl Worker {
    pub(super) fn read_client(&mut self, slot: u32, conn: &mut Conn) {
        // While draining, `connect` keeps reading (and dropping) until the server is quiet.
        if conn.c2e_busy || conn.closing.is_some() || (self.draining.is_some() && !conn.client_role) {
            return;
        }
        if let Stage::Chan(ch) = &conn.stage
            && ch.eof_client
        {
            return;
        }
        if conn.tls.is_some() {
            return self.tls_read(slot, conn);
        }
        if self.take_flush_close(slot, conn) {
            return;
        }
        if conn.lend.rx_polling {
            return;
        }
        if !(conn.lend.rx_ready || conn.lend.rx_hot && data_stage(conn)) {
            // Nothing flowed lately (or still linking): wait for bytes
            // without holding a buffer.
            self.put_rx(conn);
            let t = self.tok(Op::ClientPoll, slot);
            let r = self.ring.poll(conn.fd.as_raw_fd(), libc::POLLIN, t);
            if self.pushed(slot, conn, r) {
                conn.lend.rx_polling = true;
                conn.c2e_busy = true;
            }
            return;
        }
        if matches!(conn.stage, Stage::Link { .. }) && conn.rx.is_none() {
            // Not linked yet: no data buffer (see `link_read`).
            return self.link_read(slot, conn);
        }
        let Some(rx) = self.take_rx(slot, conn) else { return };
        let mut size = self.ring.arena().buf_size();
        if self.live.config.limits.data_path == DataPath::Splice
            && matches!(&conn.stage, Stage::Chan(ch) if !ch.splice_off)
        {
            // Read exactly up to the next header so payloads stay in the
            // socket for splice; a small body is read whole.
            let hl = conn.enc.header_len();
            size = if conn.deframer.at_boundary() {
                hl
            } else {
                (conn.deframer.body_remaining() as usize).min(size).max(1)
            };
        }
        let t = self.tok(Op::ClientRead, slot);
        let r = self.ring.read_fixed(conn.fd.as_raw_fd(), rx, 0, size, t);
        let op = self.ring.last_op();
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
            conn.lend.rx_reading = true;
            conn.lend.rx_op = op;
        }
    }

    /// The client socket is readable (or in error: the read says which).
    pub(super) fn on_client_poll(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        conn.lend.rx_polling = false;
        if res < 0 && res != -libc::ECANCELED {
            return self.on_client_read(slot, conn, res);
        }
        if res == -libc::ECANCELED && self.draining.is_some() {
            return self.maybe_drained(slot, conn);
        }
        conn.lend.rx_ready = res >= 0;
        self.read_client(slot, conn);
    }

    pub(super) fn on_client_read(&mut self, slot: u32, conn: &mut Conn, res: i32) {
        conn.c2e_busy = false;
        conn.lend.rx_reading = false;
        conn.lend.rx_ready = false;
        if res == -libc::ECANCELED && conn.lend.rx_demote && self.draining.is_none() {
            // The tick took the buffer back from an idle side.
            conn.lend.rx_demote = false;
            self.stats().buffers_reclaimed.fetch_add(1, Ordering::Relaxed);
            return self.read_client(slot, conn);
        }
        conn.lend.rx_demote = false;
        if res <= 0 {
            let reason = if res == 0 { "client closed".to_string() } else { errno_reason("client read", res) };
            if let Stage::Chan(ch) = &mut conn.stage {
                // Everything read was written already (reads wait for writes).
                ch.eof_client = true;
            }
            if self.draining.is_some() && res == -libc::ECANCELED {
                self.maybe_drained(slot, conn);
                return;
            }
            self.close(slot, conn, &reason);
            return;
        }
        conn.lend.rx_hot = data_stage(conn);
        conn.rx_len = usize::try_from(res).unwrap_or(0);
        conn.rx_pos = 0;
        conn.last_rx = Instant::now();
        self.pump_in(slot, conn);
    }

    /// Processes buffered client bytes according to the stage, then reads more.
    pub(super) fn pump_in(&mut self, slot: u32, conn: &mut Conn) {
        if conn.closing.is_some() || conn.c2e_busy {
            return;
        }
        // A link stage that completes hands the rest of the input to the
        // data stage in the same pass (bytes may follow the link result).
        loop {
            match conn.stage {
                Stage::WaitKey => return,
                Stage::Link { .. } => {
                    if !self.pump_link(slot, conn) {
                        return;
                    }
                    if matches!(conn.stage, Stage::Link { .. }) {
                        break;
                    }
                }
                Stage::CLink { .. } => {
                    if !self.pump_clink(slot, conn) {
                        return;
                    }
                    if matches!(conn.stage, Stage::CLink { .. }) {
                        break;
                    }
                }
                Stage::ULink { .. } => {
                    if !self.proxy_pump_ulink(slot, conn) {
                        return;
                    }
                    if matches!(conn.stage, Stage::ULink { .. }) {
                        break;
                    }
                }
                Stage::Pipe(_) => {
                    if !self.proxy_forward(slot, conn) {
                        return;
                    }
                    break;
                }
                Stage::Main { .. } | Stage::CMain | Stage::Chan(_) => {
                    if !self.pump_data(slot, conn) {
                        return;
                    }
                    break;
                }
            }
            if conn.closing.is_some() || conn.c2e_busy {
                return;
            }
        }
        if conn.rx_pos >= conn.rx_len && conn.closing.is_none() {
            self.read_client(slot, conn);
        }
    }

    /// Data stage: deframes client bytes. Returns whether more input is wanted now.
    pub(super) fn pump_data(&mut self, slot: u32, conn: &mut Conn) -> bool {
        let limits = &self.live.config.limits;
        let (max_ctl, max_lz4) = (limits.max_control_bytes, limits.max_lz4_bytes);
        let kind = match &conn.stage {
            Stage::Main { .. } | Stage::CMain => ChannelKind::of(CH_MAIN),
            Stage::Chan(ch) => Some(ch.kind),
            _ => None,
        };
        let Some(kind) = kind else { return false };
        if let Stage::Chan(ch) = &conn.stage
            && (ch.lz4_pending.is_some() || (!ch.ranges.is_empty() && ch.ep_state != EpState::Open))
        {
            return false;
        }
        let Some(buf) = conn.rx.and_then(|b| self.ring.arena().get(b)) else { return conn.rx_pos >= conn.rx_len };
        let mut error: Option<String> = None;
        let mut control: Vec<(MsgHeader, Vec<u8>)> = Vec::new();
        let mut compressed_done = false;
        let mut acks: Vec<ClientMsg<'static>> = Vec::new();
        let mut c2e_delta = 0u64;
        while conn.rx_pos < conn.rx_len {
            let input = &buf[conn.rx_pos..conn.rx_len];
            let (used, ev) = conn.deframer.advance(input);
            let base = conn.rx_pos;
            conn.rx_pos += used;
            match ev {
                Some(Event::Header(h)) => {
                    if conn.client_role {
                        // Every server message counts toward the ACK window.
                        if h.msg_type != MSG_SET_ACK
                            && let Some(m) = conn.ack.on_message()
                        {
                            acks.push(m);
                        }
                    } else if !kind.client_msg_allowed(h.msg_type) {
                        error = Some(format!("protocol error: message type {} not valid on {}", h.msg_type, kind));
                        break;
                    }
                    if h.sub_list != 0 {
                        error = Some("protocol error: sub-message list".into());
                        break;
                    }
                    conn.st.c2e_msgs += 1;
                    conn.cur = if h.msg_type == MSG_SPICEVMC_DATA
                        && kind.class != crate::proto::channel::ChannelClass::Main
                    {
                        Cur::Data
                    } else if h.msg_type == MSG_SPICEVMC_COMPRESSED_DATA
                        && kind.class != crate::proto::channel::ChannelClass::Main
                    {
                        if h.size as usize > max_lz4 {
                            error = Some(format!("protocol error: compressed message of {} bytes", h.size));
                            break;
                        }
                        if let Stage::Chan(ch) = &mut conn.stage {
                            ch.lz4_in.clear();
                            // Flush earlier data first, to keep the stream in order.
                            if !ch.ranges.is_empty() {
                                conn.cur = Cur::Compressed;
                                break;
                            }
                        }
                        Cur::Compressed
                    } else {
                        // A client keeps the first bytes of any server message
                        // (a PING carries 256 000 bytes of padding).
                        let big_ok = conn.client_role
                            || (kind.class == crate::proto::channel::ChannelClass::Main
                                && matches!(h.msg_type, MSGC_MAIN_AGENT_DATA | 112));
                        if h.size as usize > max_ctl && !big_ok {
                            error = Some(format!("protocol error: message type {} of {} bytes", h.msg_type, h.size));
                            break;
                        }
                        conn.ctl.start(h);
                        Cur::Control
                    };
                    // An empty body is complete now; the deframer's empty
                    // last chunk (if the caller asks again) is then ignored.
                    if h.size == 0 {
                        match conn.cur {
                            Cur::Control => control.push((h, Vec::new())),
                            Cur::Compressed => {
                                error = Some("protocol error: empty compressed message".into());
                                break;
                            }
                            _ => {}
                        }
                        conn.cur = Cur::None;
                    }
                }
                Some(Event::Body { offset, len, last }) => {
                    let (a, b) = (base + offset, base + offset + len);
                    match conn.cur {
                        Cur::Data => {
                            if let Stage::Chan(ch) = &mut conn.stage {
                                if ch.app_left.is_some() {
                                    // No local app: dropped, counted.
                                    ch.dropped += len as u64;
                                } else if len > 0 {
                                    // Merge with the previous range when contiguous.
                                    match ch.ranges.last_mut() {
                                        Some(r) if r.0 + r.1 == a => r.1 += len,
                                        _ => ch.ranges.push((a, len)),
                                    }
                                    conn.st.c2e_bytes += len as u64;
                                    c2e_delta += len as u64;
                                }
                                if ch.ranges.len() == MAX_IOV {
                                    break;
                                }
                            }
                        }
                        Cur::Compressed => {
                            if let Stage::Chan(ch) = &mut conn.stage {
                                ch.lz4_in.extend_from_slice(&buf[a..b]);
                                if last {
                                    compressed_done = true;
                                    conn.cur = Cur::None;
                                    break;
                                }
                            }
                        }
                        Cur::Control => {
                            conn.ctl.push(&buf[a..b]);
                            if last {
                                control.push((conn.ctl.header(), conn.ctl.body().to_vec()));
                                conn.cur = Cur::None;
                            }
                        }
                        Cur::None => {}
                    }
                    if last && conn.cur == Cur::Data {
                        conn.cur = Cur::None;
                    }
                }
                None => {
                    if used == 0 {
                        break;
                    }
                }
            }
        }
        if let Some(e) = error {
            self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(self.who, "peer={} channel={} {e}", conn.peer, conn.label);
            self.close(slot, conn, &e);
            return false;
        }
        self.stats().c2e_bytes.fetch_add(c2e_delta, Ordering::Relaxed);
        for m in acks {
            self.queue_client(slot, conn, &m);
        }
        for (h, body) in control {
            if conn.client_role {
                self.on_server_control(slot, conn, kind, h, &body);
            } else {
                self.on_control(slot, conn, kind, h, &body);
            }
        }
        if conn.closing.is_some() {
            return false;
        }
        let Stage::Chan(ch) = &mut conn.stage else { return true };
        if compressed_done && ch.app_left.is_some() {
            ch.dropped += ch.lz4_in.len() as u64;
        } else if compressed_done {
            let mut out = ch.lz4_out.take().unwrap_or_default();
            let parsed = if conn.client_role {
                match ServerMsg::parse(kind, MSG_SPICEVMC_COMPRESSED_DATA, &ch.lz4_in) {
                    Ok(ServerMsg::CompressedData(cd)) => Ok(cd),
                    Ok(_) => Err(crate::proto::framing::FrameError::BadCompression),
                    Err(e) => Err(e),
                }
            } else {
                match ClientMsg::parse(kind, MSG_SPICEVMC_COMPRESSED_DATA, &ch.lz4_in) {
                    Ok(ClientMsg::CompressedData(cd)) => Ok(cd),
                    Ok(_) => Err(crate::proto::framing::FrameError::BadCompression),
                    Err(e) => Err(e),
                }
            };
            let r = parsed.and_then(|cd| {
                out.resize((cd.uncompressed_size as usize).min(max_lz4), 0);
                cd.decompress(max_lz4, &mut out)
            });
            match r {
                Ok(n) => {
                    out.truncate(n);
                    conn.st.c2e_bytes += n as u64;
                    self.stats().c2e_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    ch.lz4_pending = Some(0);
                    return self.write_lz4(slot, conn, out, 0);
                }
                Err(e) => {
                    ch.lz4_out = Some(out);
                    self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
                    let m = format!("protocol error: {e}");
                    warn!(self.who, "peer={} channel={} {m}", conn.peer, conn.label);
                    self.close(slot, conn, &m);
                    return false;
                }
            }
        }
        if !ch.ranges.is_empty() {
            if ch.ep_state != EpState::Open {
                return false;
            }
            self.write_ranges(slot, conn);
            return false;
        }
        if self.live.config.limits.data_path == DataPath::Splice
            && conn.tls.is_none()
            && conn.cur == Cur::Data
            && conn.rx_pos >= conn.rx_len
            && conn.deframer.body_remaining() >= SPLICE_MIN_BYTES
            && ch.ep_state == EpState::Open
            && !ch.splice_off
        {
            self.splice_in(slot, conn);
            return false;
        }
        true
    }

    pub(super) fn write_lz4(&mut self, slot: u32, conn: &mut Conn, out: Vec<u8>, done: usize) -> bool {
        let Stage::Chan(ch) = &mut conn.stage else { return false };
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else {
            // Endpoint not there yet: keep the output until it is.
            ch.lz4_out = Some(out);
            ch.lz4_pending = None;
            return false;
        };
        ch.lz4_pending = Some(done);
        let t = self.tok(Op::EpWrite, slot);
        let r = self.ring.write_owned(fd, out, done, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
        false
    }

    pub(super) fn write_ranges(&mut self, slot: u32, conn: &mut Conn) {
        let t = self.tok(Op::EpWrite, slot);
        let Stage::Chan(ch) = &conn.stage else { return };
        let Some(fd) = ch.ep.as_ref().map(AsRawFd::as_raw_fd) else { return };
        let Some(rx) = conn.rx else { return };
        // The ring copies the ranges into its own iovec array: no clone needed.
        let r = self.ring.writev(fd, rx, &ch.ranges, t);
        if self.pushed(slot, conn, r) {
            conn.c2e_busy = true;
        }
    }

    pub(super) fn on_ep_write(&mut self, slot: u32, conn: &mut Conn, res: i32, owned: Option<Vec<u8>>) {
        conn.c2e_busy = false;
        let Stage::Chan(ch) = &mut conn.stage else { return };
        if ch.app_left.is_some() {
            // The local app left while this write was in flight: what it
            // did not take is dropped (counted when the app left).
            ch.ranges.clear();
            ch.lz4_pending = None;
            if let Some(v) = owned {
                ch.lz4_out = Some(v);
            }
            return self.pump_in(slot, conn);
        }
        if res < 0 {
            if let Some(v) = owned {
                ch.lz4_out = Some(v);
            }
            if res == -libc::EAGAIN || res == -libc::EINTR {
                // Retry the same write.
                return self.pump_in(slot, conn);
            }
            let r = errno_reason("endpoint write", res);
            return self.endpoint_gone(slot, conn, &r);
        }
        let n = usize::try_from(res).unwrap_or(0);
        if let Some(v) = owned {
            let done = ch.lz4_pending.unwrap_or(0) + n;
            if done < v.len() {
                self.write_lz4(slot, conn, v, done);
                return;
            }
            ch.lz4_pending = None;
            ch.lz4_out = Some(v);
        } else {
            // Drop the written prefix of the gathered ranges.
            let mut left = n;
            while let Some(first) = ch.ranges.first_mut() {
                if left >= first.1 {
                    left -= first.1;
                    ch.ranges.remove(0);
                } else {
                    first.0 += left;
                    first.1 -= left;
                    break;
                }
            }
            if !ch.ranges.is_empty() {
                self.write_ranges(slot, conn);
                return;
            }
        }
        if self.draining.is_some() && conn.rx_pos >= conn.rx_len {
            return self.maybe_drained(slot, conn);
        }
        self.pump_in(slot, conn);
    }

    pub(super) fn on_control(&mut self, slot: u32, conn: &mut Conn, kind: ChannelKind, h: MsgHeader, body: &[u8]) {
        let msg = match ClientMsg::parse(kind, h.msg_type, body) {
            Ok(m) => m,
            // Main-channel messages we only skip (agent data) may be truncated.
            Err(_) if kind.class == crate::proto::channel::ChannelClass::Main && conn.ctl.is_truncated() => return,
            Err(e) => {
                self.stats().protocol_errors.fetch_add(1, Ordering::Relaxed);
                let m = format!("protocol error: {e}");
                warn!(self.who, "peer={} channel={} {m}", conn.peer, conn.label);
                return self.close(slot, conn, &m);
            }
        };
        match msg {
            ClientMsg::AttachChannels => {
                let entries: Vec<[u8; 2]> = self.live.config.services[conn.service]
                    .live_channels()
                    .map(|(_, c)| [c.kind.channel_type, c.id])
                    .collect();
                self.queue(slot, conn, &ServerMsg::ChannelsList(ChannelsList { entries: &entries }));
            }
            ClientMsg::AckSync { .. } | ClientMsg::Ack => {
                if let Stage::Chan(ch) = &mut conn.stage {
                    let was_blocked = !ch.ack.may_send();
                    ch.ack.on_client_msg(&msg);
                    if was_blocked && ch.ack.may_send() {
                        self.pump_out(slot, conn);
                    }
                }
            }
            ClientMsg::Disconnecting(_) => conn.close_after_flush = Some("client disconnecting".into()),
            ClientMsg::PortEvent { event } => debug!(self.who, "channel={} client port event {event}", conn.label),
            _ => {}
        }
    }
}

/// Stages whose reads may keep a buffer posted (linking never does).
pub(super) fn data_stage(conn: &Conn) -> bool {
    matches!(conn.stage, Stage::Main { .. } | Stage::CMain | Stage::Chan(_) | Stage::Pipe(_))
}
