//! An ext2/3/4 image from the fuzzer's bytes, walked whole (within budgets).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::walk_ext4(data));
