//! An NTFS volume from the fuzzer's bytes (sparse-sector records, see
//! `mount::filesystem::SparseImage`), walked whole within budgets.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::walk_ntfs(data));
