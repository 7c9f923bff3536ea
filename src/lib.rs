//! vmcrelay: a relay for SPICE spicevmc channels (usbredir, port, webdav,
//! smartcard and user-defined types 128..=255).
//!
//! Three layers:
//! - [`proto`]: the SPICE codec and link state machines; sans-IO,
//!   `forbid(unsafe_code)`, fuzzable.
//! - [`uring`]: the only code that touches the io_uring and holds `unsafe`.
//! - [`relay`]: workers, connections, endpoints, configuration: policy.
//!
//! `proto` imports neither of the others. Data flows client socket →
//! registered buffer (arena, owned by the kernel while a read is in
//! flight) → deframed payload ranges → endpoint write, and back with the
//! SPICE header written into headroom in front of the endpoint's bytes.

#![deny(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod load;
pub mod proto;
pub mod relay;
pub mod tls;
#[allow(unsafe_code)]
pub mod uring;
