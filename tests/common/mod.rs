//! Shared helpers for the real-peer tests: free ports, the relay process,
//! QEMU, the spice-gtk harness, unix echo apps. Every wait has a deadline.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the real peers are installed; with `VMCRELAY_REQUIRE_PEERS=1`
/// (set by scripts/test) a missing peer fails the test instead of skipping.
pub fn peers_available(what: &[&str]) -> bool {
    let missing: Vec<&str> = what
        .iter()
        .copied()
        .filter(|w| match *w {
            "gtk" => !Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import gi; gi.require_version('SpiceClientGLib','2.0'); from gi.repository import SpiceClientGLib",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            bin => !Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("VMCRELAY_REQUIRE_PEERS").is_ok_and(|v| v == "1") {
        panic!("real peers missing: {missing:?} (run scripts/install-peers)");
    }
    eprintln!("SKIP: real peers missing: {missing:?} (scripts/test installs them)");
    false
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmcrelay-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("tempdir");
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The relay under test, killed (SIGTERM, then SIGKILL) on drop.
pub struct Relay {
    pub child: Child,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    /// Starts `vmcrelay serve ARGS` and waits for its `ready` line.
    pub fn start(args: &[String]) -> Relay {
        Self::start_under(&[], args)
    }

    /// Like [`Relay::start`], run under a wrapper command (e.g. `prlimit
    /// --nofile=64:64`).
    pub fn start_under(wrapper: &[&str], args: &[String]) -> Relay {
        let port = args
            .iter()
            .position(|a| a == "--listen")
            .and_then(|i| args.get(i + 1))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let (child, log) = spawn_logged(wrapper, "serve", args, "relay");
        let r = Relay { child, port, log };
        r.wait_log("ready workers=", Duration::from_secs(20));
        r
    }

    /// Waits until a log line contains `needle`; returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().expect("log").iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!("relay log never showed {needle:?}; log:\n{}", self.log.lock().expect("log").join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// All log lines containing `needle`.
    pub fn lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().expect("log").iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    pub fn uri(&self) -> String {
        format!("spice://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts `vmcrelay SUBCOMMAND ARGS` (under `wrapper`, e.g. `prlimit
/// --nofile=64:64`, when given) with its stderr kept line by line (and
/// echoed as `TAG: line` with `VMCRELAY_TEST_LOG` set).
fn spawn_logged(
    wrapper: &[&str],
    subcommand: &str,
    args: &[String],
    tag: &'static str,
) -> (Child, Arc<Mutex<Vec<String>>>) {
    let mut cmd = match wrapper.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(env!("CARGO_BIN_EXE_vmcrelay"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_vmcrelay")),
    };
    let mut child = cmd
        .arg(subcommand)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn vmcrelay {subcommand}: {e}"));
    let log = Arc::new(Mutex::new(Vec::new()));
    let err = child.stderr.take().expect("stderr");
    let log2 = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if std::env::var("VMCRELAY_TEST_LOG").is_ok() {
                eprintln!("{tag}: {line}");
            }
            log2.lock().expect("log").push(line);
        }
    });
    (child, log)
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Result of one spice-gtk harness run.
#[derive(Debug)]
pub struct GtkRun {
    pub code: i32,
    pub json: String,
    pub stderr: String,
}

impl GtkRun {
    /// A JSON field's raw text (good enough for numbers, bools and strings).
    pub fn field(&self, key: &str) -> Option<String> {
        let pat = format!("\"{key}\": ");
        let i = self.json.find(&pat)? + pat.len();
        let rest = &self.json[i..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().trim_matches('"').to_string())
    }
}

/// Runs `tests/interop/gtk_client.py ARGS` with a hard deadline.
pub fn gtk(args: &[&str], timeout: Duration) -> GtkRun {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/gtk_client.py");
    let mut child = Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(timeout.as_secs().to_string())
        .arg("/usr/bin/python3")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gtk_client.py");
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t = std::thread::spawn(move || {
        let mut e = String::new();
        let _ = se.read_to_string(&mut e);
        e
    });
    let _ = so.read_to_string(&mut out);
    err.push_str(&t.join().unwrap_or_default());
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(-1);
    let json = out.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default().to_string();
    GtkRun { code, json, stderr: err }
}

/// A unix-socket echo app: accepts connections one after another and
/// echoes each until EOF. Counts connections and bytes.
pub struct EchoApp {
    pub path: PathBuf,
    pub conns: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    pub eofs: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl EchoApp {
    pub fn start(path: PathBuf) -> Self {
        let l = UnixListener::bind(&path).expect("bind echo app");
        l.set_nonblocking(true).expect("nonblocking");
        let (conns, bytes, eofs, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c2, b2, e2, s2) = (Arc::clone(&conns), Arc::clone(&bytes), Arc::clone(&eofs), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        c2.fetch_add(1, Ordering::Relaxed);
                        let (b3, e3) = (Arc::clone(&b2), Arc::clone(&e2));
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let mut buf = vec![0u8; 256 * 1024];
                            loop {
                                match s.read(&mut buf) {
                                    Ok(0) | Err(_) => {
                                        e3.fetch_add(1, Ordering::Relaxed);
                                        return;
                                    }
                                    Ok(n) => {
                                        b3.fetch_add(n as u64, Ordering::Relaxed);
                                        if s.write_all(&buf[..n]).is_err() {
                                            e3.fetch_add(1, Ordering::Relaxed);
                                            return;
                                        }
                                    }
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        EchoApp { path, conns, bytes, eofs, stop }
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A QEMU process, killed on drop.
pub struct Qemu {
    pub child: Child,
}

impl Qemu {
    pub fn start(args: &[String]) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Qemu { child }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for a path to exist (a socket QEMU creates).
pub fn wait_path(p: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// Connects a unix stream, retrying until `timeout`.
pub fn connect_unix(p: &Path, timeout: Duration) -> UnixStream {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(p) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {}: {e}", p.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// TLS certificates for the real-peer tests, made with the openssl CLI.

pub fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for 127.0.0.1 (SAN IP), P-256, in
/// QEMU's layout: DIR/ca-cert.pem, server-cert.pem, server-key.pem.
pub fn make_x509_dir(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("x509 dir");
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem"], dir);
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/CN=vmcrelay test CA",
            "-days",
            "2",
            "-out",
            "ca-cert.pem",
        ],
        dir,
    );
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server-key.pem"], dir);
    openssl(
        &["req", "-new", "-key", "server-key.pem", "-subj", "/C=XX/O=test/CN=127.0.0.1", "-out", "server.csr"],
        dir,
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server-cert.pem",
        ],
        dir,
    );
    dir.to_path_buf()
}

/// Another CA that signed nothing of ours.
pub fn make_other_ca(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("other ca dir");
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "k.pem"], dir);
    openssl(
        &["req", "-x509", "-new", "-key", "k.pem", "-subj", "/CN=someone else", "-days", "2", "-out", "ca.pem"],
        dir,
    );
    dir.join("ca.pem")
}

/// A running `vmcrelay connect`, its stderr kept line by line; killed on
/// drop (a failed test prints what it logged: CI keeps no other trace).
pub struct Connect {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Connect {
    /// Starts `vmcrelay connect ARGS`.
    pub fn start(args: &[String]) -> Connect {
        Self::start_under(&[], args)
    }

    /// Like [`Connect::start`], run under a wrapper command (e.g. `prlimit
    /// --nofile=64:64`).
    pub fn start_under(wrapper: &[&str], args: &[String]) -> Connect {
        let (child, log) = spawn_logged(wrapper, "connect", args, "connect");
        Connect { child, log }
    }

    /// The exit code once connect exits within `timeout`, else None.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything logged so far, one line per line.
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Log lines containing `needle`.
    pub fn lines(&self, needle: &str) -> Vec<String> {
        self.log.lock().expect("log").iter().filter(|l| l.contains(needle)).cloned().collect()
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for l in self.log.lock().map(|l| l.clone()).unwrap_or_default() {
                eprintln!("connect: {l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
