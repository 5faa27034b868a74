//! Identifier newtypes. Each prints the way it appears in object keys and in the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Keyed BLAKE3 of a chunk's plaintext (see [`crate::crypto::Keys::chunk_id`]). Also names map
/// pages, which are stored as chunks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(ChunkId(out))
    }
}

/// Random 128-bit name of a pack object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> Self {
        PackId(rand::random())
    }

    /// Object key: packs are fanned out over 256 directories so no directory grows huge.
    pub fn key(&self) -> String {
        let h = hex::encode(self.0);
        format!("packs/{}/{}", &h[..2], h)
    }

    /// The pack an object key names, only if the key is exactly the one [`PackId::key`] writes
    /// (lower-case hex in its own fan-out directory): a planted copy under another spelling is
    /// not a pack.
    pub fn from_key(key: &str) -> Option<Self> {
        let name = key.strip_prefix("packs/")?.split('/').nth(1)?;
        Self::from_hex(name).filter(|p| p.key() == key)
    }

    pub fn from_hex(name: &str) -> Option<Self> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(name, &mut out).ok()?;
        Some(PackId(out))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// `rp-<ulid>`: sortable by creation time, unique without coordination between writers.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RecoveryPointId(String);

impl RecoveryPointId {
    pub fn generate() -> Self {
        RecoveryPointId(format!(
            "rp-{}",
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn catalog_key(&self) -> String {
        format!("catalog/{}", self.0)
    }

    pub fn tags_prefix(&self) -> String {
        format!("tags/{}/", self.0)
    }

    pub fn scans_prefix(&self) -> String {
        format!("scans/{}/", self.0)
    }

    /// The RP an object name (`catalog/<name>`) stands for, only if the name is exactly the
    /// canonical spelling of its id. User input may be in any case ([`FromStr`]), object names
    /// may not: a copy of `catalog/rp-<id>` under another spelling authenticates (the sealed
    /// body is bound to the canonical id), so accepting it would list the RP twice, and prune
    /// would then delete the canonical entry as the "duplicate".
    pub fn from_object_name(name: &str) -> Option<Self> {
        // The ULID must also print back as itself: the decoder ignores the top bits of the
        // first character, so `rp-8...` and `rp-0...` would otherwise name one id.
        let u = ulid::Ulid::from_string(name.strip_prefix("rp-")?).ok()?;
        (format!("rp-{}", u.to_string().to_ascii_lowercase()) == name)
            .then(|| RecoveryPointId(name.to_string()))
    }
}

impl fmt::Display for RecoveryPointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RecoveryPointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid recovery point id {0:?}: expected rp-<26 base32 characters>")]
pub struct BadRecoveryPointId(String);

impl FromStr for RecoveryPointId {
    type Err = BadRecoveryPointId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s
            .strip_prefix("rp-")
            .is_some_and(|u| u.len() == 26 && ulid::Ulid::from_string(u).is_ok());
        if ok {
            Ok(RecoveryPointId(s.to_ascii_lowercase()))
        } else {
            Err(BadRecoveryPointId(s.to_string()))
        }
    }
}

impl TryFrom<String> for RecoveryPointId {
    type Error = BadRecoveryPointId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RecoveryPointId> for String {
    fn from(id: RecoveryPointId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rp_ids_sort_by_time_and_parse() {
        let a = RecoveryPointId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = RecoveryPointId::generate();
        assert!(a < b);
        assert_eq!(a.as_str().parse::<RecoveryPointId>().unwrap(), a);
        assert!("rp-nope".parse::<RecoveryPointId>().is_err());
        assert!("../../etc".parse::<RecoveryPointId>().is_err());
    }

    #[test]
    fn pack_key_roundtrip() {
        let p = PackId::random();
        assert_eq!(PackId::from_key(&p.key()), Some(p));
        // Another spelling of the same id is not a pack (hex with letters in the fan-out
        // directory and the name, so that upper-casing changes both).
        let p = PackId([0xab; 16]);
        assert_eq!(PackId::from_key(&p.key()), Some(p));
        assert_eq!(PackId::from_key(&p.key().to_ascii_uppercase()), None);
        let h = p.hex();
        assert_eq!(PackId::from_key(&format!("packs/AB/{h}")), None);
        assert_eq!(PackId::from_key(&format!("packs/00/{h}")), None);
    }

    #[test]
    fn object_names_must_be_canonical() {
        let id = RecoveryPointId::generate();
        assert_eq!(
            RecoveryPointId::from_object_name(id.as_str()),
            Some(id.clone())
        );
        let upper = format!("rp-{}", id.as_str()[3..].to_ascii_uppercase());
        // The CLI accepts any case, object names only the canonical one.
        assert_eq!(upper.parse::<RecoveryPointId>().unwrap(), id);
        assert_eq!(RecoveryPointId::from_object_name(&upper), None);
        assert_eq!(
            RecoveryPointId::from_object_name("RP-01ARZ3NDEKTSV4RRFFQ69G5FAV"),
            None
        );
        assert_eq!(RecoveryPointId::from_object_name("junk"), None);
        // The decoder drops the top bits of the first character: `8` reads like `0`.
        let eight = format!("rp-8{}", &id.as_str()[4..]);
        assert_eq!(RecoveryPointId::from_object_name(&eight), None);
    }
}
