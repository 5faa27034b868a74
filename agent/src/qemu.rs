//! Pull-mode backups of a QEMU (or qemu-storage-daemon) block node, driven over QMP: the
//! point-in-time view libvirt and Proxmox use, set up, exported over NBD, and torn down.
//!
//! At the point in time, in one QMP transaction: `blockdev-backup sync=none` from the node into a
//! temporary qcow2 "fleece" overlay whose backing is the node (QEMU inserts a copy-before-write
//! filter above the node, so a guest write first copies the old data into the overlay: reading
//! the overlay shows the disk as it was) and, with a dirty bitmap `B`: `B` is disabled (it holds
//! the changes since the previous backup, up to now) and `B.elastio-next` starts tracking the
//! changes from now on. The overlay is exported over NBD (with `B` as a meta context) on a
//! private Unix socket, and read like any NBD source.
//!
//! After a successful backup `B` becomes `B.elastio-next` (clear, merge, enable, remove, in one
//! transaction): it counts changes since this backup. After a failure both merge back into `B`,
//! which then counts since the previous backup again, so nothing is ever lost from the bitmap.
//! Every object has a fixed name derived from the node, so a run killed before it could clean
//! up is cleaned up by the next one ([`Pull::begin`] first removes any leftover).
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
    bitmap: Option<String>,
    /// Whether the bitmap existed before (an incremental is possible) or was made now.
    pub bitmap_existed: bool,
    dir: PathBuf,
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

fn next_of(bitmap: &str) -> String {
    format!("{bitmap}.elastio-next")
}

impl Pull {
    /// Sets up the point-in-time view of `node` (and rotates `bitmap`, creating it on the first
    /// run), after removing what a killed earlier run left behind. `dir`: where the fleece
    /// overlay and the NBD socket live (a private directory).
    pub fn begin(
        socket: &Path,
        node: &str,
        bitmap: Option<&str>,
        dir: &Path,
    ) -> Result<Pull, AgentError> {
        let mut qmp = Qmp::connect(socket)?;
        cleanup(&mut qmp, node, bitmap, None, false);
        let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
        let info = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == node))
            .ok_or_else(|| qerr(format!("QEMU has no block node named {node:?}")))?;
        let size = info["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| qerr(format!("block node {node:?} reports no size")))?;
        let bitmap_existed = bitmap.is_some_and(|b| {
            info["dirty-bitmaps"]
                .as_array()
                .is_some_and(|a| a.iter().any(|m| m["name"] == b))
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
            bitmap: bitmap.map(str::to_string),
            bitmap_existed,
            dir: dir.to_path_buf(),
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
            let mut actions = vec![json!({"type": "blockdev-backup", "data": {
                "device": node, "target": fleece, "sync": "none", "job-id": job,
                "auto-finalize": true, "auto-dismiss": true}})];
            if let Some(b) = bitmap {
                if !bitmap_existed {
                    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                        "node": node, "name": b, "persistent": true, "disabled": true}}));
                } else {
                    actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                        "node": node, "name": b}}));
                }
                actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                    "node": node, "name": next_of(b), "persistent": true}}));
            }
            q.execute("transaction", json!({"actions": actions}))?;
            let sock = dir.join("nbd.sock");
            q.execute(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )?;
            let mut args = json!({"type": "nbd", "id": export, "node-name": fleece,
                                  "name": "elastio", "writable": false});
            if let Some(b) = bitmap.filter(|_| bitmap_existed) {
                args["bitmaps"] = json!([{"node": node, "name": b}]);
            }
            q.execute("block-export-add", args)?;
            Ok(sock)
        })(&mut qmp);
        drop(qmp);
        let sock = made?;
        pull.uri = format!("nbd+unix:///elastio?socket={}", sock.display());
        Ok(pull)
    }

    /// Tears the view down; `success`: the backup committed, so the bitmap now counts from it.
    pub fn finish(mut self, success: bool) -> Result<(), AgentError> {
        self.done = true;
        self.teardown(success)
    }

    fn teardown(&mut self, success: bool) -> Result<(), AgentError> {
        let mut qmp = Qmp::connect(&self.socket)?;
        let (node, bitmap) = (self.node.clone(), self.bitmap.clone());
        match cleanup(&mut qmp, &node, bitmap.as_deref(), Some(&self.dir), success) {
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

/// Removes what a pull of `node` left behind (a killed run): the export, the overlay, the job,
/// and merges the changes tracked since back into `bitmap`, as the next backup would first.
pub fn clean_up(socket: &Path, node: &str, bitmap: Option<&str>) -> Result<(), AgentError> {
    let mut qmp = Qmp::connect(socket)?;
    match cleanup(&mut qmp, node, bitmap, None, false) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Removes whatever of a pull of `node` exists, in order (export, NBD server, bitmaps, job,
/// overlay), each step tolerating its object's absence; returns the first real failure.
/// `success`: rotate the bitmap forward, else merge the new changes back into it.
fn cleanup(
    q: &mut Qmp,
    node: &str,
    bitmap: Option<&str>,
    dir: Option<&Path>,
    success: bool,
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
        "not running",
        "doesn't exist",
        "No job",
    ];
    note(
        q.execute("block-export-del", json!({"id": export, "mode": "hard"})),
        &gone,
    );
    // The export goes away asynchronously; its bitmap stays busy until then.
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match q.execute("query-block-exports", json!({})) {
            Ok(v)
                if v.as_array()
                    .is_some_and(|a| a.iter().any(|e| e["id"] == export)) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => break,
        }
    }
    note(q.execute("nbd-server-stop", json!({})), &gone);
    if let Some(b) = bitmap {
        let next = next_of(b);
        let has_next = q
            .execute("query-named-block-nodes", json!({"flat": true}))
            .ok()
            .and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|n| n["node-name"] == node)
                    .map(|n| {
                        n["dirty-bitmaps"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|m| m["name"] == next.as_str()))
                    })
            })
            .unwrap_or(false);
        if has_next {
            let mut actions = Vec::new();
            if success {
                actions.push(
                    json!({"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": b}}),
                );
            }
            actions.extend([
                json!({"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": b, "bitmaps": [next]}}),
                json!({"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": b}}),
                json!({"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": next}}),
            ]);
            note(q.execute("transaction", json!({"actions": actions})), &[]);
        } else if success {
            // The first run made the bitmap disabled at the point in time: it starts counting now.
            note(
                q.execute(
                    "block-dirty-bitmap-enable",
                    json!({"node": node, "name": b}),
                ),
                &gone,
            );
        }
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
    if let Some(dir) = dir {
        let _ = std::fs::remove_file(dir.join("fleece.qcow2"));
        let _ = std::fs::remove_file(dir.join("nbd.sock"));
    }
    first
}
