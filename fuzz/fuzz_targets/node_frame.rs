//! Any bytes as a node stream frame, either way: decoding and checking may refuse them,
//! never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_proto::fuzz::check_frames(data);
});
