//! In-memory server ↔ client link: every outcome of the link stage, with
//! bytes moved in deliberately awkward splits.

use vmcrelay::proto::auth::{TicketKey, seeded_rng};
use vmcrelay::proto::caps::Caps;
use vmcrelay::proto::client_link::{self, ClientLink, ClientLinkConfig, ClientLinkFailure};
use vmcrelay::proto::framing::HeaderKind;
use vmcrelay::proto::link::LinkErrorCode;
use vmcrelay::proto::server_link::{self, Decision, LinkFailure, ServerLink, ServerLinkConfig};

struct Outcome {
    server: Option<server_link::Action>,
    client: Option<client_link::Action>,
    requests: usize,
}

/// Runs a link to completion moving at most `step` bytes per hop.
fn run(
    server_cfg: ServerLinkConfig,
    client_cfg: ClientLinkConfig,
    step: usize,
    decide: impl Fn(&server_link::LinkRequest) -> Decision,
) -> Outcome {
    let mut rng = seeded_rng([1; 32]);
    let key = TicketKey::generate(&mut rng).expect("keygen");
    let mut s = ServerLink::new(&server_cfg, key);
    let mut c = ClientLink::new(client_cfg, [2; 32]).expect("client");
    let (mut s_final, mut c_final, mut requests) = (None, None, 0);
    let mut buf = vec![0u8; step];
    for _ in 0..100_000 {
        // client → server
        let n = c.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            let used = s.handle_input(&buf[off..n]);
            off += used;
            match s.poll_action() {
                Some(server_link::Action::Request(r)) => {
                    requests += 1;
                    s.decide(decide(&r));
                    if let Some(a) = s.poll_action() {
                        s_final = Some(a);
                    }
                }
                Some(server_link::Action::Authenticated(_)) => {
                    s.confirm(Err(LinkErrorCode::ChannelNotAvailable));
                    s_final = s.poll_action();
                }
                Some(a) => s_final = Some(a),
                None if used == 0 => break,
                None => {}
            }
        }
        // server → client
        let n = s.poll_output(&mut buf);
        let mut off = 0;
        while off < n {
            let used = c.handle_input(&buf[off..n]);
            off += used;
            if let Some(a) = c.poll_action() {
                c_final = Some(a);
            }
            if used == 0 {
                break;
            }
        }
        let idle = c.pending_output().is_empty() && s.pending_output().is_empty();
        if idle && (s_final.is_some() || c_final.is_some()) {
            break;
        }
    }
    Outcome { server: s_final, client: c_final, requests }
}

fn client(password: &[u8], channel_type: u8, mini: bool) -> ClientLinkConfig {
    ClientLinkConfig {
        connection_id: 0,
        channel_type,
        channel_id: 0,
        channel_caps: Caps::from_bits(&[0]),
        password: password.to_vec(),
        mini_header: mini,
        defer_ticket: false,
    }
}

fn accept(_: &server_link::LinkRequest) -> Decision {
    Decision::Accept { channel_caps: Caps::from_bits(&[0]) }
}

#[test]
fn links_without_ticket_in_any_split() {
    for step in [1, 3, 16, 4096] {
        for mini in [true, false] {
            let o = run(ServerLinkConfig::default(), client(b"", 10, mini), step, accept);
            let Some(server_link::Action::Linked(sl)) = o.server else { panic!("server: {:?}", o.server) };
            let Some(client_link::Action::Linked(cl)) = o.client else { panic!("client: {:?}", o.client) };
            let kind = if mini { HeaderKind::Mini } else { HeaderKind::Full };
            assert_eq!((sl.header_kind, cl.header_kind), (kind, kind));
            assert_eq!((sl.channel_type, cl.channel_type), (10, 10));
            assert!(sl.peer_channel_caps.has(0) && cl.peer_channel_caps.has(0));
            assert_eq!(o.requests, 1);
        }
    }
}

#[test]
fn right_password_links_wrong_gets_7() {
    let cfg = ServerLinkConfig { password: Some(b"hunter2".to_vec()), mini_header: true };
    let o = run(cfg.clone(), client(b"hunter2", 128, true), 7, accept);
    assert!(matches!(o.server, Some(server_link::Action::Linked(l)) if l.channel_type == 128));
    let o = run(cfg, client(b"hunter3", 9, true), 64, accept);
    assert_eq!(o.server, Some(server_link::Action::Close(LinkFailure::WrongPassword)));
    assert_eq!(o.client, Some(client_link::Action::Close(ClientLinkFailure::Result(LinkErrorCode::PermissionDenied))));
}

#[test]
fn unknown_channel_closes_without_reply() {
    let o = run(ServerLinkConfig::default(), client(b"", 42, true), 64, |_| Decision::Unknown);
    assert_eq!(o.server, Some(server_link::Action::Close(LinkFailure::UnknownChannel)));
    assert_eq!(o.client, None, "no reply bytes reach the client");
}

#[test]
fn bad_session_gets_8_after_auth() {
    let o = run(ServerLinkConfig::default(), client(b"", 9, true), 64, |_| Decision::BadConnectionId);
    assert_eq!(o.client, Some(client_link::Action::Close(ClientLinkFailure::Result(LinkErrorCode::BadConnectionId))));
}

#[test]
fn garbage_gets_error_reply() {
    let mut rng = seeded_rng([3; 32]);
    let mut s = ServerLink::new(&ServerLinkConfig::default(), TicketKey::generate(&mut rng).expect("key"));
    assert_eq!(s.handle_input(b"GET / HTTP/1.1\r\n\r\n"), 16);
    assert!(matches!(s.poll_action(), Some(server_link::Action::Close(LinkFailure::Header(_)))));
    let out = s.pending_output();
    assert_eq!(out.len(), 194);
    assert_eq!(&out[16..20], &2u32.to_le_bytes(), "INVALID_MAGIC");
}

#[test]
fn endpoint_failure_after_auth_gets_9() {
    let o = run(ServerLinkConfig::default(), client(b"", 9, true), 5, |_| Decision::AcceptThenConfirm {
        channel_caps: Caps::EMPTY,
    });
    assert_eq!(o.server, Some(server_link::Action::Close(LinkFailure::Refused(LinkErrorCode::ChannelNotAvailable))));
    assert_eq!(
        o.client,
        Some(client_link::Action::Close(ClientLinkFailure::Result(LinkErrorCode::ChannelNotAvailable)))
    );
}

/// Regression (found by the server_link fuzzer): a bad auth mechanism in
/// the same read as the link message must not truncate the error reply.
#[test]
fn bad_mechanism_before_drain_keeps_whole_error_reply() {
    let mut rng = seeded_rng([4; 32]);
    let mut s = ServerLink::new(&ServerLinkConfig::default(), TicketKey::generate(&mut rng).expect("key"));
    let link = [
        0x52u8, 0x45, 0x44, 0x51, 2, 0, 0, 0, 2, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0,
        0x12, 0, 0, 0, 0x0d, 0, 0, 0, 0x0f, 0, 0, 0,
    ];
    assert_eq!(s.handle_input(&link), link.len());
    assert!(matches!(s.poll_action(), Some(server_link::Action::Request(_))));
    s.decide(Decision::Accept { channel_caps: Caps::EMPTY });
    assert_eq!(s.pending_output().len(), 16 + 182, "reply: 1 common cap word, no channel caps");
    assert_eq!(s.handle_input(&2u32.to_le_bytes()), 4);
    assert_eq!(s.poll_action(), Some(server_link::Action::Close(LinkFailure::AuthMechanism(2))));
    assert_eq!(s.pending_output().len(), 16 + 182 + 194, "reply then the whole error reply");
}
