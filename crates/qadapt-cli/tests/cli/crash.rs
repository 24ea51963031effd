//! Crash consistency of `qadapt train`: the process is killed at every filesystem step of its
//! writes (run directory, checkpoint swap, adapter, log, plot, summary) through the
//! `QADAPT_FAULT_AT=N` hook, and by SIGKILL at a few moments; after each kill, `--resume` (or,
//! when the kill came before the run directory existed, the same command again) must finish,
//! leave no temporary behind, and reach the uninterrupted run's adapter bit for bit.
//! Also: `--resume` from another working directory, and its refusal of changed inputs.

use crate::support::{bin, step_losses};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qadapt_cmd(args: &[&str], cwd: &Path) -> Command {
    let mut c = bin();
    c.args(args).arg("--quiet").current_dir(cwd);
    c
}

fn run(args: &[&str], cwd: &Path, fault_at: Option<usize>) -> Output {
    let mut c = qadapt_cmd(args, cwd);
    if let Some(k) = fault_at {
        c.env("QADAPT_FAULT_AT", k.to_string());
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", stderr(o));
}

/// The model and data as files, so that run.toml and inputs.json record real paths.
fn inputs(tmp: &Path) -> (PathBuf, PathBuf) {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let model = tmp.join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(assets.join("default-model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let data = tmp.join("train.jsonl");
    std::fs::copy(assets.join("task/train.jsonl"), &data).unwrap();
    (model, data)
}

fn args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--method",
        "lora",
        "--model",
        model,
        "--data",
        data,
        "--steps",
        "5",
        "--batch",
        "4",
        "--checkpoint-every",
        "2",
        "--output",
        out,
    ]
}

fn adapter(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Names under `dir` (recursively) that a finished run must not have: temporaries and a
/// checkpoint moved aside.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".partial") || name.ends_with(".old") {
            found.push(e.path().display().to_string());
        }
        if e.file_type().unwrap().is_dir() {
            found.extend(leftovers(&e.path()));
        }
    }
    found
}

/// Finishes a killed run the way a user would: `--resume` when its directory exists, else the
/// same command again; `fault_at` may kill the first attempt again.
fn finish(cmd: &[&str], cwd: &Path, out: &str, fault_at: Option<usize>) {
    for fault in [fault_at, None] {
        let o = if cwd.join(out).exists() {
            run(&["train", "--resume", out], cwd, fault)
        } else {
            run(cmd, cwd, fault)
        };
        if o.status.success() {
            return;
        }
        assert!(
            fault.is_some() && stderr(&o).contains("QADAPT_FAULT_AT"),
            "a recovery failed: {}",
            stderr(&o)
        );
    }
}

#[test]
fn a_run_killed_at_any_write_resumes_to_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = inputs(tmp.path());
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    ok(&run(&args(model, data, "whole"), tmp.path(), None));
    let want = adapter(&tmp.path().join("whole"));
    let want_losses = step_losses(&tmp.path().join("whole"));
    assert_eq!(want_losses.len(), 5);

    let mut points = 0;
    for k in 1.. {
        let out = format!("k{k}");
        let cmd = args(model, data, &out);
        let o = run(&cmd, tmp.path(), Some(k));
        if o.status.success() {
            // Fewer than k fault points: every one has been tried.
            points = k - 1;
            break;
        }
        let err = stderr(&o);
        assert!(
            err.contains(&format!("QADAPT_FAULT_AT={k}: killed at")),
            "{err}"
        );
        // The recovery is itself killed at its k-th step once, then finishes.
        finish(&cmd, tmp.path(), &out, Some(k));
        let dir = tmp.path().join(&out);
        assert_eq!(
            adapter(&dir),
            want,
            "killed at point {k} ({err}): other weights"
        );
        assert_eq!(
            step_losses(&dir),
            want_losses,
            "killed at point {k}: other losses"
        );
        assert_eq!(
            leftovers(tmp.path()),
            Vec::<String>::new(),
            "after point {k}"
        );
    }
    // Run directory (3 steps), 3 checkpoints (4 + 5 + 5), adapter (4), log cut on resume, plot
    // and summary (3 each).
    assert!(points >= 25, "only {points} fault points were reached");

    // SIGKILL from outside at a few moments of a run (wherever it happens to be).
    for (i, ms) in [150u64, 400, 700].into_iter().enumerate() {
        let out = format!("sigkill{i}");
        let cmd = args(model, data, &out);
        let mut child = qadapt_cmd(&cmd, tmp.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = child.kill();
        child.wait().unwrap();
        finish(&cmd, tmp.path(), &out, None);
        assert_eq!(
            adapter(&tmp.path().join(&out)),
            want,
            "SIGKILL after {ms} ms"
        );
        assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
    }
}

#[test]
fn resume_works_from_anywhere_and_refuses_changed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = inputs(tmp.path());
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    // Relative paths on the command line, resolved in the first working directory only.
    let sub = tmp.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let mut cmd = args("../model", "../train.jsonl", "cut");
    cmd.extend(["--interrupt-after", "2"]);
    ok(&run(&cmd, &sub, None));
    ok(&run(&args(model, data, "whole"), tmp.path(), None));
    // From the parent directory, through another spelling of the run directory.
    ok(&run(&["train", "--resume", "sub/cut"], tmp.path(), None));
    assert_eq!(
        adapter(&sub.join("cut")),
        adapter(&tmp.path().join("whole"))
    );

    let mut cmd = args(model, data, "edited");
    cmd.extend(["--interrupt-after", "2"]);
    ok(&run(&cmd, tmp.path(), None));
    let mut text = std::fs::read_to_string(data).unwrap();
    text.push('\n');
    std::fs::write(data, text).unwrap();
    let o = run(&["train", "--resume", "edited"], tmp.path(), None);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("train.jsonl changed since the run started"),
        "{err}"
    );
}
