//! The embedded default: a small pretrained Llama (`assets/default-model`, made by
//! `qadapt pretrain` on the corpus of `assets/make_task.py`) and its fine-tuning task
//! (`assets/task`, train and held-out JSONL). Both are compiled into the binary so that
//! `qadapt train` works from any directory with no download; on first use they are written to
//! a directory under the system temp dir named by the binary's version and the content's
//! length, atomically, and reused after that.

use std::path::PathBuf;

use anyhow::{Context, Result};

const MODEL: [(&str, &[u8]); 5] = [
    (
        "config.json",
        include_bytes!("../assets/default-model/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../assets/default-model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../assets/default-model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../assets/default-model/tokenizer_config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../assets/default-model/generation_config.json"),
    ),
];

const TASK: [(&str, &[u8]); 2] = [
    ("train.jsonl", include_bytes!("../assets/task/train.jsonl")),
    (
        "heldout.jsonl",
        include_bytes!("../assets/task/heldout.jsonl"),
    ),
];

/// Writes `files` into `<tmp>/qadapt-<version>-<what>-<bytes>` unless it is there already.
fn materialize(what: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    let dir = std::env::temp_dir().join(format!(
        "qadapt-{}-{what}-{bytes}",
        env!("CARGO_PKG_VERSION")
    ));
    let complete = files.iter().all(|(name, b)| {
        std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == b.len() as u64)
    });
    if complete {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let made = crate::io::new_directory(&dir, |tmp| {
        for (name, b) in files {
            std::fs::write(tmp.join(name), b)?;
        }
        Ok(())
    });
    // Another process may have won the race; its copy is as good as ours.
    if made.is_err() && dir.is_dir() {
        return Ok(dir);
    }
    made.with_context(|| format!("unpacking the embedded {what}"))?;
    Ok(dir)
}

/// The embedded model as an HF directory.
pub(crate) fn model_dir() -> Result<PathBuf> {
    materialize("default-model", &MODEL)
}

/// The embedded task: `train.jsonl` and `heldout.jsonl`.
pub(crate) fn task_dir() -> Result<PathBuf> {
    materialize("task", &TASK)
}
