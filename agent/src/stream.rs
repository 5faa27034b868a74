//! Streams of unknown length (stdin, a file): content-defined chunks (FastCDC 2020) so an insert
//! near the start does not shift every later chunk, stored like any chunk; restored byte-exact.
//!
//! Backup = reader thread (cut points) → workers (hash, compress, encrypt) → this thread, which
//! puts the chunk ids back in stream order into manifests ([`scalez::stream_map`]). Memory: the
//! chunker's buffer (max chunk size) plus the chunks queued to and held by the workers.
//!
//! Chunk sizes: 256 KiB min, 1 MiB average, 4 MiB max. Measured with `cargo xtask bench stream`
//! (JSON lines): 1 MiB average keeps per-chunk costs (index entries, requests) low while an
//! insert costs one or two chunks of new data.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use scalez::stream_map::{self, MANIFEST_ENTRIES};
use scalez::{
    Asset, BackupSession, ChunkId, RecoveryPoint, RpBody, RpDraft, RpFigures, RpKind, SessionStats,
    StreamRef, Vault,
};

use crate::error::AgentError;
use crate::progress::{Cancel, Progress};

pub const MIN_CHUNK: u32 = 256 * 1024;
pub const AVG_CHUNK: u32 = 1024 * 1024;
pub const MAX_CHUNK: u32 = 4 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub tags: BTreeMap<String, String>,
    pub workers: usize,
    pub cancel: Cancel,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            tags: BTreeMap::new(),
            workers: crate::pipeline::default_workers(),
            cancel: Cancel::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StreamReport {
    pub rp: RecoveryPoint,
    pub session: SessionStats,
    pub elapsed: Duration,
}

/// The asset a stream is recorded as.
pub fn stream_asset(name: &str) -> Asset {
    Asset {
        name: name.to_string(),
        host: crate::pipeline::hostname(),
    }
}

/// Reads `source` to its end and commits it as a stream RP named `name`.
pub fn backup_stream(
    vault: &Arc<Vault>,
    source: impl Read + Send,
    name: &str,
    opts: &StreamOptions,
    progress: &dyn Progress,
) -> Result<StreamReport, AgentError> {
    backup_stream_with(vault, source, name, opts, progress, &BTreeMap::new)
}

/// [`backup_stream`], adding the tags `late_tags` returns once `source` has been read to its
/// end (e.g. where a consumed topic ended).
pub fn backup_stream_with(
    vault: &Arc<Vault>,
    source: impl Read + Send,
    name: &str,
    opts: &StreamOptions,
    progress: &dyn Progress,
    late_tags: &dyn Fn() -> BTreeMap<String, String>,
) -> Result<StreamReport, AgentError> {
    let started = Instant::now();
    let asset = stream_asset(name);
    let parent = vault.latest_rp(RpKind::Stream, &asset)?.map(|rp| rp.id);
    let mut draft = RpDraft::new(asset, parent, opts.tags.clone());
    let workers = opts.workers.max(1);
    let mut session = BackupSession::new(vault.clone())?;
    progress.start(0);
    let size = AtomicU64::new(0);
    let (ctx, crx) = bounded::<(u64, Vec<u8>)>(workers * 2);
    let (rtx, rrx) = bounded::<Result<(u64, ChunkId, u32), AgentError>>(workers * 4);

    let (collected, read) = std::thread::scope(|s| {
        let reader = {
            let size = &size;
            s.spawn(move || -> Result<(), AgentError> {
                let chunker =
                    fastcdc::v2020::StreamCDC::new(source, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
                for (seq, chunk) in chunker.enumerate() {
                    if opts.cancel.is_cancelled() {
                        return Err(AgentError::Cancelled);
                    }
                    let chunk = chunk.map_err(|e| AgentError::Source {
                        path: name.into(),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    size.fetch_add(chunk.length as u64, Ordering::Relaxed);
                    if ctx.send((seq as u64, chunk.data)).is_err() {
                        return Err(AgentError::Stopped);
                    }
                }
                Ok(())
            })
        };
        for _ in 0..workers {
            let (crx, rtx, session) = (crx.clone(), rtx.clone(), &session);
            s.spawn(move || {
                let keys = session.vault().keys();
                for (seq, data) in crx {
                    let id = keys.chunk_id(&data);
                    let r = session
                        .store_chunk(id, &data)
                        .map(|_| (seq, id, data.len() as u32))
                        .map_err(AgentError::from);
                    let failed = r.is_err();
                    progress.advance(data.len() as u64);
                    if rtx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
        }
        drop((crx, rtx));
        let collected = collect(rrx, &session);
        let read = reader.join().unwrap_or(Err(AgentError::Panicked));
        (collected, read)
    });
    let outcome = match (read, collected) {
        (Err(e), _) if !matches!(e, AgentError::Stopped) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(e),
        (Ok(()), Ok(r)) => Ok(r),
    };
    let (root, chunks) = match outcome {
        Ok(r) => r,
        Err(e) => return Err(crate::pipeline::session_cause(e, session.abandon())),
    };
    let stats = session.finish()?;
    let size = size.load(Ordering::Relaxed);
    // Tags known only once the stream ended (a Kafka topic's last offsets).
    draft.tags.extend(late_tags());
    let rp = draft.finish(
        RpBody::Stream(StreamRef { size, chunks, root }),
        RpFigures::stored(size, size, &stats),
    );
    session.commit(&rp)?;
    Ok(StreamReport {
        rp,
        session: stats,
        elapsed: started.elapsed(),
    })
}

/// Puts chunk ids back in stream order and writes the manifests and the root.
fn collect(
    results: crossbeam_channel::Receiver<Result<(u64, ChunkId, u32), AgentError>>,
    session: &BackupSession,
) -> Result<(Option<ChunkId>, u64), AgentError> {
    let mut pending: BTreeMap<u64, (ChunkId, u32)> = BTreeMap::new();
    let mut next = 0u64;
    let mut current: Vec<(ChunkId, u32)> = Vec::with_capacity(MANIFEST_ENTRIES);
    let mut manifests: Vec<ChunkId> = Vec::new();
    for r in results {
        let (seq, id, len) = r?;
        pending.insert(seq, (id, len));
        while let Some(e) = pending.remove(&next) {
            next += 1;
            current.push(e);
            if current.len() == MANIFEST_ENTRIES {
                manifests.push(session.store_blob(&stream_map::encode_manifest(&current))?);
                current.clear();
            }
        }
    }
    if !pending.is_empty() {
        return Err(AgentError::Stopped);
    }
    if !current.is_empty() {
        manifests.push(session.store_blob(&stream_map::encode_manifest(&current))?);
    }
    if manifests.is_empty() {
        return Ok((None, 0));
    }
    Ok((
        Some(session.store_blob(&stream_map::encode_root(&manifests))?),
        next,
    ))
}

/// Writes stream RP `rp` to `out`, fetching `workers` chunks at a time in parallel; returns the
/// bytes written.
pub fn restore_stream(
    vault: &Arc<Vault>,
    rp: &RecoveryPoint,
    out: &mut dyn Write,
    workers: usize,
    progress: &dyn Progress,
) -> Result<u64, AgentError> {
    let s = rp.stream()?.clone();
    progress.start(s.size);
    let batch = workers.max(1) * 4;
    let mut written = 0u64;
    let werr = |e: std::io::Error| AgentError::Target {
        path: "output".into(),
        source: e,
    };
    for m in stream_map::manifests(vault, &s)? {
        let entries = stream_map::manifest(vault, &m)?;
        for group in entries.chunks(batch) {
            let mut datas: Vec<Option<Result<Vec<u8>, AgentError>>> =
                (0..group.len()).map(|_| None).collect();
            // read_chunk authenticates and re-hashes every chunk to its id.
            std::thread::scope(|sc| {
                let per = group.len().div_ceil(workers.max(1));
                for (jobs, outs) in group.chunks(per).zip(datas.chunks_mut(per)) {
                    sc.spawn(move || {
                        for ((id, len), out) in jobs.iter().zip(outs.iter_mut()) {
                            let r = vault
                                .read_chunk(id)
                                .map_err(AgentError::from)
                                .and_then(|d| {
                                    if d.len() as u32 == *len {
                                        Ok(d)
                                    } else {
                                        Err(AgentError::Vault(scalez::Error::Corrupt {
                                            location: vault.location(),
                                            key: format!("chunk {id}"),
                                            detail: format!(
                                                "{} bytes, the stream map says {len}",
                                                d.len()
                                            ),
                                        }))
                                    }
                                });
                            *out = Some(r);
                        }
                    });
                }
            });
            for d in datas {
                let d = d.expect("every slot filled")?;
                out.write_all(&d).map_err(werr)?;
                written += d.len() as u64;
                progress.advance(d.len() as u64);
            }
        }
    }
    out.flush().map_err(werr)?;
    if written != s.size {
        return Err(AgentError::Vault(scalez::Error::Corrupt {
            location: vault.location(),
            key: rp.id.catalog_key(),
            detail: format!("stream map holds {written} bytes, the RP says {}", s.size),
        }));
    }
    Ok(written)
}
