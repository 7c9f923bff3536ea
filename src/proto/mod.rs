#![forbid(unsafe_code)]
//! `proto`: the SPICE wire protocol for spicevmc pass-through channels, with
//! no I/O.
//!
//! Nothing here touches a file descriptor, reads a clock or allocates per
//! data message. State machines are fed bytes (in any split) and emit bytes
//! into caller-owned buffers plus [`Action`](server_link::Action)s the
//! caller acts on. Every byte is treated as hostile: malformed input becomes
//! a typed error, never a panic.

pub mod ack;
pub mod auth;
pub mod caps;
pub mod channel;
pub mod client_link;
pub mod consts;
pub mod framing;
pub mod link;
pub mod main_filter;
pub mod msg;
pub mod server_link;
pub mod wire;
