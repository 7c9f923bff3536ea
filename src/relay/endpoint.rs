//! Host-side endpoints: sockets and files a channel's bytes go to.
//!
//! Opening is split by cost: files and built-in endpoints open at once;
//! unix and TCP connects go through the ring (the caller gets a socket
//! and an address to connect); `unix-listen` sockets are bound at start-up
//! and accepted from by whichever worker owns the channel.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrLike, SockaddrStorage, UnixAddr, socket,
};

use super::config::{EndpointSpec, SocketPerms};

/// How an endpoint comes up.
#[derive(Debug)]
pub enum Opening {
    /// Ready now.
    Ready(OwnedFd),
    /// Connect this non-blocking socket to this address through the ring.
    Connect(OwnedFd, SockaddrStorage),
    /// Wait for a peer on the shared `unix-listen` socket.
    Accept,
}

fn storage_of(a: &dyn SockaddrLike) -> SockaddrStorage {
    crate::uring::sockaddr_storage_of(a)
}

/// Starts opening `spec`.
pub fn open(spec: &EndpointSpec) -> std::io::Result<Opening> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match spec {
        EndpointSpec::Unix(path) => {
            let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
            let addr = UnixAddr::new(path.as_path())?;
            Ok(Opening::Connect(fd, storage_of(&addr)))
        }
        EndpointSpec::Tcp(sa) => {
            let (family, st) = match sa {
                SocketAddr::V4(v4) => (AddressFamily::Inet, storage_of(&SockaddrIn::from(*v4))),
                SocketAddr::V6(v6) => (AddressFamily::Inet6, storage_of(&SockaddrIn6::from(*v6))),
            };
            let fd = socket(family, SockType::Stream, flags, None)?;
            let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::TcpNoDelay, &true);
            Ok(Opening::Connect(fd, st))
        }
        EndpointSpec::File(path) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                .open(path)?;
            Ok(Opening::Ready(OwnedFd::from(f)))
        }
        EndpointSpec::UnixListen(_) => Ok(Opening::Accept),
        EndpointSpec::Echo | EndpointSpec::Sink => {
            let (ours, theirs) = UnixStream::pair()?;
            ours.set_nonblocking(true)?;
            builtins()?.add(theirs, matches!(spec, EndpointSpec::Echo))?;
            Ok(Opening::Ready(OwnedFd::from(ours)))
        }
    }
}

use std::os::unix::fs::OpenOptionsExt;

/// The far ends of every `echo:` and `sink:` endpoint, served by one
/// thread over epoll: such an endpoint costs its socket pair, not a thread
/// (a thread and its heap cost about 2 MiB of RSS per idle channel).
struct Builtins {
    epoll: nix::sys::epoll::Epoll,
    ends: std::sync::Mutex<std::collections::HashMap<u64, Builtin>>,
    next: std::sync::atomic::AtomicU64,
}

struct Builtin {
    sock: UnixStream,
    echo: bool,
    /// Echo bytes the socket did not take yet (then only EPOLLOUT is
    /// watched: back-pressure toward the relay, bounded by one read).
    pending: Vec<u8>,
    done: usize,
}

static BUILTINS: std::sync::OnceLock<Result<Builtins, String>> = std::sync::OnceLock::new();

fn builtins() -> std::io::Result<&'static Builtins> {
    let b = BUILTINS.get_or_init(|| {
        let epoll = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| format!("epoll for built-in endpoints: {e}"))?;
        std::thread::Builder::new()
            .name("vmcrelay-builtin".into())
            .spawn(|| {
                if let Ok(b) = BUILTINS.wait() {
                    b.run();
                }
            })
            .map_err(|e| format!("built-in endpoint thread: {e}"))?;
        Ok(Builtins {
            epoll,
            ends: std::sync::Mutex::new(std::collections::HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    });
    b.as_ref().map_err(|e| std::io::Error::other(e.clone()))
}

impl Builtins {
    fn add(&self, sock: UnixStream, echo: bool) -> std::io::Result<()> {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        sock.set_nonblocking(true)?;
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key);
        let mut ends = self.ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.epoll.add(&sock, ev).map_err(std::io::Error::from)?;
        ends.insert(key, Builtin { sock, echo, pending: Vec::new(), done: 0 });
        Ok(())
    }

    fn run(&self) {
        use nix::sys::epoll::{EpollEvent, EpollTimeout};
        let mut events = vec![EpollEvent::empty(); 256];
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            let mut ends = self.ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for ev in &events[..n] {
                let key = ev.data();
                let Some(end) = ends.get_mut(&key) else { continue };
                if !self.serve(key, end, &mut buf) {
                    // Dropping the socket closes it and leaves the epoll set.
                    ends.remove(&key);
                }
            }
        }
    }

    /// One readiness event; returns whether the endpoint lives on.
    fn serve(&self, key: u64, end: &mut Builtin, buf: &mut [u8]) -> bool {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        // A few reads per event, then the next endpoint (level-triggered:
        // a busy one is reported again).
        for _ in 0..8 {
            if end.done < end.pending.len() {
                match end.sock.write(&end.pending[end.done..]) {
                    Ok(k) => end.done += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let ev = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP, key);
                        return self.epoll.modify(&end.sock, &mut { ev }).is_ok();
                    }
                    Err(_) => return false,
                }
                if end.done < end.pending.len() {
                    continue;
                }
                end.pending = Vec::new();
                end.done = 0;
                let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, key);
                if self.epoll.modify(&end.sock, &mut { ev }).is_err() {
                    return false;
                }
            }
            match end.sock.read(buf) {
                Ok(0) => return false,
                Ok(n) if end.echo => match end.sock.write(&buf[..n]) {
                    Ok(k) if k == n => {}
                    Ok(k) => end.pending = buf[k..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => end.pending = buf[..n].to_vec(),
                    Err(_) => return false,
                },
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if end.done < end.pending.len() {
            // The last read's echo went out in part: wait for room, not for
            // input (level-triggered EPOLLIN would not fire again once the
            // relay has sent everything, and the rest would sit here).
            let ev = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP, key);
            return self.epoll.modify(&end.sock, &mut { ev }).is_ok();
        }
        true
    }
}

/// Binds a `unix-listen` endpoint socket, replacing a stale socket file.
pub fn bind_listener(path: &Path) -> std::io::Result<OwnedFd> {
    match std::fs::symlink_metadata(path) {
        // A socket file nobody answers on is left over from a previous run.
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) && UnixStream::connect(path).is_err() => {
            std::fs::remove_file(path)?;
        }
        _ => {}
    }
    let l = UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on unix:{}: {e}", path.display())))?;
    l.set_nonblocking(true)?;
    Ok(OwnedFd::from(l))
}

/// A file's identity (device, inode): tells later whether a path still
/// names the socket file we created.
pub type FileId = (u64, u64);

/// The identity of the socket file at `path`, if there is one.
pub fn socket_file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
}

/// Creates the missing directories above a socket path, each with mode
/// 0755 whatever the umask; returns those it created, outermost first.
pub fn create_parent_dirs(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut dir = path.parent();
    while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::symlink_metadata(d) {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d.to_path_buf()),
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
        }
        dir = d.parent();
    }
    missing.reverse();
    let mut created = Vec::new();
    for d in missing {
        match std::fs::create_dir(&d) {
            Ok(()) => {}
            // Made by someone else meanwhile: not ours to chmod.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display()))),
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot chmod 0755 {}: {e}", d.display())))?;
        created.push(d);
    }
    Ok(created)
}

/// Gives the socket file at `path` its owner and group, then its mode.
pub fn apply_socket_perms(path: &Path, perms: &SocketPerms) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if perms.owner.is_some() || perms.group.is_some() {
        std::os::unix::fs::lchown(path, perms.owner, perms.group).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot give unix-listen:{} owner {} group {}: {e}",
                    path.display(),
                    perms.owner.map_or_else(|| "(unchanged)".into(), |u| u.to_string()),
                    perms.group.map_or_else(|| "(unchanged)".into(), |g| g.to_string()),
                ),
            )
        })?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode)).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot chmod {:04o} unix-listen:{}: {e}", perms.mode, path.display()))
    })
}

/// Removes the socket file at `path` if it is still the file `id`;
/// returns whether it did.
pub fn remove_socket_if_ours(path: &Path, id: FileId) -> bool {
    socket_file_id(path) == Some(id) && std::fs::remove_file(path).is_ok()
}

/// Peer address of an accepted TCP socket, for logs.
pub fn peer_of(fd: &OwnedFd) -> String {
    match nix::sys::socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(a) => {
            if let Some(v4) = a.as_sockaddr_in() {
                SocketAddr::from(std::net::SocketAddrV4::from(*v4)).to_string()
            } else if let Some(v6) = a.as_sockaddr_in6() {
                SocketAddr::from(std::net::SocketAddrV6::from(*v6)).to_string()
            } else {
                "unix".into()
            }
        }
        Err(_) => "?".into(),
    }
}
