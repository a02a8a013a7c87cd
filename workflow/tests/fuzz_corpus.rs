//! Replays the fuzz corpus (`fuzz/corpus/workflow/`, grown by `cargo fuzz run workflow -s
//! none` and kept in git) through the code the fuzz target runs: every input must be
//! handled without a panic. The examples are part of the corpus and must stay valid.

use std::path::Path;

#[test]
fn the_fuzz_corpus_replays_without_a_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/workflow");
    let mut inputs = 0;
    let mut valid = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::env::var_os("FUZZ_CORPUS_TRACE").is_some() {
            eprintln!("{}", path.display());
        }
        inputs += 1;
        let started = std::time::Instant::now();
        valid += usize::from(mesh_workflow::fuzz::check(&data));
        // A stall guard, not a speed check: an expression's cost is bounded before it
        // runs (the `hardening-*` seeds took seconds to minutes each before).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{} took {:?}",
            path.display(),
            started.elapsed()
        );
    }
    assert!(inputs >= 20, "corpus too small: {inputs} inputs");
    assert!(
        valid >= 8,
        "the valid seeds (the examples) stay valid: {valid} valid"
    );
    eprintln!("{inputs} corpus inputs replayed, {valid} valid workflows");
}
