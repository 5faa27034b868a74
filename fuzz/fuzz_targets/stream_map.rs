//! Stream map blobs: manifests and roots of stream and file-tree RPs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(m) = scalez::stream_map::decode_manifest(data) {
        assert_eq!(scalez::stream_map::encode_manifest(&m), data);
    }
    if let Some(r) = scalez::stream_map::decode_root(data) {
        assert_eq!(scalez::stream_map::encode_root(&r), data);
    }
});
