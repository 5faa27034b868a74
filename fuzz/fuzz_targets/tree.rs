//! File-tree records (EZT1) and the path checks every reader applies to them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(e) = scalez::tree::decode_entry(data) {
        let _ = scalez::tree::path_problem(&e.path);
        let mut out = Vec::new();
        scalez::tree::encode_entry(&e, &mut out);
        // Whatever decodes re-decodes to the same entry (the record after its length prefix).
        assert_eq!(scalez::tree::decode_entry(&out[4..]).as_ref(), Ok(&e));
    }
});
