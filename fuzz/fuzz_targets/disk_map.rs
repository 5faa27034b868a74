//! Disk map pages (the tree of a disk RP's block map).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = scalez::disk_map::Page::decode(data);
});
