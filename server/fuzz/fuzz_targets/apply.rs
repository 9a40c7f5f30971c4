//! libFuzzer entry for `chorus_server::fuzzing::apply` (the write path on a live document).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus_server::fuzzing::apply(data));
