//! Application-consistent snapshots: a pre-command (flush a database), a file-system freeze
//! (`FIFREEZE`) for the milliseconds a snapshot call takes, the thaw (`FITHAW`) and a
//! post-command, around EBS `CreateSnapshot(s)` ([`SnapshotHook`]).
//!
//! A frozen file system blocks every writer on the machine, so the thaw must happen whatever
//! becomes of elastio. Before freezing, a watchdog process is started (this very binary, its
//! hidden `internal-thaw-watchdog` command, in a session of its own): it inherits the very
//! descriptors elastio froze (no path is opened twice) and thaws them when the timeout passes
//! or as soon as its stdin closes, which is when elastio has thawed them, or when elastio died,
//! even by SIGKILL. The residual risk is the
//! watchdog being killed too (`kill -9` of both) within the window: the file systems then stay
//! frozen until `fsfreeze -u` (or `xfs_freeze -u`).
//!
//! With `skip_free`, each file system is asked for its free space ([`crate::fsmap`]) while it
//! is frozen, right before the snapshot call: that map is exactly the snapshot's, so the EBS
//! read can leave the free blocks unread. The question has half the timeout; a file system that
//! does not answer in time (or at all) is read whole.
// ioctls on directory descriptors; poll(2) on the watchdog's stdin.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::AgentError;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`.
const FIFREEZE: libc::c_ulong = 0xc004_5877;
const FITHAW: libc::c_ulong = 0xc004_5878;

/// The hidden command of the elastio binary that runs the watchdog.
pub const WATCHDOG_COMMAND: &str = "internal-thaw-watchdog";

/// What runs around a snapshot call.
pub trait SnapshotHook: Send + Sync {
    /// Right before the call: an error aborts the backup with nothing left frozen.
    fn before(&self) -> Result<(), AgentError>;
    /// Right after the call returned, whatever it returned: an error means the snapshot may
    /// not be consistent (the backup then fails and removes it).
    fn after(&self) -> Result<(), AgentError>;
    /// The free space the frozen file systems reported during the last freeze, when asked for.
    fn free_space(&self) -> Vec<MountFree> {
        Vec::new()
    }
}

/// The free space of one file system frozen for a snapshot, asked for while it was frozen.
#[derive(Debug, Clone)]
pub struct MountFree {
    pub mount: PathBuf,
    /// Where its data device lies on an EBS volume (looked up while frozen, so no partition
    /// change or device reuse after the thaw can move it), or why it is not on one.
    pub extent: Result<crate::aws::VolumeExtent, String>,
    /// Free byte ranges of that device ([`crate::fsmap`]), or why there are none.
    pub free: Result<Vec<(u64, u64)>, String>,
}

/// Longest the free-space question may hold a freeze: every writer on the machine waits.
const MAX_FREE_SCAN: Duration = Duration::from_secs(2);

/// Most free ranges asked of one file system (16 bytes each).
const MAX_FREE_RANGES: usize = 1 << 20;

fn qerr(what: String) -> AgentError {
    AgentError::Quiesce(what)
}

/// Opens a mount point for the freeze ioctls.
fn open_mount(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
}

fn ioctl(f: &File, request: libc::c_ulong) -> io::Result<()> {
    // SAFETY: FIFREEZE and FITHAW take an int argument that the kernel ignores; the fd is ours.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), request, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pre-command, freeze of `mounts` bounded by `timeout`, thaw, post-command.
pub struct Quiesce {
    pub pre_cmd: Option<String>,
    pub post_cmd: Option<String>,
    pub mounts: Vec<PathBuf>,
    pub timeout: Duration,
    /// The elastio binary (runs the watchdog).
    pub exe: PathBuf,
    /// Ask each frozen file system for its free space while it is frozen.
    pub skip_free: bool,
    frozen: Mutex<Option<Frozen>>,
    free: Mutex<Vec<MountFree>>,
}

struct Frozen {
    files: Vec<(PathBuf, File)>,
    watchdog: Option<Child>,
}

impl Quiesce {
    pub fn new(
        pre_cmd: Option<String>,
        post_cmd: Option<String>,
        mounts: Vec<PathBuf>,
        timeout: Duration,
    ) -> Result<Self, AgentError> {
        let exe = std::env::current_exe().map_err(|e| {
            qerr(format!(
                "cannot find the elastio binary for the watchdog: {e}"
            ))
        })?;
        Ok(Quiesce {
            pre_cmd,
            post_cmd,
            mounts,
            timeout,
            exe,
            skip_free: false,
            frozen: Mutex::new(None),
            free: Mutex::new(Vec::new()),
        })
    }

    fn run(&self, which: &str, cmd: &str) -> Result<(), AgentError> {
        let out = Command::new("sh")
            .args(["-c", cmd])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| qerr(format!("{which} {cmd:?} cannot run: {e}")))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(qerr(format!(
                "{which} {cmd:?} failed ({}): {}",
                out.status,
                tail.trim()
            )));
        }
        Ok(())
    }

    fn freeze(&self) -> Result<Frozen, AgentError> {
        let mut frozen = Frozen {
            files: Vec::new(),
            watchdog: None,
        };
        if self.mounts.is_empty() {
            return Ok(frozen);
        }
        // Opened once: the descriptors frozen are the ones the watchdog inherits, so no path
        // swapped in between (a symlink someone else controls) can make it thaw something else.
        let mut opened = Vec::new();
        for m in &self.mounts {
            let f = open_mount(m)
                .map_err(|e| qerr(format!("cannot open mount point {}: {e}", m.display())))?;
            opened.push((m.clone(), f));
        }
        // Inheritable copies for the watchdog (the originals are close-on-exec).
        let mut inherited = Vec::new();
        for (m, f) in &opened {
            // SAFETY: F_DUPFD on a descriptor we own returns a new one (without FD_CLOEXEC).
            let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD, 3) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                close_all(&inherited);
                return Err(qerr(format!(
                    "cannot pass {} to the watchdog: {e}",
                    m.display()
                )));
            }
            inherited.push(fd);
        }
        let spawned = Command::new(&self.exe)
            .arg(WATCHDOG_COMMAND)
            .arg(self.timeout.as_millis().to_string())
            .args(inherited.iter().map(|fd| fd.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        close_all(&inherited);
        let mut child =
            spawned.map_err(|e| qerr(format!("cannot start the thaw watchdog: {e}")))?;
        // Byte by byte: nothing after "ready" may be swallowed by a buffer.
        let mut line = Vec::new();
        let mut ready = false;
        if let Some(o) = child.stdout.as_mut() {
            let mut b = [0u8; 1];
            while line.len() < 64 && matches!(o.read(&mut b), Ok(1)) {
                if b[0] == b'\n' {
                    ready = line == b"ready";
                    break;
                }
                line.push(b[0]);
            }
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(qerr(format!(
                "the thaw watchdog did not start: {}",
                line.trim()
            )));
        }
        frozen.watchdog = Some(child);
        for (m, f) in opened {
            if let Err(e) = ioctl(&f, FIFREEZE) {
                let _ = thaw(frozen);
                return Err(qerr(format!("cannot freeze {}: {e}", m.display())));
            }
            frozen.files.push((m, f));
        }
        if self.skip_free {
            *self.free.lock().expect("free space") = self.ask_free(&frozen);
        }
        Ok(frozen)
    }

    /// The free space of each frozen file system and where it lies on an EBS volume. A
    /// quarter of the freeze's timeout (2 s at most), so the snapshot call still fits: a file
    /// system that does not answer in time is read whole.
    fn ask_free(&self, frozen: &Frozen) -> Vec<MountFree> {
        use std::os::unix::fs::MetadataExt;
        let deadline = std::time::Instant::now() + (self.timeout / 4).min(MAX_FREE_SCAN);
        let sys = crate::aws::sys_root();
        frozen
            .files
            .iter()
            .map(|(m, f)| {
                let extent = f.metadata().map_err(|e| e.to_string()).and_then(|md| {
                    crate::aws::volume_extent(md.dev(), &sys).map_err(|e| e.to_string())
                });
                // Off an EBS volume the map would go unused: the freeze is not held for it.
                let free = match &extent {
                    Ok(_) => crate::fsmap::free_space(f, MAX_FREE_RANGES, 512 * 1024, deadline)
                        .map_err(|e| e.to_string()),
                    Err(_) => Err("not asked".into()),
                };
                MountFree {
                    mount: m.clone(),
                    extent,
                    free,
                }
            })
            .collect()
    }
}

fn close_all(fds: &[libc::c_int]) {
    for &fd in fds {
        // SAFETY: closing descriptors this process made and nothing else uses.
        unsafe { libc::close(fd) };
    }
}

/// Thaws what `frozen` froze and stops its watchdog; an error if the watchdog's timeout had
/// thawed first (the snapshot then may postdate the thaw). Returns the mount points that were
/// no longer frozen (thawed by someone else, or by the watchdog).
fn thaw(frozen: Frozen) -> Result<Vec<PathBuf>, AgentError> {
    let mut failed = Vec::new();
    let mut early = Vec::new();
    for (m, f) in &frozen.files {
        match ioctl(f, FITHAW) {
            Ok(()) => {}
            // Not frozen any more: the watchdog's timeout (reported below), or someone else.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => early.push(m.clone()),
            Err(e) => failed.push(format!("{}: {e}", m.display())),
        }
    }
    let mut said = String::new();
    if let Some(mut child) = frozen.watchdog {
        drop(child.stdin.take());
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut said);
        }
        let _ = child.wait();
    }
    if !failed.is_empty() {
        return Err(qerr(format!("cannot thaw {}", failed.join(", "))));
    }
    if said.contains("timeout") {
        return Err(qerr(
            "the freeze outlasted its timeout and was released before the snapshot call \
             returned: the snapshot may not be application-consistent"
                .into(),
        ));
    }
    Ok(early)
}

impl SnapshotHook for Quiesce {
    fn free_space(&self) -> Vec<MountFree> {
        self.free.lock().expect("free space").clone()
    }

    fn before(&self) -> Result<(), AgentError> {
        self.free.lock().expect("free space").clear();
        if let Some(cmd) = &self.pre_cmd {
            if let Err(e) = self.run("--pre-cmd", cmd) {
                // It may have done part of its work (a lock taken): let the post-command undo it.
                if let Some(post) = &self.post_cmd {
                    if let Err(pe) = self.run("--post-cmd", post) {
                        tracing::warn!("{pe}");
                    }
                }
                return Err(e);
            }
        }
        match self.freeze() {
            Ok(f) => {
                *self.frozen.lock().expect("freeze state") = Some(f);
                Ok(())
            }
            Err(e) => {
                if let Some(post) = &self.post_cmd {
                    if let Err(pe) = self.run("--post-cmd", post) {
                        tracing::warn!("{pe}");
                    }
                }
                Err(e)
            }
        }
    }

    fn after(&self) -> Result<(), AgentError> {
        let frozen = self.frozen.lock().expect("freeze state").take();
        let thawed = frozen.map_or(Ok(Vec::new()), thaw).map(|early| {
            // Thawed before the snapshot call returned: its free-space map may not be the
            // snapshot's any more (blocks allocated since), so it is not used.
            let mut free = self.free.lock().expect("free space");
            for m in free.iter_mut().filter(|f| early.contains(&f.mount)) {
                if m.free.is_ok() {
                    let e = format!(
                        "{} was thawed by someone else before the snapshot call returned; its \
                         free space is read",
                        m.mount.display()
                    );
                    tracing::warn!("{e}");
                    eprintln!("warning: {e}");
                }
                m.free = Err("thawed early".into());
            }
        });
        // The snapshot's consistency does not depend on the post-command: its failure is
        // reported, not a reason to throw the snapshot away.
        if let Some(cmd) = &self.post_cmd {
            if let Err(e) = self.run("--post-cmd", cmd) {
                tracing::warn!("{e}");
                eprintln!("warning: {e}");
            }
        }
        thawed
    }
}

impl Drop for Quiesce {
    fn drop(&mut self) {
        // An error between before() and after() unwinds through here: never leave a freeze.
        if let Some(f) = self.frozen.lock().ok().and_then(|mut g| g.take()) {
            let _ = thaw(f);
        }
    }
}

/// The watchdog (`elastio internal-thaw-watchdog TIMEOUT_MS FD...`): takes the mount points'
/// descriptors it inherited, says `ready`, and thaws them all when its stdin closes or the timeout passes (saying
/// `timeout` first). Returns the exit code.
pub fn watchdog_main(args: &[OsString]) -> i32 {
    // Its own session: a signal to elastio's process group does not reach it; and the usual
    // termination signals are ignored (`systemctl stop` sends SIGTERM to the whole cgroup): its
    // life is bounded by the timeout and its stdin anyway.
    // SAFETY: setsid has no preconditions; failure (already a leader) is harmless. Ignoring
    // signals with SIG_IGN involves no handler code.
    unsafe {
        libc::setsid();
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let Some(ms) = args.first().and_then(|a| a.to_str()?.parse::<u64>().ok()) else {
        eprintln!("usage: elastio {WATCHDOG_COMMAND} TIMEOUT_MS FD...");
        return 2;
    };
    // The mount points' descriptors, inherited from elastio (which froze these very ones).
    let mut files = Vec::new();
    for a in &args[1..] {
        let Some(fd) = a
            .to_str()
            .and_then(|a| a.parse::<libc::c_int>().ok())
            .filter(|&fd| fd > 2)
        else {
            eprintln!("thaw watchdog: {a:?} is not a descriptor number");
            return 2;
        };
        // SAFETY: the descriptor was inherited for this process alone to own; fstat first checks
        // that it is open.
        let open = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st) == 0
        };
        if !open {
            eprintln!("thaw watchdog: descriptor {fd} is not open");
            return 1;
        }
        // SAFETY: as above: open, and owned by nothing else in this process.
        files.push(unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) });
    }
    let mut out = io::stdout();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let mut buf = [0u8; 64];
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() && !timed_out {
            timed_out = true;
            let _ = writeln!(out, "timeout");
            let _ = out.flush();
        }
        if timed_out {
            // Past the deadline, thaw and keep thawing while elastio lives: a freeze still
            // waiting for writers when the deadline came (FITHAW fails then) is caught when it
            // completes.
            for f in &files {
                let _ = ioctl(f, FITHAW);
            }
        }
        let mut pfd = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = if timed_out {
            100
        } else {
            left.as_millis().clamp(1, i32::MAX as u128) as i32
        };
        // SAFETY: one valid pollfd for stdin.
        let r = unsafe { libc::poll(&mut pfd, 1, wait) };
        if r > 0 {
            // EOF (or an error): elastio is done or gone.
            match io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    for f in &files {
        let _ = ioctl(f, FITHAW);
    }
    0
}
