//! systemd integration, without libsystemd: readiness notification
//! (`sd_notify`), the watchdog, and socket activation (`sd_listen_fds`).
//!
//! - **Notify.** `NOTIFY_SOCKET` names a unix datagram socket: a path, or
//!   an abstract name when it starts with `@`. Each state (`READY=1`,
//!   `STOPPING=1`, `WATCHDOG=1`, `STATUS=...`) is one datagram sent from an
//!   unbound `UnixDatagram`; with no `NOTIFY_SOCKET` nothing is sent. A
//!   failed send is logged at debug level and never stops the relay.
//! - **Watchdog.** `WATCHDOG_USEC` (and `WATCHDOG_PID`, when set, our pid)
//!   asks for `WATCHDOG=1` at least that often. `serve` pings every half
//!   of it from a thread of its own, and only while every worker is alive:
//!   each worker advances its tick counter once a second from its ring
//!   (`WorkerStats::ticks`), and a worker whose counter has not moved for
//!   [`WORKER_STALL`] is stuck; then no ping is sent, and systemd restarts
//!   the service when `WatchdogSec=` runs out.
//! - **Socket activation.** With `LISTEN_PID` = our pid, `LISTEN_FDS` = N
//!   and optionally `LISTEN_FDNAMES` = `a:b:...`, fds 3..3+N are listening
//!   sockets the service manager opened for us. `serve` accepts on them
//!   instead of binding `--listen`: a socket goes to the service its name
//!   (`FileDescriptorName=`) names; with a single service it takes every
//!   socket whatever the names. The variables stay in the environment
//!   (vmcrelay starts no child process that could inherit them).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::debug;

/// A worker whose tick counter has not moved for this long is stuck.
pub const WORKER_STALL: Duration = Duration::from_secs(3);

/// The first inherited fd (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Most inherited sockets taken (a bound on a number the environment gives).
const MAX_LISTEN_FDS: usize = 1024;

/// Sends `state` (e.g. `READY=1`) to the service manager; false when there
/// is none (`NOTIFY_SOCKET` unset) or the send failed.
pub fn notify(state: &str) -> bool {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let target = target.to_string_lossy().into_owned();
    let sent = send_notify(&target, state);
    if let Err(e) = &sent {
        debug!("main", "sd_notify {:?} to {target} failed: {e}", state.lines().next().unwrap_or(""));
    }
    sent.is_ok()
}

fn send_notify(target: &str, state: &str) -> std::io::Result<()> {
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    let n = if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?
    } else if target.starts_with('/') {
        sock.send_to(state.as_bytes(), target)?
    } else {
        return Err(std::io::Error::other("only path and @abstract notify sockets are supported"));
    };
    if n != state.len() {
        return Err(std::io::Error::other("short datagram"));
    }
    Ok(())
}

/// How often the service manager wants `WATCHDOG=1`, if it does.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// One listening socket the service manager passed.
#[derive(Debug)]
pub struct ListenFd {
    /// Its number in this process at start (3, 4, ...).
    pub fd_num: RawFd,
    /// `FileDescriptorName=` (systemd's default is the socket unit's name).
    pub name: String,
    /// Its local address.
    pub addr: SocketAddr,
    /// The socket.
    pub fd: OwnedFd,
}

/// Whether this process was started with sockets to take (`LISTEN_PID`
/// is ours and `LISTEN_FDS` > 0).
pub fn listen_fds_present() -> bool {
    std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id())
        && std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n > 0)
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes the sockets passed by the service manager (none when not socket
/// activated). Runs once per process; each must be a listening TCP socket.
pub fn take_listen_fds() -> Result<Vec<ListenFd>, String> {
    if !listen_fds_present() {
        return Ok(Vec::new());
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err("internal: the inherited sockets were already taken".into());
    }
    let n: usize = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok()).unwrap_or(0);
    if n > MAX_LISTEN_FDS {
        return Err(format!("LISTEN_FDS={n}: more than {MAX_LISTEN_FDS} inherited sockets"));
    }
    let names: Vec<String> =
        std::env::var("LISTEN_FDNAMES").map(|v| v.split(':').map(str::to_string).collect()).unwrap_or_default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let fd_num = LISTEN_FDS_START + RawFd::try_from(i).unwrap_or(0);
        let name = names.get(i).cloned().filter(|s| !s.is_empty()).unwrap_or_else(|| "unknown".into());
        let fd = adopt(fd_num).map_err(|e| format!("inherited socket fd {fd_num} (name {name}): {e}"))?;
        let addr = check_listener(&fd).map_err(|e| format!("inherited socket fd {fd_num} (name {name}): {e}"))?;
        out.push(ListenFd { fd_num, name, addr, fd });
    }
    Ok(out)
}

/// Owns inherited fd `raw`, close-on-exec from now on.
#[allow(unsafe_code)]
fn adopt(raw: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD reads the flags of whatever `raw` is, or fails with
    // EBADF; it touches no memory of ours.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } == -1 {
        return Err("not open (LISTEN_FDS counts more sockets than were passed)".into());
    }
    // SAFETY: fds 3..3+LISTEN_FDS were open when the service manager
    // exec'd us (LISTEN_PID is our pid), so no file this process opened
    // since can have their numbers, and nothing in vmcrelay closes an fd it
    // does not own; `TAKEN` makes this the only owner, taken once.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|e| format!("cannot set close-on-exec: {e}"))?;
    Ok(fd)
}

/// The address of `fd` if it is a listening TCP socket; else what to fix.
fn check_listener(fd: &OwnedFd) -> Result<SocketAddr, String> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt};
    let what = "vmcrelay accepts SPICE clients on TCP: use ListenStream=HOST:PORT with Accept=no in the .socket unit";
    let ty = getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket ({e}); {what}"))?;
    if ty != nix::sys::socket::SockType::Stream {
        return Err(format!("not a stream socket; {what}"));
    }
    let sa: SockaddrStorage = getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    let addr = if let Some(v4) = sa.as_sockaddr_in() {
        SocketAddr::from(std::net::SocketAddrV4::from(*v4))
    } else if let Some(v6) = sa.as_sockaddr_in6() {
        SocketAddr::from(std::net::SocketAddrV6::from(*v6))
    } else {
        return Err(format!("a {:?} socket, not TCP; {what}", sa.family()));
    };
    if !getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(format!("{addr} is not listening (a connection passed with Accept=yes?); {what}"));
    }
    Ok(addr)
}

/// The inherited sockets by (service index, address), for the workers.
pub type Activated = std::collections::HashMap<(usize, SocketAddr), OwnedFd>;

/// Gives each inherited socket to its service: the service named like the
/// socket, or the only service. A service that got sockets listens on
/// those instead of its configured addresses. Returns the sockets and one
/// log line per socket; an error says what to change in the units.
pub fn assign(
    services: &mut [crate::relay::config::Service],
    fds: Vec<ListenFd>,
) -> Result<(Activated, Vec<String>), String> {
    let mut got: Vec<Vec<SocketAddr>> = vec![Vec::new(); services.len()];
    let mut out = Activated::new();
    let mut notes = Vec::new();
    for f in fds {
        let si = match services.iter().position(|s| s.name == f.name) {
            Some(i) => i,
            None if services.len() == 1 => 0,
            None => {
                let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
                return Err(format!(
                    "the inherited socket {} (fd {}) is named {:?}, which is no service: set FileDescriptorName= in \
                     its .socket unit to one of: {}",
                    f.addr,
                    f.fd_num,
                    f.name,
                    names.join(", ")
                ));
            }
        };
        if got.iter().flatten().any(|a| *a == f.addr) {
            return Err(format!("two inherited sockets listen on {}: list it once in the .socket units", f.addr));
        }
        notes.push(format!(
            "listen service={} addr={} from=systemd fd={} fdname={}",
            services[si].name, f.addr, f.fd_num, f.name
        ));
        got[si].push(f.addr);
        out.insert((si, f.addr), f.fd);
    }
    for (s, addrs) in services.iter_mut().zip(got) {
        if addrs.is_empty() {
            if s.listen.is_empty() && s.tls_listen.is_empty() {
                return Err(format!(
                    "service {} has no listen address and systemd passed no socket named {:?}: give it \
                     listen = [...] or a .socket unit with FileDescriptorName={}",
                    s.name, s.name, s.name
                ));
            }
            continue;
        }
        let ignored: Vec<String> = s.listen.iter().filter(|a| !addrs.contains(a)).map(ToString::to_string).collect();
        if !ignored.is_empty() {
            notes.push(format!(
                "service {}: configured listen {} ignored: systemd's sockets are used instead",
                s.name,
                ignored.join(",")
            ));
        }
        s.listen = addrs;
    }
    Ok((out, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, listen: &[&str]) -> crate::relay::config::Service {
        crate::relay::config::Service {
            name: name.into(),
            listen: listen.iter().map(|a| a.parse().expect("addr")).collect(),
            tls_listen: Vec::new(),
            tls: None,
            security: Default::default(),
            password: None,
            channels: Vec::new(),
            upstream: None,
            upstream_tls: None,
            busy: None,
            removed: false,
        }
    }

    fn fd(name: &str) -> ListenFd {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        ListenFd { fd_num: 3, name: name.into(), addr, fd: OwnedFd::from(l) }
    }

    #[test]
    fn sockets_go_to_the_service_they_name() {
        let mut s = vec![service("vm1", &["127.0.0.1:1"]), service("vm2", &["127.0.0.1:2"])];
        let f = fd("vm2");
        let a = f.addr;
        let (act, notes) = assign(&mut s, vec![f]).expect("assign");
        assert!(act.contains_key(&(1, a)));
        assert_eq!(s[1].listen, vec![a]);
        assert_eq!(s[0].listen, vec!["127.0.0.1:1".parse::<SocketAddr>().expect("addr")]);
        assert!(notes.iter().any(|n| n.contains("ignored")), "{notes:?}");
        let e = assign(&mut s, vec![fd("vmcrelay.socket")]).expect_err("no such service");
        assert!(e.contains("FileDescriptorName=") && e.contains("vm1, vm2"), "{e}");
    }

    #[test]
    fn the_only_service_takes_every_socket() {
        let mut s = vec![service("default", &[])];
        let (act, _) = assign(&mut s, vec![fd("unknown"), fd("vmcrelay.socket")]).expect("assign");
        assert_eq!(act.len(), 2);
        assert_eq!(s[0].listen.len(), 2);
        let mut s = vec![service("a", &[]), service("b", &["127.0.0.1:2"])];
        let e = assign(&mut s, vec![fd("b")]).expect_err("a has nothing");
        assert!(e.contains("service a has no listen address"), "{e}");
    }

    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        use std::os::unix::net::UnixDatagram;
        let dir = std::env::temp_dir().join(format!("vmcrelay-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).expect("bind");
        super::send_notify(path.to_str().expect("utf-8"), "READY=1").expect("send");
        let mut b = [0u8; 64];
        let n = rx.recv(&mut b).expect("recv");
        assert_eq!(&b[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("vmcrelay-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        super::send_notify(&format!("@{name}"), "STOPPING=1").expect("send");
        let n = rx.recv(&mut b).expect("recv");
        assert_eq!(&b[..n], b"STOPPING=1");
        assert!(super::send_notify("vsock:2:1", "X=1").is_err());
    }
}
