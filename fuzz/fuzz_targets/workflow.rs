//! Any bytes through the workflow parser and validator, then through input binding:
//! errors are fine, panics and hangs are not.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_workflow::fuzz::check(data);
});
