//! Server side of the link stage, as a sans-IO state machine.
//!
//! Checks run in spice-server's order: magic, major version, body size
//! (18..=4096), cap counts and bounds, channel lookup (by the caller, via
//! [`Action::Request`] / [`ServerLink::decide`]), auth mechanism, ticket,
//! session. Feed bytes with [`ServerLink::handle_input`] (any split),
//! drain bytes with [`ServerLink::poll_output`], then act on
//! [`ServerLink::poll_action`]. Input is consumed exactly up to the end of
//! the link stage, so bytes after it belong to the data stage.

use super::auth::{TicketKey, constant_time_eq};
use super::caps::Caps;
use super::consts::*;
use super::framing::HeaderKind;
use super::link::{HeaderError, LinkErrorCode, LinkHeader, LinkMess, LinkReply};
use super::wire::OutBuf;

/// Server-wide link settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLinkConfig {
    /// Ticket password; `None` disables ticketing (any password links, but
    /// the ticket must still decrypt, as with spice-server).
    pub password: Option<Vec<u8>>,
    /// Whether to offer the mini header.
    pub mini_header: bool,
}

impl Default for ServerLinkConfig {
    fn default() -> Self {
        Self { password: None, mini_header: true }
    }
}

/// What the client asked to link, for the caller to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkRequest {
    /// 0 for a new session's main channel, else the session id.
    pub connection_id: u32,
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// Client common caps.
    pub common_caps: Caps,
    /// Client channel caps.
    pub channel_caps: Caps,
}

/// The caller's answer to a [`LinkRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Reply, authenticate, link with these channel caps.
    Accept {
        /// Channel caps the server announces.
        channel_caps: Caps,
    },
    /// Reply and authenticate, then emit [`Action::Authenticated`] and wait
    /// for [`ServerLink::confirm`] before sending the result. Lets the
    /// caller open the channel's endpoint only for an authenticated client
    /// and still answer with a link error when it cannot.
    AcceptThenConfirm {
        /// Channel caps the server announces.
        channel_caps: Caps,
    },
    /// Reply and authenticate, then answer `BAD_CONNECTION_ID` (no session
    /// has this connection id), as spice-server does.
    BadConnectionId,
    /// Authenticate, then answer with this result code instead of OK
    /// (e.g. `CHANNEL_NOT_AVAILABLE` when the endpoint cannot be reached).
    FailAfterAuth(LinkErrorCode),
    /// Close without a reply: the channel does not exist (spice-server's
    /// behaviour for unregistered channels).
    Unknown,
    /// Answer with an error reply carrying this code, then close (e.g. the
    /// upstream server of a proxy is down): spice-gtk shows a link error,
    /// not a password prompt.
    Refuse(LinkErrorCode),
    /// Proxy: reply, decrypt the ticket without judging it, emit
    /// [`Action::Authenticated`] (the plaintext is in
    /// [`ServerLink::take_ticket`]) and wait for [`ServerLink::confirm`]:
    /// the upstream server decides.
    Forward {
        /// Channel caps the server announces.
        channel_caps: Caps,
    },
}

/// A completed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linked {
    /// Connection (session) id the client sent.
    pub connection_id: u32,
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// The peer's common caps.
    pub peer_common_caps: Caps,
    /// The peer's channel caps.
    pub peer_channel_caps: Caps,
    /// Our channel caps.
    pub our_channel_caps: Caps,
    /// Data header negotiated from both sides' caps.
    pub header_kind: HeaderKind,
}

/// Why a link failed, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkFailure {
    /// Header refused.
    #[error("{0}")]
    Header(HeaderError),
    /// Link message malformed.
    #[error("malformed link message")]
    BadLinkMess,
    /// The channel does not exist.
    #[error("no such channel")]
    UnknownChannel,
    /// Unsupported auth mechanism (SASL or garbage).
    #[error("unsupported auth mechanism {0}")]
    AuthMechanism(u32),
    /// The ticket did not decrypt with this link's key.
    #[error("ticket does not decrypt")]
    TicketUndecryptable,
    /// Wrong password.
    #[error("wrong password")]
    WrongPassword,
    /// Refused by the caller after authentication.
    #[error("{0}")]
    Refused(LinkErrorCode),
    /// The peer closed mid-link (reported by the caller).
    #[error("peer closed during link")]
    Eof,
}

impl LinkFailure {
    /// The code sent to the peer, if any.
    pub fn code(&self) -> Option<LinkErrorCode> {
        match self {
            Self::Header(h) => Some(h.code()),
            Self::BadLinkMess | Self::AuthMechanism(_) => Some(LinkErrorCode::InvalidData),
            Self::TicketUndecryptable | Self::WrongPassword => Some(LinkErrorCode::PermissionDenied),
            Self::Refused(c) => Some(*c),
            Self::UnknownChannel | Self::Eof => None,
        }
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look the channel up and call [`ServerLink::decide`].
    Request(LinkRequest),
    /// The ticket is good; call [`ServerLink::confirm`] (only after
    /// [`Decision::AcceptThenConfirm`]).
    Authenticated(LinkRequest),
    /// Linked: flush output, then switch to the data stage.
    Linked(Linked),
    /// Flush output, then close the connection.
    Close(LinkFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Body { size: usize },
    AwaitDecision,
    AuthMechanism,
    Ticket,
    AwaitConfirm,
    Done,
}

/// Most output the link stage can hold undrained: the reply, then an
/// error reply (a bad auth mechanism can arrive in the same read as the
/// link message), or a 4-byte result. Found by the `server_link` fuzzer.
const OUT_CAP: usize = 2 * (LINK_HEADER_LEN + LINK_REPLY_LEN + 8 * 4 * super::caps::KEPT_CAP_WORDS) + 4;

/// The server side of one link.
#[derive(Debug)]
pub struct ServerLink {
    state: State,
    key: TicketKey,
    password: Option<Vec<u8>>,
    mini_header: bool,
    /// Input accumulator: a header, a link body (≤ 4096, as the header
    /// announced), a mechanism or a ticket. Grown to the field being read,
    /// never past the largest of them, and empty until the first byte, so
    /// a connection that sends nothing holds no input buffer (half-open
    /// floods).
    inbuf: Vec<u8>,
    have: usize,
    out: OutBuf<OUT_CAP>,
    request: Option<LinkRequest>,
    decision: Option<Decision>,
    action: Option<Action>,
    /// The decrypted ticket under [`Decision::Forward`], until taken.
    ticket: Option<Vec<u8>>,
}

impl ServerLink {
    /// Starts a link with this link's own key (from the pool).
    pub fn new(config: &ServerLinkConfig, key: TicketKey) -> Self {
        Self {
            state: State::Header,
            key,
            password: config.password.clone(),
            mini_header: config.mini_header,
            inbuf: Vec::new(),
            have: 0,
            out: OutBuf::new(),
            request: None,
            decision: None,
            action: None,
            ticket: None,
        }
    }

    /// Server common caps.
    fn common_caps(&self) -> Caps {
        let mut c = Caps::from_bits(&[CAP_AUTH_SELECTION, CAP_AUTH_SPICE]);
        if self.mini_header {
            c.set(CAP_MINI_HEADER);
        }
        c
    }

    /// Whether the link stage is over (linked or closed).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds peer bytes; returns how many were consumed. Stops at the end
    /// of the link stage and while a decision is pending.
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut used = 0;
        while used < input.len() && self.action.is_none() {
            let want = match self.state {
                State::Header => LINK_HEADER_LEN,
                State::Body { size } => size,
                State::AuthMechanism => 4,
                State::Ticket => TICKET_LEN,
                State::AwaitDecision | State::AwaitConfirm | State::Done => break,
            };
            if self.inbuf.len() < want {
                // Bounded: `want` is a fixed field size or a body size the
                // header check capped at MAX_LINK_BODY_LEN.
                self.inbuf.resize(want, 0);
            }
            let n = (want - self.have).min(input.len() - used);
            self.inbuf[self.have..self.have + n].copy_from_slice(&input[used..used + n]);
            self.have += n;
            used += n;
            if self.have == want {
                self.have = 0;
                self.step();
            }
        }
        used
    }

    /// Acts on a complete field in `inbuf`.
    fn step(&mut self) {
        match self.state {
            State::Header => {
                let mut h = [0u8; LINK_HEADER_LEN];
                h.copy_from_slice(&self.inbuf[..LINK_HEADER_LEN]);
                match LinkHeader::parse(&h) {
                    Err(e) => self.fail_with_reply(LinkFailure::Header(e)),
                    Ok(h) if (h.size as usize) < LINK_MESS_LEN || h.size > MAX_LINK_BODY_LEN => {
                        self.fail_with_reply(LinkFailure::Header(HeaderError::Size(h.size)))
                    }
                    Ok(h) => self.state = State::Body { size: h.size as usize },
                }
            }
            State::Body { size } => match LinkMess::parse(&self.inbuf[..size]) {
                None => self.fail_with_reply(LinkFailure::BadLinkMess),
                Some(m) => {
                    let req = LinkRequest {
                        connection_id: m.connection_id,
                        channel_type: m.channel_type,
                        channel_id: m.channel_id,
                        common_caps: m.common_caps,
                        channel_caps: m.channel_caps,
                    };
                    self.request = Some(req);
                    self.state = State::AwaitDecision;
                    self.action = Some(Action::Request(req));
                }
            },
            State::AuthMechanism => {
                let mech = u32::from_le_bytes([self.inbuf[0], self.inbuf[1], self.inbuf[2], self.inbuf[3]]);
                if mech == AUTH_MECH_SPICE {
                    self.state = State::Ticket;
                } else {
                    self.fail_with_reply(LinkFailure::AuthMechanism(mech));
                }
            }
            State::Ticket => {
                let mut t = [0u8; TICKET_LEN];
                t.copy_from_slice(&self.inbuf[..TICKET_LEN]);
                self.check_ticket(&t);
            }
            State::AwaitDecision | State::AwaitConfirm | State::Done => {}
        }
    }

    fn check_ticket(&mut self, ticket: &[u8; TICKET_LEN]) {
        if let (Some(Decision::Forward { .. }), Some(req)) = (self.decision, self.request) {
            let Some(plain) = self.key.decrypt_ticket(ticket) else {
                return self.fail_with_result(LinkFailure::TicketUndecryptable);
            };
            self.ticket = Some(plain);
            self.state = State::AwaitConfirm;
            self.action = Some(Action::Authenticated(req));
            return;
        }
        let failure = match (self.key.decrypt_ticket(ticket), &self.password) {
            (None, _) => Some(LinkFailure::TicketUndecryptable),
            (Some(_), None) => None,
            (Some(p), Some(want)) if want.is_empty() => {
                // An empty configured password still requires an empty ticket.
                (!p.is_empty()).then_some(LinkFailure::WrongPassword)
            }
            (Some(p), Some(want)) => (!constant_time_eq(&p, want)).then_some(LinkFailure::WrongPassword),
        };
        if let Some(f) = failure {
            return self.fail_with_result(f);
        }
        match (self.decision, self.request) {
            (Some(Decision::Accept { channel_caps }), Some(req)) => self.link(req, channel_caps),
            (Some(Decision::AcceptThenConfirm { .. }), Some(req)) => {
                self.state = State::AwaitConfirm;
                self.action = Some(Action::Authenticated(req));
            }
            (Some(Decision::FailAfterAuth(code)), _) => self.fail_with_result(LinkFailure::Refused(code)),
            _ => self.fail_with_result(LinkFailure::Refused(LinkErrorCode::BadConnectionId)),
        }
    }

    fn link(&mut self, req: LinkRequest, channel_caps: Caps) {
        self.push_out(&0u32.to_le_bytes());
        self.state = State::Done;
        let header_kind = HeaderKind::negotiate(self.mini_header, req.common_caps.has(CAP_MINI_HEADER));
        self.action = Some(Action::Linked(Linked {
            connection_id: req.connection_id,
            channel_type: req.channel_type,
            channel_id: req.channel_id,
            peer_common_caps: req.common_caps,
            peer_channel_caps: req.channel_caps,
            our_channel_caps: channel_caps,
            header_kind,
        }));
    }

    /// Finishes a link held by [`Decision::AcceptThenConfirm`]: `Ok` sends
    /// result OK and yields [`Action::Linked`]; `Err(code)` sends `code`
    /// and yields [`Action::Close`].
    pub fn confirm(&mut self, result: Result<(), LinkErrorCode>) {
        if self.state != State::AwaitConfirm {
            return;
        }
        match (result, self.decision, self.request) {
            (
                Ok(()),
                Some(Decision::AcceptThenConfirm { channel_caps } | Decision::Forward { channel_caps }),
                Some(req),
            ) => self.link(req, channel_caps),
            (Err(code), ..) => self.fail_with_result(LinkFailure::Refused(code)),
            _ => self.fail_with_result(LinkFailure::Refused(LinkErrorCode::Error)),
        }
    }

    /// Records the caller's decision on the pending request.
    pub fn decide(&mut self, decision: Decision) {
        if self.state != State::AwaitDecision {
            return;
        }
        let Some(req) = self.request else { return };
        self.decision = Some(decision);
        let channel_caps = match decision {
            Decision::Unknown => {
                self.state = State::Done;
                self.action = Some(Action::Close(LinkFailure::UnknownChannel));
                return;
            }
            Decision::Refuse(code) => return self.fail_with_reply(LinkFailure::Refused(code)),
            Decision::Accept { channel_caps }
            | Decision::AcceptThenConfirm { channel_caps }
            | Decision::Forward { channel_caps } => channel_caps,
            Decision::BadConnectionId | Decision::FailAfterAuth(_) => Caps::EMPTY,
        };
        let reply =
            LinkReply { error: 0, pub_key: *self.key.public_der(), common_caps: self.common_caps(), channel_caps };
        self.emit_reply(&reply);
        self.state = if req.common_caps.has(CAP_AUTH_SELECTION) { State::AuthMechanism } else { State::Ticket };
    }

    fn emit_reply(&mut self, reply: &LinkReply) {
        // OUT_CAP is sized for the largest replies; a failure here is our
        // bug and shows up as a short (rejected) reply, never a panic.
        let _ = self.out.push_with(|w| reply.emit(w));
    }

    fn fail_with_reply(&mut self, f: LinkFailure) {
        if let Some(code) = f.code() {
            self.emit_reply(&LinkReply::error(code));
        }
        self.state = State::Done;
        self.action = Some(Action::Close(f));
    }

    fn fail_with_result(&mut self, f: LinkFailure) {
        if let Some(code) = f.code() {
            self.push_out(&code.code().to_le_bytes());
        }
        self.state = State::Done;
        self.action = Some(Action::Close(f));
    }

    fn push_out(&mut self, b: &[u8]) {
        self.out.push(b);
    }

    /// Bytes waiting to be sent.
    pub fn pending_output(&self) -> &[u8] {
        self.out.pending()
    }

    /// Copies pending output into `buf`; returns the bytes copied.
    pub fn poll_output(&mut self, buf: &mut [u8]) -> usize {
        self.out.poll(buf)
    }

    /// The next action, once.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.action.take()
    }

    /// The ticket's plaintext after [`Decision::Forward`] authenticated
    /// (once; the caller passes it upstream and drops it).
    pub fn take_ticket(&mut self) -> Option<Vec<u8>> {
        self.ticket.take()
    }

    /// The link request, once it has been parsed.
    pub fn request(&self) -> Option<LinkRequest> {
        self.request
    }
}
