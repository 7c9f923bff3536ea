//! Wire constants of the SPICE protocol used by spicevmc channels.
//!
//! Numbers come from spice-protocol's `enums.h`/`protocol.h` and were checked
//! against QEMU 7.2 (spice-server 0.15.1) and spice-gtk 0.42.

/// First four bytes of every link header, both directions.
pub const MAGIC: [u8; 4] = *b"REDQ";
/// Major version; both peers require an exact match.
pub const VERSION_MAJOR: u32 = 2;
/// Minor version; sent, never checked by real peers.
pub const VERSION_MINOR: u32 = 2;

/// `SpiceLinkHeader`: magic, major, minor, size.
pub const LINK_HEADER_LEN: usize = 16;
/// Fixed part of `SpiceLinkMess` (caps follow).
pub const LINK_MESS_LEN: usize = 18;
/// Fixed part of `SpiceLinkReply` (caps follow).
pub const LINK_REPLY_LEN: usize = 178;
/// DER SubjectPublicKeyInfo of a 1024-bit RSA key.
pub const PUBKEY_LEN: usize = 162;
/// RSA-OAEP(SHA-1) ciphertext of the ticket: the modulus size.
pub const TICKET_LEN: usize = 128;
/// RSA modulus size of the per-link ticket key.
pub const TICKET_KEY_BITS: usize = 1024;
/// spice-server refuses longer passwords; so do we.
pub const MAX_PASSWORD_LEN: usize = 60;
/// spice-server accepts link bodies of 18..=4096 bytes.
pub const MAX_LINK_BODY_LEN: u32 = 4096;
/// spice-server refuses more cap words than this per array.
pub const MAX_CAP_WORDS: u32 = 1024;

/// Auth mechanism word: RSA ticket (the bit number of `CAP_AUTH_SPICE`).
pub const AUTH_MECH_SPICE: u32 = 1;
/// Auth mechanism word: SASL (unsupported by vmcrelay).
pub const AUTH_MECH_SASL: u32 = 2;

/// Common capability bit numbers.
pub const CAP_AUTH_SELECTION: u32 = 0;
/// RSA ticket authentication.
pub const CAP_AUTH_SPICE: u32 = 1;
/// SASL authentication.
pub const CAP_AUTH_SASL: u32 = 2;
/// 6-byte data header.
pub const CAP_MINI_HEADER: u32 = 3;

/// Main channel capability bit numbers.
pub const MAIN_CAP_SEMI_SEAMLESS_MIGRATE: u32 = 0;
/// Server sends MAIN_NAME / MAIN_UUID.
pub const MAIN_CAP_NAME_AND_UUID: u32 = 1;
/// AGENT_CONNECTED_TOKENS message.
pub const MAIN_CAP_AGENT_CONNECTED_TOKENS: u32 = 2;
/// Seamless migration.
pub const MAIN_CAP_SEAMLESS_MIGRATE: u32 = 3;
/// spicevmc channel cap: "I can receive LZ4 compressed data".
pub const SPICEVMC_CAP_DATA_COMPRESS_LZ4: u32 = 0;

/// Full data header: u64 serial, u16 type, u32 size, u32 sub_list.
pub const DATA_HEADER_LEN: usize = 18;
/// Mini data header: u16 type, u32 size.
pub const MINI_HEADER_LEN: usize = 6;

/// Common server → client messages.
pub const MSG_MIGRATE: u16 = 1;
/// Channel migration blob.
pub const MSG_MIGRATE_DATA: u16 = 2;
/// ACK window set-up.
pub const MSG_SET_ACK: u16 = 3;
/// Liveness / latency probe.
pub const MSG_PING: u16 = 4;
/// Display-channel ordering barrier.
pub const MSG_WAIT_FOR_CHANNELS: u16 = 5;
/// Server is going away.
pub const MSG_DISCONNECTING: u16 = 6;
/// Text notification.
pub const MSG_NOTIFY: u16 = 7;
/// Sub-message list.
pub const MSG_LIST: u16 = 8;

/// Common client → server messages.
pub const MSGC_ACK_SYNC: u16 = 1;
/// Releases one ACK window.
pub const MSGC_ACK: u16 = 2;
/// Answer to PING.
pub const MSGC_PONG: u16 = 3;
/// Migration flush mark.
pub const MSGC_MIGRATE_FLUSH_MARK: u16 = 4;
/// Migration blob.
pub const MSGC_MIGRATE_DATA: u16 = 5;
/// Client is going away.
pub const MSGC_DISCONNECTING: u16 = 6;

/// Main channel, server → client.
pub const MSG_MAIN_MIGRATE_BEGIN: u16 = 101;
/// Main channel INIT (session id).
pub const MSG_MAIN_INIT: u16 = 103;
/// Main channel list of channels.
pub const MSG_MAIN_CHANNELS_LIST: u16 = 104;
/// Mouse mode.
pub const MSG_MAIN_MOUSE_MODE: u16 = 105;
/// Multimedia time.
pub const MSG_MAIN_MULTI_MEDIA_TIME: u16 = 106;
/// Agent connected.
pub const MSG_MAIN_AGENT_CONNECTED: u16 = 107;
/// Agent disconnected.
pub const MSG_MAIN_AGENT_DISCONNECTED: u16 = 108;
/// Agent data.
pub const MSG_MAIN_AGENT_DATA: u16 = 109;
/// Agent token.
pub const MSG_MAIN_AGENT_TOKEN: u16 = 110;
/// VM name.
pub const MSG_MAIN_NAME: u16 = 113;
/// VM UUID.
pub const MSG_MAIN_UUID: u16 = 114;
/// Agent connected with tokens.
pub const MSG_MAIN_AGENT_CONNECTED_TOKENS: u16 = 115;

/// Main channel, client → server.
pub const MSGC_MAIN_CLIENT_INFO: u16 = 101;
/// Ask for CHANNELS_LIST.
pub const MSGC_MAIN_ATTACH_CHANNELS: u16 = 104;
/// Mouse mode request.
pub const MSGC_MAIN_MOUSE_MODE_REQUEST: u16 = 105;
/// Agent start.
pub const MSGC_MAIN_AGENT_START: u16 = 106;
/// Agent data.
pub const MSGC_MAIN_AGENT_DATA: u16 = 107;
/// Agent token.
pub const MSGC_MAIN_AGENT_TOKEN: u16 = 108;

/// spicevmc data, both directions.
pub const MSG_SPICEVMC_DATA: u16 = 101;
/// spicevmc LZ4 data, both directions.
pub const MSG_SPICEVMC_COMPRESSED_DATA: u16 = 102;
/// Port channel init (server → client).
pub const MSG_PORT_INIT: u16 = 201;
/// Port channel event (server → client).
pub const MSG_PORT_EVENT: u16 = 202;
/// Port channel event (client → server).
pub const MSGC_PORT_EVENT: u16 = 201;

/// Port events.
pub const PORT_EVENT_OPENED: u8 = 0;
/// The host side closed the port.
pub const PORT_EVENT_CLOSED: u8 = 1;
/// Break condition.
pub const PORT_EVENT_BREAK: u8 = 2;

/// `SpiceDataCompressionType`.
pub const COMPRESSION_NONE: u8 = 0;
/// Raw LZ4 block.
pub const COMPRESSION_LZ4: u8 = 1;

/// spice-server compresses only payloads larger than this.
pub const LZ4_THRESHOLD: usize = 1000;
/// spice-server's largest server → client DATA payload (one device read).
pub const SERVER_VMC_MAX_CHUNK: usize = 64 * 1024 + 32;

/// Mouse modes (u16 on the wire in MOUSE_MODE, u32 in MAIN_INIT).
pub const MOUSE_MODE_SERVER: u32 = 1;
/// Client mouse mode.
pub const MOUSE_MODE_CLIENT: u32 = 2;
