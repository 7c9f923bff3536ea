//! `vmcload`: load generator and endpoint apps for vmcrelay (and any SPICE
//! server with spicevmc channels).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use vmcrelay::load::endpoint::{Endpoint, EndpointConfig, EpMode, Listen};
use vmcrelay::load::run::{Limit, Mode, RunConfig, check_rate, default_timeout, run};
use vmcrelay::load::size::{MAX_MESSAGE_BYTES, SizeDist, parse_bytes, parse_duration};
use vmcrelay::load::target::{ChannelSel, Target};
use vmcrelay::load::{LoadError, demo};
use vmcrelay::relay::config::ServerAddr;
use vmcrelay::relay::sync_client::ClientTls;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_FAIL: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "vmcload",
    version,
    about = "Load generator for SPICE spicevmc channels: drives vmcrelay (or any SPICE server) and checks every byte",
    after_help = "Exit codes: 0 ok, 1 integrity or run failure, 2 usage error.\n\n\
        Start with `vmcload demo`; see `vmcload run --help` and `vmcload endpoint --help`."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open N client connections and move the seeded pattern (up, down, echo, rr).
    #[command(after_help = RUN_HELP)]
    Run(Box<RunArgs>),
    /// Be the local app behind the relay: sink, source or echo on a unix or TCP socket.
    #[command(after_help = ENDPOINT_HELP)]
    Endpoint(EndpointArgs),
    /// Link many sessions × channels, hold them idle, then check a sample still echoes.
    #[command(after_help = IDLE_HELP)]
    Idle(IdleArgs),
    /// Start vmcrelay with three endpoints, run up, down and rr, explain the figures.
    Demo(DemoArgs),
    /// TLS handshakes + SPICE link replies per second against a tls-port (fresh TCP + full handshake each).
    #[command(after_help = HANDSHAKE_HELP)]
    Handshake(HandshakeArgs),
}

const HANDSHAKE_HELP: &str = "\
Each link: TCP connect, a full TLS handshake (no resumption), a main-channel
SpiceLinkMess and the whole SpiceLinkReply (error 0), then close: the cost of
a new client before any password is judged (scripts/bench's TH row). Threads
link one after the other until --duration ends. Prints links/s and set-up
p50/p99; --json writes one object (ok, failed, wall, links_per_s, p50_ms,
p99_ms, max_ms, client_cpu, suites, errors). Exit 1 when no link succeeded.

EXAMPLE
  vmcload handshake --uri spice+tls://127.0.0.1:5931 --ca-file x509/ca-cert.pem -k 4 --duration 5s";

#[derive(Args, Debug)]
struct HandshakeArgs {
    /// The server's TLS port: spice+tls://HOST:PORT or spice://HOST?tls-port=PORT.
    #[arg(long, value_name = "URI")]
    uri: String,
    /// PEM CA file that signed the server's certificate.
    #[arg(long, value_name = "FILE")]
    ca_file: PathBuf,
    /// Client threads, each linking one after the other.
    #[arg(short = 'k', long, value_name = "K", default_value_t = 4)]
    concurrency: usize,
    /// How long to run (e.g. 5s, 500ms).
    #[arg(long, value_name = "D", default_value = "5s")]
    duration: String,
    /// Per-link timeout.
    #[arg(long, value_name = "D", default_value = "10s")]
    timeout: String,
    /// Write the figures as JSON to FILE (- for stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No human summary.
    #[arg(short, long)]
    quiet: bool,
}

const RUN_HELP: &str = "\
MODES
  up    client → endpoint bulk. Run the endpoint as `vmcload endpoint --mode sink --verify`;
        it checks the pattern. This side reports MiB/s and msgs/s sent.
  down  endpoint → client bulk (`--mode source` endpoint); this side checks every byte.
  echo  both ways at once through an `--mode echo` endpoint; this side checks what comes back
        and records each message's round trip.
  rr    request/response: send one message of SIZE, wait for SIZE bytes back (echo endpoint);
        round trips go into a histogram (p50, p90, p99, p99.9, max). With --rate, requests are
        paced open-loop and timed from when they were due.

CHANNELS (--channel, repeatable; connection i takes the i-th selected channel)
  port:NAME        the port channel whose PORT_INIT name is NAME (found by linking each port once)
  port:PREFIX*     every port channel whose name starts with PREFIX
  usbredir[:ID]    also smartcard, webdav, and user-defined 128..=255
  128[:ID]         with a single --channel, connection i uses id ID+i
  128:A-B | 128:*  an id range, or every announced channel of the type
  The relay (like spice-server) gives a channel to one client at a time, so N connections
  need N channels.

INTEGRITY
  Byte p of every stream is a splitmix64 of (seed, p/8): both sides generate or check any
  offset without storing anything. A wrong byte ends the run with exit code 1 and its offset.

EXAMPLES
  # the endpoint, then 5 s of 64 KiB uploads through the relay
  vmcload endpoint --unix-listen /tmp/sink.sock --mode sink --verify &
  vmcrelay serve --listen 127.0.0.1:5930 --disable-ticketing --channel 128=unix:/tmp/sink.sock &
  vmcload run --uri spice://127.0.0.1:5930 --channel 128 --mode up --size 64K --duration 5

  # 64-byte round trips on a port channel, 1000 per second, JSON for scripts
  vmcload run --uri spice://127.0.0.1:5930 --channel port:com.example.echo --mode rr --size 64 \\
      --rate 1000 --duration 10 --json rr.json

  # 100 connections over channels 128:0..99, mixed sizes
  vmcload run --uri spice://127.0.0.1:5930 --channel 128:0-99 --connections 100 --mode echo \\
      --sizes 64:0.9,65536:0.1 --bytes 16M

  # the no-relay ceiling: the same pattern straight into the endpoint
  vmcload run --raw-unix /tmp/sink.sock --mode up --size 64K --duration 5";

const ENDPOINT_HELP: &str = "\
Every accepted connection gets its own thread and starts at pattern offset 0. A line per
connection goes to stderr when it closes; totals go to stdout on SIGINT/SIGTERM (exit 0, or 1
if a wrong byte was seen). --json FILE is rewritten after every close and at exit.

EXAMPLES
  vmcload endpoint --unix-listen /run/vm1/app.sock --mode sink --verify --json sink.json
  vmcload endpoint --unix-listen /tmp/src.sock --mode source --size 64K
  vmcload endpoint --raw-tcp-listen 127.0.0.1:7000 --mode echo      # for run --raw-tcp / socat
  vmcload endpoint --unix /run/vm1/app.sock --mode echo --reconnect # relay has unix-listen:";

#[derive(Args, Debug)]
struct RunArgs {
    /// SPICE server, spice://HOST:PORT (or HOST:PORT); TLS: spice+tls://HOST:PORT or
    /// spice://HOST?tls-port=PORT (with --ca-file).
    #[arg(long, value_name = "URI", required_unless_present_any = ["raw_tcp", "raw_unix", "raw_tls"])]
    uri: Option<String>,
    /// Channel to use (repeatable): port:NAME, usbredir:0, 128[:ID], 128:A-B, 128:* (see below).
    #[arg(long, value_name = "SPEC", requires = "uri")]
    channel: Vec<String>,
    /// Read the SPICE password from the first line of FILE.
    #[arg(long, value_name = "FILE", requires = "uri")]
    password_file: Option<PathBuf>,
    /// Announce LZ4 and send COMPRESSED_DATA when it is smaller (the pattern rarely is).
    #[arg(long, requires = "uri")]
    lz4: bool,
    /// No SPICE: raw bytes over TCP to HOST:PORT (direct to an endpoint, or via socat).
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["uri", "raw_unix", "raw_tls"])]
    raw_tcp: Option<String>,
    /// No SPICE: raw bytes over a unix socket straight to the endpoint.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["uri", "raw_tcp", "raw_tls"])]
    raw_unix: Option<PathBuf>,
    /// No SPICE: raw bytes over TLS to HOST:PORT (e.g. stunnel in front of an endpoint; with --ca-file).
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["uri", "raw_tcp", "raw_unix"])]
    raw_tls: Option<String>,
    /// TLS: PEM file of the CA that signed the server's certificate (QEMU's x509-dir/ca-cert.pem);
    /// the host of the URI is checked against the certificate as spice-gtk does.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Concurrent connections (each its own session + channel, and thread).
    #[arg(short = 'c', long, default_value_t = 1, value_name = "N")]
    connections: usize,
    /// Message size (down: read size), e.g. 64, 64K, 1M.
    #[arg(long, value_name = "BYTES", default_value = "64K", conflicts_with = "sizes")]
    size: String,
    /// Message size distribution: 64,1024,65536 (uniform) or 64:0.9,65536:0.1 (weighted).
    #[arg(long, value_name = "DIST")]
    sizes: Option<String>,
    /// What moves where: up, down, echo, rr.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Stop each connection after N payload bytes (sent; down: received).
    #[arg(long, value_name = "N", conflicts_with = "duration")]
    bytes: Option<String>,
    /// Stop after S seconds (5, 2.5s, 500ms) [default: 5 s unless --bytes].
    #[arg(long, value_name = "S")]
    duration: Option<String>,
    /// Messages per second per connection, paced open-loop (not with down).
    #[arg(long, value_name = "MSGS_PER_S")]
    rate: Option<f64>,
    /// Pattern seed; the endpoint must use the same.
    #[arg(long, default_value_t = 1, value_name = "K")]
    seed: u64,
    /// Write one JSON object with every figure and the exact parameters (`-`: stdout).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Per-connection link timeout.
    #[arg(long, default_value = "10", value_name = "S")]
    connect_timeout: String,
    /// Give up on the whole run after S [default: duration + 40 s, or 600 s with --bytes].
    #[arg(long, value_name = "S")]
    timeout: Option<String>,
    /// No progress line.
    #[arg(short, long)]
    quiet: bool,
}

const IDLE_HELP: &str = "\
Session i goes to target i (one VM each: a SPICE server serves one session at a time) and links
its main channel, then channels TYPE:FIRST .. TYPE:FIRST+C-1 one after another; --concurrency
sessions link at once. Once all are linked (or failed) they are held with no traffic for --hold
seconds (default: until SIGINT/SIGTERM). Then every session and channel must still be open and
--echo-sample channels, spread over all, must echo --echo-bytes back (serve them with `echo:`
endpoints). Exit 0 only if every link was made, nothing closed and every sampled echo matched.

A held channel costs one socket here, a session three and a thread. RLIMIT_NOFILE is raised to
what the run needs (soft to hard; as root the hard limit too, up to /proc/sys/fs/nr_open); when it
cannot be, the run stops before linking and says so.

--json FILE is written twice: once every link is made (\"phase\": \"holding\", for a script that
measures the server while it holds) and at the end (\"phase\": \"done\").

EXAMPLES
  # 40 VMs on ports 6000..6039, each with 24 `128:N=echo:` channels; hold 30 s
  vmcload idle --target 127.0.0.1:6000-6039 --channels 24 --hold 30
  # two relays, until Ctrl-C
  vmcload idle --target 10.0.0.5:5930,10.0.0.6:5930 --channels 4 --json idle.json";

#[derive(Args, Debug)]
struct IdleArgs {
    /// Targets, one per session: HOST:PORT[,HOST:PORT...] or HOST:FIRST-LAST (repeatable).
    #[arg(long, value_name = "HOST:PORT", required = true)]
    target: Vec<String>,
    /// Sessions [default: one per target].
    #[arg(long, value_name = "N")]
    sessions: Option<usize>,
    /// Channels per session (besides main).
    #[arg(long, value_name = "C")]
    channels: usize,
    /// Channel type of every channel: 128..=255, usbredir, smartcard, webdav.
    #[arg(long, value_name = "TYPE", default_value = "128")]
    channel_type: String,
    /// Id of each session's first channel.
    #[arg(long, value_name = "ID", default_value_t = 0)]
    first_id: u8,
    /// Sessions linking at once.
    #[arg(short = 'k', long, value_name = "K", default_value_t = 8)]
    concurrency: usize,
    /// Seconds to hold once linked (0: none) [default: until SIGINT/SIGTERM].
    #[arg(long, value_name = "S")]
    hold: Option<String>,
    /// Read the SPICE password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Channels that must echo at the end (0: no echo check).
    #[arg(long, value_name = "N", default_value_t = 32)]
    echo_sample: usize,
    /// Bytes each sampled channel sends and must get back.
    #[arg(long, value_name = "BYTES", default_value = "64")]
    echo_bytes: String,
    /// Main-link timeout.
    #[arg(long, default_value = "10", value_name = "S")]
    connect_timeout: String,
    /// Stop linking once N links failed (then hold and check what is linked).
    #[arg(long, value_name = "N")]
    max_failed: Option<u64>,
    /// Write the report as JSON (`-`: stdout), once linked and at the end.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("where").required(true).args(["unix_listen", "unix", "raw_tcp_listen"]))]
struct EndpointArgs {
    /// Listen on a unix socket (the relay's `unix:PATH` endpoints connect here).
    #[arg(long, value_name = "PATH")]
    unix_listen: Option<PathBuf>,
    /// Connect to a unix socket (the relay's `unix-listen:PATH` endpoints).
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Listen on TCP for raw streams (run --raw-tcp, socat).
    #[arg(long, value_name = "HOST:PORT")]
    raw_tcp_listen: Option<String>,
    /// sink: read (and check); source: write the pattern; echo: send everything back.
    #[arg(long, value_enum)]
    mode: EpMode,
    /// Check incoming bytes against the pattern (sink, echo).
    #[arg(long)]
    verify: bool,
    /// Pattern seed.
    #[arg(long, default_value_t = 1, value_name = "K")]
    seed: u64,
    /// Write size in source mode.
    #[arg(long, default_value = "64K", value_name = "BYTES")]
    size: String,
    /// Source mode: stop after N bytes per connection (default: until the peer closes).
    #[arg(long, value_name = "N")]
    bytes: Option<String>,
    /// With --unix: connect again after each connection ends.
    #[arg(long, requires = "unix")]
    reconnect: bool,
    /// Rewrite FILE with the figures after every close and at exit.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// No per-connection lines.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Relay worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The vmcrelay binary [default: next to vmcload].
    #[arg(long, value_name = "PATH")]
    relay: Option<PathBuf>,
    /// Show the relay's log.
    #[arg(short, long)]
    verbose: bool,
}

/// A usage error (exit 2) rather than a failure (exit 1).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(m: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(m.into()))
}

fn from_load(e: LoadError) -> anyhow::Error {
    match e {
        LoadError::Usage(m) => usage(m),
        other => anyhow::Error::new(other),
    }
}

/// SIGINT/SIGTERM set the flag (a second one exits at once). The signals
/// are blocked in every thread and taken by one waiter thread, so no
/// handler code runs in signal context.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    std::thread::Builder::new().name("vmcload-signals".into()).stack_size(64 * 1024).spawn(move || {
        while set.wait().is_ok() {
            if s2.swap(true, Ordering::Relaxed) {
                std::process::exit(130);
            }
        }
    })?;
    Ok(stop)
}

fn size_arg(s: &str) -> anyhow::Result<usize> {
    let n = parse_bytes(s).map_err(usage)?;
    match usize::try_from(n) {
        Ok(n) if n > 0 && n <= MAX_MESSAGE_BYTES => Ok(n),
        _ => Err(usage(format!("size {s} must be 1..={MAX_MESSAGE_BYTES} bytes"))),
    }
}

fn cmd_run(a: RunArgs) -> anyhow::Result<bool> {
    let tls_for = |host: &str| -> anyhow::Result<ClientTls> {
        let ca =
            a.ca_file.as_ref().ok_or_else(|| usage("TLS needs --ca-file FILE (the CA of the server's certificate)"))?;
        let config = vmcrelay::tls::client_config(&vmcrelay::tls::ClientTlsOptions::with_ca_file(ca))
            .map_err(|e| usage(e.to_string()))?;
        Ok(ClientTls { config, host: host.to_string() })
    };
    let is_tls_uri = a.uri.as_deref().is_some_and(|u| u.starts_with("spice+tls://") || u.contains("tls-port="));
    if a.ca_file.is_some() && !is_tls_uri && a.raw_tls.is_none() {
        return Err(usage(
            "--ca-file applies to TLS only: spice+tls://HOST:PORT, spice://HOST?tls-port=PORT or --raw-tls",
        ));
    }
    let target = match (&a.uri, &a.raw_tcp, &a.raw_unix) {
        (Some(uri), None, None) => {
            let (addr, tls) = if is_tls_uri {
                match vmcrelay::relay::config::parse_spice_uri(uri).map_err(usage)? {
                    ServerAddr::Tls { addr, host } => (addr.to_string(), Some(tls_for(&host)?)),
                    _ => {
                        return Err(usage(format!(
                            "--uri {uri}: write spice+tls://HOST:PORT or spice://HOST?tls-port=PORT"
                        )));
                    }
                }
            } else {
                (uri.strip_prefix("spice://").unwrap_or(uri).trim_end_matches('/').to_string(), None)
            };
            if addr.is_empty() || !addr.contains(':') {
                return Err(usage(format!("--uri {uri}: write spice://HOST:PORT")));
            }
            if a.channel.is_empty() {
                return Err(usage("give --channel SPEC (e.g. --channel 128 or --channel port:NAME)"));
            }
            let channels =
                a.channel.iter().map(|c| ChannelSel::parse(c)).collect::<Result<Vec<_>, _>>().map_err(usage)?;
            let password = match &a.password_file {
                Some(f) => vmcrelay::relay::config::read_password_file(f).map_err(usage)?,
                None => Vec::new(),
            };
            Target::Spice { addr, password, channels, lz4: a.lz4, tls }
        }
        (None, Some(t), None) => Target::RawTcp(t.clone()),
        (None, None, Some(p)) => Target::RawUnix(p.clone()),
        (None, None, None) if a.raw_tls.is_some() => {
            let t = a.raw_tls.clone().unwrap_or_default();
            let host = t.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')).unwrap_or(&t);
            let tls = tls_for(host)?;
            Target::RawTls(t, tls)
        }
        _ => return Err(usage("give exactly one of --uri, --raw-tcp, --raw-unix, --raw-tls")),
    };
    let sizes = match &a.sizes {
        Some(d) => SizeDist::parse(d).map_err(usage)?,
        None => SizeDist::fixed(size_arg(&a.size)?),
    };
    if a.mode == Mode::Down && !sizes.is_fixed() {
        return Err(usage(
            "--sizes does not apply to down (the endpoint chooses its writes); use --size for the read size",
        ));
    }
    let rate = match a.rate {
        Some(_) if a.mode == Mode::Down => return Err(usage("--rate does not apply to down: the endpoint sends")),
        Some(r) => Some(check_rate(r).map_err(usage)?),
        None => None,
    };
    let limit = match (&a.bytes, &a.duration) {
        (Some(b), _) => Limit::Bytes(parse_bytes(b).map_err(usage)?),
        (None, Some(d)) => Limit::Duration(parse_duration(d).map_err(usage)?),
        (None, None) => Limit::Duration(Duration::from_secs(5)),
    };
    if a.connections == 0 || a.connections > 100_000 {
        return Err(usage("--connections must be 1..=100000"));
    }
    let connect_timeout = parse_duration(&a.connect_timeout).map_err(usage)?;
    let timeout = match &a.timeout {
        Some(t) => parse_duration(t).map_err(usage)?,
        None => default_timeout(limit, connect_timeout),
    };
    let stop = stop_on_signals()?;
    let cfg = RunConfig {
        target,
        connections: a.connections,
        sizes,
        mode: a.mode,
        limit,
        rate,
        seed: a.seed,
        connect_timeout,
        timeout,
        progress: !a.quiet,
    };
    let report = run(cfg, stop).map_err(from_load)?;
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => println!("{json}"),
        Some(p) => {
            vmcrelay::load::endpoint::write_atomic(p, &json).map_err(from_load)?;
            print!("{}", report.human());
        }
        None => print!("{}", report.human()),
    }
    Ok(report.ok)
}

fn cmd_endpoint(a: EndpointArgs) -> anyhow::Result<bool> {
    let listen = match (a.unix_listen, a.unix, a.raw_tcp_listen) {
        (Some(p), None, None) => Listen::UnixListen(p),
        (None, Some(p), None) => Listen::Unix(p),
        (None, None, Some(t)) => Listen::TcpListen(t),
        _ => return Err(usage("give exactly one of --unix-listen, --unix, --raw-tcp-listen")),
    };
    let cfg = EndpointConfig {
        listen,
        mode: a.mode,
        verify: a.verify,
        seed: a.seed,
        size: size_arg(&a.size)?,
        bytes: a.bytes.as_deref().map(parse_bytes).transpose().map_err(usage)?,
        reconnect: a.reconnect,
        json: a.json,
        quiet: a.quiet,
    };
    let stop = stop_on_signals()?;
    let ep = Endpoint::bind(cfg).map_err(from_load)?;
    if let Some(addr) = ep.local_tcp_addr() {
        eprintln!("vmcload endpoint: listening on tcp {addr}");
    }
    let served = ep.serve(&stop);
    let report = ep.report();
    ep.write_json().map_err(from_load)?;
    println!("{}", report.human());
    served.map_err(from_load)?;
    Ok(report.integrity != "mismatch")
}

fn cmd_idle(a: IdleArgs) -> anyhow::Result<bool> {
    use vmcrelay::load::idle;
    let targets = idle::parse_targets(&a.target).map_err(usage)?;
    let sessions = a.sessions.unwrap_or(targets.len());
    if sessions == 0 || sessions > targets.len() {
        return Err(usage(format!(
            "--sessions {sessions}: give 1..={} (one session per target; a SPICE server serves one session at a \
             time, a second replaces the first)",
            targets.len()
        )));
    }
    if a.channels == 0 || usize::from(a.first_id) + a.channels > 256 {
        return Err(usage(format!("--channels {} from id {}: ids must fit in 0..=255", a.channels, a.first_id)));
    }
    let channel_type = match ChannelSel::parse(&a.channel_type).map_err(usage)? {
        ChannelSel::From { channel_type, first: 0 } => channel_type,
        _ => return Err(usage(format!("--channel-type {}: give a type only (128, usbredir, ...)", a.channel_type))),
    };
    if a.concurrency == 0 {
        return Err(usage("--concurrency must be at least 1"));
    }
    let hold = match a.hold.as_deref() {
        Some(h) if matches!(h.trim(), "0" | "0s" | "0.0") => Some(Duration::ZERO),
        h => h.map(parse_duration).transpose().map_err(usage)?,
    };
    let echo_bytes = size_arg(&a.echo_bytes)?;
    let password = match &a.password_file {
        Some(f) => vmcrelay::relay::config::read_password_file(f).map_err(usage)?,
        None => Vec::new(),
    };
    let connect_timeout = parse_duration(&a.connect_timeout).map_err(usage)?;
    let fd_limit = idle::raise_nofile(idle::fds_needed(sessions, a.channels));
    if !a.quiet {
        eprintln!("vmcload idle: fd limit {} (need ≈{}): {}", fd_limit.soft, fd_limit.need, fd_limit.note);
    }
    if !fd_limit.enough() {
        return Err(anyhow::anyhow!(
            "{sessions} sessions × (main + {} channels) need ≈{} file descriptors here but RLIMIT_NOFILE is {} \
             ({}); raise it (ulimit -n / -Hn, LimitNOFILE=) or run fewer sessions",
            a.channels,
            fd_limit.need,
            fd_limit.soft,
            fd_limit.note
        ));
    }
    let cfg = idle::IdleConfig {
        targets,
        sessions,
        channels: a.channels,
        channel_type,
        first_id: a.first_id,
        concurrency: a.concurrency,
        hold,
        password,
        connect_timeout,
        echo_sample: a.echo_sample,
        echo_bytes,
        max_failed: a.max_failed.filter(|&m| m > 0),
        progress: !a.quiet,
    };
    let stop = stop_on_signals()?;
    let mut write_err = None;
    let json = a.json.clone();
    let rep = idle::idle(&cfg, fd_limit, &stop, &mut |r| {
        if let Some(p) = json.as_deref().filter(|p| p.as_os_str() != "-")
            && let Err(e) = idle::write_report(p, r)
        {
            write_err = Some(e);
        }
    })
    .map_err(from_load)?;
    if let Some(e) = write_err {
        return Err(from_load(e));
    }
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => idle::write_report(p, &rep).map_err(from_load)?,
        Some(p) => {
            idle::write_report(p, &rep).map_err(from_load)?;
            print!("{}", rep.human());
        }
        None => print!("{}", rep.human()),
    }
    Ok(rep.ok)
}

fn cmd_demo(a: DemoArgs) -> anyhow::Result<bool> {
    if !(a.seconds > 0.0 && a.seconds <= 600.0) {
        return Err(usage("--seconds must be in (0, 600]"));
    }
    let relay = match a.relay {
        Some(r) => r,
        None => std::env::current_exe().context("locating vmcload")?.with_file_name("vmcrelay"),
    };
    let cfg = demo::DemoConfig { relay, seconds: a.seconds, workers: a.workers.max(1), verbose: a.verbose };
    demo::demo(&cfg).map_err(from_load)
}

fn cmd_handshake(a: HandshakeArgs) -> anyhow::Result<bool> {
    use vmcrelay::load::handshake::{HandshakeConfig, run_handshakes};
    let (addr, host) = match vmcrelay::relay::config::parse_spice_uri(&a.uri).map_err(usage)? {
        ServerAddr::Tls { addr, host } => (addr, host),
        _ => return Err(usage(format!("--uri {}: write spice+tls://HOST:PORT or spice://HOST?tls-port=PORT", a.uri))),
    };
    if a.concurrency == 0 {
        return Err(usage("--concurrency must be at least 1"));
    }
    let duration = parse_duration(&a.duration).map_err(usage)?;
    let timeout = parse_duration(&a.timeout).map_err(usage)?;
    let tls = vmcrelay::tls::client_config(&vmcrelay::tls::ClientTlsOptions::with_ca_file(&a.ca_file))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = HandshakeConfig { addr, host, tls, threads: a.concurrency, duration, timeout };
    let r = run_handshakes(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    if !a.quiet {
        eprintln!(
            "vmcload handshake: {} ok, {} failed in {:.2} s: {:.1} links/s, set-up p50 {:.2} ms p99 {:.2} ms max {:.2} \
             ms, client CPU {:.2} s, {}",
            r.ok,
            r.failed,
            r.wall_secs,
            r.links_per_s,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.client_cpu_secs,
            r.suites.join(", ")
        );
        for e in &r.errors {
            eprintln!("  error: {e}");
        }
    }
    match a.json.as_deref() {
        Some(p) if p == std::path::Path::new("-") => println!("{}", r.to_json()),
        Some(p) => std::fs::write(p, r.to_json() + "\n")?,
        None => {}
    }
    Ok(r.ok > 0)
}

fn main() -> ExitCode {
    // No transparent huge pages: mimalloc asks for them on its arenas, and
    // with a thread per connection each thread's first pages then fault in
    // (and zero) 2 MiB at a time: a burst of 100 connections spent 2.3 s
    // of system time in clear_page. Best effort (an old kernel refuses).
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(*a),
        Cmd::Endpoint(a) => cmd_endpoint(a),
        Cmd::Idle(a) => cmd_idle(a),
        Cmd::Demo(a) => cmd_demo(a),
        Cmd::Handshake(a) => cmd_handshake(a),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAIL),
        Err(e) if e.is::<Usage>() => {
            eprintln!("vmcload: {e}\n(see vmcload --help)");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("vmcload: {e:#}");
            ExitCode::from(EXIT_FAIL)
        }
    }
}
