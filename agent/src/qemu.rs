//! Pull-mode backups of a QEMU (or qemu-storage-daemon) block node, driven over QMP: the
//! point-in-time view libvirt and Proxmox use, set up, exported over NBD, and torn down.
//!
//! At the point in time, in one QMP transaction: `blockdev-backup sync=none` from the node into a
//! temporary qcow2 "fleece" overlay whose backing is the node (QEMU inserts a copy-before-write
//! filter above the node, so a guest write first copies the old data into the overlay: reading
//! the overlay shows the disk as it was; where QEMU supports it, a failing overlay write breaks
//! the snapshot, not the guest's write), and with a dirty bitmap: a new generation `B@G` (a
//! random G) starts counting, and the generation the asset's latest RP was tagged with (`B@F`,
//! which counted the changes since that RP) is disabled and exported with the overlay on a
//! private Unix socket. Naming generations ties a bitmap to exactly one RP: a lost, recreated,
//! disabled or inconsistent bitmap, a deleted RP or another VM's RP under the same asset name
//! can only lead to a full read, never to an incremental from the wrong parent.
//!
//! After a committed backup (tagged `B@G`) the old generation is removed; after a failure the
//! new one is merged back into the old one, which records again. A run killed before it could
//! clean up is cleaned up by the next one (or `--qmp-cleanup`): leftover generations merge into
//! the one the latest RP names. One pull of a node at a time (a lock file); QEMU's NBD server is
//! stopped only if elastio started it.
//!
//! QMP replies are bounded (lines of at most [`MAX_LINE`] bytes, a timeout on every read).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::AgentError;

/// Longest QMP message read.
pub const MAX_LINE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(30);

fn qerr(what: impl std::fmt::Display) -> AgentError {
    AgentError::Qemu(what.to_string())
}

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: PathBuf,
}

impl Qmp {
    /// Connects to the QMP socket and leaves capabilities negotiation.
    pub fn connect(socket: &Path) -> Result<Qmp, AgentError> {
        let s = UnixStream::connect(socket).map_err(|e| {
            qerr(format!(
                "cannot connect to QMP socket {}: {e}",
                socket.display()
            ))
        })?;
        s.set_read_timeout(Some(TIMEOUT)).ok();
        s.set_write_timeout(Some(TIMEOUT)).ok();
        let writer = s
            .try_clone()
            .map_err(|e| qerr(format!("QMP socket {}: {e}", socket.display())))?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            socket: socket.to_path_buf(),
        };
        let greeting = q.message()?;
        if greeting.get("QMP").is_none() {
            return Err(qerr(format!("{} is not a QMP socket", socket.display())));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// The next message that is not an event.
    fn message(&mut self) -> Result<Value, AgentError> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .map_err(|e| qerr(format!("QMP {}: {e}", self.socket.display())))?;
            if n == 0 {
                return Err(qerr(format!(
                    "QMP {} closed the connection",
                    self.socket.display()
                )));
            }
            if !line.ends_with(b"\n") {
                return Err(qerr(format!("a QMP message over {MAX_LINE} bytes")));
            }
            let v: Value = serde_json::from_slice(&line)
                .map_err(|e| qerr(format!("QMP sent something that is not JSON: {e}")))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs `command` with `args`; its `return` value, or its error as ours.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, AgentError> {
        let mut msg = json!({"execute": command, "arguments": args}).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| qerr(format!("QMP {}: {e}", self.socket.display())))?;
        let reply = self.message()?;
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        let desc = reply["error"]["desc"].as_str().unwrap_or("no description");
        Err(qerr(format!("QMP {command} failed: {desc}")))
    }
}

/// A pull-mode backup in progress: the fleece overlay, its export and (with a bitmap) the
/// rotation. [`Pull::finish`] must be called; dropping it without cleans up as a failure.
pub struct Pull {
    /// The QMP socket, connected to only while setting up and tearing down: QEMU serves one
    /// client per monitor, and a backup should not lock others out of it for hours.
    socket: PathBuf,
    node: String,
    /// The bitmap that counts changes since the asset's latest RP (exported when usable).
    current: Option<String>,
    /// Whether `current` exists, records and is consistent: an incremental may use it.
    pub incremental: bool,
    /// The bitmap made at this point in time (`BASE@GENERATION`): it counts the changes after
    /// this backup, so the RP made is tagged with its name.
    pub new_bitmap: Option<String>,
    /// The node's size in bytes.
    pub size: u64,
    dir: PathBuf,
    /// Held until the pull is torn down: one pull of a node at a time.
    _lock: std::fs::File,
    /// The export to read: `nbd+unix:///elastio?socket=...`.
    pub uri: String,
    done: bool,
}

/// Names of what a pull of `node` creates.
fn names(node: &str) -> (String, String, String) {
    (
        format!("elastio-fleece-{node}"),
        format!("elastio-fleece-job-{node}"),
        format!("elastio-export-{node}"),
    )
}

/// The bitmaps of `node` as (name, recording, inconsistent).
fn bitmaps(q: &mut Qmp, node: &str) -> Result<Vec<(String, bool, bool)>, AgentError> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let info = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .ok_or_else(|| qerr(format!("QEMU has no block node named {node:?}")))?;
    Ok(info["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    Some((
                        m["name"].as_str()?.to_string(),
                        m["recording"].as_bool().unwrap_or(false),
                        m["inconsistent"].as_bool().unwrap_or(false),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The per-node work directory and lock file under `base` (a pull of the same node always uses
/// the same ones, so a killed run's overlay is found and removed).
fn work_paths(base: &Path, socket: &Path, node: &str) -> (PathBuf, PathBuf) {
    // FNV-1a of the monitor and node: short, stable names.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{}\0{node}", socket.display());
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (
        base.join(format!("elastio-pull-{h:016x}")),
        base.join(format!("elastio-pull-{h:016x}.lock")),
    )
}

/// Takes the lock of a pull of `node` (failing at once if another holds it) and makes its
/// empty private work directory.
fn lock_and_dir(
    base: &Path,
    socket: &Path,
    node: &str,
) -> Result<(std::fs::File, PathBuf), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    let (dir, lock) = work_paths(base, socket, node);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&lock)
        .map_err(|e| qerr(format!("cannot open lock file {}: {e}", lock.display())))?;
    // SAFETY: flock on a descriptor we own.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::flock(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r != 0 {
        return Err(qerr(format!(
            "another pull-mode backup of {node} is running (lock {})",
            lock.display()
        )));
    }
    // A killed run's directory: ours only if it is a real directory we own.
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() && m.uid() == unsafe_geteuid() => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(_) => {
            return Err(qerr(format!(
                "{} exists and is not a directory of this user: remove it",
                dir.display()
            )))
        }
        Err(_) => {}
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| qerr(format!("cannot create {}: {e}", dir.display())))?;
    Ok((f, dir))
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

impl Pull {
    /// Sets up the point-in-time view of `node`, after removing what a killed earlier run left
    /// behind. With `bitmap` (a base name B): `current` is the exact bitmap the asset's latest
    /// RP was tagged with (`B@…`); it is exported if it still records and is consistent, and a
    /// new generation `B@…` starts counting now. `base`: where the per-node work directory (the
    /// fleece overlay, the NBD socket) goes.
    pub fn begin(
        socket: &Path,
        node: &str,
        bitmap: Option<&str>,
        current: Option<&str>,
        base: &Path,
    ) -> Result<Pull, AgentError> {
        let (lock, dir) = lock_and_dir(base, socket, node)?;
        let mut qmp = Qmp::connect(socket)?;
        let current = current.filter(|c| bitmap.is_some_and(|b| is_generation_of(c, b)));
        if let Some(e) = cleanup(&mut qmp, node, bitmap, current, true, None, false) {
            tracing::warn!("cleaning up an earlier pull of {node}: {e}");
        }
        let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
        let info = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .ok_or_else(|| qerr(format!("QEMU has no block node named {node:?}")))?;
        let size = info["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| qerr(format!("block node {node:?} reports no size")))?;
        let usable = current.is_some_and(|c| {
            bitmaps(&mut qmp, node)
                .unwrap_or_default()
                .iter()
                .any(|(n, recording, inconsistent)| n == c && *recording && !*inconsistent)
        });
        let new_bitmap = bitmap.map(|b| {
            use rand::Rng;
            format!("{b}@{:016x}", rand::thread_rng().gen::<u64>())
        });
        let (fleece, job, export) = names(node);
        let overlay = dir.join("fleece.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&overlay)
            .arg(size.to_string())
            .output()
            .map_err(|e| qerr(format!("cannot run qemu-img (qemu-utils): {e}")))?;
        if !made.status.success() {
            return Err(qerr(format!(
                "qemu-img create {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&made.stderr)
            )));
        }
        let mut pull = Pull {
            socket: socket.to_path_buf(),
            node: node.to_string(),
            current: current.map(str::to_string),
            incremental: usable,
            new_bitmap: new_bitmap.clone(),
            size,
            dir: dir.clone(),
            _lock: lock,
            uri: String::new(),
            done: false,
        };
        // On a failure part-way, the monitor is let go before `pull` tears down what was made.
        let made = (|q: &mut Qmp| -> Result<PathBuf, AgentError> {
            q.execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": fleece, "backing": node,
                       "file": {"driver": "file", "filename": overlay}}),
            )?;
            let backup = json!({"device": node, "target": fleece, "sync": "none", "job-id": job,
                                "auto-finalize": true, "auto-dismiss": true});
            let mut actions = Vec::new();
            if let Some(n) = &new_bitmap {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": n, "persistent": true}}));
            }
            if let Some(c) = current.filter(|_| usable) {
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                    "node": node, "name": c}}));
            }
            // A full overlay must fail the backup, not the guest's writes, where QEMU can say so.
            let mut safe = backup.clone();
            safe["on-cbw-error"] = json!("break-snapshot");
            let with = |b: &Value| {
                let mut a = vec![json!({"type": "blockdev-backup", "data": b})];
                a.extend(actions.iter().cloned());
                json!({ "actions": a })
            };
            match q.execute("transaction", with(&safe)) {
                Err(AgentError::Qemu(m)) if m.contains("on-cbw-error") => {
                    q.execute("transaction", with(&backup))?
                }
                r => r?,
            };
            let sock = dir.join("nbd.sock");
            q.execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )
            .map_err(|e| {
                qerr(format!(
                    "{e}: QEMU runs one NBD server and elastio starts its own; if another is \
                     running, back up through it instead (nbd://… --dirty-bitmap)"
                ))
            })?;
            let mut args = json!({"type": "nbd", "id": export, "node-name": fleece,
                                  "name": "elastio", "writable": false});
            if let Some(c) = current.filter(|_| usable) {
                args["bitmaps"] = json!([{"node": node, "name": c}]);
            }
            q.execute("block-export-add", args)?;
            Ok(sock)
        })(&mut qmp);
        drop(qmp);
        let sock = made?;
        pull.uri = format!("nbd+unix:///elastio?socket={}", sock.display());
        Ok(pull)
    }

    /// Tears the view down; `success`: the backup committed (tagged with `new_bitmap`), so the
    /// new generation counts from it and the old one goes.
    pub fn finish(mut self, success: bool) -> Result<(), AgentError> {
        self.done = true;
        self.teardown(success)
    }

    fn teardown(&mut self, success: bool) -> Result<(), AgentError> {
        let mut qmp = Qmp::connect(&self.socket)?;
        let node = self.node.clone();
        let base = self
            .new_bitmap
            .as_deref()
            .and_then(|n| n.rsplit_once('@'))
            .map(|(b, _)| b);
        // On success the new generation is current; on failure the old one stays current.
        let keep = if success {
            self.new_bitmap.clone()
        } else {
            self.current.clone()
        };
        let r = cleanup(
            &mut qmp,
            &node,
            base,
            keep.as_deref(),
            !success,
            Some(&self.dir),
            true,
        );
        let _ = std::fs::remove_dir_all(&self.dir);
        match r {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.teardown(false) {
                tracing::warn!(
                    "cleaning up the pull-mode backup of {} (the next run will): {e}",
                    self.node
                );
            }
        }
    }
}

/// Whether `name` is a generation (`BASE@HEX`) of bitmap `base`.
fn is_generation_of(name: &str, base: &str) -> bool {
    name.rsplit_once('@').is_some_and(|(b, g)| {
        b == base && !g.is_empty() && g.chars().all(|c| c.is_ascii_hexdigit())
    })
}

/// Removes what a pull of `node` left behind (a killed run): the export, the overlay, the job,
/// and merges the generations of `bitmap` made since `current` back into it (or removes them
/// when there is no `current`), as the next backup would first.
pub fn clean_up(
    socket: &Path,
    node: &str,
    bitmap: Option<&str>,
    current: Option<&str>,
    base: &Path,
) -> Result<(), AgentError> {
    let (_lock, dir) = lock_and_dir(base, socket, node)?;
    let mut qmp = Qmp::connect(socket)?;
    let r = cleanup(&mut qmp, node, bitmap, current, true, Some(&dir), false);
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Removes whatever of a pull of `node` exists, in order (export, NBD server, job, overlay,
/// bitmaps), each step tolerating its object's absence; returns the first real failure.
/// Bitmaps: every generation of `bitmap` other than `keep` is removed, its changes first merged
/// into `keep` when `merge` (a failed or killed run: `keep` must count them too); `keep`
/// records again. Without `keep`, every generation is removed. The NBD
/// server is stopped only when `ours` (this run started it) or an elastio export was found and
/// no other export remains (a killed run's server).
fn cleanup(
    q: &mut Qmp,
    node: &str,
    bitmap: Option<&str>,
    keep: Option<&str>,
    merge: bool,
    dir: Option<&Path>,
    ours: bool,
) -> Option<AgentError> {
    let (fleece, job, export) = names(node);
    let mut first: Option<AgentError> = None;
    let mut note = |r: Result<Value, AgentError>, absent: &[&str]| {
        if let Err(e) = r {
            let text = e.to_string();
            if !absent.iter().any(|a| text.contains(a)) && first.is_none() {
                first = Some(e);
            }
        }
    };
    let gone = [
        "not found",
        "No such",
        "Cannot find",
        "Failed to find",
        "not running",
        "doesn't exist",
        "No job",
    ];
    // The NBD exports (the server serves only those; FUSE and vhost exports do not need it).
    let exports = |q: &mut Qmp| -> Vec<String> {
        q.execute("query-block-exports", json!({}))
            .ok()
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter(|e| e["type"] == "nbd")
                        .filter_map(|e| e["id"].as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let had_ours = exports(q).contains(&export);
    note(
        q.execute("block-export-del", json!({"id": export, "mode": "hard"})),
        &gone,
    );
    // The export goes away asynchronously; its bitmap stays busy until then.
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline && exports(q).contains(&export) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let others = exports(q);
    if ours || (had_ours && others.is_empty()) {
        note(q.execute("nbd-server-stop", json!({})), &gone);
    }
    note(
        q.execute("block-job-cancel", json!({"device": job, "force": true})),
        &gone,
    );
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match q.execute("query-block-jobs", json!({})) {
            Ok(v)
                if v.as_array()
                    .is_some_and(|a| a.iter().any(|j| j["device"] == job)) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => break,
        }
    }
    note(
        q.execute("blockdev-del", json!({"node-name": fleece})),
        &gone,
    );
    if let Some(b) = bitmap {
        let all = bitmaps(q, node).unwrap_or_default();
        let keep_exists = keep.is_some_and(|k| all.iter().any(|(n, ..)| n == k));
        let stale: Vec<&String> = all
            .iter()
            .map(|(n, ..)| n)
            .filter(|n| is_generation_of(n, b) && Some(n.as_str()) != keep)
            .collect();
        let mut actions = Vec::new();
        if let (Some(k), true) = (keep, keep_exists) {
            if merge && !stale.is_empty() {
                actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                    "node": node, "target": k, "bitmaps": stale}}));
            }
            actions.push(
                json!({"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": k}}),
            );
        }
        for n in &stale {
            actions.push(
                json!({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": n}}),
            );
        }
        if !actions.is_empty() {
            note(q.execute("transaction", json!({"actions": actions})), &[]);
        }
    }
    if let Some(dir) = dir {
        let _ = std::fs::remove_file(dir.join("fleece.qcow2"));
        let _ = std::fs::remove_file(dir.join("nbd.sock"));
    }
    first
}
