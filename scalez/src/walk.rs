//! The one walker of what a recovery point references.
//!
//! Prune's mark step, prune's spare step (RPs committed while it ran) and `check` all ask the
//! same question: which chunks does this RP need? They used to answer it three ways, and the
//! spare step walked disk maps only, so a file or stream backup that committed during a prune
//! could lose a pack it deduplicated against. Every caller now goes through [`for_each_chunk`],
//! so a new RP kind (or a new kind of metadata chunk) is seen by all of them or by none.
//!
//! What is visited, per kind (metadata chunks before the chunks they list):
//! * **disk**: every map page (root first, depth first) and every data chunk of the leaves;
//! * **stream**: the root blob, each manifest, each data chunk;
//! * **file**: the tree stream as a stream, then every chunk its records list;
//! * **instance**: nothing of its own (each volume is a disk RP of its own in the catalog).
//!
//! A chunk shared by several places is visited once per place. Damage (a page, manifest or
//! tree record that does not load) goes to the caller's `damage` callback: returning the error
//! stops the walk (prune: never decide on a partial view), returning `Ok` skips the unreadable
//! part and goes on (check: attribute the RP to every other damaged object it needs too).

use std::cell::RefCell;
use std::sync::Arc;

use crate::catalog::{RecoveryPoint, StreamRef};
use crate::disk_map::{MapReader, Page};
use crate::error::{Error, Result};
use crate::ids::ChunkId;
use crate::stream_map;
use crate::tree::TreeReader;
use crate::vault::Vault;

/// What to do with a part of an RP that cannot be read: `Err` stops the walk with that error,
/// `Ok` skips the part.
pub(crate) type OnDamage<'a> = &'a mut dyn FnMut(Error) -> Result<()>;

/// Called with every chunk the RP references; an error stops the walk.
pub(crate) type OnChunk<'a> = &'a mut dyn FnMut(&ChunkId) -> Result<()>;

/// Stops at the first damaged part: the policy of every caller that acts on the result.
pub(crate) fn stop_on_damage(e: Error) -> Result<()> {
    Err(e)
}

/// Calls `chunk` for every chunk `rp` references (see the module doc for the order).
pub(crate) fn for_each_chunk(
    vault: &Vault,
    rp: &RecoveryPoint,
    damage: OnDamage<'_>,
    chunk: OnChunk<'_>,
) -> Result<()> {
    if let Some(map) = &rp.disk {
        // The page loader and the leaf visitor both report chunks: they share the callbacks.
        let chunk = RefCell::new(&mut *chunk);
        let damage = RefCell::new(&mut *damage);
        let mut load = |id: &ChunkId| -> Result<Arc<Page>> {
            (chunk.borrow_mut())(id)?;
            match vault.load_page(id) {
                Ok(p) => Ok(Arc::new(p)),
                Err(e) => {
                    // Reported, then read as empty when the caller goes on.
                    (damage.borrow_mut())(e)?;
                    Ok(Arc::new(Page {
                        level: 0,
                        entries: Vec::new(),
                    }))
                }
            }
        };
        let mut reader = MapReader::of(map, &mut load);
        reader.walk(&mut |_, entries| {
            let mut chunk = chunk.borrow_mut();
            entries.iter().flatten().try_for_each(&mut **chunk)
        })?;
    }
    if let Some(s) = &rp.stream {
        stream(vault, s, damage, chunk)?;
    }
    if let Some(t) = &rp.tree {
        tree(vault, &t.stream, damage, chunk)?;
    }
    Ok(())
}

/// The root, the manifests and the data chunks of a stream map.
fn stream(vault: &Vault, s: &StreamRef, damage: OnDamage<'_>, chunk: OnChunk<'_>) -> Result<()> {
    let Some(root) = &s.root else { return Ok(()) };
    chunk(root)?;
    let manifests = match stream_map::manifests(vault, s) {
        Ok(m) => m,
        Err(e) => return damage(e),
    };
    for m in manifests {
        chunk(&m)?;
        match stream_map::manifest(vault, &m) {
            Ok(entries) => entries.iter().try_for_each(|(id, _)| chunk(id))?,
            Err(e) => damage(e)?,
        }
    }
    Ok(())
}

/// A file tree: its stream map, then the chunks its records list. A record that does not
/// decode ends the tree (the records after it cannot be found).
fn tree(vault: &Vault, s: &StreamRef, damage: OnDamage<'_>, chunk: OnChunk<'_>) -> Result<()> {
    stream(vault, s, damage, chunk)?;
    let records = match TreeReader::open(vault, s, "a file RP") {
        Ok(r) => r,
        Err(e) => return damage(e),
    };
    for e in records {
        match e {
            Ok(e) => e.chunks.iter().try_for_each(|(id, _)| chunk(id))?,
            Err(e) => return damage(e),
        }
    }
    Ok(())
}
