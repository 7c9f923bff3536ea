//! `vmcrelay`: a SPICE relay for spicevmc channels (usbredir, port, webdav,
//! smartcard, user-defined types 128..=255).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmcrelay::relay::config::{self, BusyPolicy, Limits, ServeConfig, Service};
use vmcrelay::relay::worker::{ConnectOptions, ServerAddr};
use vmcrelay::relay::{log, serve};

#[path = "vmcrelay/ops.rs"]
mod ops;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit codes: 0 success, 1 runtime failure (`connect`: cannot reach the
/// server, or it is not SPICE), 2 usage or configuration error (in every
/// mode), 3 start-up failure (io_uring, listen address, endpoint socket),
/// 4 the server refused the password.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;
const EXIT_STARTUP: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "vmcrelay",
    version,
    about = "Relay SPICE spicevmc channels (usbredir, port, webdav, user-defined) between SPICE clients and local sockets",
    long_about = "vmcrelay carries SPICE spicevmc channels outside QEMU's main loop, on one io_uring per core.\n\n\
        `serve` is a SPICE server: remote-viewer or any spice-gtk client connects to it, and each \
        channel is spliced to a local endpoint (QEMU chardev socket, char device, FIFO, any app).",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage/configuration error, 3 start-up failure, \
        4 wrong password (connect)."
)]
struct Cli {
    /// Log verbosity: -q errors and warnings only, -v debug.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Log lines as `text` (grep-able) or `json` (one object per line, the same fields) [default: text,
    /// or `log-format` under [relay] in the config file].
    #[arg(long, value_enum, value_name = "FORMAT", global = true)]
    log_format: Option<log::LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve spicevmc channels to SPICE clients, each spliced to a local endpoint.
    #[command(help_template = help_template(SERVE_HELP))]
    Serve(Box<ServeArgs>),
    /// Serve a built-in demo on 127.0.0.1 (echo, sink and a type-128 channel), drive it for a few seconds, keep serving.
    Demo(DemoArgs),
    /// Log into a SPICE server (QEMU) and end chosen channels in local unix sockets.
    #[command(help_template = help_template(CONNECT_HELP))]
    Connect(ConnectArgs),
    /// Write the man pages (vmcrelay.1 and one per subcommand, e.g. vmcrelay-serve.1).
    Man(ManArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) to stdout.
    Completions(CompletionsArgs),
}

/// Where `man` and `completions` output goes on a typical system.
const MAN_HELP: &str = "\
Install:  vmcrelay man --dir /usr/local/share/man/man1 && mandb -q
Read one without installing:  vmcrelay man | man -l -";

#[derive(Args, Debug)]
#[command(after_help = MAN_HELP)]
struct ManArgs {
    /// Directory to write every page into (created if missing) [default: print vmcrelay.1 to stdout].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

const COMPLETIONS_HELP: &str = "\
Install:
  bash  vmcrelay completions bash > /usr/local/share/bash-completion/completions/vmcrelay
  zsh   vmcrelay completions zsh > /usr/local/share/zsh/site-functions/_vmcrelay
  fish  vmcrelay completions fish > ~/.config/fish/completions/vmcrelay.fish";

#[derive(Args, Debug)]
#[command(after_help = COMPLETIONS_HELP)]
struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `vmcrelay man` and `vmcrelay completions`.
fn ops_main(cmd: Cmd) -> ExitCode {
    use clap::CommandFactory;
    match cmd {
        Cmd::Man(a) => {
            match ops::man(Cli::command(), &[("serve", SERVE_HELP), ("connect", CONNECT_HELP)], a.dir.as_deref()) {
                Ok(written) => {
                    for w in written {
                        println!("{w}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vmcrelay: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Cmd::Completions(a) => match ops::completions(Cli::command(), a.shell) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmcrelay: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        _ => ExitCode::from(EXIT_CONFIG),
    }
}

/// clap's default layout with `text` after the options, verbatim: clap
/// rewraps `after_help` to the terminal's width, which breaks command
/// lines in the middle; literal template text is printed as written (every
/// line of it fits 80 columns).
fn help_template(text: &str) -> String {
    format!("{{before-help}}{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{{all-args}}\n\n{text}")
}

/// Mode, owner and group of the unix-listen sockets (serve and connect).
#[derive(Args, Debug)]
struct SocketArgs {
    /// Permission bits of every unix-listen socket, in octal [default: 0660: owner and group may connect].
    #[arg(long, value_name = "MODE", value_parser = config::parse_socket_mode)]
    socket_mode: Option<u32>,
    /// Owner (user name or uid) of every unix-listen socket [default: vmcrelay's user].
    #[arg(long, value_name = "USER", value_parser = config::parse_socket_owner)]
    socket_owner: Option<u32>,
    /// Group (name or gid) of every unix-listen socket [default: vmcrelay's group].
    #[arg(long, value_name = "GROUP", value_parser = config::parse_socket_group)]
    socket_group: Option<u32>,
}

impl SocketArgs {
    fn apply(&self, p: &mut config::SocketPerms) {
        if let Some(m) = self.socket_mode {
            p.mode = m;
        }
        if let Some(o) = self.socket_owner {
            p.owner = Some(o);
        }
        if let Some(g) = self.socket_group {
            p.group = Some(g);
        }
    }
}

const CONNECT_HELP: &str = "\
CHANNEL SPECS (--channel, repeatable): KIND[:ID]=LOCAL
  KIND    port:NAME (found by its PORT_INIT name) | usbredir[:ID] | webdav
          | smartcard | 128..=255
  LOCAL   unix-listen:PATH  vmcrelay listens; one local app at a time talks
                            to the channel
          unix:PATH         vmcrelay connects to a local app (e.g. a usbredir
                            host)
A unix-listen channel is linked when its local app connects (one app at a
time). When the app leaves, server bytes are dropped (counted) and the SPICE
channel closes once the server has been quiet for --linger-ms, so QEMU never
loses a channel with input of ours still unread (spice-server 0.15.1 crashes
then); the next app gets a fresh link (QEMU's monitor greets anew). Bytes of
an app that hung up before its channel was linked are discarded, never sent.
With --eager every channel is linked when the session starts and server
bytes wait (back-pressure, nothing dropped) until the first app connects.
unix:/file: local ends are opened before the SPICE link; while one is
missing it is retried with backoff and nothing is linked. Port channels are
found by their PORT_INIT name: each port is linked briefly once per session
to learn it, and the log names configured ports the server does not have.

unix-listen sockets get --socket-mode (default 0660), --socket-owner and
--socket-group; a missing directory is created (0755); the sockets are
removed when vmcrelay exits.

EXAMPLES
  # QMP over SPICE; QEMU runs with
  #   -chardev spiceport,id=qmp0,name=org.qemu.monitor.qmp.0
  #   -mon chardev=qmp0,mode=control
  vmcrelay connect spice://127.0.0.1:5930 \\
      --channel port:org.qemu.monitor.qmp.0=unix-listen:/run/me/qmp.sock
  socat - UNIX-CONNECT:/run/me/qmp.sock   # type {\"execute\":\"qmp_capabilities\"}

  # a USB redirection slot ending in a local usbredir host
  vmcrelay connect spice://host:5930 --password-file ~/.vm1.pass \\
      --channel usbredir:0=unix:/run/usbredir-host.sock

  # the server's channels and port names
  vmcrelay connect spice://127.0.0.1:5930 --list

Exit codes: 0 stopped by SIGTERM/SIGINT (or --list done); 1 cannot reach
the server, or it is not a SPICE server (--list; without it, connect keeps
retrying); 2 usage or configuration error (URI, channel spec, password
file), in every mode; 3 start-up failure (a local socket); 4 the server
refused the password (never retried).";

#[derive(Args, Debug)]
struct ConnectArgs {
    /// spice://HOST:PORT, spice://HOST?port=PORT or spice+unix:///PATH.
    uri: String,
    /// Read the SPICE password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the SPICE password from environment variable VAR.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// A channel and where it ends locally (repeatable): KIND[:ID]=LOCAL.
    #[arg(long, value_name = "SPEC")]
    channel: Vec<String>,
    /// Print the server's channels (type, id, port names) and exit.
    #[arg(long)]
    list: bool,
    /// --list: seconds to wait for the server's answers.
    #[arg(long, default_value_t = 10, hide = true)]
    timeout_secs: u64,
    #[command(flatten)]
    socket: SocketArgs,
    /// Announce LZ4 on pass-through channels (the server compresses large payloads).
    #[arg(long)]
    lz4: bool,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30)]
    max_backoff_secs: u64,
    /// Link every channel when the session starts; server bytes wait until the local app connects.
    #[arg(long)]
    eager: bool,
    /// Keep unix-listen channels linked for the whole session: local apps come and go as PORT_EVENT
    /// opened/closed, server bytes while no app is there are dropped. QEMU's monitor does not restart
    /// on PORT_EVENT, so for QMP only the first app gets the greeting: leave this off for QMP.
    #[arg(long)]
    keep_linked: bool,
    /// After a local app leaves, its SPICE channel closes once the server has been quiet this long
    /// (closing earlier can crash QEMU's spice-server 0.15.1 while it still has input of ours).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    linger_ms: u64,
    /// Seconds between `stats` log lines (links, bytes each way, MiB/s; 0: none).
    #[arg(long, value_name = "S", default_value_t = 60)]
    stats_secs: u64,
    /// TLS (spice+tls:// or ?tls-port=): PEM file of the CA that signed the server's certificate
    /// (QEMU's x509-dir/ca-cert.pem; spice-gtk's ca-file). Required with TLS.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// TLS: accept the server by its certificate subject instead of the host name, e.g.
    /// "C=XX,O=test,CN=my-vm" (spice-gtk's cert-subject, remote-viewer --spice-host-subject).
    #[arg(long, value_name = "SUBJECT")]
    cert_subject: Option<String>,
}

const EXIT_AUTH: u8 = 4;
/// `connect`: the server's TLS certificate did not verify (never retried).
const EXIT_TLS_VERIFY: u8 = 5;

/// The TLS client configuration `connect` needs for `server`, if any.
fn connect_tls(
    server: &ServerAddr,
    ca_file: Option<&std::path::Path>,
    cert_subject: Option<&str>,
) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, String> {
    if !server.is_tls() {
        if ca_file.is_some() || cert_subject.is_some() {
            return Err(format!(
                "--ca-file/--cert-subject apply to TLS only; write spice+tls://HOST:PORT or \
                 spice://HOST?tls-port=PORT (not {server})"
            ));
        }
        return Ok(None);
    }
    let ca = ca_file.ok_or_else(|| {
        format!("{server} is TLS: give --ca-file FILE, the CA that signed its certificate (QEMU: x509-dir/ca-cert.pem)")
    })?;
    let mut opts = vmcrelay::tls::ClientTlsOptions::with_ca_file(ca);
    opts.cert_subject = cert_subject.map(str::to_string);
    vmcrelay::tls::client_config(&opts).map(Some).map_err(|e| e.to_string())
}

fn parse_uri(uri: &str) -> Result<ServerAddr, String> {
    config::parse_spice_uri(uri)
}

/// Why `--list` failed, with its exit code.
fn list_failure(addr: &str, e: &vmcrelay::relay::sync_client::ClientError) -> (u8, String) {
    use vmcrelay::proto::client_link::ClientLinkFailure;
    use vmcrelay::proto::link::LinkErrorCode;
    use vmcrelay::relay::sync_client::ClientError;
    match e {
        ClientError::Link(
            ClientLinkFailure::Result(LinkErrorCode::PermissionDenied)
            | ClientLinkFailure::ErrorReply(LinkErrorCode::PermissionDenied),
        ) => (
            EXIT_AUTH,
            format!(
                "{addr} refused the password ({}); check --password-file or --password-env",
                LinkErrorCode::PermissionDenied
            ),
        ),
        ClientError::Link(f) => (EXIT_RUNTIME, format!("{addr}: {f}")),
        ClientError::LinkEof => (
            EXIT_RUNTIME,
            format!(
                "{addr} closed the connection without a SPICE link reply: not a SPICE server, \
                 or a TLS-only port (write spice+tls://HOST:PORT or spice://HOST?tls-port=PORT with --ca-file)"
            ),
        ),
        ClientError::TlsVerify(m) => (
            EXIT_TLS_VERIFY,
            format!(
                "{m}; check --ca-file (the CA that signed the server's certificate; QEMU: x509-dir/ca-cert.pem), \
                 the host in the URI (it must be in the certificate's subjectAltName) or --cert-subject"
            ),
        ),
        ClientError::Connect { .. } | ClientError::NoAnswer { .. } => (EXIT_RUNTIME, e.to_string()),
        other => (EXIT_RUNTIME, format!("{addr}: {other}")),
    }
}

fn list_channels(
    addr: &ServerAddr,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    password: &[u8],
    timeout: std::time::Duration,
) -> Result<(), (u8, String)> {
    use vmcrelay::relay::sync_client::{ClientTls, Session};
    let (sa, tls) = match (addr, tls) {
        (ServerAddr::Tcp(sa), _) => (*sa, None),
        (ServerAddr::Tls { addr, host }, Some(config)) => (*addr, Some(ClientTls { config, host: host.clone() })),
        _ => return Err((EXIT_CONFIG, "--list supports spice://, spice+tls:// and ?tls-port= addresses".into())),
    };
    let s =
        Session::connect_tls(&sa.to_string(), tls, password, timeout).map_err(|e| list_failure(&sa.to_string(), &e))?;
    println!("session {:#010x} on {addr}", s.session_id);
    println!("{:<10} {:>3}  port name", "type", "id");
    println!("{:<10} {:>3}  (this session's own channel)", "main", 0);
    for &(t, id) in &s.channels {
        let name = vmcrelay::proto::channel::ChannelKind::of(t).map_or_else(|| t.to_string(), |k| k.to_string());
        let port = if t == vmcrelay::proto::channel::CH_PORT || t == vmcrelay::proto::channel::CH_WEBDAV {
            match s.open(t, id, false) {
                Ok(mut ch) => match ch
                    .reader
                    .set_read_timeout(Some(timeout))
                    .map_err(Into::into)
                    .and_then(|()| ch.reader.wait_port_state())
                {
                    Ok(opened) => format!(
                        "{}{}",
                        ch.reader.port_name.clone().unwrap_or_default(),
                        if opened { "" } else { "  (closed on the host side)" }
                    ),
                    Err(e) => format!("? ({e})"),
                },
                Err(e) => format!("? ({e})"),
            }
        } else {
            String::new()
        };
        println!("{name:<10} {id:>3}  {port}");
    }
    s.close();
    Ok(())
}

fn connect_password(a: &ConnectArgs) -> Result<Vec<u8>, String> {
    match (&a.password_file, &a.password_env) {
        (Some(f), None) => config::read_password_file(f),
        (None, Some(v)) => config::read_password_env(v),
        (None, None) => Ok(Vec::new()),
        _ => Err("choose one of --password-file and --password-env".into()),
    }
}

fn connect_config(a: &ConnectArgs) -> Result<(ServeConfig, ConnectOptions), String> {
    let server = parse_uri(&a.uri)?;
    let password = connect_password(a)?;
    let tls = connect_tls(&server, a.ca_file.as_deref(), a.cert_subject.as_deref())?;
    let opts = ConnectOptions {
        server,
        password,
        lz4: a.lz4,
        max_backoff: std::time::Duration::from_secs(a.max_backoff_secs.max(1)),
        eager: a.eager,
        keep_linked: a.keep_linked,
        linger: std::time::Duration::from_millis(a.linger_ms),
        tls,
    };
    let channels = config::parse_channels(a.channel.iter().map(|c| (c.as_str(), "--channel".to_string())))
        .map_err(|e| e.to_string())?;
    let mut cfg = ServeConfig {
        services: vec![Service {
            name: "connect".into(),
            listen: Vec::new(),
            tls_listen: Vec::new(),
            tls: None,
            security: Default::default(),
            password: None,
            channels,
            upstream: None,
            upstream_tls: None,
            busy: None,
            removed: false,
        }],
        limits: Limits { workers: 1, max_conns_per_worker: 64, stats_secs: a.stats_secs, ..Limits::default() },
    };
    a.socket.apply(&mut cfg.limits.socket);
    cfg.validate()?;
    Ok((cfg, opts))
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Port on 127.0.0.1 [default: 5930, or a free one if that is taken; 0: a free one].
    #[arg(long)]
    port: Option<u16>,
    /// Seconds of built-in load per figure before serving (0: skip).
    #[arg(long, default_value_t = 2)]
    drive_secs: u64,
}

/// Drives the demo relay with vmcrelay's own client for a few seconds and
/// prints what it measured and what each figure means.
fn demo_drive(addr: String, secs: u64) {
    use std::time::{Duration, Instant};
    use vmcrelay::relay::sync_client::Session;
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        match Session::connect(&addr, b"", Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                eprintln!("demo: cannot reach the relay at {addr}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let run = || -> Result<(f64, u64, u64), String> {
        let ch = session.open(128, 0, false).map_err(|e| e.to_string())?;
        let (mut w, mut r) = (ch.writer, ch.reader);
        // Echo bulk: a writer thread and this reader, the same bytes checked on return.
        let msg: Vec<u8> = (0..65536u32).map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[2]).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop2, m2) = (std::sync::Arc::clone(&stop), msg.clone());
        let writer = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                if w.send(&m2).is_err() {
                    break;
                }
                sent += m2.len() as u64;
            }
            (w, sent)
        });
        let t = Instant::now();
        let mut got = vec![0u8; msg.len()];
        let mut received = 0u64;
        while t.elapsed() < Duration::from_secs(secs) {
            let mut have = 0;
            while have < got.len() {
                let n = r.read(&mut got[have..]).map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("relay closed the channel".into());
                }
                have += n;
            }
            if got != msg {
                return Err("echoed bytes differ".into());
            }
            received += got.len() as u64;
        }
        let mib_s = received as f64 / (1024.0 * 1024.0) / t.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Drain what is still in flight so the writer can finish.
        let (mut w, sent) = writer.join().map_err(|_| "writer panicked".to_string())?;
        let mut left = sent - received;
        while left > 0 {
            let n = r.read(&mut got).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n as u64);
        }
        // Request/response: 64 bytes out, wait for them back.
        let mut h = hdrhistogram::Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
        let small = [7u8; 64];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            let s = Instant::now();
            w.send(&small).map_err(|e| e.to_string())?;
            let mut have = 0;
            let mut b = [0u8; 64];
            while have < 64 {
                have += r.read(&mut b[have..]).map_err(|e| e.to_string())?;
            }
            let _ = h.record(u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        Ok((mib_s, h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
    };
    match run() {
        Ok((mib_s, p50, p99)) => println!(
            "demo load through the relay (vmcrelay's own client, channel 128 → built-in echo, {secs} s each):\n\
             \x20 echo, 64 KiB messages   {mib_s:8.1} MiB/s each way   bytes sent to the relay, echoed by the endpoint and checked on return\n\
             \x20 request/response, 64 B  p50 {p50} µs, p99 {p99} µs   time from sending 64 bytes to their echo arriving (client → relay → endpoint → back)\n\
             \x20 (client, relay and endpoint share this machine's cores; scripts/bench compares against other relays)\n"
        ),
        Err(e) => eprintln!("demo: built-in load failed: {e}"),
    }
    session.close();
}

/// The demo's built-in service: a port channel that echoes, one that
/// discards, and a user-defined channel 128 that echoes.
fn demo_config(a: &DemoArgs) -> Result<ServeConfig, String> {
    let port = match a.port {
        Some(p) if p != 0 => p,
        _ => std::net::TcpListener::bind("127.0.0.1:5930")
            .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?,
    };
    let specs = ["port:org.vmcrelay.echo.0=echo:", "port:org.vmcrelay.sink.0=sink:", "128=echo:"];
    let channels = config::parse_channels(specs.iter().map(|s| (*s, "demo".to_string()))).map_err(|e| e.to_string())?;
    let listen = vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))];
    let cfg = ServeConfig {
        services: vec![Service {
            name: "demo".into(),
            listen,
            tls_listen: Vec::new(),
            tls: None,
            security: Default::default(),
            password: None,
            channels,
            upstream: None,
            upstream_tls: None,
            busy: None,
            removed: false,
        }],
        limits: Limits { workers: 1, max_conns_per_worker: 64, ..Limits::default() },
    };
    cfg.validate()?;
    eprintln!(
        "vmcrelay demo: a SPICE server on 127.0.0.1:{port} (no password) with three channels:\n\
         \x20 port org.vmcrelay.echo.0  echoes every byte back\n\
         \x20 port org.vmcrelay.sink.0  discards what it gets\n\
         \x20 128 (user-defined)        echoes; only vmcrelay's own client opens it\n\
         Attach a real client:  remote-viewer spice://127.0.0.1:{port}   (or: spicy -h 127.0.0.1 -p {port})\n\
         Scripted check:  /usr/bin/python3 tests/interop/gtk_client.py port-echo --uri spice://127.0.0.1:{port} \\\n\
         \x20                  --port-name org.vmcrelay.echo.0 --bytes 16777216\n\
         Stop with Ctrl-C. Log lines below: one per link and per close.\n"
    );
    Ok(cfg)
}

const SERVE_HELP: &str = "\
CHANNEL SPECS (--channel, repeatable): KIND[:ID]=ENDPOINT
  KIND      usbredir | smartcard | webdav | port:NAME
            | 128..=255 (user-defined, vmcrelay's own)
  ID        channel id within its type; default: the next free one
  ENDPOINT  unix:PATH         connect to a unix socket
                              (QEMU -chardev socket,server=on,wait=off)
            unix-listen:PATH  listen; QEMU or the app connects to vmcrelay
            file:PATH         a char device (/dev/virtio-ports/NAME) or FIFO
            tcp:HOST:PORT     connect over TCP
            echo: | sink:     built-in, for demos and tests
unix-listen sockets get --socket-mode (default 0660), --socket-owner and
--socket-group; a missing directory is created (0755); the sockets are
removed when vmcrelay exits.

EXAMPLES
  # one VM, no password, QMP and a USB redirection slot
  vmcrelay serve --listen 127.0.0.1:5930 --disable-ticketing \\
      --channel usbredir:0=unix:/run/vm1/ur0.sock \\
      --channel port:org.qemu.monitor.qmp.0=unix:/run/vm1/qmp.sock
  remote-viewer spice://127.0.0.1:5930

  # a password from a file; channel 128 ends where the host app connects
  vmcrelay serve --listen 0.0.0.0:5930 \\
      --password-file /etc/vmcrelay/vm1.pass \\
      --channel 128=unix-listen:/run/vm1/app.sock

  # a whole host from a config file (see README)
  vmcrelay serve --config /etc/vmcrelay/host.toml

Logs go to stderr, one line per link and per close (grep `link ` / `close `).
SIGTERM or SIGINT: stop accepting, flush accepted data, close, exit 0.
SIGHUP (systemctl reload): read --config FILE again, with the flags over
it: new services and channels start, removed ones drain, changed endpoints
apply to the next link, linked sessions are untouched; a bad file is
refused (FILE:LINE logged) and the running configuration keeps serving.
workers, max-conns-per-worker, buffer-kib, max-payload-kib, data-path,
key-reuse, log-format and metrics need a restart. TLS certificates are
read again either way.
Exit codes: 0 stopped by a signal, 1 runtime failure, 2 usage or
configuration error, 3 start-up failure (address in use, io_uring, an
endpoint socket).";

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML file with [relay] knobs and one [[service]] per VM (see README); SIGHUP reads it again.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "channel", "tls_listen", "x509_dir", "tls_cert", "tls_key", "tls_ca", "tls_channel", "plaintext_channel"])]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable), e.g. 127.0.0.1:5930. Under systemd socket activation
    /// (LISTEN_FDS) the sockets systemd passed are used instead, and --listen may be left out.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Address to listen on with TLS (repeatable; QEMU's tls-port), e.g. 0.0.0.0:5931. Plain and TLS
    /// listeners share sessions. Needs --x509-dir or --tls-cert/--tls-key.
    #[arg(long, value_name = "HOST:PORT")]
    tls_listen: Vec<String>,
    /// Directory in QEMU's x509-dir layout: ca-cert.pem, server-cert.pem, server-key.pem (the chain
    /// sent is completed from ca-cert.pem).
    #[arg(long, value_name = "DIR")]
    x509_dir: Option<PathBuf>,
    /// PEM server certificate (leaf first), instead of or over x509-dir's.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s), used to complete the chain sent to clients.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Channel type that must use TLS (repeatable; QEMU's tls-channel): main, usbredir, port, ...,
    /// 128..255, or default. A plain link of it gets NEED_SECURED and spice-gtk relinks it over TLS.
    #[arg(long, value_name = "NAME")]
    tls_channel: Vec<String>,
    /// Channel type that must not use TLS (repeatable; QEMU's plaintext-channel).
    #[arg(long, value_name = "NAME")]
    plaintext_channel: Vec<String>,
    /// Whole-VM mode: proxy every channel not given with --channel (display, inputs, cursor, audio,
    /// QEMU's own ports) to QEMU's spice-server at URI (spice://HOST:PORT, spice+unix:///PATH, or over
    /// TLS spice+tls://HOST:PORT or spice://HOST?tls-port=PORT, with --upstream-ca-file);
    /// QEMU's password applies, no --password-* needed.
    #[arg(long, value_name = "URI", conflicts_with_all = ["password_file", "password_env"])]
    upstream: Option<String>,
    /// TLS upstream: PEM file of the CA that signed QEMU's certificate (QEMU's x509-dir/ca-cert.pem).
    /// Required with a TLS --upstream; QEMU's certificate must name the host of the URI in its
    /// subjectAltName, or match --upstream-cert-subject.
    #[arg(long, value_name = "FILE", requires = "upstream")]
    upstream_ca_file: Option<PathBuf>,
    /// TLS upstream: accept QEMU by its certificate subject instead of the host name, e.g.
    /// "C=XX,O=test,CN=my-vm" (as connect --cert-subject).
    #[arg(long, value_name = "SUBJECT", requires = "upstream")]
    upstream_cert_subject: Option<String>,
    /// A channel and its endpoint (repeatable): KIND[:ID]=ENDPOINT.
    #[arg(long, value_name = "SPEC")]
    channel: Vec<String>,
    /// Read the SPICE password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the SPICE password from environment variable VAR.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Accept clients without a password (as QEMU's disable-ticketing).
    #[arg(long)]
    disable_ticketing: bool,
    /// Service name used in logs.
    #[arg(long, default_value = "default")]
    name: String,
    /// Worker threads, one io_uring each [default: all cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Client connections per worker, any stage. An idle or linking connection holds no data buffer
    /// (about 2 KiB of relay memory plus its sockets), so this can be large; the relay raises its own
    /// open-file limit to match, or says how far it got [default: 16384].
    #[arg(long, value_name = "N")]
    max_conns: Option<usize>,
    /// Size of each registered buffer in KiB [default: 262,216 bytes ≈ 256 KiB: four 64 KiB messages with
    /// their headers].
    #[arg(long, value_name = "KIB")]
    buffer_kib: Option<usize>,
    /// Registered buffers per worker, shared by its connections: a connection holds one per direction
    /// only while data moves (at most buffers × buffer size is ever pinned). When all are in use, a
    /// connection with data waits for one (counter buffer_waits) [default: 512].
    #[arg(long, value_name = "N")]
    buffers_per_worker: Option<usize>,
    /// RSA ticket keys kept ready per worker (each link with a password takes a fresh one): the pool
    /// absorbs a burst of links; key threads refill it at idle priority [default: 128].
    #[arg(long, value_name = "N")]
    key_pool: Option<usize>,
    /// Threads generating RSA keys at nice 10 (below the workers and the rest of the host)
    /// [default: one per core].
    #[arg(long, value_name = "N")]
    key_threads: Option<usize>,
    /// Seconds without data after which a connection's posted read gives its buffer back and waits
    /// for data with a poll instead (counter buffers_reclaimed) [default: 2].
    #[arg(long, value_name = "S")]
    idle_buffer_secs: Option<u64>,
    /// A new session while another is linked: `replace` (the old session closes as a whole, as
    /// spice-server) or `refuse` (the new main link gets CHANNEL_NOT_AVAILABLE) [default: replace].
    /// A second link of a channel already linked in the same session is always refused, as spice-server.
    #[arg(long, value_enum)]
    busy: Option<BusyPolicy>,
    /// Seconds a client may take to finish the link stage [default: 10].
    #[arg(long, value_name = "S")]
    link_timeout_secs: Option<u64>,
    /// Connections still in the link stage (accepted, not linked) per worker. When full, the oldest
    /// is closed to make room, so a flood of half-open connections cannot keep a fresh client out;
    /// link-stage connections hold no key and wait for no key thread [default: 128].
    #[arg(long, value_name = "N")]
    max_link_stage: Option<usize>,
    /// Link-stage connections from one source address (IPv6: its /64) per worker; over it, that
    /// address's oldest link-stage connection is closed [default: 32].
    #[arg(long, value_name = "N")]
    max_link_stage_per_addr: Option<usize>,
    /// On SIGTERM/SIGINT: seconds linked channels are still served (until they end) before what was
    /// accepted is flushed and the rest closed [default: 5].
    #[arg(long, value_name = "S")]
    drain_secs: Option<u64>,
    /// Failed tickets from one source address within --auth-fail-window-secs before its further links
    /// wait (1 s, doubling per failure, up to --auth-fail-max-delay-secs; 0: off) [default: 3].
    /// Link starts from a throttled address are spaced one delay apart, so of many parallel
    /// connections the ones queued past --link-timeout-secs are closed unanswered (no link reply;
    /// counted as link_timeout), never told "wrong password".
    #[arg(long, value_name = "N")]
    auth_fail_limit: Option<u32>,
    /// The window over which failed tickets of an address are counted [default: 60].
    #[arg(long, value_name = "S")]
    auth_fail_window_secs: Option<u64>,
    /// Longest wait of a throttled address's link [default: 8].
    #[arg(long, value_name = "S")]
    auth_fail_max_delay_secs: Option<u64>,
    /// Keep a unix-listen endpoint connection open when the client goes away.
    #[arg(long)]
    keep_listen_endpoint: bool,
    /// Send LZ4 COMPRESSED_DATA to clients that accept it (payloads over 1000 B that shrink).
    #[arg(long)]
    lz4_to_client: bool,
    /// SPICE ACK window toward clients in messages (0: off, as spice-server on spicevmc) [default: 0].
    #[arg(long, value_name = "N")]
    ack_window: Option<u32>,
    /// Client → endpoint payload path: `copy` (registered buffers) or `splice` (socket → pipe → endpoint:
    /// less CPU for bulk uploads, an extra read per small message) [default: copy].
    #[arg(long, value_enum)]
    data_path: Option<config::DataPath>,
    /// Seconds between `stats` log lines with live totals and MiB/s (0: none) [default: 60].
    #[arg(long, value_name = "S")]
    stats_secs: Option<u64>,
    /// Links served by one RSA ticket key [default: 1, a fresh key per link as spice-server].
    /// More raises the link rate, but a sniffed ticket can then be replayed on a link that got
    /// the same key: only on trusted networks.
    #[arg(long, value_name = "N")]
    key_reuse: Option<usize>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics and a live status page at / (its own
    /// thread; keep it on a trusted address, e.g. 127.0.0.1:9930).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    #[command(flatten)]
    socket: SocketArgs,
}

fn build_config(a: &ServeArgs) -> Result<ServeConfig, String> {
    let mut cfg = match &a.config {
        Some(path) => ServeConfig::from_file(path).map_err(|e| e.to_string())?,
        None => {
            if a.listen.is_empty() && a.tls_listen.is_empty() && !vmcrelay::relay::systemd::listen_fds_present() {
                return Err("give --listen HOST:PORT and --channel SPEC..., or --config FILE (see --help)".into());
            }
            let listen = a.listen.iter().map(|l| config::parse_listen(l)).collect::<Result<Vec<_>, _>>()?;
            let tls_listen = a.tls_listen.iter().map(|l| config::parse_listen(l)).collect::<Result<Vec<_>, _>>()?;
            let tls = config::tls_files(
                a.x509_dir.as_deref(),
                a.tls_cert.as_deref(),
                a.tls_key.as_deref(),
                a.tls_ca.as_deref(),
            )
            .map_err(|m| format!("{m} (flags: --x509-dir, --tls-cert, --tls-key)"))?;
            let security = config::channel_security(
                a.tls_channel.iter().map(String::as_str),
                a.plaintext_channel.iter().map(String::as_str),
            )?;
            let upstream = a.upstream.as_deref().map(config::parse_spice_uri).transpose()?;
            let upstream_tls = config::upstream_tls(
                upstream.as_ref(),
                a.upstream_ca_file.as_deref(),
                a.upstream_cert_subject.as_deref(),
            )
            .map_err(|m| format!("{m} (flags: --upstream, --upstream-ca-file, --upstream-cert-subject)"))?;
            let password = if upstream.is_some() {
                None
            } else {
                config::resolve_password(a.password_file.as_deref(), a.password_env.as_deref(), a.disable_ticketing)
                    .map_err(|m| format!("{m} (flags: --password-file, --password-env, --disable-ticketing)"))?
            };
            let channels = config::parse_channels(a.channel.iter().map(|c| (c.as_str(), "--channel".to_string())))
                .map_err(|e| e.to_string())?;
            ServeConfig {
                services: vec![Service {
                    name: a.name.clone(),
                    listen,
                    tls_listen,
                    tls,
                    security,
                    password,
                    channels,
                    upstream,
                    upstream_tls,
                    busy: None,
                    removed: false,
                }],
                limits: Limits::default(),
            }
        }
    };
    let l = &mut cfg.limits;
    if let Some(w) = a.workers {
        l.workers = w;
    }
    if let Some(m) = a.max_conns {
        l.max_conns_per_worker = m;
    }
    if let Some(k) = a.buffer_kib {
        l.buffer_bytes = k * 1024;
    }
    if let Some(n) = a.buffers_per_worker {
        l.buffers_per_worker = n;
    }
    if let Some(n) = a.idle_buffer_secs {
        l.idle_buffer_secs = n;
    }
    if let Some(n) = a.key_pool {
        l.key_pool_per_worker = n;
    }
    if let Some(n) = a.key_threads {
        l.key_threads = n;
    }
    if let Some(b) = a.busy {
        l.busy = b;
    }
    if let Some(t) = a.link_timeout_secs {
        l.link_timeout_secs = t;
    }
    if let Some(n) = a.max_link_stage {
        l.max_link_stage = n;
    }
    if let Some(n) = a.max_link_stage_per_addr {
        l.max_link_stage_per_addr = n;
    }
    if let Some(t) = a.drain_secs {
        l.drain_secs = t;
    }
    if let Some(n) = a.auth_fail_limit {
        l.auth_fail_limit = n;
    }
    if let Some(t) = a.auth_fail_window_secs {
        l.auth_fail_window_secs = t;
    }
    if let Some(t) = a.auth_fail_max_delay_secs {
        l.auth_fail_max_delay_secs = t;
    }
    if a.keep_listen_endpoint {
        l.keep_listen_endpoint = true;
    }
    if a.lz4_to_client {
        l.lz4_to_client = true;
    }
    if let Some(w) = a.ack_window {
        l.ack_window = w;
    }
    if let Some(d) = a.data_path {
        l.data_path = d;
    }
    if let Some(t) = a.stats_secs {
        l.stats_secs = t;
    }
    if let Some(k) = a.key_reuse {
        l.key_reuse = k;
    }
    if let Some(m) = &a.metrics {
        l.metrics = Some(config::parse_listen(m).map_err(|e| format!("--metrics: {e}"))?);
    }
    a.socket.apply(&mut l.socket);
    cfg.validate()?;
    // A CA file that does not load is a configuration error, not a
    // failure of every link later.
    for s in cfg.services.iter().filter(|s| !s.removed) {
        if let Some(o) = &s.upstream_tls {
            vmcrelay::tls::client_config(o).map_err(|e| format!("service {}: upstream-ca-file: {e}", s.name))?;
        }
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    // No transparent huge pages: mimalloc asks for them on its arenas, so
    // a thread's or a buffer's first touch faults in (and zeroes) 2 MiB,
    // and an idle connection's few KiB pin a huge page. Best effort.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::parse();
    log::set_level(if cli.quiet { 1 } else { 2 + cli.verbose });
    if let Some(f) = cli.log_format {
        log::set_format(f);
    }
    let mut reload = None;
    let cfg = match cli.cmd {
        c @ (Cmd::Man(_) | Cmd::Completions(_)) => return ops_main(c),
        Cmd::Serve(a) => {
            let cfg = build_config(&a);
            if let Some(path) = a.config.clone() {
                // SIGHUP reads the file again, with the same flags over it.
                reload = Some(serve::Reload {
                    origin: path.display().to_string(),
                    load: Box::new(move || build_config(&a)),
                });
            }
            cfg
        }
        Cmd::Demo(a) => {
            let cfg = demo_config(&a);
            if let (Ok(c), true) = (&cfg, a.drive_secs > 0) {
                // Block the signals serve waits for before the driver thread exists.
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(nix::sys::signal::Signal::SIGTERM);
                set.add(nix::sys::signal::Signal::SIGINT);
                set.add(nix::sys::signal::Signal::SIGPIPE);
                let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None);
                let addr = c.services[0].listen[0].to_string();
                let secs = a.drive_secs;
                std::thread::spawn(move || demo_drive(addr, secs));
            }
            cfg
        }
        Cmd::Connect(a) => return connect_main(&a),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            log::fatal(&format!("configuration error: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let (None, Some(f)) = (cli.log_format, cfg.limits.log_format) {
        log::set_format(f);
    }
    match serve::run_with_reload(cfg, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(serve::ServeError::Startup(e)) => {
            log::fatal(&format!("cannot start: {e}"));
            ExitCode::from(EXIT_STARTUP)
        }
        Err(e) => {
            log::fatal(&e.to_string());
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn connect_main(a: &ConnectArgs) -> ExitCode {
    if a.list {
        // The same mistakes as without --list are configuration errors (exit 2).
        let checked = parse_uri(&a.uri).and_then(|addr| {
            if !a.channel.is_empty() {
                config::parse_channels(a.channel.iter().map(|c| (c.as_str(), "--channel".to_string())))
                    .map_err(|e| e.to_string())?;
            }
            let tls = connect_tls(&addr, a.ca_file.as_deref(), a.cert_subject.as_deref())?;
            Ok((addr, tls, connect_password(a)?))
        });
        let (addr, tls, pw) = match checked {
            Ok(x) => x,
            Err(e) => {
                log::fatal(&format!("configuration error: {e}"));
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        return match list_channels(&addr, tls, &pw, std::time::Duration::from_secs(a.timeout_secs.max(1))) {
            Ok(()) => ExitCode::SUCCESS,
            Err((code, e)) => {
                log::fatal(&e.to_string());
                ExitCode::from(code)
            }
        };
    }
    let (cfg, opts) = match connect_config(a) {
        Ok(x) => x,
        Err(e) => {
            log::fatal(&format!("configuration error: {e}"));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match serve::run_connect(cfg, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(serve::ServeError::Fatal(e)) => {
            log::fatal(&e.to_string());
            ExitCode::from(EXIT_AUTH)
        }
        Err(serve::ServeError::TlsVerify(e)) => {
            eprintln!("vmcrelay: {e}");
            ExitCode::from(EXIT_TLS_VERIFY)
        }
        Err(serve::ServeError::Startup(e)) => {
            log::fatal(&format!("cannot start: {e}"));
            ExitCode::from(EXIT_STARTUP)
        }
        Err(e) => {
            log::fatal(&e.to_string());
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
