//! `vmcload demo`: a relay on a free loopback port with three in-process
//! endpoints behind user-defined channels, driven up, down and rr for a
//! few seconds each; prints the figures and what each one means.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::LoadError;
use super::endpoint::{Background, EndpointConfig, EpMode, Listen};
use super::report::{RunReport, fmt_us};
use super::run::{Limit, Mode, RunConfig, run};
use super::size::SizeDist;
use super::target::{ChannelSel, Target};

/// Demo parameters.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The `vmcrelay` binary.
    pub relay: PathBuf,
    /// Seconds per run.
    pub seconds: f64,
    /// Relay worker threads.
    pub workers: usize,
    /// Echo the relay's log lines.
    pub verbose: bool,
}

/// The relay process, killed if still running when dropped.
#[derive(Debug)]
struct RelayProc {
    child: Child,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RelayProc {
    fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `timeout`; the exit code.
    fn terminate(&mut self, timeout: Duration) -> Result<Option<i32>, LoadError> {
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(self.child.id()).map_err(|_| LoadError::Run("relay pid out of range".into()))?,
        );
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| LoadError::Run(format!("SIGTERM to the relay: {e}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st.code());
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_relay(cfg: &DemoConfig, port: u16, socks: &[PathBuf]) -> Result<RelayProc, LoadError> {
    if !cfg.relay.exists() {
        return Err(LoadError::Run(format!(
            "{} not found; build both binaries (cargo build --release) or pass --relay PATH",
            cfg.relay.display()
        )));
    }
    let mut cmd = Command::new(&cfg.relay);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--disable-ticketing", "--name", "demo"])
        .args(["--workers", &cfg.workers.to_string()]);
    for (i, s) in socks.iter().enumerate() {
        cmd.args(["--channel", &format!("128:{i}=unix:{}", s.display())]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LoadError::Run(format!("cannot start {}: {e}", cfg.relay.display())))?;
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = mpsc::channel();
    if let Some(err) = child.stderr.take() {
        let (log2, verbose) = (Arc::clone(&log), cfg.verbose);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if verbose {
                    eprintln!("relay: {line}");
                }
                if line.contains("ready workers=") {
                    let _ = ready_tx.send(());
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
    }
    let mut relay = RelayProc { child, log };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ready_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(relay);
        }
        if let Some(st) = relay.child.try_wait()? {
            return Err(LoadError::Run(format!("the relay exited ({st}) before it was ready:\n{}", relay.log_text())));
        }
        if Instant::now() >= deadline {
            return Err(LoadError::Run(format!("the relay was not ready within 15 s:\n{}", relay.log_text())));
        }
    }
}

fn free_port() -> Result<u16, LoadError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn one_run(addr: &str, id: u8, mode: Mode, size: usize, seconds: f64) -> Result<RunReport, LoadError> {
    let d = Duration::from_secs_f64(seconds);
    let cfg = RunConfig {
        target: Target::Spice {
            addr: addr.to_string(),
            password: Vec::new(),
            channels: vec![ChannelSel::From { channel_type: 128, first: id }],
            lz4: false,
            tls: None,
        },
        connections: 1,
        sizes: SizeDist::fixed(size),
        mode,
        limit: Limit::Duration(d),
        rate: None,
        seed: 1,
        connect_timeout: Duration::from_secs(10),
        timeout: d + Duration::from_secs(30),
        progress: true,
    };
    run(cfg, Arc::new(AtomicBool::new(false)))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn endpoint(path: &Path, mode: EpMode) -> Result<Background, LoadError> {
    Background::start(EndpointConfig {
        listen: Listen::UnixListen(path.to_path_buf()),
        mode,
        verify: mode != EpMode::Source,
        seed: 1,
        size: 64 * 1024,
        bytes: None,
        reconnect: false,
        json: None,
        quiet: true,
    })
}

/// Runs the demo; `Ok(true)` when every check passed.
pub fn demo(cfg: &DemoConfig) -> Result<bool, LoadError> {
    let dir = TempDir(std::env::temp_dir().join(format!("vmcload-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let socks: Vec<PathBuf> = ["sink", "source", "echo"].iter().map(|n| dir.0.join(format!("{n}.sock"))).collect();
    let sink = endpoint(&socks[0], EpMode::Sink)?;
    let source = endpoint(&socks[1], EpMode::Source)?;
    let echo = endpoint(&socks[2], EpMode::Echo)?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    println!(
        "vmcload demo: vmcrelay serve on spice://{addr} (workers={}), user-defined channels\n  \
         128:0 → a sink that checks every byte, 128:1 → a source of the pattern, 128:2 → an echo\n\
         Each run: one SPICE client (main channel + one data channel), {} s.\n",
        cfg.workers, cfg.seconds
    );
    let mut relay = start_relay(cfg, port, &socks)?;
    let up = one_run(&addr, 0, Mode::Up, 64 * 1024, cfg.seconds)?;
    println!("up    {:>10.1} MiB/s", up.throughput_mib_s);
    let down = one_run(&addr, 1, Mode::Down, 64 * 1024, cfg.seconds)?;
    println!("down  {:>10.1} MiB/s", down.throughput_mib_s);
    let rr = one_run(&addr, 2, Mode::Rr, 64, cfg.seconds)?;
    let lat = rr.latency_us.clone();
    println!("rr    p50 {}\n", lat.as_ref().map_or_else(|| "-".into(), |l| fmt_us(l.p50)));
    let code = relay.terminate(Duration::from_secs(10))?;
    // The endpoints see their last connection close with the relay.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.report().connections_closed < sink.report().connections && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sink_r = sink.stop();
    let _ = source.stop();
    let _ = echo.stop();

    let l = |f: fn(&super::report::LatencyStats) -> u64| lat.as_ref().map_or_else(|| "-".into(), |x| fmt_us(f(x)));
    let rows: Vec<(String, String, &str)> = vec![
        (
            "up".into(),
            format!("{:.1} MiB/s, {:.0} msgs/s", up.throughput_mib_s, up.msgs_per_s.unwrap_or(0.0)),
            "Payload the client pushed into the relay per second, in 64 KiB DATA messages, all of it delivered to the sink.",
        ),
        (
            "down".into(),
            format!("{:.1} MiB/s, {:.0} msgs/s", down.throughput_mib_s, down.msgs_per_s.unwrap_or(0.0)),
            "Payload per second from the local app through the relay to the client, which the relay framed into DATA messages.",
        ),
        (
            "rr p50 / p99".into(),
            format!("{} / {}", l(|x| x.p50), l(|x| x.p99)),
            "Round trip of one 64-byte message client → relay → app → relay → client: typical, and slowest in a hundred.",
        ),
        (
            "rr max".into(),
            format!("{} ({} round trips)", l(|x| x.max), lat.as_ref().map_or(0, |x| x.count)),
            "The slowest round trip seen: scheduler and machine noise show up here first.",
        ),
        (
            "link set-up p50".into(),
            format!("{} / {} / {}", fmt_us(up.setup_us.p50), fmt_us(down.setup_us.p50), fmt_us(rr.setup_us.p50)),
            "Time to link the session's main channel and the data channel (RSA ticket exchange included), per run.",
        ),
        (
            "integrity".into(),
            format!("sink {}, down {}, rr {}", sink_r.integrity, down.integrity, rr.integrity),
            "Every byte was checked against a seeded pattern: at the app for up, at the client for down and rr.",
        ),
        (
            "relay exit".into(),
            code.map_or_else(|| "did not exit within 10 s".into(), |c| format!("code {c}")),
            "The relay stopped on SIGTERM; 0 means it closed every connection cleanly.",
        ),
    ];
    println!("{:<16}  {:<34}  meaning", "figure", "value");
    for (k, v, m) in &rows {
        println!("{k:<16}  {v:<34}  {m}");
    }
    let ok =
        up.ok && down.ok && rr.ok && sink_r.integrity == "ok" && code == Some(0) && sink_r.bytes_in == up.bytes_sent;
    for r in [&up, &down, &rr] {
        for e in &r.error_messages {
            println!("error ({}): {e}", r.params.mode);
        }
    }
    if sink_r.bytes_in != up.bytes_sent {
        println!("error: the sink got {} bytes of the {} sent", sink_r.bytes_in, up.bytes_sent);
    }
    println!("\n{}", if ok { "demo: all checks passed" } else { "demo: FAILED (see above)" });
    Ok(ok)
}
