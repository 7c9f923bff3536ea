//! `relay`: policy. Workers (one io_uring each), the connection table,
//! sessions, endpoints and configuration. The only place `proto` and
//! `uring` meet.

pub mod config;
pub mod endpoint;
pub mod keypool;
pub mod log;
pub mod metrics;
pub mod reload;
pub mod serve;
pub mod status;
pub mod sync_client;
pub mod systemd;
pub mod worker;
