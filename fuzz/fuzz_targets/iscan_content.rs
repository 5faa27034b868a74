//! A file's name and bytes as an integrity scan judges them (iscan's magic numbers, extensions,
//! ransom-note names, onion addresses, entropy and χ² of windows): no panic, bounded results.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::iscan_content(data));
