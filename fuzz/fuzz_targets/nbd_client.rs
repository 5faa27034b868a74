//! The NBD client (mount::nbd::client, the source side of `block backup nbd://…`) against a
//! server whose every byte is the fuzzer's: handshake, meta contexts, reads and block status.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::nbd_client(data));
