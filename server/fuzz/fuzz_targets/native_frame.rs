//! libFuzzer entry for `chorus_server::fuzzing::native_frame` (native frame decoding).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus_server::fuzzing::native_frame(data));
