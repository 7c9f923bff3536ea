//! `vmcload handshake`: TLS handshakes + SPICE link replies per second
//! against a `tls-port` (scripts/bench's TH row). Each link is a fresh TCP
//! connection, a full TLS handshake (resumption disabled), a main-channel
//! `SpiceLinkMess` and the whole `SpiceLinkReply` (error 0 and a public
//! key), then a close: what a server pays per new client before any
//! password is judged. Threads run such links one after the other until
//! the deadline; the client is Rust and rustls, so on a shared machine the
//! server, not the client, is what runs out first.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::proto::caps::Caps;
use crate::proto::consts::{CAP_AUTH_SELECTION, CAP_AUTH_SPICE, CAP_MINI_HEADER, LINK_HEADER_LEN};
use crate::proto::link::{LinkHeader, LinkMess, LinkReply};
use crate::proto::wire::Writer;

/// What to run.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// The server's TLS address.
    pub addr: SocketAddr,
    /// Name the certificate is checked against (IP address or DNS name).
    pub host: String,
    /// Client TLS configuration (its resumption is turned off here).
    pub tls: Arc<ClientConfig>,
    /// Links one after the other per thread.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Per-link timeout (connect, handshake, reply).
    pub timeout: Duration,
}

/// The figures.
#[derive(Debug, Clone, Default)]
pub struct HandshakeReport {
    pub ok: u64,
    pub failed: u64,
    pub wall_secs: f64,
    /// Successful links per second over the wall time.
    pub links_per_s: f64,
    /// Set-up time of successful links (connect → whole reply), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// This process's CPU (user + system) over the run, seconds.
    pub client_cpu_secs: f64,
    /// Negotiated protocol version and cipher suite(s).
    pub suites: Vec<String>,
    /// The first few errors, for the log.
    pub errors: Vec<String>,
}

impl HandshakeReport {
    /// One JSON object (what scripts/bench reads).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "ok": self.ok,
            "failed": self.failed,
            "wall": self.wall_secs,
            "links_per_s": self.links_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "client_cpu": self.client_cpu_secs,
            "suites": self.suites,
            "errors": self.errors,
        })
        .to_string()
    }
}

/// The bytes of a main-channel link request as spice-gtk sends it:
/// header + `SpiceLinkMess` with AUTH_SELECTION, AUTH_SPICE, MINI_HEADER.
fn link_request() -> Vec<u8> {
    let mess = LinkMess {
        connection_id: 0,
        channel_type: crate::proto::channel::CH_MAIN,
        channel_id: 0,
        common_caps: Caps::from_words(&[(1 << CAP_AUTH_SELECTION) | (1 << CAP_AUTH_SPICE) | (1 << CAP_MINI_HEADER)]),
        channel_caps: Caps::EMPTY,
    };
    let body_len = mess.encoded_len();
    let mut out = vec![0u8; LINK_HEADER_LEN + body_len];
    let mut w = Writer::new(&mut out);
    // Header + body fit: the buffer is sized from their own lengths.
    let _ = mess.emit(&mut w);
    out
}

/// One link: returns the negotiated "version suite".
fn one_link(cfg: &HandshakeConfig, name: &ServerName<'static>, request: &[u8]) -> Result<String, String> {
    let tcp = TcpStream::connect_timeout(&cfg.addr, cfg.timeout).map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(cfg.timeout)).map_err(|e| format!("socket: {e}"))?;
    tcp.set_write_timeout(Some(cfg.timeout)).map_err(|e| format!("socket: {e}"))?;
    let conn = ClientConnection::new(Arc::clone(&cfg.tls), name.clone()).map_err(|e| format!("tls: {e}"))?;
    let mut s = StreamOwned::new(conn, tcp);
    s.write_all(request).map_err(|e| format!("handshake or link request: {e}"))?;
    let mut hdr = [0u8; LINK_HEADER_LEN];
    s.read_exact(&mut hdr).map_err(|e| format!("link reply header: {e}"))?;
    let h = LinkHeader::parse(&hdr).map_err(|e| format!("link reply header: {e:?}"))?;
    if !(178..=4096).contains(&h.size) {
        return Err(format!("link reply of {} bytes", h.size));
    }
    let mut body = vec![0u8; h.size as usize];
    s.read_exact(&mut body).map_err(|e| format!("link reply: {e}"))?;
    let reply = LinkReply::parse(&body).ok_or("link reply does not parse")?;
    if reply.error != 0 {
        return Err(format!("link reply error {}", reply.error));
    }
    let suite = format!(
        "{:?} {:?}",
        s.conn.protocol_version().map_or_else(|| "?".into(), |v| format!("{v:?}")),
        s.conn.negotiated_cipher_suite().map_or_else(|| "?".into(), |c| format!("{:?}", c.suite()))
    )
    .replace('"', "");
    s.conn.send_close_notify();
    let _ = s.flush();
    Ok(suite)
}

/// CPU seconds (user + system) this process has used.
fn process_cpu_secs() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Runs the loops and returns the figures.
pub fn run_handshakes(cfg: &HandshakeConfig) -> Result<HandshakeReport, String> {
    let name = ServerName::try_from(cfg.host.clone()).map_err(|e| format!("host {:?}: {e}", cfg.host))?;
    let mut tls = (*cfg.tls).clone();
    tls.resumption = rustls::client::Resumption::disabled();
    let cfg = HandshakeConfig { tls: Arc::new(tls), ..cfg.clone() };
    let request = link_request();
    let stop = AtomicBool::new(false);
    struct Acc {
        ok: u64,
        failed: u64,
        hist: Histogram<u64>,
        suites: Vec<String>,
        errors: Vec<String>,
    }
    let hist = Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let acc = Mutex::new(Acc { ok: 0, failed: 0, hist, suites: Vec::new(), errors: Vec::new() });
    let cpu0 = process_cpu_secs();
    let t0 = Instant::now();
    let deadline = t0 + cfg.duration;
    std::thread::scope(|sc| {
        for _ in 0..cfg.threads.max(1) {
            sc.spawn(|| {
                let Ok(mut hist) = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) else { return };
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut suites: Vec<String> = Vec::new();
                let mut errors: Vec<String> = Vec::new();
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match one_link(&cfg, &name, &request) {
                        Ok(s) => {
                            ok += 1;
                            let _ = hist.record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
                            if !suites.contains(&s) {
                                suites.push(s);
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            if errors.len() < 3 {
                                errors.push(e);
                            }
                        }
                    }
                }
                let Ok(mut a) = acc.lock() else { return };
                a.ok += ok;
                a.failed += failed;
                let _ = a.hist.add(&hist);
                for s in suites {
                    if !a.suites.contains(&s) {
                        a.suites.push(s);
                    }
                }
                for e in errors {
                    if a.errors.len() < 3 {
                        a.errors.push(e);
                    }
                }
            });
        }
    });
    stop.store(true, Ordering::Relaxed);
    let wall = t0.elapsed().as_secs_f64();
    let a = acc.into_inner().map_err(|_| "a client thread panicked".to_string())?;
    let ms = |q: f64| a.hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(HandshakeReport {
        ok: a.ok,
        failed: a.failed,
        wall_secs: wall,
        links_per_s: if wall > 0.0 { a.ok as f64 / wall } else { 0.0 },
        p50_ms: if a.ok > 0 { ms(0.5) } else { 0.0 },
        p99_ms: if a.ok > 0 { ms(0.99) } else { 0.0 },
        max_ms: if a.ok > 0 { a.hist.max() as f64 / 1000.0 } else { 0.0 },
        client_cpu_secs: process_cpu_secs() - cpu0,
        suites: a.suites,
        errors: a.errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_request_parses_as_a_main_link() {
        let b = link_request();
        let hdr: [u8; LINK_HEADER_LEN] = b[..LINK_HEADER_LEN].try_into().expect("header");
        let h = LinkHeader::parse(&hdr).expect("header parses");
        assert_eq!(h.size as usize, b.len() - LINK_HEADER_LEN);
        let m = LinkMess::parse(&b[LINK_HEADER_LEN..]).expect("mess parses");
        assert_eq!((m.connection_id, m.channel_type, m.channel_id), (0, crate::proto::channel::CH_MAIN, 0));
        assert!(m.common_caps.has(CAP_MINI_HEADER));
    }
}
