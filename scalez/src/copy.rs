//! Copying recovery points to another vault (`vault copy`): the 3-2-1 rule's second copy.
//!
//! Two vaults have different keys, so a chunk's id differs between them (ids are keyed hashes
//! of the plaintext) and every chunk is re-hashed and re-sealed on the way; map pages, stream
//! manifests and tree records, which name chunk ids, are rebuilt. What stays is the RP itself:
//! its id, asset, creation time, parent, tags and figures, so a copied RP is the same RP, found
//! by the same id, in both vaults. The chunk boundaries stay too (a disk RP keeps its chunk
//! size, a stream its content-defined cuts), so the copy restores byte for byte.
//!
//! * **Incremental.** An RP already in the target (by id) is skipped; a chunk the target already
//!   has is not sent again (its dedup). A disk RP whose parent was copied before reads only the
//!   slots that differ from the parent: the others take the target parent's chunk unread.
//! * **Resumable, idempotent.** Each RP is written by one backup session of the target and
//!   committed last (packs, then index, then catalog entry), so a copy killed midway leaves
//!   only unreferenced packs (or indexed chunks, which the rerun does not send again), and the
//!   rerun copies exactly the RPs still missing.
//! * **Verified.** Every chunk read is authenticated and re-hashed in the source; after the
//!   commit, every chunk the copied RP references is checked to be indexed in the target.
//! * **Independent.** Nothing links the two vaults afterwards: a prune of one never affects the
//!   other.
//!
//! Instance RPs name the disk RPs of their volumes by id: those are copied first (a selection
//! that names an instance RP but not its volumes is refused).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::catalog::{RecoveryPoint, RpKind, StreamRef, TreeRef};
use crate::disk_writer::{is_zero, DiskWriter};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::reader::DiskReader;
use crate::session::BackupSession;
use crate::stream_map;
use crate::tree::{self, TreeReader};
use crate::vault::{Vault, Verify};

/// Disk slots read with one request (when contiguous in one pack): 8 MiB of 128 KiB chunks.
const READ_RUN: usize = 64;

/// What a copy did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    pub dry_run: bool,
    /// RPs copied, in order.
    pub copied: Vec<String>,
    /// Selected RPs the target already had.
    pub already_there: usize,
    /// Selected RPs the target had and deleted since: not copied again.
    pub deleted_in_target: Vec<String>,
    /// Chunks read from the source (decrypted and re-hashed).
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Disk slots taken from the target's copy of the parent, unread.
    pub slots_kept: u64,
    /// Chunks the target lacked (sent), and their plaintext bytes.
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    /// Bytes the target's store received (sealed, compressed), and its requests.
    pub stored_bytes: u64,
    pub requests: u64,
    /// A dry run's estimate of the requests the copy would send: per RP, a pack per pack size
    /// of new bytes (before compression: an upper bound), an index object per 8 packs, the
    /// catalog entry and the session's lease (write, refresh, delete).
    pub requests_estimate: u64,
    pub elapsed_ms: u64,
}

/// Copies `rps` (any order: parents and volume RPs go first) from `from` to `to`.
pub fn copy_rps(
    from: &Arc<Vault>,
    to: &Arc<Vault>,
    rps: &[RecoveryPoint],
    dry_run: bool,
    progress: &dyn Fn(&str),
) -> Result<CopyReport> {
    let started = Instant::now();
    let requests = to.store().stats().requests;
    let mut report = CopyReport {
        dry_run,
        ..CopyReport::default()
    };
    // Creation order, instances after the disks they name.
    let mut order: Vec<&RecoveryPoint> = rps.iter().collect();
    order.sort_by(|a, b| {
        (a.kind == RpKind::Instance, &a.created, &a.id).cmp(&(
            b.kind == RpKind::Instance,
            &b.created,
            &b.id,
        ))
    });
    for rp in order {
        match to.get_rp(&rp.id) {
            Ok(_) => {
                report.already_there += 1;
                continue;
            }
            Err(Error::RpNotFound { .. }) => {}
            // Damaged or unreachable: copying over it would fail at the commit anyway.
            Err(e) => return Err(e),
        }
        // Deleted in the target (its own retention, or rp delete): a versioned target still
        // has the catalog entry's versions. Writing it again would bring back what the target
        // removed, and on a locked target look like tampering.
        if let Some(lock) = to.store().object_lock() {
            let key = rp.id.catalog_key();
            if lock.versions(&key)?.iter().any(|v| v.key == key) {
                report.deleted_in_target.push(rp.id.to_string());
                continue;
            }
        }
        progress(&format!(
            "copying {} ({} {})",
            rp.id, rp.kind, rp.asset.name
        ));
        let sent_before = report.bytes_sent;
        let mut c = Copier {
            from,
            to,
            dry_run,
            report: &mut report,
        };
        match rp.kind {
            RpKind::Disk => c.disk(rp)?,
            RpKind::Stream => c.stream_rp(rp)?,
            RpKind::File => c.tree_rp(rp)?,
            RpKind::Instance => {
                let record = rp.instance()?;
                // Right before the commit: every volume RP must be in the target (copied above,
                // or there already), not merely selected.
                for v in &record.volumes {
                    if !dry_run && to.get_rp(&v.rp).is_err() {
                        return Err(Error::InvalidParameter(format!(
                            "instance RP {} names disk RP {} ({}), which the target does not \
                             have (not selected, or deleted there): nothing of the instance \
                             was committed",
                            rp.id, v.rp, v.device_name
                        )));
                    }
                }
                if !dry_run {
                    to.commit_rp(rp)?;
                }
            }
        }
        let packs = (report.bytes_sent - sent_before).div_ceil(to.config().pack_size as u64);
        report.requests_estimate += packs + packs.div_ceil(8) + 1 + 3;
        report.copied.push(rp.id.to_string());
    }
    report.requests = to.store().stats().requests - requests;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

struct Copier<'a> {
    from: &'a Arc<Vault>,
    to: &'a Arc<Vault>,
    dry_run: bool,
    report: &'a mut CopyReport,
}

/// Where the chunks of one RP go: a backup session of the target, or nowhere (dry run).
enum Sink {
    Session(Box<BackupSession>),
    DryRun,
}

impl Copier<'_> {
    fn sink(&self) -> Result<Sink> {
        Ok(if self.dry_run {
            Sink::DryRun
        } else {
            Sink::Session(Box::new(BackupSession::new(self.to.clone())?))
        })
    }

    /// Reads source chunk `id` and stores it in the target; its id there (None: all zeros, for
    /// disk slots).
    fn chunk(&mut self, sink: &Sink, id: &ChunkId, zero_is_none: bool) -> Result<Option<ChunkId>> {
        let plain = self.from.read_chunk(id)?;
        self.report.chunks_read += 1;
        self.report.bytes_read += plain.len() as u64;
        if zero_is_none && is_zero(&plain) {
            return Ok(None);
        }
        let new = self.to.keys().chunk_id(&plain);
        if !self.to.has_chunk(&new) {
            self.report.chunks_sent += 1;
            self.report.bytes_sent += plain.len() as u64;
        }
        if let Sink::Session(s) = sink {
            s.store_chunk(new, &plain)?;
        }
        Ok(Some(new))
    }

    /// A blob made here (a map page, a manifest): stored, its id returned.
    fn blob(&mut self, sink: &Sink, plain: &[u8]) -> Result<ChunkId> {
        let id = self.to.keys().chunk_id(plain);
        if let Sink::Session(s) = sink {
            s.store_chunk(id, plain)?;
        }
        Ok(id)
    }

    /// Flushes the session and commits `rp` (the source's, with its new body).
    fn commit(&mut self, sink: Sink, rp: RecoveryPoint) -> Result<()> {
        let Sink::Session(mut s) = sink else {
            return Ok(());
        };
        let stats = s.finish()?;
        self.report.stored_bytes += stats.bytes_written;
        // Verified before it becomes visible: a failure leaves no RP a rerun would skip.
        self.verify(&rp)?;
        s.commit(&rp)
    }

    fn disk(&mut self, rp: &RecoveryPoint) -> Result<()> {
        let map = rp.disk()?.clone();
        let src = DiskReader::new(self.from.clone(), map.clone(), 1 << 20);
        // The parent's copy in the target, for the slots that did not change.
        let parents = match &rp.parent {
            Some(p) => match (self.from.get_rp(p), self.to.get_rp(p)) {
                (Ok(sp), Ok(tp)) => match (sp.disk, tp.disk) {
                    (Some(s), Some(t))
                        if s.size == map.size
                            && t.size == map.size
                            && s.chunk_size == map.chunk_size
                            && t.chunk_size == map.chunk_size =>
                    {
                        Some((
                            DiskReader::new(self.from.clone(), s, 1 << 20),
                            DiskReader::new(self.to.clone(), t, 1 << 20),
                        ))
                    }
                    _ => None,
                },
                _ => None,
            },
            None => None,
        };
        let writer = match self.dry_run {
            true => None,
            false => Some(DiskWriter::with_chunk_size(
                self.to,
                map.size,
                map.chunk_size,
            )?),
        };
        let mut asm = writer.as_ref().map(DiskWriter::map);
        // Slots to read, gathered into runs read with one request where the source allows.
        let mut run: Vec<(u64, ChunkId)> = Vec::new();
        let flush = |this: &mut Self,
                     run: &mut Vec<(u64, ChunkId)>,
                     asm: &mut Option<crate::disk_writer::MapAssembly<'_>>|
         -> Result<()> {
            if run.is_empty() {
                return Ok(());
            }
            let chunks = this.from.read_disk_chunks(&map, run, Verify::Rehash)?;
            for plain in chunks {
                this.report.chunks_read += 1;
                this.report.bytes_read += plain.len() as u64;
                let id = this.to.keys().chunk_id(&plain);
                if !is_zero(&plain) && !this.to.has_chunk(&id) {
                    this.report.chunks_sent += 1;
                    this.report.bytes_sent += plain.len() as u64;
                }
                if let (Some(w), Some(a)) = (writer.as_ref(), asm.as_mut()) {
                    a.push(w.put(&plain)?)?;
                }
            }
            run.clear();
            Ok(())
        };
        for slot in 0..map.slots() {
            let Some(sid) = src.chunk_id(slot)? else {
                flush(self, &mut run, &mut asm)?;
                if let Some(a) = asm.as_mut() {
                    a.push([None])?;
                }
                continue;
            };
            if let Some((sp, tp)) = &parents {
                if sp.chunk_id(slot)? == Some(sid) {
                    flush(self, &mut run, &mut asm)?;
                    self.report.slots_kept += 1;
                    if let Some(a) = asm.as_mut() {
                        a.keep(tp.chunk_id(slot)?)?;
                    }
                    continue;
                }
            }
            run.push((slot, sid));
            if run.len() >= READ_RUN {
                flush(self, &mut run, &mut asm)?;
            }
        }
        flush(self, &mut run, &mut asm)?;
        let Some(asm) = asm else {
            return Ok(());
        };
        let new_map = asm.finish()?;
        let writer = writer.expect("a map has a writer");
        let mut copy = rp.clone();
        copy.disk = Some(new_map);
        let stats = writer.commit_as(&copy, |rp| self.verify(rp))?;
        self.report.stored_bytes += stats.bytes_written;
        Ok(())
    }

    /// Every chunk the copied RP references is indexed in the target.
    fn verify(&self, rp: &RecoveryPoint) -> Result<()> {
        crate::walk::for_each_chunk(self.to, rp, &mut crate::walk::stop_on_damage, &mut |id| {
            if self.to.has_chunk(id) {
                Ok(())
            } else {
                Err(Error::MissingChunk {
                    location: self.to.location(),
                    chunk: *id,
                })
            }
        })
    }

    fn stream(&mut self, sink: &Sink, s: &StreamRef) -> Result<StreamRef> {
        let Some(_) = &s.root else {
            return Ok(s.clone());
        };
        let mut manifests = Vec::new();
        for m in stream_map::manifests(self.from, s)? {
            let mut entries = Vec::new();
            for (id, len) in stream_map::manifest(self.from, &m)? {
                let new = self
                    .chunk(sink, &id, false)?
                    .expect("a stream chunk is never taken for zeros");
                entries.push((new, len));
            }
            manifests.push(self.blob(sink, &stream_map::encode_manifest(&entries))?);
        }
        let root = self.blob(sink, &stream_map::encode_root(&manifests))?;
        Ok(StreamRef {
            root: Some(root),
            ..s.clone()
        })
    }

    fn stream_rp(&mut self, rp: &RecoveryPoint) -> Result<()> {
        let sink = self.sink()?;
        let s = self.stream(&sink, rp.stream()?)?;
        let mut copy = rp.clone();
        copy.stream = Some(s);
        self.commit(sink, copy)
    }

    fn tree_rp(&mut self, rp: &RecoveryPoint) -> Result<()> {
        let t = rp.tree()?;
        let sink = self.sink()?;
        let mut entries = Vec::new();
        for e in TreeReader::open(self.from, &t.stream, &format!("file RP {}", rp.id))? {
            let mut e = e?;
            for c in e.chunks.iter_mut() {
                c.0 = self
                    .chunk(&sink, &c.0, false)?
                    .expect("a file chunk is never taken for zeros");
            }
            entries.push(e);
        }
        let stream = match &sink {
            Sink::Session(s) => tree::store_tree(s, &entries)?,
            Sink::DryRun => t.stream.clone(),
        };
        let mut copy = rp.clone();
        copy.tree = Some(TreeRef {
            stream,
            ..t.clone()
        });
        self.commit(sink, copy)
    }
}
