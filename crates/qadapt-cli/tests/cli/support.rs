//! Helpers every module of the CLI tests uses: the fixtures and the `qadapt` binary under test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `tests/data/<name>` in this checkout.
pub(crate) fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(name)
}

/// A path as the `&str` argument the CLI takes (the test paths are UTF-8).
pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The binary under test: `$QADAPT_BIN` when set (the GPU bundle runs its own copy), else the
/// one cargo built for these tests.
pub(crate) fn bin() -> Command {
    let bin = std::env::var_os("QADAPT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_qadapt").into());
    Command::new(bin)
}

/// `qadapt ARGS...` run to completion in this process's directory.
pub(crate) fn qadapt<A: AsRef<OsStr>>(args: &[A]) -> Output {
    bin().args(args).output().expect("run qadapt")
}

/// `(step, loss)` of every step row of a run's `log.jsonl`.
pub(crate) fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// A resumed run's step losses against the uninterrupted run's: `steps` rows, each within 1e-5
/// (relative; the checkpoint restores every state exactly, so only the order of a reduction may
/// differ).
pub(crate) fn assert_resumed_like(
    tag: &str,
    whole: &[(u64, f64)],
    resumed: &[(u64, f64)],
    steps: usize,
) {
    assert_eq!(resumed.len(), steps, "{tag}: resumed steps");
    for ((step, a), (_, b)) in whole.iter().zip(resumed) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{tag} step {step}: uninterrupted {a} vs resumed {b}"
        );
    }
}
