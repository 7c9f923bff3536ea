//! Load generation for vmcrelay (`vmcload`): the client side that drives a
//! SPICE server, the endpoint side that sits where QEMU's chardev would,
//! and the seeded pattern both use to check every byte.
//!
//! - [`pattern`]: stream offset → byte, checkable at any offset without
//!   storing what was sent.
//! - [`size`]: byte counts, durations, message-size distributions.
//! - [`target`]: channel selection (`port:NAME`, `128:0-9`, …) and linking
//!   one connection (its own SPICE session + channel, or a raw socket).
//! - [`run`]: N connections on N threads, released together; modes `up`,
//!   `down`, `echo`, `rr`; the watchdog and progress line.
//! - [`endpoint`]: sink / source / echo apps on unix or TCP sockets.
//! - [`handshake`]: TLS handshakes + link replies per second (TH).
//! - [`idle`]: many sessions × channels linked and held idle (the server's
//!   cost per idle channel), checked alive by an echo sample at the end.
//! - [`report`]: the figures, as JSON and for humans.
//! - [`demo`]: relay + endpoints + three short runs, explained.
//!
//! This is a measuring tool on the blocking client in
//! [`crate::relay::sync_client`], one thread per connection; it is not the
//! relay's data path. Speed is measured here, never asserted in tests.

pub mod demo;
pub mod endpoint;
pub mod handshake;
pub mod idle;
pub mod pattern;
pub mod report;
pub mod run;
pub mod size;
pub mod target;

/// Errors of a load run or endpoint.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line or the selection cannot work (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The run could not be carried out (exit code 1).
    #[error("{0}")]
    Run(String),
    /// A socket or file error (exit code 1).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
