//! TLS for SPICE channels, sans-IO: bytes in, bytes out, no fds, no sockets.
//!
//! SPICE wraps each channel's TCP connection in TLS from its first byte; the
//! link and data stages inside are byte-for-byte those of a plain
//! connection. So this layer sits *below* the [`proto`](crate::proto) link
//! state machines and deframer: the worker feeds received ciphertext into a
//! [`Session`], hands the plaintext it takes out to the SPICE code exactly as
//! it would hand bytes read from a plain socket, and sends whatever
//! [`Session::poll_output`] writes into its send buffer.
//!
//! - [`config`]: loading certificates and keys (QEMU's `x509-dir` layout or
//!   explicit files), a reloadable [`ServerTls`], and the client
//!   configuration with spice-gtk's host and subject rules.
//! - [`verify`]: the client's certificate verifier (webpki for the chain,
//!   then spice-gtk's `hostname` / `subject` check) and its error type.
//! - [`session`]: [`Session`], the bounded sans-IO wrapper around one
//!   rustls connection, server or client.
//! - [`blocking`]: [`TlsStream`](blocking::TlsStream), a blocking client
//!   stream over a std socket and a [`Session`] (sync client, vmcload).
//!
//! rustls 0.23 with the *ring* provider (no aws-lc build, no OpenSSL).
//! Everything that crosses this module's boundary is bytes and typed errors,
//! so a kernel-TLS hand-off can later replace the record layer behind the
//! same [`Session`] interface without touching the worker's policy code.

#![forbid(unsafe_code)]

pub mod blocking;
pub mod config;
pub mod session;
pub mod verify;

pub use config::{
    ClientCertFiles, ClientTlsOptions, ConfigError, ServerTls, ServerTlsFiles, client_config, server_config,
};
pub use session::{Limits, PeerClose, Role, Session, SessionError, SessionErrorKind};
pub use verify::{CertSubject, SpiceServerVerifier, VerifyError, VerifyErrorKind};

/// The crypto provider every config of this module is built with.
///
/// Always passed explicitly (never the process default), so enabling a
/// second rustls provider elsewhere cannot make a builder panic.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
