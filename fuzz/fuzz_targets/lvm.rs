//! An LVM2 physical volume from the fuzzer's bytes: label, metadata area, the VG's text
//! metadata, and every LV mapped piece by piece.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::lvm(data));
