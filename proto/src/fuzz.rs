//! What the node-frame fuzz target (`fuzz/fuzz_targets/node_frame.rs`) runs on each input,
//! shared with the corpus replay test so that CI checks the same path without a fuzzer:
//! any bytes as a frame from a node and as a frame from the coordinator, decoded and
//! checked as the coordinator and the SDK do. Errors are fine; panics are not.

use prost::Message;

use crate::convert::task_token;
use crate::domain::{FromNode, ToNode};
use crate::pb;

/// Returns how many of the two readings decoded into a valid frame.
pub fn check_frames(data: &[u8]) -> usize {
    let mut valid = 0;
    if let Ok(frame) = pb::NodeFrame::decode(data) {
        valid += usize::from(FromNode::try_from(frame).is_ok());
    }
    if let Ok(frame) = pb::CoordinatorFrame::decode(data) {
        let _ = task_token(&frame);
        valid += usize::from(ToNode::try_from(frame).is_ok());
    }
    valid
}
