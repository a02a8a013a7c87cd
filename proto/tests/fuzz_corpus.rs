//! Replays the node-frame fuzz corpus (`fuzz/corpus/node_frame/`, grown by `cargo fuzz run
//! node_frame -s none` and kept in git) through the code the fuzz target runs: garbage,
//! truncated and hostile frames from nodes and from the coordinator, each handled without a
//! panic. The hostile-input test sends the same kind of bytes to a real coordinator.

use std::path::Path;

#[test]
fn the_node_frame_corpus_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/node_frame");
    let (mut inputs, mut valid) = (0, 0);
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        inputs += 1;
        valid += mesh_proto::fuzz::check_frames(&data);
    }
    assert!(inputs >= 10, "corpus too small: {inputs} inputs");
    // The valid seeds (a register, a task whose token alone is readable) stay valid.
    assert!(valid >= 2, "{valid} valid readings");
    eprintln!("{inputs} node-frame corpus inputs replayed, {valid} valid readings");
}

/// The seeds that pin the hardening: an output the coordinator cannot keep fails its
/// attempt (the stream goes on), and a task a node cannot read still names its attempt.
#[test]
fn hostile_results_fail_their_attempt_and_unreadable_tasks_keep_their_token() {
    use mesh_proto::domain::{FromNode, ToNode};
    use mesh_proto::pb;
    use prost::Message;
    let seed = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/corpus/node_frame")
                .join(name),
        )
        .unwrap()
    };
    for (name, says) in [
        (
            "result-output-40-deep",
            "is nested 40 levels deep, the limit is 32",
        ),
        ("result-deep-output", "recursion limit"),
        ("result-big-output", "the limit is"),
        ("result-invalid-json", "invalid JSON"),
    ] {
        let frame = pb::NodeFrame::decode(seed(name).as_slice()).unwrap();
        let Ok(FromNode::Result(result)) = FromNode::try_from(frame) else {
            panic!("{name}: a result frame stays a result");
        };
        let error = result.outcome.expect_err(name);
        assert_eq!(error.code, "bad_output", "{name}");
        assert!(!error.retryable, "{name}");
        assert!(error.message.contains(says), "{name}: {}", error.message);
    }
    let frame = pb::CoordinatorFrame::decode(seed("task-unreadable-input").as_slice()).unwrap();
    assert!(mesh_proto::convert::task_token(&frame).is_some());
    assert!(ToNode::try_from(frame).is_err());
}
