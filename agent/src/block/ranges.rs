//! Byte ranges of a disk ([`RangeSet`]) and the changed-map file format that feeds changed-block
//! incrementals from outside tools ([`parse_changed_map`]).
//!
//! # The changed-map format (version 1)
//!
//! A text file listing the byte ranges of a disk that may have changed since the parent recovery
//! point; every other byte is taken from the parent unread. One range per line:
//!
//! ```text
//! # elastio changed-map 1          (comments start with '#'; blank lines are ignored)
//! parent rp-01m80mb7eb9rts308j4hc4b1xn
//!                                  (the recovery point the changes count from: it must be the
//!                                   asset's latest, or `--parent` names it instead)
//! unit 512                         (optional, before the first range: both numbers count units
//!                                   of this many bytes; a power of two up to 1 GiB; default 1)
//! 0 8                              (START LENGTH: decimal, or hexadecimal with 0x)
//! 0x100000 4096
//! 2048,16                          (a comma, spaces or tabs separate the two numbers)
//! ```
//!
//! Ranges may come in any order, overlap or touch; zero-length ranges are ignored. A range that
//! starts past the disk, or ends past it by a whole unit, is an error (the map belongs to another
//! disk; the last unit of a disk of no whole number of units is clipped), as is any malformed
//! line: the error names the line. Naming the parent matters: changes made after the parent but
//! before the map's own starting point would otherwise be taken from the parent unread. Converters are one-liners: `thin_delta` reports data blocks (`unit`
//! = the pool's block size), dm-era's `era_invalidate` blocks of its own size, QEMU dirty
//! bitmaps granularity-sized clusters.
//!
//! The file is untrusted input: lines are at most [`MAX_LINE`] bytes, arithmetic is checked, and
//! memory is bounded whatever the file's size: past `max_ranges` ranges the set is coarsened
//! (nearby ranges are merged, so more is read, never less).

use std::io::{self, BufRead, Read};

/// Sorted, disjoint, non-touching half-open byte ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// The set of `ranges` in any order; overlapping and touching ones merge, empty ones drop.
    pub fn from_unsorted(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|(s, e)| s < e);
        ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet { ranges: out }
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The ranges that overlap `[start, end)`, clipped to it.
    pub fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges[first..]
            .iter()
            .take_while(move |&&(s, _)| s < end)
            .map(move |&(s, e)| (s.max(start), e.min(end)))
    }

    /// Whether any byte of `[start, end)` is in the set.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.within(start, end).next().is_some()
    }

    /// Whether every byte of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let first = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges
            .get(first)
            .is_some_and(|&(s, e)| s <= start && e >= end)
    }

    /// Merges ranges separated by small gaps until at most `max` remain: the result covers
    /// everything the set did, and some gaps besides. Each round doubles the gap merged.
    pub fn coarsen(&mut self, max: usize) {
        let mut gap = 1u64;
        while self.ranges.len() > max.max(1) {
            let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
            for &(s, e) in &self.ranges {
                match out.last_mut() {
                    Some(last) if s - last.1 <= gap => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
            self.ranges = out;
            gap = gap.saturating_mul(2);
        }
    }

    /// Ranges whose length is at least `min`, the rest dropped (for sets whose bytes are skipped:
    /// dropping a range only means reading it).
    pub fn keep_at_least(&mut self, min: u64) {
        self.ranges.retain(|(s, e)| e - s >= min);
    }
}

/// Longest line of a changed map, in bytes.
pub const MAX_LINE: usize = 4096;
/// Default bound on the ranges held while parsing a changed map (16 bytes each).
pub const MAX_RANGES: usize = 1 << 20;

/// A changed map that cannot be used, with the line at fault (0: the file as a whole).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct MapError {
    pub line: u64,
    pub what: String,
}

/// Reads a changed map (format above) for a disk of `disk_size` bytes into the set of changed
/// byte ranges, holding at most `max_ranges` ranges (coarsening past that), and its parent.
pub fn parse_changed_map(
    mut input: impl BufRead,
    disk_size: u64,
    max_ranges: usize,
) -> Result<ChangedMap, MapError> {
    let max_ranges = max_ranges.max(2);
    let mut unit: Option<u64> = None;
    let mut parent: Option<String> = None;
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let mut set = RangeSet::default();
    let mut line = Vec::with_capacity(128);
    let mut number = 0u64;
    loop {
        number += 1;
        let err = |what: String| MapError { line: number, what };
        line.clear();
        let n = Read::take(input.by_ref(), MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e: io::Error| err(format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE && !(line.len() == MAX_LINE + 1 && line.ends_with(b"\n")) {
            return Err(err(format!("longer than {MAX_LINE} bytes")));
        }
        let text = std::str::from_utf8(&line).map_err(|_| err("not UTF-8 text".into()))?;
        let text = text.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        let mut words = text
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        let (Some(a), Some(b), None) = (words.next(), words.next(), words.next()) else {
            return Err(err(format!(
                "expected START LENGTH or `unit BYTES`, found {text:?}"
            )));
        };
        if a == "parent" {
            if parent.is_some() {
                return Err(err("`parent` must come once".into()));
            }
            parent = Some(b.to_string());
            continue;
        }
        if a == "unit" {
            if unit.is_some() || !pending.is_empty() || !set.is_empty() {
                return Err(err("`unit` must come once, before the first range".into()));
            }
            let u = number_of(b).ok_or_else(|| err(format!("bad unit {b:?}")))?;
            if !u.is_power_of_two() || u > 1 << 30 {
                return Err(err(format!("unit {u} is not a power of two up to 1 GiB")));
            }
            unit = Some(u);
            continue;
        }
        let u = unit.unwrap_or(1);
        let start = number_of(a).ok_or_else(|| err(format!("bad start {a:?}")))?;
        let len = number_of(b).ok_or_else(|| err(format!("bad length {b:?}")))?;
        let (start, end) = start
            .checked_mul(u)
            .zip(len.checked_mul(u))
            .and_then(|(s, l)| Some((s, s.checked_add(l)?)))
            .ok_or_else(|| err("range overflows 64 bits".into()))?;
        // A last unit that covers the end of a disk of no whole number of units is clipped;
        // a range starting past the end means the map is for another disk.
        if start > disk_size || (start == disk_size && end > start) {
            return Err(err(format!(
                "range {start}..{end} starts past the disk's {disk_size} bytes (is the map for \
                 another disk?)"
            )));
        }
        if end > disk_size && end - disk_size >= u {
            return Err(err(format!(
                "range {start}..{end} ends past the disk's {disk_size} bytes (is the map for \
                 another disk?)"
            )));
        }
        let end = end.min(disk_size);
        if start < end {
            pending.push((start, end));
        }
        if pending.len() + set.len() >= max_ranges {
            merge_into(&mut set, &mut pending, max_ranges / 2);
        }
    }
    merge_into(&mut set, &mut pending, max_ranges);
    Ok(ChangedMap {
        ranges: set,
        parent,
    })
}

/// A parsed changed map: the changed ranges and the recovery point they are relative to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedMap {
    pub ranges: RangeSet,
    /// From a `parent RP-ID` line: the recovery point the changes are counted from.
    pub parent: Option<String>,
}

fn merge_into(set: &mut RangeSet, pending: &mut Vec<(u64, u64)>, max: usize) {
    let mut all = std::mem::take(&mut set.ranges);
    all.append(pending);
    *set = RangeSet::from_unsorted(all);
    set.coarsen(max);
}

fn number_of(w: &str) -> Option<u64> {
    match w.strip_prefix("0x").or_else(|| w.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => w.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, size: u64) -> Result<Vec<(u64, u64)>, MapError> {
        parse_changed_map(text.as_bytes(), size, MAX_RANGES).map(|s| s.ranges.ranges)
    }

    #[test]
    fn ranges_merge_and_sort() {
        let text = "# elastio changed-map 1\n\n100 50\n0x0 10\n140,20 # overlaps\n10 5\n300 0\n";
        assert_eq!(parse(text, 1000).unwrap(), [(0, 15), (100, 160)]);
        assert_eq!(parse("unit 512\n1 2\n", 4096).unwrap(), [(512, 1536)]);
        // The last unit clipped to a disk of no whole number of units.
        assert_eq!(parse("unit 512\n7 1\n", 3800).unwrap(), [(3584, 3800)]);
        let m = parse_changed_map("parent rp-1\n0 1\n".as_bytes(), 10, 8).unwrap();
        assert_eq!(m.parent.as_deref(), Some("rp-1"));
        let line = format!("{}\n", " ".repeat(MAX_LINE - 3) + "0 1");
        assert_eq!(parse(&line, 10).unwrap(), [(0, 1)]);
    }

    #[test]
    fn bad_lines_are_named() {
        let e = |t: &str| parse(t, 1000).unwrap_err();
        assert_eq!(e("0 10\n990 11\n").line, 2);
        assert!(e("0 10\n990 11\n").what.contains("past the disk"));
        assert_eq!(e("\n\nx 1\n").line, 3);
        assert_eq!(e("1 2 3\n").line, 1);
        assert_eq!(e("0 1\nunit 512\n").line, 2);
        assert!(e("unit 3\n").what.contains("power of two"));
        assert!(e("0xffffffffffffffff 2\n").what.contains("overflows"));
        assert!(e(&"9".repeat(MAX_LINE + 10)).what.contains("longer"));
        assert!(parse("unit 1099511627776\n", 1000).is_err());
    }

    #[test]
    fn many_ranges_coarsen_but_cover_everything() {
        let text: String = (0..1000u64).map(|i| format!("{} 1\n", i * 10)).collect();
        let set = parse_changed_map(text.as_bytes(), 100_000, 16)
            .unwrap()
            .ranges;
        assert!(set.len() <= 16, "{} ranges", set.len());
        for i in 0..1000u64 {
            assert!(set.covers(i * 10, i * 10 + 1), "byte {} lost", i * 10);
        }
    }

    #[test]
    fn queries() {
        let s = RangeSet::from_unsorted(vec![(10, 20), (30, 40)]);
        assert_eq!(s.within(15, 35).collect::<Vec<_>>(), [(15, 20), (30, 35)]);
        assert!(s.intersects(19, 21) && !s.intersects(20, 30));
        assert!(s.covers(30, 40) && !s.covers(15, 31));
        assert_eq!(s.bytes(), 20);
    }
}
