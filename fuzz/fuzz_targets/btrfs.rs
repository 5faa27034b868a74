//! A btrfs file system from the fuzzer's bytes (sparse-sector records, see
//! `mount::filesystem::SparseImage`), walked whole within budgets (checksums are not verified
//! under `cfg(fuzzing)`, so mutations reach the parsers behind them).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::walk_btrfs(data));
