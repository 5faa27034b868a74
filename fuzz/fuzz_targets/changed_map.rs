//! A changed map (agent::block::ranges, the `--changed-map` file format) for a disk of the
//! size the first 8 bytes give: parsed within its budget into a sorted set inside the disk.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::changed_map(data));
