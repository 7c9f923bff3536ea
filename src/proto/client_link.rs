//! Client side of the link stage, as a sans-IO state machine.
//!
//! The link message is queued at construction; feed the server's bytes
//! with [`ClientLink::handle_input`] (any split), send what
//! [`ClientLink::poll_output`] yields, and act on
//! [`ClientLink::poll_action`]. Input is consumed exactly up to the final
//! link result.

use rand::rngs::StdRng;

use super::auth::{AuthError, encrypt_ticket, seeded_rng};
use super::caps::Caps;
use super::consts::*;
use super::framing::HeaderKind;
use super::link::{HeaderError, LinkErrorCode, LinkHeader, LinkMess, LinkReply};
use super::server_link::Linked;
use super::wire::OutBuf;

/// What to link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLinkConfig {
    /// 0 for the main channel of a new session, else the session id.
    pub connection_id: u32,
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// Channel caps to announce (e.g. LZ4 on spicevmc channels).
    pub channel_caps: Caps,
    /// Password (≤ 60 bytes); empty when the server has ticketing disabled.
    pub password: Vec<u8>,
    /// Whether to offer the mini header.
    pub mini_header: bool,
    /// Proxy: stop after the server's reply with [`Action::Reply`] and send
    /// the ticket only once [`ClientLink::send_password`] is called.
    pub defer_ticket: bool,
}

/// Why a client link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientLinkFailure {
    /// The server's link header was refused.
    #[error("{}", describe_header(*.0))]
    Header(HeaderError),
    /// The reply does not parse.
    #[error("malformed SPICE link reply (a broken or foreign server)")]
    BadReply,
    /// The server answered with an error reply.
    #[error("server refused the link: {0}")]
    ErrorReply(LinkErrorCode),
    /// The server offers no authentication we speak (SASL only).
    #[error("server requires SASL authentication, which vmcrelay does not support")]
    NoCommonAuth,
    /// Ticket encryption failed.
    #[error("{0}")]
    Auth(AuthError),
    /// The final link result was not OK.
    #[error("link refused: {0}")]
    Result(LinkErrorCode),
}

/// Says what came instead of a SPICE link reply: printable bytes as text,
/// others in hex.
fn describe_header(e: HeaderError) -> String {
    match e {
        HeaderError::Magic(m) => {
            let sent = if m.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
                format!("`{}`", String::from_utf8_lossy(&m))
            } else {
                let hex: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                format!("bytes {} (hex)", hex.join(" "))
            };
            format!("not a SPICE server: it sent {sent} where a SPICE link reply starts with `REDQ`")
        }
        HeaderError::Version(v) => {
            format!("the server speaks SPICE link protocol version {v}; vmcrelay speaks version 2")
        }
        HeaderError::Size(n) => format!("not a SPICE server: its link reply announces {n} bytes (out of range)"),
    }
}

/// What the caller must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The server replied (only with `defer_ticket`): its caps are known,
    /// the ticket waits for [`ClientLink::send_password`].
    Reply {
        /// The server's common caps.
        common_caps: Caps,
        /// The server's channel caps.
        channel_caps: Caps,
    },
    /// Linked: switch to the data stage.
    Linked(Linked),
    /// Close the connection.
    Close(ClientLinkFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ReplyHeader,
    ReplyBody { size: usize },
    AwaitPassword,
    Result,
    Done,
}

const OUT_CAP: usize = LINK_HEADER_LEN + LINK_MESS_LEN + 8 * 4 * super::caps::KEPT_CAP_WORDS + 4 + TICKET_LEN;

/// The client side of one link.
#[derive(Debug)]
pub struct ClientLink {
    state: State,
    config: ClientLinkConfig,
    common_caps: Caps,
    rng: StdRng,
    inbuf: Box<[u8; MAX_LINK_BODY_LEN as usize]>,
    have: usize,
    out: OutBuf<OUT_CAP>,
    reply: Option<LinkReply>,
    action: Option<Action>,
}

impl ClientLink {
    /// Queues the link message. `rng_seed` seeds OAEP padding: take it
    /// from the OS in production, fixed in tests.
    pub fn new(config: ClientLinkConfig, rng_seed: [u8; 32]) -> Result<Self, AuthError> {
        if config.password.len() > MAX_PASSWORD_LEN {
            return Err(AuthError::PasswordTooLong);
        }
        let mut common_caps = Caps::from_bits(&[CAP_AUTH_SELECTION, CAP_AUTH_SPICE]);
        if config.mini_header {
            common_caps.set(CAP_MINI_HEADER);
        }
        let mess = LinkMess {
            connection_id: config.connection_id,
            channel_type: config.channel_type,
            channel_id: config.channel_id,
            common_caps,
            channel_caps: config.channel_caps,
        };
        let mut out = OutBuf::new();
        out.push_with(|w| mess.emit(w)).map_err(|_| AuthError::Rsa)?;
        Ok(Self {
            state: State::ReplyHeader,
            config,
            common_caps,
            rng: seeded_rng(rng_seed),
            inbuf: Box::new([0; MAX_LINK_BODY_LEN as usize]),
            have: 0,
            out,
            reply: None,
            action: None,
        })
    }

    /// Whether the link stage is over.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds server bytes; returns how many were consumed.
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut used = 0;
        while used < input.len() && self.action.is_none() {
            let want = match self.state {
                State::ReplyHeader => LINK_HEADER_LEN,
                State::ReplyBody { size } => size,
                State::Result => 4,
                State::AwaitPassword | State::Done => break,
            };
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

    fn fail(&mut self, f: ClientLinkFailure) {
        self.state = State::Done;
        self.action = Some(Action::Close(f));
    }

    fn step(&mut self) {
        match self.state {
            State::ReplyHeader => {
                let mut h = [0u8; LINK_HEADER_LEN];
                h.copy_from_slice(&self.inbuf[..LINK_HEADER_LEN]);
                match LinkHeader::parse(&h) {
                    Err(e) => self.fail(ClientLinkFailure::Header(e)),
                    // An error reply is 178 bytes; anything shorter cannot hold the key.
                    Ok(h) if h.size < 4 || h.size > MAX_LINK_BODY_LEN => {
                        self.fail(ClientLinkFailure::Header(HeaderError::Size(h.size)))
                    }
                    Ok(h) => self.state = State::ReplyBody { size: h.size as usize },
                }
            }
            State::ReplyBody { size } => {
                let body = &self.inbuf[..size];
                // Check the error word before anything else: an error reply
                // carries no caps and may be shorter than a full reply.
                let error = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                if error != 0 {
                    return self.fail(ClientLinkFailure::ErrorReply(LinkErrorCode::from_code(error)));
                }
                let Some(reply) = LinkReply::parse(body) else {
                    return self.fail(ClientLinkFailure::BadReply);
                };
                // spice-server with SASL on refuses the ticket mechanism (INVALID_DATA).
                if reply.common_caps.has(CAP_AUTH_SASL) {
                    return self.fail(ClientLinkFailure::NoCommonAuth);
                }
                self.reply = Some(reply);
                if self.config.defer_ticket {
                    self.state = State::AwaitPassword;
                    self.action =
                        Some(Action::Reply { common_caps: reply.common_caps, channel_caps: reply.channel_caps });
                } else {
                    self.send_ticket(&reply);
                }
            }
            State::Result => {
                let code = u32::from_le_bytes([self.inbuf[0], self.inbuf[1], self.inbuf[2], self.inbuf[3]]);
                if code != 0 {
                    return self.fail(ClientLinkFailure::Result(LinkErrorCode::from_code(code)));
                }
                let Some(reply) = self.reply else { return self.fail(ClientLinkFailure::BadReply) };
                self.state = State::Done;
                self.action = Some(Action::Linked(Linked {
                    connection_id: self.config.connection_id,
                    channel_type: self.config.channel_type,
                    channel_id: self.config.channel_id,
                    peer_common_caps: reply.common_caps,
                    peer_channel_caps: reply.channel_caps,
                    our_channel_caps: self.config.channel_caps,
                    header_kind: HeaderKind::negotiate(
                        self.common_caps.has(CAP_MINI_HEADER),
                        reply.common_caps.has(CAP_MINI_HEADER),
                    ),
                }));
            }
            State::AwaitPassword | State::Done => {}
        }
    }

    /// Sends the ticket after [`Action::Reply`] (`defer_ticket`).
    pub fn send_password(&mut self, password: &[u8]) {
        if self.state != State::AwaitPassword {
            return;
        }
        let Some(reply) = self.reply else { return self.fail(ClientLinkFailure::BadReply) };
        if password.len() > MAX_PASSWORD_LEN {
            return self.fail(ClientLinkFailure::Auth(AuthError::PasswordTooLong));
        }
        self.config.password = password.to_vec();
        self.send_ticket(&reply);
        self.config.password.clear();
    }

    fn send_ticket(&mut self, reply: &LinkReply) {
        let server = reply.common_caps;
        if server.has(CAP_AUTH_SELECTION) {
            if !server.has(CAP_AUTH_SPICE) {
                return self.fail(ClientLinkFailure::NoCommonAuth);
            }
            self.push_out(&AUTH_MECH_SPICE.to_le_bytes());
        }
        match encrypt_ticket(&mut self.rng, &reply.pub_key, &self.config.password) {
            Ok(t) => self.push_out(&t),
            Err(e) => return self.fail(ClientLinkFailure::Auth(e)),
        }
        self.state = State::Result;
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
}
