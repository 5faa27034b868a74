//! LVM2 physical volumes: the label, the metadata area, the volume group's text metadata, and
//! the logical volumes it describes, each mapped to byte ranges of the physical volume(s) so a
//! disk RP can show the file system inside every LV (`lvm/<vg>/<lv>/`) without device-mapper.
//!
//! Model: [`read_pv`] reads a PV's label (one of its first four sectors), its header (UUID,
//! data and metadata areas) and the newest metadata text of its first metadata area (a
//! circular buffer; the text may wrap). [`parse_metadata`] parses that text (LVM's config
//! syntax: sections, `key = value`, strings, numbers, lists) into a [`VolumeGroup`]. Linear
//! and striped segments are mapped ([`Lv::map`]); thin, RAID, mirror, snapshot and cache LVs
//! are listed with the reason they are not read. The newest of several metadata copies is not
//! looked for: the first area's current text is what LVM itself reads first.
//!
//! Invariants: nothing is written; every number from the device or the text is checked (sizes,
//! overflow, extents inside their PV); the text is at most [`MAX_TEXT`] bytes, nested at most
//! [`MAX_DEPTH`] sections deep with at most [`MAX_ITEMS`] values, so hostile metadata costs
//! bounded memory and time; a damaged VG is an error naming the PV, never a panic.

use std::collections::BTreeMap;
use std::io;

use crate::ext4::ReadAt;

/// Longest metadata text read (LVM's default metadata area is 1 MiB).
pub const MAX_TEXT: u64 = 4 << 20;
/// Deepest section nesting parsed (real metadata nests 5 deep).
pub const MAX_DEPTH: usize = 16;
/// Most values (assignments and list items) parsed from one text.
pub const MAX_ITEMS: usize = 1 << 18;
/// Most disk pieces one read of an LV maps to.
pub const MAX_PIECES: usize = 1 << 16;
/// Most logical volumes, segments per LV and stripes per segment taken from one VG.
pub const MAX_LVS: usize = 4096;
const MAX_SEGMENTS: usize = 4096;
const MAX_STRIPES: usize = 128;
/// The smallest stripe size LVM creates (and so the most pieces one read can split into).
const MIN_STRIPE: u64 = 4096;

const LABEL_ID: &[u8; 8] = b"LABELONE";
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const SECTOR: u64 = 512;

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("lvm: {what}"))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A physical volume as its label describes it.
#[derive(Debug, Clone)]
pub struct Pv {
    /// The PV's UUID as LVM prints it in metadata (32 characters, no dashes).
    pub uuid: String,
    /// The current metadata text of its first metadata area, if it has one.
    pub metadata: Option<String>,
}

/// Reads the PV label, header and current metadata text of the PV on `dev` (`size` bytes).
/// `Ok(None)` when there is no LVM2 label.
pub fn read_pv(dev: &dyn ReadAt, size: u64) -> io::Result<Option<Pv>> {
    let mut label = None;
    for s in 0..4 {
        if (s + 1) * SECTOR > size {
            break;
        }
        let mut b = vec![0u8; SECTOR as usize];
        dev.read_at(s * SECTOR, &mut b)?;
        if &b[..8] == LABEL_ID && &b[24..32] == LABEL_TYPE && le64(&b, 8) == Some(s) {
            label = Some((s, b));
            break;
        }
    }
    let Some((sector, b)) = label else {
        return Ok(None);
    };
    // The PV header follows the label within its sector.
    let off = le32(&b, 20).unwrap_or(0) as usize;
    if !(32..=SECTOR as usize - 40).contains(&off) {
        return Err(corrupt(format!(
            "PV header offset {off} in sector {sector}"
        )));
    }
    let h = &b[off..];
    let uuid = String::from_utf8_lossy(&h[..32]).into_owned();
    // Data areas, then metadata areas: (offset, size) lists, each ended by a zero entry.
    let mut at = 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            let (Some(o), Some(n)) = (le64(h, at), le64(h, at + 8)) else {
                return Err(corrupt("the PV header's area lists run off its sector"));
            };
            at += 16;
            if o == 0 && n == 0 {
                break;
            }
            list.push((o, n));
        }
    }
    // The first metadata area LVM keeps metadata in (an area can be marked ignored).
    let mut metadata = None;
    for &(o, n) in lists[1].iter().take(2) {
        if let Some(text) = read_mda(dev, size, o, n)? {
            metadata = Some(text);
            break;
        }
    }
    Ok(Some(Pv { uuid, metadata }))
}

/// The current text of the metadata area at `offset` (`len` bytes) of the PV; None when the
/// area is marked ignored (its VG keeps metadata elsewhere).
fn read_mda(dev: &dyn ReadAt, size: u64, offset: u64, len: u64) -> io::Result<Option<String>> {
    if offset.checked_add(len).is_none_or(|end| end > size) || len < SECTOR {
        return Err(corrupt(format!(
            "metadata area at {offset} of {len} bytes is outside the PV"
        )));
    }
    let mut h = vec![0u8; SECTOR as usize];
    dev.read_at(offset, &mut h)?;
    if &h[4..20] != MDA_MAGIC {
        return Err(corrupt(format!("no metadata area header at {offset}")));
    }
    // The first raw location is the current metadata: (offset in the area, size, crc, flags).
    let (Some(rel), Some(n)) = (le64(&h, 40), le64(&h, 48)) else {
        return Err(corrupt("metadata area header"));
    };
    // raw_locn flags: bit 0 = RAW_LOCN_IGNORED.
    if le32(&h, 60).unwrap_or(0) & 1 != 0 {
        return Ok(None);
    }
    if n == 0 {
        return Err(corrupt("the metadata area holds no metadata"));
    }
    if n > MAX_TEXT || n > len - SECTOR || rel < SECTOR || rel >= len {
        return Err(corrupt(format!(
            "metadata of {n} bytes at {rel} in an area of {len}"
        )));
    }
    // A circular buffer after the header sector: the text may wrap to its start.
    let first = n.min(len - rel);
    let mut text = vec![0u8; n as usize];
    dev.read_at(offset + rel, &mut text[..first as usize])?;
    if first < n {
        dev.read_at(offset + SECTOR, &mut text[first as usize..])?;
    }
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    text.truncate(end);
    String::from_utf8(text)
        .map(Some)
        .map_err(|_| corrupt("metadata text is not UTF-8"))
}

/// A value of LVM's config syntax.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(i64),
    String(String),
    List(Vec<Value>),
    Section(BTreeMap<String, Value>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(m) => m.get(key),
            _ => None,
        }
    }
    fn num(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }
    fn text(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    fn sections(&self) -> impl Iterator<Item = (&String, &Value)> {
        let m = match self {
            Value::Section(m) => Some(m),
            _ => None,
        };
        m.into_iter()
            .flatten()
            .filter(|(_, v)| matches!(v, Value::Section(_)))
    }
}

/// Parses LVM's config syntax into a section of values.
pub fn parse_config(text: &str) -> io::Result<Value> {
    if text.len() as u64 > MAX_TEXT {
        return Err(corrupt(format!("metadata of {} bytes", text.len())));
    }
    let mut p = Parser {
        b: text.as_bytes(),
        at: 0,
        items: 0,
    };
    let root = p.section(0, true)?;
    Ok(root)
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
    items: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while let Some(&c) = self.b.get(self.at) {
            if c == b'#' {
                while self.b.get(self.at).is_some_and(|&c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn fail(&self, what: &str) -> io::Error {
        let line = self.b[..self.at.min(self.b.len())]
            .iter()
            .filter(|&&c| c == b'\n')
            .count()
            + 1;
        corrupt(format!("metadata line {line}: {what}"))
    }

    fn count(&mut self) -> io::Result<()> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return Err(corrupt(format!(
                "metadata has more than {MAX_ITEMS} values"
            )));
        }
        Ok(())
    }

    fn ident(&mut self) -> Option<String> {
        let start = self.at;
        while self
            .b
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"_.+-".contains(c))
        {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.b[start..self.at]).into_owned())
    }

    /// Entries until `}` (or the end, at the top level).
    fn section(&mut self, depth: usize, top: bool) -> io::Result<Value> {
        if depth > MAX_DEPTH {
            return Err(self.fail("sections nested too deep"));
        }
        let mut m = BTreeMap::new();
        loop {
            self.skip();
            match self.b.get(self.at) {
                None if top => return Ok(Value::Section(m)),
                None => return Err(self.fail("a section is not closed")),
                Some(b'}') if !top => {
                    self.at += 1;
                    return Ok(Value::Section(m));
                }
                _ => {}
            }
            let key = self
                .ident()
                .ok_or_else(|| self.fail("a name was expected"))?;
            self.skip();
            self.count()?;
            let v = match self.b.get(self.at) {
                Some(b'{') => {
                    self.at += 1;
                    self.section(depth + 1, false)?
                }
                Some(b'=') => {
                    self.at += 1;
                    self.skip();
                    self.value(depth)?
                }
                _ => return Err(self.fail("`=` or `{` was expected")),
            };
            m.insert(key, v);
        }
    }

    fn value(&mut self, depth: usize) -> io::Result<Value> {
        match self.b.get(self.at) {
            Some(b'"') => {
                self.at += 1;
                let mut s = Vec::new();
                loop {
                    match self.b.get(self.at) {
                        None => return Err(self.fail("a string is not closed")),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            self.at += 1;
                            s.extend(self.b.get(self.at).copied());
                        }
                        Some(&c) => s.push(c),
                    }
                    self.at += 1;
                }
                self.at += 1;
                Ok(Value::String(String::from_utf8_lossy(&s).into_owned()))
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err(self.fail("lists nested too deep"));
                }
                self.at += 1;
                let mut items = Vec::new();
                loop {
                    self.skip();
                    match self.b.get(self.at) {
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::List(items));
                        }
                        Some(b',') => self.at += 1,
                        None => return Err(self.fail("a list is not closed")),
                        _ => {
                            self.count()?;
                            items.push(self.value(depth + 1)?);
                        }
                    }
                }
            }
            _ => {
                let start = self.at;
                if self.b.get(self.at) == Some(&b'-') {
                    self.at += 1;
                }
                while self
                    .b
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.at += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.at]).unwrap_or("");
                // Floats appear in some settings; only integers matter here.
                let int = s.split('.').next().unwrap_or("");
                int.parse()
                    .map(Value::Number)
                    .map_err(|_| self.fail("a value was expected"))
            }
        }
    }
}

/// A volume group as its metadata describes it.
#[derive(Debug, Clone)]
pub struct VolumeGroup {
    pub name: String,
    /// Extent size in bytes.
    pub extent_size: u64,
    /// PV name in the metadata (`pv0`) → (UUID without dashes, first extent's byte offset).
    pub pvs: BTreeMap<String, (String, u64)>,
    pub lvs: Vec<Lv>,
}

/// A logical volume: its segments, or why it is not read.
#[derive(Debug, Clone)]
pub struct Lv {
    pub name: String,
    pub size: u64,
    pub segments: Vec<Segment>,
    /// Why elastio does not read this LV (thin, RAID, ...); None when it does.
    pub unsupported: Option<String>,
}

/// A run of an LV's extents, linear (one stripe) or striped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset and length in the LV.
    pub start: u64,
    pub len: u64,
    /// Stripe size in bytes (0 when there is one stripe).
    pub stripe_size: u64,
    /// Per stripe: PV name and the byte offset in the PV where its share starts.
    pub stripes: Vec<(String, u64)>,
}

/// The volume group a PV's metadata text describes.
pub fn parse_metadata(text: &str) -> io::Result<VolumeGroup> {
    let root = parse_config(text)?;
    let (name, vg) = root
        .sections()
        .next()
        .ok_or_else(|| corrupt("metadata names no volume group"))?;
    if !valid_name(name) {
        return Err(corrupt(format!("a VG named {name:?}")));
    }
    let sectors = |v: i64, what: &str| -> io::Result<u64> {
        u64::try_from(v)
            .ok()
            .and_then(|v| v.checked_mul(SECTOR))
            .ok_or_else(|| corrupt(format!("VG {name}: {what} {v}")))
    };
    let extent_size = sectors(vg.num("extent_size").unwrap_or(0), "extent size")?;
    if extent_size == 0 {
        return Err(corrupt(format!("VG {name}: no extent size")));
    }
    let mut pvs = BTreeMap::new();
    if let Some(list) = vg.get("physical_volumes") {
        for (pv, v) in list.sections() {
            let id = v.text("id").unwrap_or("").replace('-', "");
            let pe_start = sectors(v.num("pe_start").unwrap_or(-1), "pe_start")?;
            pvs.insert(pv.clone(), (id, pe_start));
        }
    }
    let mut lvs = Vec::new();
    if let Some(list) = vg.get("logical_volumes") {
        for (lv, v) in list.sections() {
            if lvs.len() >= MAX_LVS {
                return Err(corrupt(format!("VG {name}: more than {MAX_LVS} LVs")));
            }
            lvs.push(parse_lv(name, lv, v, extent_size)?);
        }
    }
    Ok(VolumeGroup {
        name: name.clone(),
        extent_size,
        pvs,
        lvs,
    })
}

/// A name usable as a directory of the view: LVM's own rules refuse these too.
fn valid_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && !n.contains('/')
}

fn parse_lv(vg: &str, name: &str, v: &Value, extent_size: u64) -> io::Result<Lv> {
    let bad = |what: String| corrupt(format!("LV {vg}/{name}: {what}"));
    if !valid_name(name) {
        return Err(bad("an invalid name".into()));
    }
    let mut segments = Vec::new();
    let mut unsupported = None;
    let visible = matches!(v.get("status"), Some(Value::List(l)) if l.contains(&Value::String("VISIBLE".into())));
    if !visible {
        unsupported = Some("a hidden LV (part of another)".to_string());
    }
    for (_, s) in v.sections() {
        if segments.len() >= MAX_SEGMENTS {
            return Err(bad(format!("more than {MAX_SEGMENTS} segments")));
        }
        let ty = s.text("type").unwrap_or("");
        let first = s.num("start_extent").unwrap_or(-1);
        let count = s.num("extent_count").unwrap_or(-1);
        let extents = |n: i64| {
            u64::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(extent_size))
        };
        let (Some(start), Some(len)) = (extents(first), extents(count)) else {
            return Err(bad(format!("a segment of {count} extents at {first}")));
        };
        if ty != "striped" {
            unsupported
                .get_or_insert_with(|| format!("a {ty} LV, which elastio does not read yet"));
            continue;
        }
        let n = s.num("stripe_count").unwrap_or(0);
        let list = match s.get("stripes") {
            Some(Value::List(l)) => l,
            _ => return Err(bad("a striped segment without stripes".into())),
        };
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| (1..=MAX_STRIPES).contains(&n) && list.len() == 2 * n)
            .ok_or_else(|| bad(format!("{n} stripes listed as {} values", list.len())))?;
        let stripe_size = if n > 1 {
            let ss = s.num("stripe_size").unwrap_or(0);
            u64::try_from(ss)
                .ok()
                .and_then(|ss| ss.checked_mul(SECTOR))
                .filter(|&ss| ss >= MIN_STRIPE && (len / n as u64).is_multiple_of(ss))
                .ok_or_else(|| bad(format!("stripe size {ss}")))?
        } else {
            0
        };
        let mut stripes = Vec::new();
        for pair in list.chunks(2) {
            let (Value::String(pv), Value::Number(pe)) = (&pair[0], &pair[1]) else {
                return Err(bad("a stripe is not a PV name and an extent".into()));
            };
            let at = u64::try_from(*pe)
                .ok()
                .and_then(|pe| pe.checked_mul(extent_size))
                .ok_or_else(|| bad(format!("stripe at extent {pe}")))?;
            stripes.push((pv.clone(), at));
        }
        segments.push(Segment {
            start,
            len,
            stripe_size,
            stripes,
        });
    }
    segments.sort_by_key(|s| s.start);
    let mut size = 0u64;
    for s in &segments {
        if s.start != size {
            return Err(bad(format!("segments leave a gap at {size}")));
        }
        size = s
            .start
            .checked_add(s.len)
            .ok_or_else(|| bad("size overflows".into()))?;
    }
    if unsupported.is_some() {
        segments.clear();
    }
    Ok(Lv {
        name: name.to_string(),
        size,
        segments,
        unsupported,
    })
}

impl Lv {
    /// Where byte `offset` of the LV is: (PV name, byte offset in the PV's data area, bytes
    /// contiguous from there). None past the end, or where the PV offset would overflow.
    pub fn map(&self, offset: u64) -> Option<(&str, u64, u64)> {
        let i = self.segments.partition_point(|s| s.start + s.len <= offset);
        let s = self.segments.get(i)?;
        let rel = offset - s.start;
        if s.stripes.len() == 1 {
            let (pv, at) = &s.stripes[0];
            return Some((pv, at.checked_add(rel)?, s.len - rel));
        }
        let n = s.stripes.len() as u64;
        let (chunk, within) = (rel / s.stripe_size, rel % s.stripe_size);
        let (pv, at) = &s.stripes[(chunk % n) as usize];
        let inside = (chunk / n) * s.stripe_size + within; // at most rel: no overflow
        Some((pv, at.checked_add(inside)?, s.stripe_size - within))
    }
}

/// An LV placed on its PVs: where each of its bytes is on the disk.
#[derive(Debug, Clone)]
pub struct LvMap {
    lv: Lv,
    /// PV name → byte offset on the disk of the PV's first extent.
    pvs: BTreeMap<String, u64>,
}

impl LvMap {
    /// `lv` of `vg`, whose PVs lie at `pv_places` on the disk (by UUID without dashes: byte
    /// offset and length of the PV). An error, with the reason, when a PV is missing, the LV is
    /// not read, or a segment reaches past the end of its PV (hostile metadata must not make a
    /// read leave the disk).
    pub fn new(
        vg: &VolumeGroup,
        lv: &Lv,
        pv_places: &BTreeMap<String, (u64, u64)>,
    ) -> Result<Self, String> {
        if let Some(why) = &lv.unsupported {
            return Err(why.clone());
        }
        let mut pvs = BTreeMap::new();
        for seg in &lv.segments {
            let share = seg.len / seg.stripes.len() as u64;
            for (name, at) in &seg.stripes {
                let (uuid, pe_start) = vg
                    .pvs
                    .get(name)
                    .ok_or_else(|| format!("its PV {name} is not in the VG's metadata"))?;
                let &(start, len) = pv_places
                    .get(uuid)
                    .ok_or_else(|| format!("its PV {name} is not on this disk"))?;
                let end = pe_start.checked_add(*at).and_then(|x| x.checked_add(share));
                if end.is_none_or(|end| end > len) {
                    return Err(format!(
                        "a segment reaches past the end of its PV {name} ({len} bytes)"
                    ));
                }
                pvs.insert(name.clone(), start + pe_start);
            }
        }
        Ok(LvMap {
            lv: lv.clone(),
            pvs,
        })
    }

    pub fn size(&self) -> u64 {
        self.lv.size
    }

    /// The disk byte ranges `[offset, offset + len)` of the LV lies in, in order; an error
    /// past [`MAX_PIECES`] of them (a read is split at most at every stripe).
    pub fn pieces(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.lv.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("read at {offset} past the end of LV {}", self.lv.name),
                )
            })?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut at = offset;
        while at < end {
            let (pv, pv_at, run) = self
                .lv
                .map(at)
                .ok_or_else(|| corrupt(format!("LV {} maps past the disk", self.lv.name)))?;
            let n = run.min(end - at);
            let disk = self.pvs[pv]
                .checked_add(pv_at)
                .ok_or_else(|| corrupt(format!("LV {} maps past the disk", self.lv.name)))?;
            let full = out.len() >= MAX_PIECES;
            match out.last_mut() {
                Some(last) if last.0 + last.1 == disk => last.1 += n,
                _ if full => {
                    return Err(corrupt(format!(
                        "a read of LV {} splits into more than {MAX_PIECES} pieces",
                        self.lv.name
                    )))
                }
                _ => out.push((disk, n)),
            }
            at += n;
        }
        Ok(out)
    }
}

/// Everything this module does with `bytes` as a PV at offset 0 of a disk (or, without a
/// label, as metadata text), checking what comes out: the fuzz target's body, and the replay of
/// its seeds and crashes in tests.
pub fn check(bytes: &[u8]) {
    let text = match read_pv(&bytes, bytes.len() as u64) {
        Ok(Some(pv)) => pv.metadata,
        Ok(None) => std::str::from_utf8(bytes).ok().map(str::to_string),
        Err(_) => None,
    };
    let Some(vg) = text.and_then(|t| parse_metadata(&t).ok()) else {
        return;
    };
    // Every PV at a hostile offset near the end of the address space, with room to spare: maps
    // must stay inside their PV and never overflow.
    let places: BTreeMap<String, (u64, u64)> = vg
        .pvs
        .values()
        .map(|(id, _)| (id.clone(), (u64::MAX / 2, u64::MAX / 4)))
        .collect();
    for lv in &vg.lvs {
        let Ok(map) = LvMap::new(&vg, lv, &places) else {
            continue;
        };
        let mut at = 0;
        for _ in 0..64 {
            if at >= map.size() {
                break;
            }
            let n = (map.size() - at).min(1 << 20);
            // Offsets past any disk are an error; what maps covers the range exactly.
            if let Ok(pieces) = map.pieces(at, n) {
                assert_eq!(
                    pieces.iter().map(|p| p.1).sum::<u64>(),
                    n,
                    "pieces cover the range"
                );
            }
            at += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = r#"vg0 {
id = "abc"
seqno = 3
format = "lvm2" # comment
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192
physical_volumes {
pv0 {
id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG"
pe_start = 2048
pe_count = 100
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment2 {
start_extent = 10
extent_count = 4
type = "striped"
stripe_count = 2
stripe_size = 128
stripes = [
"pv0", 50,
"pv0", 70
]
}
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
}
pool {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 1
type = "thin-pool"
}
}
}
}
contents = "Text Format Volume Group"
version = 1
"#;

    #[test]
    fn metadata_parses_into_mapped_lvs() {
        let vg = parse_metadata(META).unwrap();
        assert_eq!(vg.name, "vg0");
        let mib4 = 4 << 20;
        assert_eq!(vg.extent_size, mib4);
        assert_eq!(
            vg.pvs["pv0"],
            ("AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG".into(), 1 << 20)
        );
        let root = vg.lvs.iter().find(|l| l.name == "root").unwrap();
        assert_eq!((root.size, root.unsupported.as_deref()), (14 * mib4, None));
        assert_eq!(root.map(5), Some(("pv0", 5, 10 * mib4 - 5)));
        // Striped: 64 KiB stripes alternate between the two runs.
        let base = 10 * mib4;
        assert_eq!(root.map(base), Some(("pv0", 50 * mib4, 65536)));
        assert_eq!(
            root.map(base + 65536 + 7),
            Some(("pv0", 70 * mib4 + 7, 65529))
        );
        assert_eq!(
            root.map(base + 2 * 65536),
            Some(("pv0", 50 * mib4 + 65536, 65536))
        );
        assert_eq!(root.map(14 * mib4), None);
        let pool = vg.lvs.iter().find(|l| l.name == "pool").unwrap();
        assert!(pool.unsupported.as_deref().unwrap().contains("thin-pool"));
    }

    #[test]
    fn hostile_metadata_is_an_error_not_a_panic() {
        for bad in [
            "vg0 {",
            "vg0 { extent_size = 8192 logical_volumes { a { status = [\"VISIBLE\"] s { start_extent = 0 extent_count = 9223372036854775807 type = \"striped\" stripe_count = 1 stripes = [\"pv0\", 0] } } } }",
            "vg0 { extent_size = -1 }",
            "vg0 { extent_size = 8 logical_volumes { a { status = [\"VISIBLE\"] s { start_extent = 0 extent_count = 4 type = \"striped\" stripe_count = 3 stripe_size = 0 stripes = [\"pv0\", 0, \"pv0\", 1, \"pv0\", 2] } } } }",
            "\"",
            "x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ] {
            assert!(parse_metadata(bad).is_err(), "{bad}");
        }
        let deep = "a {".repeat(100);
        assert!(parse_config(&deep).is_err());
    }
}
