//! ACK window accounting (reference §2.5), both roles, as plain counters.
//!
//! The protocol: the server sends `SET_ACK { generation, window }`; the
//! client answers `ACK_SYNC(generation)` at once and then one `ACK` per
//! `window` messages it receives; the server stops sending while more than
//! `2 × window` messages are unacknowledged. `window == 0` turns the
//! machinery off.
//!
//! spice-server uses it only on display and cursor channels, so vmcrelay's
//! server never needs to send SET_ACK, but its client honours it on any
//! channel because other servers may. Nothing here does I/O: methods
//! return the message to send, if any, as a [`ClientMsg`] / [`ServerMsg`]
//! value for the caller to encode.
//!
//! Both sides count the same messages: everything the server sends after
//! its SET_ACK, excluding the SET_ACK itself (a `SPICE_MSG_LIST` counts as
//! one message).

use super::msg::{ClientMsg, ServerMsg, SetAck};

/// The client's side: when to send ACK_SYNC and ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientAck {
    /// Window from the last SET_ACK; 0 = no ACKs.
    window: u32,
    /// Messages still to receive before the next ACK.
    remaining: u32,
}

impl ClientAck {
    /// No SET_ACK seen yet: no ACKs are sent.
    pub const fn new() -> Self {
        Self { window: 0, remaining: 0 }
    }

    /// The current window (0 = disabled).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// A SET_ACK arrived: answer with the returned ACK_SYNC right away and
    /// restart the count.
    pub fn on_set_ack(&mut self, set_ack: SetAck) -> ClientMsg<'static> {
        self.window = set_ack.window;
        self.remaining = set_ack.window;
        ClientMsg::AckSync { generation: set_ack.generation }
    }

    /// Any other server message arrived (call once per message, on its
    /// header or on its last body chunk, consistently). Returns the ACK to
    /// send when the window is used up.
    pub fn on_message(&mut self) -> Option<ClientMsg<'static>> {
        if self.window == 0 {
            return None;
        }
        self.remaining = self.remaining.saturating_sub(1);
        if self.remaining > 0 {
            return None;
        }
        self.remaining = self.window;
        Some(ClientMsg::Ack)
    }

    /// Convenience: feeds a decoded server message to the right method.
    pub fn on_server_msg(&mut self, msg: &ServerMsg<'_>) -> Option<ClientMsg<'static>> {
        match msg {
            ServerMsg::SetAck(s) => Some(self.on_set_ack(*s)),
            _ => self.on_message(),
        }
    }
}

/// The server's side: generation, window and unacknowledged messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerAck {
    /// Generation of the last SET_ACK (0 before any).
    generation: u32,
    /// Window of the last SET_ACK; 0 = unlimited.
    window: u32,
    /// Messages sent since SET_ACK, less the windows the client ACKed.
    unacked: u32,
    /// Generation of the client's last ACK_SYNC.
    synced_generation: Option<u32>,
}

impl ServerAck {
    /// No SET_ACK sent: sending is unlimited and ACKs are ignored.
    pub const fn new() -> Self {
        Self { generation: 0, window: 0, unacked: 0, synced_generation: None }
    }

    /// Starts a new generation with `window` (0 = unlimited) and returns
    /// the SET_ACK to send. The SET_ACK itself is not counted.
    pub fn set_ack(&mut self, window: u32) -> ServerMsg<'static> {
        self.generation = self.generation.wrapping_add(1);
        self.window = window;
        self.unacked = 0;
        ServerMsg::SetAck(SetAck { generation: self.generation, window })
    }

    /// Current generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Current window.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Messages sent and not yet covered by an honoured ACK.
    pub fn unacked(&self) -> u32 {
        self.unacked
    }

    /// Whether another message may be sent: false while more than
    /// `2 × window` are unacknowledged (never false with window 0).
    pub fn may_send(&self) -> bool {
        self.window == 0 || u64::from(self.unacked) <= 2 * u64::from(self.window)
    }

    /// One message (other than SET_ACK) went out.
    pub fn on_sent(&mut self) {
        if self.window != 0 {
            self.unacked = self.unacked.saturating_add(1);
        }
    }

    /// The client sent ACK_SYNC.
    pub fn on_ack_sync(&mut self, generation: u32) {
        self.synced_generation = Some(generation);
    }

    /// The client sent ACK. Returns whether it was honoured: only when the
    /// last ACK_SYNC carried the current generation (a stale ACK from
    /// before a new SET_ACK must not release the new window).
    pub fn on_ack(&mut self) -> bool {
        if self.window == 0 || self.synced_generation != Some(self.generation) {
            return false;
        }
        self.unacked = self.unacked.saturating_sub(self.window);
        true
    }

    /// Convenience: feeds a decoded client message; other types are ignored.
    pub fn on_client_msg(&mut self, msg: &ClientMsg<'_>) {
        match msg {
            ClientMsg::AckSync { generation } => self.on_ack_sync(*generation),
            ClientMsg::Ack => {
                self.on_ack();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn client_syncs_then_acks_every_window() {
        let mut c = ClientAck::new();
        assert_eq!(c.on_message(), None, "no ACK before SET_ACK");
        assert_eq!(c.on_set_ack(SetAck { generation: 7, window: 3 }), ClientMsg::AckSync { generation: 7 });
        let acks: Vec<bool> = (0..9).map(|_| c.on_message().is_some()).collect();
        assert_eq!(acks, [false, false, true, false, false, true, false, false, true]);
        // a new SET_ACK restarts the count
        c.on_message();
        c.on_set_ack(SetAck { generation: 8, window: 2 });
        assert_eq!(c.on_message(), None);
        assert_eq!(c.on_message(), Some(ClientMsg::Ack));
    }

    #[test]
    fn client_window_zero_disables() {
        let mut c = ClientAck::new();
        let msg = ServerMsg::SetAck(SetAck { generation: 1, window: 0 });
        assert_eq!(c.on_server_msg(&msg), Some(ClientMsg::AckSync { generation: 1 }));
        assert!((0..100).all(|_| c.on_server_msg(&ServerMsg::Data).is_none()));
    }

    #[test]
    fn client_window_one_acks_every_message() {
        let mut c = ClientAck::new();
        c.on_set_ack(SetAck { generation: 1, window: 1 });
        assert!((0..10).all(|_| c.on_message() == Some(ClientMsg::Ack)));
    }

    #[test]
    fn server_stalls_after_twice_the_window() {
        let mut s = ServerAck::new();
        for _ in 0..1000 {
            assert!(s.may_send());
            s.on_sent();
        }
        assert_eq!(s.unacked(), 0, "window 0 counts nothing");
        assert_eq!(s.set_ack(20), ServerMsg::SetAck(SetAck { generation: 1, window: 20 }));
        for _ in 0..=40 {
            assert!(s.may_send());
            s.on_sent();
        }
        assert!(!s.may_send(), "41 unacked > 2 × 20");
        assert!(!s.on_ack(), "no ACK_SYNC yet");
        s.on_ack_sync(1);
        assert!(s.on_ack());
        assert_eq!(s.unacked(), 21);
        assert!(s.may_send());
    }

    #[test]
    fn server_ignores_acks_of_an_old_generation() {
        let mut s = ServerAck::new();
        s.set_ack(2);
        s.on_client_msg(&ClientMsg::AckSync { generation: 1 });
        s.set_ack(2); // generation 2; the client has only synced 1
        for _ in 0..5 {
            s.on_sent();
        }
        assert!(!s.may_send());
        s.on_client_msg(&ClientMsg::Ack);
        assert_eq!(s.unacked(), 5, "stale generation not honoured");
        s.on_client_msg(&ClientMsg::AckSync { generation: 2 });
        s.on_client_msg(&ClientMsg::Ack);
        assert_eq!(s.unacked(), 3);
        // saturates rather than underflowing
        s.on_ack();
        s.on_ack();
        assert_eq!(s.unacked(), 0);
    }

    /// A server and a client in lock-step: the client's ACKs keep the server
    /// sending forever, and the server never runs more than 2 × W ahead.
    #[test]
    fn pair_never_stalls() {
        for window in [1u32, 2, 3, 20, 40] {
            let mut s = ServerAck::new();
            let mut c = ClientAck::new();
            let set_ack = s.set_ack(window);
            let sync = c.on_server_msg(&set_ack).expect("ACK_SYNC");
            s.on_client_msg(&sync);
            let mut in_flight: u32 = 0;
            for _ in 0..10_000 {
                if s.may_send() {
                    s.on_sent();
                    in_flight += 1;
                    assert!(in_flight <= 2 * window + 1);
                } else {
                    // deliver everything in flight to the client
                    assert!(in_flight > 0, "stalled with nothing in flight (window {window})");
                    for _ in 0..in_flight {
                        if let Some(ack) = c.on_server_msg(&ServerMsg::Data) {
                            s.on_client_msg(&ack);
                        }
                    }
                    in_flight = 0;
                }
            }
        }
    }
}
