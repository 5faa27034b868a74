//! A disk's first sectors from the fuzzer's bytes, parsed as MBR/GPT.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::check_partitions(data));
