//! What an NBD client sends, through the server's wire parsers: option haggling, then
//! transmission requests (see `elastio_fuzz::nbd_client_stream`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| elastio_fuzz::nbd_client_stream(data));
