//! Keys, chunk ids and sealing.
//!
//! * A vault has one random 256-bit **master key**. It never touches the store unencrypted: key
//!   files (`keys/<id>`) hold it wrapped with AES-256-GCM under a key-encryption key derived from
//!   the passphrase by Argon2id. Several key files (several passphrases) may unlock one vault.
//! * Sub-keys come from the master key through BLAKE3's `derive_key` with frozen context strings,
//!   so one secret yields independent keys for chunk ids, data encryption and the config MAC.
//! * **Chunk id** = BLAKE3 keyed with the id key over the plaintext: equal data dedups, but the store
//!   learns nothing about content (no unkeyed hash of known data can be matched).
//! * **Sealing** = optional zstd, then AES-256-GCM with a random 96-bit nonce. The associated data
//!   names the object (chunk id, index name, RP id), so an object moved under another name fails
//!   authentication. Random nonces bound one vault key to ~2^32 sealed objects (NIST SP 800-38D);
//!   at the default chunk size that is 512 TiB of unique data, documented in FORMAT.md.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::ids::ChunkId;

/// Frozen: changing any of these strings makes every existing vault unreadable.
use crate::format::{CTX_CHUNK_ID, CTX_CONFIG_MAC, CTX_DATA};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed object adds to its (possibly compressed) body: nonce, codec byte, tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 1 + TAG_LEN;

/// Frozen codec bytes (first plaintext byte inside the AEAD).
const CODEC_RAW: u8 = 0;
/// zstd frame preceded by the raw length as u32 LE (so decompression allocates exactly once).
const CODEC_ZSTD: u8 = 1;

/// Largest plaintext the sealer accepts (and the opener will allocate for).
pub const MAX_PLAINTEXT: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("authentication failed (wrong key, or the object was modified)")]
    Authentication,
    #[error("malformed sealed object: {0}")]
    Malformed(&'static str),
    #[error("decompression failed: {0}")]
    Decompress(String),
}

/// The vault's root secret. Zeroed on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::Rng::fill(&mut rand::thread_rng(), &mut k[..]);
        MasterKey(k)
    }
}

/// Sub-keys derived from the master key.
pub struct Keys {
    id_key: Zeroizing<[u8; 32]>,
    mac_key: Zeroizing<[u8; 32]>,
    data: LessSafeKey,
}

/// An AES-256-GCM key (ring: AES-NI and carry-less multiply in assembly).
fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"))
}

impl Keys {
    pub fn derive(master: &MasterKey) -> Self {
        let mut data_key = Zeroizing::new(blake3::derive_key(CTX_DATA, &master.0[..]));
        let data = aead_key(&data_key);
        data_key.zeroize();
        Keys {
            id_key: Zeroizing::new(blake3::derive_key(CTX_CHUNK_ID, &master.0[..])),
            mac_key: Zeroizing::new(blake3::derive_key(CTX_CONFIG_MAC, &master.0[..])),
            data,
        }
    }

    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// MAC over the vault config so a tampered chunk size or version is detected after unlock.
    pub fn config_mac(&self, bytes: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.mac_key, bytes).as_bytes()
    }

    /// Seals `plaintext`: zstd at `level` when it saves space (`level` None: never), then
    /// AES-256-GCM bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8], level: Option<i32>) -> Vec<u8> {
        assert!(plaintext.len() <= MAX_PLAINTEXT, "plaintext too large");
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD + 4);
        let nonce: [u8; NONCE_LEN] = rand::random();
        out.extend_from_slice(&nonce);
        let compressed = level.and_then(|l| compress(plaintext, l));
        match compressed {
            Some(c) => {
                out.push(CODEC_ZSTD);
                out.extend_from_slice(&(plaintext.len() as u32).to_le_bytes());
                out.extend_from_slice(&c);
            }
            None => {
                out.push(CODEC_RAW);
                out.extend_from_slice(plaintext);
            }
        }
        let tag = self
            .data
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-GCM encryption cannot fail for in-range lengths");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Reverses [`Keys::seal`]; fails if any byte of `sealed` or the `aad` differs.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_in_place(aad, &mut sealed.to_vec())
    }

    /// Like [`Keys::open`], decrypting inside `sealed` (which is left holding the compressed
    /// plaintext): readers that own the fetched bytes skip a copy of them.
    pub fn open_in_place(&self, aad: &[u8], sealed: &mut [u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_in_place_into(aad, sealed, Vec::new())
    }

    /// Like [`Keys::open_in_place`], writing the plaintext into `out` (emptied first): readers
    /// that recycle chunk buffers avoid touching fresh memory for every chunk.
    pub fn open_in_place_into(
        &self,
        aad: &[u8],
        sealed: &mut [u8],
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>, CryptoError> {
        out.clear();
        match self.open_body(aad, sealed)? {
            Body::Raw(raw) => out.extend_from_slice(raw),
            Body::Zstd { frame, raw_len } => {
                out.reserve_exact(raw_len);
                if decompress(frame, &mut out)? != raw_len {
                    return Err(CryptoError::Malformed("decompressed length mismatch"));
                }
            }
        }
        Ok(out)
    }

    /// Like [`Keys::open_in_place`], writing the plaintext to the front of `out` and returning
    /// its length: a restore decodes chunks straight into the aligned buffer it writes from. A
    /// plaintext longer than `out` is an error.
    pub fn open_in_place_to(
        &self,
        aad: &[u8],
        sealed: &mut [u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        let too_long = CryptoError::Malformed("plaintext longer than the space for it");
        match self.open_body(aad, sealed)? {
            Body::Raw(raw) => {
                out.get_mut(..raw.len())
                    .ok_or(too_long)?
                    .copy_from_slice(raw);
                Ok(raw.len())
            }
            Body::Zstd { frame, raw_len } => {
                let out = out.get_mut(..raw_len).ok_or(too_long)?;
                if decompress(frame, out)? != raw_len {
                    return Err(CryptoError::Malformed("decompressed length mismatch"));
                }
                Ok(raw_len)
            }
        }
    }

    /// Authenticates and decrypts `sealed` in place and splits the body by its codec.
    fn open_body<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Result<Body<'a>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError::Malformed("shorter than nonce, codec and tag"));
        }
        let (nonce, body) = sealed.split_at_mut(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Malformed("nonce"))?;
        let body: &'a [u8] = self
            .data
            .open_in_place(nonce, Aad::from(aad), body)
            .map_err(|_| CryptoError::Authentication)?;
        match body[0] {
            CODEC_RAW => Ok(Body::Raw(&body[1..])),
            CODEC_ZSTD => {
                if body.len() < 5 {
                    return Err(CryptoError::Malformed("zstd body without length"));
                }
                let raw_len = u32::from_le_bytes(body[1..5].try_into().unwrap()) as usize;
                if raw_len > MAX_PLAINTEXT {
                    return Err(CryptoError::Malformed("declared length too large"));
                }
                Ok(Body::Zstd {
                    frame: &body[5..],
                    raw_len,
                })
            }
            _ => Err(CryptoError::Malformed("unknown codec")),
        }
    }
}

/// An authenticated, decrypted body.
enum Body<'a> {
    Raw(&'a [u8]),
    /// `raw_len`: the plaintext length the sealer declared (at most [`MAX_PLAINTEXT`]).
    Zstd {
        frame: &'a [u8],
        raw_len: usize,
    },
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses into `out` (a Vec's spare capacity, or a slice) with this thread's reusable
/// context (creating one per chunk cost ~5 % of a restore); returns the bytes written.
fn decompress<C: zstd::zstd_safe::WriteBuf + ?Sized>(
    frame: &[u8],
    out: &mut C,
) -> Result<usize, CryptoError> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| CryptoError::Decompress(e.to_string()))?,
            );
        }
        d.as_mut()
            .unwrap()
            .decompress_to_buffer(frame, out)
            .map_err(|e| CryptoError::Decompress(e.to_string()))
    })
}

/// zstd-compresses `data`, or None when that would not save at least 1/32 of it.
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, comp) = c.as_mut().unwrap();
        let out = comp.compress(data).ok()?;
        (out.len() + out.len() / 32 + 4 < data.len()).then_some(out)
    })
}

/// Argon2id parameters, stored in each key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 4 lanes: RFC 9106's second recommendation. The lanes are computed in
    /// parallel, so unlocking takes about 0.1 s on two cores here (one lane took 0.2 s) for the
    /// same memory and work an attacker must spend per guess.
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 4,
        }
    }
}

/// The master key wrapped under a passphrase (`keys/<id>` object, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub kdf: String,
    pub params: KdfParams,
    #[serde(with = "hex::serde")]
    pub salt: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    #[serde(with = "hex::serde")]
    pub wrapped: Vec<u8>,
    pub created: String,
}

impl KdfParams {
    /// Caps checked before any hashing, on unwrap (key files are unauthenticated: a planted
    /// one with `iterations = 2^32-1` hung every open) and on wrap (so no vault is made that
    /// this code would refuse to open): at most 2 GiB of memory (RFC 9106's first
    /// recommendation), 64 passes, 16 lanes, and 8 GiB-passes of work in all (the default is
    /// 192 MiB-passes). A vault made with more (before these caps existed) opens with
    /// `ELASTIO_KDF_LIMIT_MIB` set to at least its memory in MiB, which scales the caps.
    pub fn check(&self) -> Result<(), String> {
        let limit_mib: u64 = std::env::var("ELASTIO_KDF_LIMIT_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|m| *m >= 2048)
            .unwrap_or(2048);
        let max_kib = limit_mib * 1024;
        let work = self.memory_kib as u64 * self.iterations as u64;
        if self.memory_kib as u64 > max_kib
            || self.iterations == 0
            || self.iterations > 64
            || self.parallelism == 0
            || self.parallelism > 16
            || work > 4 * max_kib
        {
            return Err(format!(
                "Argon2 parameters out of bounds ({} KiB, {} passes, {} lanes; at most \
                 {limit_mib} MiB, 64 passes, 16 lanes and {} GiB-passes in all; a vault made \
                 with more opens with ELASTIO_KDF_LIMIT_MIB set to its memory in MiB)",
                self.memory_kib,
                self.iterations,
                self.parallelism,
                4 * limit_mib / 1024
            ));
        }
        Ok(())
    }
}

fn kek(password: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>, String> {
    p.check()?;
    if salt.len() < 8 || salt.len() > 64 {
        return Err(format!("salt of {} bytes (8 to 64)", salt.len()));
    }
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| e.to_string())?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(password, salt, &mut out[..])
        .map_err(|e| e.to_string())?;
    Ok(out)
}

impl KeyFile {
    /// Wraps `master` under `password`; `vault_id` is bound as associated data.
    pub fn wrap(
        master: &MasterKey,
        password: &[u8],
        params: KdfParams,
        vault_id: &str,
    ) -> Result<Self, String> {
        let salt: [u8; 16] = rand::random();
        let nonce: [u8; NONCE_LEN] = rand::random();
        let kek = kek(password, &salt, params)?;
        let mut buf = master.0.to_vec();
        let tag = aead_key(&kek)
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(vault_id.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM encryption of 32 bytes");
        buf.extend_from_slice(tag.as_ref());
        Ok(KeyFile {
            kdf: "argon2id".into(),
            params,
            salt: salt.to_vec(),
            nonce: nonce.to_vec(),
            wrapped: buf,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        })
    }

    /// The master key, or None if `password` is not the one this file was made with.
    pub fn unwrap_key(&self, password: &[u8], vault_id: &str) -> Result<Option<MasterKey>, String> {
        if self.kdf != "argon2id" || self.nonce.len() != NONCE_LEN || self.wrapped.len() != 48 {
            return Err(format!(
                "unsupported or malformed key file (kdf {:?})",
                self.kdf
            ));
        }
        let kek = kek(password, &self.salt, self.params)?;
        let mut buf = Zeroizing::new(self.wrapped.clone());
        let nonce = Nonce::try_assume_unique_for_key(&self.nonce)
            .map_err(|_| "malformed key file nonce".to_string())?;
        let Ok(plain) =
            aead_key(&kek).open_in_place(nonce, Aad::from(vault_id.as_bytes()), &mut buf[..])
        else {
            return Ok(None);
        };
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(plain);
        Ok(Some(MasterKey(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::derive(&MasterKey::generate())
    }

    const FAST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    proptest! {
        #[test]
        fn seal_open_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..20_000),
                               level in proptest::option::of(-3i32..4), repeat in 1usize..4) {
            let k = keys();
            let data: Vec<u8> = data.iter().cycle().take(data.len() * repeat).copied().collect();
            let sealed = k.seal(b"aad", &data, level);
            prop_assert_eq!(k.open(b"aad", &sealed).unwrap(), data);
        }

        #[test]
        fn any_flipped_bit_is_detected(data in proptest::collection::vec(any::<u8>(), 1..2000),
                                       pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let k = keys();
            let mut sealed = k.seal(b"aad", &data, Some(1));
            let i = pos.index(sealed.len());
            sealed[i] ^= 1 << bit;
            prop_assert!(k.open(b"aad", &sealed).is_err());
        }
    }

    #[test]
    fn wrong_aad_or_key_fails() {
        let k = keys();
        let sealed = k.seal(b"chunk a", b"hello hello hello hello", Some(3));
        assert!(matches!(
            k.open(b"chunk b", &sealed),
            Err(CryptoError::Authentication)
        ));
        assert!(keys().open(b"chunk a", &sealed).is_err());
        assert!(k.open(b"chunk a", &sealed[..10]).is_err());
    }

    #[test]
    fn compressible_data_shrinks() {
        let k = keys();
        let sealed = k.seal(b"", &vec![7u8; 100_000], Some(1));
        assert!(sealed.len() < 1000);
        let random: Vec<u8> = (0..100_000).map(|_| rand::random()).collect();
        let sealed = k.seal(b"", &random, Some(1));
        assert_eq!(sealed.len(), random.len() + SEAL_OVERHEAD, "stored raw");
    }

    #[test]
    fn ids_are_keyed() {
        let (a, b) = (keys(), keys());
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }

    #[test]
    fn key_wrapping() {
        let m = MasterKey::generate();
        let kf = KeyFile::wrap(&m, b"secret", FAST, "vault-1").unwrap();
        let back = kf.unwrap_key(b"secret", "vault-1").unwrap().unwrap();
        assert_eq!(&back.0[..], &m.0[..]);
        assert!(kf.unwrap_key(b"wrong", "vault-1").unwrap().is_none());
        assert!(kf.unwrap_key(b"secret", "vault-2").unwrap().is_none());
        let json = serde_json::to_string(&kf).unwrap();
        assert!(!json.contains(&hex::encode(&m.0[..])), "key in clear");
    }
}
