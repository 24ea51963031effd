//! Replays the committed fuzz corpus (`tests/fuzz/corpus/<target>/*`: seeds and every input a
//! `just fuzz` run found interesting or crashing) through the same target bodies libFuzzer runs,
//! so a fixed crash stays fixed in `just test`.

#[path = "fuzz/targets.rs"]
mod targets;

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        // A panic names the input through the test's output.
        eprintln!("{}", path.display());
        body(&data);
        n += 1;
    }
    assert!(n >= 3, "{target}: only {n} corpus inputs");
}

#[test]
fn safetensors_nf4_corpus() {
    replay("safetensors_nf4", targets::safetensors_nf4);
}

#[test]
fn model_dir_corpus() {
    replay("model_dir", targets::model_dir);
}

#[test]
fn adapter_corpus() {
    replay("adapter", targets::adapter);
}

#[test]
fn jsonl_corpus() {
    replay("jsonl", targets::jsonl);
}
