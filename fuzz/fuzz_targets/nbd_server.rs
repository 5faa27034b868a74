//! One client's bytes through the whole NBD server (see `elastio_fuzz::nbd_server_session`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::nbd_server_session(data));
