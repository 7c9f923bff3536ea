//! vmcrelay: a relay for SPICE spicevmc channels (usbredir, port, webdav,
//! smartcard and user-defined types 128..=255).
//!
//! Three layers:
//! - [`proto`]: the SPICE codec and link state machines; sans-IO,
//!   `forbid(unsafe_code)`, fuzzable.
//! - `uring`: the only code that touches the io_uring and holds `unsafe`.
//! - `relay`: workers, connections, endpoints, configuration: policy.
//!
//! `proto` imports neither of the others.

pub mod proto;
