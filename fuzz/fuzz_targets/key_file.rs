//! Key files (`keys/<id>`): unauthenticated JSON anyone with write access can plant. Parsing
//! and the KDF caps must hold for any input; unwrapping runs only for tiny parameters so the
//! fuzzer measures the parser, not Argon2 (whose cost the caps bound: see KdfParams::check).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(kf) = serde_json::from_slice::<scalez::crypto::KeyFile>(data) else {
        return;
    };
    if kf.params.check().is_ok() && kf.params.memory_kib as u64 * kf.params.iterations as u64 <= 64
    {
        let _ = kf.unwrap_key(b"password", "vault");
    }
});
