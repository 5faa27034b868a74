//! Index object plaintext (what a vault key holder wrote, or a damaged one): decoded with
//! checked counts, never allocating more than the input justifies.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = scalez::index::decode(data) {
        // Whatever decodes re-encodes to a decodable object with the same entries.
        let again = scalez::index::decode(&scalez::index::encode(&entries)).expect("round trip");
        assert_eq!(again.len(), entries.len());
    }
});
