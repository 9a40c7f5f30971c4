//! libFuzzer entry for `chorus_server::fuzzing::yjs_message` (y-websocket message parsing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| chorus_server::fuzzing::yjs_message(data));
