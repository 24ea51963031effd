//! `qadapt train` and `qadapt compare` on the embedded model and task (short runs): what lands
//! on disk, exact resume after an interruption, the NaN stop, and bad input.

use crate::support::{assert_resumed_like, bin, data, s, step_losses};
use std::path::Path;
use std::process::Output;

/// The binary under test: `QADAPT_BIN` when set (the GPU bundle ships the binary beside the test
/// binaries, away from the build tree), else the one cargo built.
fn qadapt(args: &[&str], cwd: &Path) -> Output {
    bin().args(args).current_dir(cwd).output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "failed: {err}");
    err
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "should fail");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    assert!(
        err.trim_end().ends_with(errors[0]),
        "the error comes last: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

const SHORT: [&str; 6] = ["--steps", "6", "--batch", "4", "--checkpoint-every", "2"];

/// The first 24 of the embedded task's 300 held-out examples, in `dir`: the device tests
/// evaluate on these (`--heldout-data`), since the virtual device runs every kernel on the CPU.
fn small_heldout(dir: &Path) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/task/heldout.jsonl"),
    )
    .unwrap();
    let path = dir.join("heldout-24.jsonl");
    let lines: Vec<&str> = text.lines().take(24).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `--heldout-data` replaces the embedded task's held-out examples.
#[test]
fn heldout_data_replaces_the_default_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_heldout(tmp.path());
    let err = ok(&qadapt(
        &[
            "train",
            "--steps",
            "1",
            "--heldout-data",
            &h,
            "--output",
            "r",
        ],
        tmp.path(),
    ));
    assert!(
        err.contains("(2000 training / 24 held-out examples)"),
        "{err}"
    );
    assert!(err.contains("(0/24)"), "{err}");
}

#[test]
fn a_run_writes_a_peft_adapter_a_log_a_plot_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = qadapt(
        &[
            &["train", "--method", "lora", "--output", "run"][..],
            &SHORT,
        ]
        .concat(),
        tmp.path(),
    );
    let err = ok(&o);
    assert!(err.contains("before: exact match"), "{err}");
    assert!(err.contains("after:  exact match"), "{err}");
    for f in [
        "run.toml",
        "log.jsonl",
        "loss.png",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint/state.json",
        "checkpoint/tensors.safetensors",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let losses = step_losses(&out);
    assert_eq!(
        losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert!(losses.iter().all(|l| l.1.is_finite() && l.1 > 0.0));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // r (in + out) per projection: 4 layers x (q 192+192, k 192+64, v 192+64, o 192+192,
    // gate 192+512, up 192+512, down 512+192) x 8.
    assert_eq!(
        summary["trainable_params"],
        4 * 8 * (384 + 256 + 256 + 384 + 704 * 3)
    );
    assert_eq!(summary["steps"], 6);
    // The PNG signature.
    assert_eq!(
        &std::fs::read(out.join("loss.png")).unwrap()[..8],
        b"\x89PNG\r\n\x1a\n"
    );
    // The output directory is never reused silently.
    let again = qadapt(&["train", "--output", "run", "--steps", "1"], tmp.path());
    assert!(fails(&again).contains("already exists"));
}

/// `--adapter-dtype bf16` saves the same adapter as an f32 run (same seed), each tensor rounded
/// to bf16, under the same names and shapes; run.toml keeps the choice.
#[test]
fn a_bf16_adapter_is_the_f32_one_rounded() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &str, extra: &[&str]| {
        let args = [
            &["train", "--method", "lora", "--output", out][..],
            &SHORT,
            extra,
        ]
        .concat();
        ok(&qadapt(&args, tmp.path()));
        std::fs::read(
            tmp.path()
                .join(out)
                .join("adapter/adapter_model.safetensors"),
        )
        .unwrap()
    };
    let f32_bytes = run("f32", &[]);
    let bf16_bytes = run("bf16", &["--adapter-dtype", "bf16"]);
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&f32_bytes).unwrap(),
        safetensors::SafeTensors::deserialize(&bf16_bytes).unwrap(),
    );
    let mut names = a.names();
    names.sort();
    let mut names_b = b.names();
    names_b.sort();
    assert_eq!(names, names_b);
    assert!(!names.is_empty());
    for n in names {
        let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(ta.dtype(), safetensors::Dtype::F32, "{n}");
        assert_eq!(tb.dtype(), safetensors::Dtype::BF16, "{n}");
        assert_eq!(ta.shape(), tb.shape(), "{n}");
        let want: Vec<half::bf16> = bytemuck::pod_collect_to_vec::<u8, f32>(ta.data())
            .into_iter()
            .map(half::bf16::from_f32)
            .collect();
        let got = bytemuck::pod_collect_to_vec::<u8, half::bf16>(tb.data());
        assert_eq!(got, want, "{n}");
    }
    let toml = std::fs::read_to_string(tmp.path().join("bf16/run.toml")).unwrap();
    assert!(toml.contains("adapter_dtype = \"bf16\""), "{toml}");
    let o = qadapt(
        &["train", "--adapter-dtype", "f16", "--output", "x"],
        tmp.path(),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("f32 or bf16"));
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        &["train", "--method", "lora", "--lora-dropout", "0.1"][..],
        &SHORT,
    ]
    .concat();
    ok(&qadapt(
        &[&common[..], &["--output", "whole"]].concat(),
        tmp.path(),
    ));
    let cut = qadapt(
        &[&common[..], &["--output", "cut", "--interrupt-after", "3"]].concat(),
        tmp.path(),
    );
    let err = ok(&cut);
    assert!(err.contains("interrupted at step 3"), "{err}");
    assert!(!tmp.path().join("cut/adapter").exists());
    assert_eq!(step_losses(&tmp.path().join("cut")).len(), 3);
    // Other options are refused with --resume.
    let bad = qadapt(&["train", "--resume", "cut", "--steps", "9"], tmp.path());
    assert!(fails(&bad).contains("--resume"));
    let err = ok(&qadapt(&["train", "--resume", "cut"], tmp.path()));
    assert!(err.contains("resuming at step 3 of 6"), "{err}");
    let read = |d: &str| {
        std::fs::read(tmp.path().join(d).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert_eq!(read("whole"), read("cut"), "resumed weights differ");
    assert_eq!(
        step_losses(&tmp.path().join("whole")),
        step_losses(&tmp.path().join("cut"))
    );
}

#[test]
fn a_diverging_run_stops_with_a_clear_message_and_keeps_its_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qadapt(
        &[
            "train",
            "--method",
            "full",
            "--output",
            "nan",
            "--steps",
            "20",
            "--batch",
            "2",
            "--checkpoint-every",
            "1",
            "--lr",
            "1e30",
            "--max-grad-norm",
            "none",
        ],
        tmp.path(),
    );
    let err = fails(&o);
    assert!(err.contains("the loss is"), "{err}");
    assert!(err.contains("last good checkpoint"), "{err}");
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("nan/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    let step = st["step"].as_u64().unwrap();
    assert!((1..20).contains(&step), "checkpoint at step {step}");
}

#[test]
fn bad_data_is_reported_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let mut text = String::new();
    for i in 0..12 {
        text += &format!(
            "{{\"prompt\": \"review: the soup was great {i}.\\nsentiment:\", \"completion\": \" positive\"}}\n"
        );
    }
    text += "{not json\n";
    std::fs::write(&data, &text).unwrap();
    let d = data.to_str().unwrap();
    let o = qadapt(
        &[
            "train", "--data", d, "--output", "a", "--steps", "1", "--batch", "2",
        ],
        tmp.path(),
    );
    let err = ok(&o);
    assert!(err.contains("d.jsonl:13:"), "{err}");
    assert!(err.contains("1 malformed line(s) skipped"), "{err}");
    let strict = qadapt(
        &[
            "train", "--data", d, "--output", "b", "--steps", "1", "--strict",
        ],
        tmp.path(),
    );
    assert!(fails(&strict).contains("d.jsonl:13"));
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let o = qadapt(
        &["train", "--data", empty.to_str().unwrap(), "--output", "c"],
        tmp.path(),
    );
    assert!(fails(&o).contains("no usable example"));
    let o = qadapt(
        &["train", "--data", d, "--output", "e", "--max-len", "5"],
        tmp.path(),
    );
    assert!(fails(&o).contains("no usable example"));
}

#[test]
fn settings_that_would_train_wrongly_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--min-lr-ratio=-1"], "--min-lr-ratio must be in [0, 1]"),
        (
            &["--checkpointing", "layers"],
            "--checkpointing layers applies to --device cuda",
        ),
        (
            &["--weight-decay=-0.1"],
            "--weight-decay must be 0 or positive",
        ),
        (&["--max-grad-norm=-1"], "--max-grad-norm must be positive"),
        (&["--config", "empty_targets.toml"], "--targets is empty"),
    ];
    std::fs::write(tmp.path().join("empty_targets.toml"), "targets = []\n").unwrap();
    for (i, (flags, needle)) in cases.iter().enumerate() {
        let out = format!("r{i}");
        let o = qadapt(
            &[&["train", "--output", &out][..], flags].concat(),
            tmp.path(),
        );
        assert!(fails(&o).contains(needle), "{flags:?}");
        assert!(
            !tmp.path().join(&out).exists(),
            "{flags:?} left a run directory"
        );
    }
}

#[test]
fn cuda_without_a_device_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qadapt(&["train", "--device", "cuda", "--output", "x"], tmp.path());
    let err = fails(&o);
    assert!(err.contains("cuda") || err.contains("CUDA"), "{err}");
    // LoRA dropout is accepted on the device path: what fails here is the missing device.
    let o = qadapt(
        &[
            "train",
            "--device",
            "cuda",
            "--method",
            "lora",
            "--lora-dropout",
            "0.1",
            "--output",
            "d",
        ],
        tmp.path(),
    );
    let err = fails(&o);
    assert!(
        (err.contains("cuda") || err.contains("CUDA")) && !err.contains("dropout"),
        "{err}"
    );
}

#[test]
fn cuda_trains_lora_methods_only_and_says_so_before_opening_a_device() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["ia3", "full", "prompt"] {
        let o = qadapt(
            &[
                "train", "--device", "cuda", "--method", method, "--output", method,
            ],
            tmp.path(),
        );
        let err = fails(&o);
        assert!(
            err.contains("--method lora and --method qlora only") && err.contains(method),
            "{err}"
        );
    }
}

#[test]
fn compare_tabulates_every_requested_method() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qadapt(
        &[
            "compare",
            "--methods",
            "lora,ia3,top-k",
            "--steps",
            "2",
            "--batch",
            "2",
            "--output",
            "cmp",
        ],
        tmp.path(),
    );
    ok(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    for m in ["| lora |", "| ia3 |", "| top-k |"] {
        assert!(table.contains(m), "{table}");
    }
    let csv = std::fs::read_to_string(tmp.path().join("cmp/compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4);
    assert!(tmp.path().join("cmp/losses.png").is_file());
    assert!(tmp.path().join("cmp/compare.md").is_file());
}

/// `--device cuda` on the embedded model: LoRA and QLoRA follow the CPU run's losses to bf16
/// tolerance (1 %) (the device computes in bf16 with f32 accumulation and masters, the CPU in f32), and
/// an interrupted device run resumes to the losses of the uninterrupted one. Runs on a GPU (the
/// bundle) and on the virtual device (`just test-vgpu`).
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_training_follows_the_cpu_run_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    for method in ["lora", "qlora"] {
        // A learning rate of 1e-3 (not the default 3e-3): at the default, bf16 rounding noise
        // grows along the diverging trajectories of six steps to a few percent (measured on the
        // virtual device: up to 6 % at step 5); at 1e-3 both runs stay within 0.25 %.
        let h = small_heldout(tmp.path());
        let common = [
            &[
                "train",
                "--method",
                method,
                "--lr",
                "1e-3",
                "--heldout-data",
                &h,
            ][..],
            &SHORT,
        ]
        .concat();
        let run = |device: &str, out: &str, extra: &[&str]| {
            let args = [&common[..], &["--device", device, "--output", out], extra].concat();
            ok(&qadapt(&args, tmp.path()))
        };
        run("cpu", &format!("{method}-cpu"), &[]);
        let err = run("cuda", &format!("{method}-cuda"), &[]);
        assert!(
            err.contains("training on cuda"),
            "the run names its device: {err}"
        );
        let cpu = step_losses(&tmp.path().join(format!("{method}-cpu")));
        let gpu = step_losses(&tmp.path().join(format!("{method}-cuda")));
        assert_eq!(cpu.len(), 6);
        assert_eq!(
            gpu.iter().map(|l| l.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        for ((step, c), (_, g)) in cpu.iter().zip(&gpu) {
            // bf16 activations carry 8 bits of mantissa: 1 % is four times what was measured.
            assert!(
                (c - g).abs() <= 0.01 * c.abs(),
                "{method} step {step}: cpu {c} vs cuda {g}"
            );
        }
        // The held-out loss before and after, evaluated on the device (the base alone, then with
        // the adapter): within bf16 tolerance of the CPU run's, and lowered by the training.
        let summary = |run: &str| -> serde_json::Value {
            let text = std::fs::read_to_string(tmp.path().join(run).join("summary.json")).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        let (sc, sg) = (
            summary(&format!("{method}-cpu")),
            summary(&format!("{method}-cuda")),
        );
        for key in ["before_loss", "after_loss"] {
            let (c, g) = (sc[key].as_f64().unwrap(), sg[key].as_f64().unwrap());
            assert!(
                (c - g).abs() <= 0.01 * c.abs(),
                "{method} {key}: cpu {c} vs cuda {g}"
            );
        }
        assert!(
            sg["after_loss"].as_f64() < sg["before_loss"].as_f64(),
            "{sg}"
        );
        // Each device step logs its memory high-water mark (at least the 3.5 MB of bf16 weights,
        // or the NF4 codes plus the bf16 embedding and head); a CPU step logs none.
        let peaks = |run: &str| -> Vec<Option<u64>> {
            std::fs::read_to_string(tmp.path().join(run).join("log.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v.get("loss").is_some())
                .map(|v| v.get("device_peak_bytes").and_then(|b| b.as_u64()))
                .collect()
        };
        assert!(peaks(&format!("{method}-cpu")).iter().all(Option::is_none));
        let gpu_peaks = peaks(&format!("{method}-cuda"));
        assert_eq!(gpu_peaks.len(), 6);
        assert!(
            gpu_peaks.iter().all(|p| p.is_some_and(|b| b > 1_000_000)),
            "{method}: {gpu_peaks:?}"
        );
        // Layer checkpointing recomputes each layer in the backward: the same steps exactly.
        run(
            "cuda",
            &format!("{method}-ckpt"),
            &["--checkpointing", "layers"],
        );
        let ckpt = step_losses(&tmp.path().join(format!("{method}-ckpt")));
        assert_eq!(
            ckpt, gpu,
            "{method}: --checkpointing layers changed the losses"
        );
        let cut = format!("{method}-cut");
        let err = run("cuda", &cut, &["--interrupt-after", "3"]);
        assert!(err.contains("interrupted at step 3"), "{err}");
        let err = ok(&qadapt(&["train", "--resume", &cut], tmp.path()));
        assert!(err.contains("resuming at step 3 of 6"), "{err}");
        let resumed = step_losses(&tmp.path().join(&cut));
        assert_resumed_like(method, &gpu, &resumed, 6);
    }
}

/// `--device cuda` plans the step's peak device memory (`qadapt plan-memory`'s planner) and
/// refuses, before the model goes to the device and before the run directory is made, a run that
/// does not fit the device's free memory, with the numbers. The virtual device is given 1 MB
/// (`QADAPT_VGPU_MEMORY`; the embedded model's bf16 weights alone are 3.5 MB); on a GPU, where
/// that variable means nothing, the same short run must simply train.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_refuses_a_run_whose_plan_exceeds_the_free_device_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bin()
        .args([
            "train", "--device", "cuda", "--method", "lora", "--steps", "1", "--batch", "2",
            "--output", "small",
        ])
        .env("QADAPT_VGPU_MEMORY", "1M")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    if std::env::var_os("QADAPT_VGPU").is_none() {
        ok(&o);
        return;
    }
    let err = fails(&o);
    for want in [
        "--device cuda: a step of --batch 2 sequences of up to ",
        "MB of device memory at its peak (weights 3.",
        "MB free of 150.755 GB: lower --batch or --max-len, use --checkpointing layers, or use --method qlora",
        "qadapt plan-memory",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    assert!(
        !tmp.path().join("small").exists(),
        "a refused run leaves nothing"
    );
}

/// `--batch auto` and `--checkpointing auto` follow the memory plan. `--batch auto` sizes the
/// micro-batch: on the virtual device, given 6 MB
/// and then 12 MB (`QADAPT_VGPU_MEMORY`, which it enforces: an allocation beyond it fails), the
/// run says which batch it chose, trains a step with it without running out of memory, and the
/// larger device gets the larger batch; run.toml keeps the number. On a GPU the run must train.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_batch_and_checkpointing_auto_follow_the_memory_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let vgpu = std::env::var_os("QADAPT_VGPU").is_some();
    let h = small_heldout(tmp.path());
    let chosen = |mem: &str, out: &str| -> usize {
        let o = bin()
            .args([
                "train",
                "--device",
                "cuda",
                "--method",
                "qlora",
                "--heldout-data",
                &h,
                "--steps",
                "1",
                "--batch",
                "auto",
                "--output",
                out,
            ])
            .env("QADAPT_VGPU_MEMORY", mem)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let err = ok(&o);
        let n: usize = err
            .split("--batch auto: ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no --batch auto line: {err}"));
        let toml = std::fs::read_to_string(tmp.path().join(out).join("run.toml")).unwrap();
        assert!(toml.contains(&format!("batch = {n}\n")), "{toml}");
        n
    };
    let small = chosen("6M", "small");
    let large = chosen("12M", "large");
    assert!(small >= 1, "{small}");
    if vgpu {
        assert!(large > small, "6 MB: {small}, 12 MB: {large}");
    }
    // --checkpointing auto: at --batch 4 the step needs 9.7 MB without checkpointing and 6.7 MB
    // with it (the plan), so 8 MB takes layers and 12 MB none; both train the same first step.
    let ckpt = |mem: &str, out: &str| -> (String, String) {
        let o = bin()
            .args([
                "train",
                "--device",
                "cuda",
                "--method",
                "qlora",
                "--heldout-data",
                &h,
                "--steps",
                "1",
                "--batch",
                "4",
                "--checkpointing",
                "auto",
                "--output",
                out,
            ])
            .env("QADAPT_VGPU_MEMORY", mem)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let err = ok(&o);
        let toml = std::fs::read_to_string(tmp.path().join(out).join("run.toml")).unwrap();
        let losses = step_losses(&tmp.path().join(out));
        assert_eq!(losses.len(), 1, "{err}");
        (toml, format!("{:?}", losses[0]))
    };
    let (tight, l0) = ckpt("8M", "ckpt-tight");
    let (roomy, l1) = ckpt("12M", "ckpt-roomy");
    if vgpu {
        assert!(tight.contains("checkpointing = \"layers\""), "{tight}");
        assert!(roomy.contains("checkpointing = \"none\""), "{roomy}");
    }
    assert_eq!(l0, l1, "checkpointing changed the first step");
    // On the CPU the flag is refused with one line.
    let o = bin()
        .args(["train", "--batch", "auto", "--output", "cpu"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(fails(&o).contains("--batch auto applies to --device cuda"));
    let o = bin()
        .args(["train", "--checkpointing", "auto", "--output", "cpu"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(fails(&o).contains("--checkpointing auto applies to --device cuda"));
}

/// `--pack` is refused on the CPU with one line, before anything is made.
#[test]
fn pack_is_refused_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let err = fails(&qadapt(
        &["train", "--pack", "--steps", "1", "--output", "p"],
        tmp.path(),
    ));
    assert!(err.contains("--pack applies to --device cuda"), "{err}");
    assert!(
        !tmp.path().join("p").exists(),
        "a refused run leaves nothing"
    );
}

/// `--pack` on the device: each micro-batch of 2 rows of 120 tokens holds several whole
/// sequences (the embedded task's are 30-40 tokens), so a step sees more than twice the tokens
/// of the unpacked run at the same --batch; the run trains (the held-out loss falls) and an
/// interrupted packed run resumes to exactly the uninterrupted one's steps (the sampler's
/// position decides the rows).
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_packed_training_fills_rows_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let h = small_heldout(tmp.path());
    let common = [
        "train",
        "--device",
        "cuda",
        "--method",
        "qlora",
        "--heldout-data",
        &h,
        "--max-len",
        "120",
        "--steps",
        "4",
        "--batch",
        "2",
        "--checkpoint-every",
        "2",
    ];
    let run = |out: &str, extra: &[&str]| {
        let args = [&common[..], &["--output", out], extra].concat();
        ok(&qadapt(&args, tmp.path()))
    };
    let err = run("packed", &["--pack"]);
    assert!(err.contains("--pack: rows of 120 tokens"), "{err}");
    run("padded", &[]);
    let tokens = |out: &str| -> Vec<u64> {
        std::fs::read_to_string(tmp.path().join(out).join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v.get("tokens").and_then(|t| t.as_u64()))
            .collect()
    };
    let (packed, padded) = (tokens("packed"), tokens("padded"));
    assert_eq!((packed.len(), padded.len()), (4, 4));
    for (p, q) in packed.iter().zip(&padded) {
        assert!(*p <= 240 && *p > 2 * q, "packed {p} vs padded {q} tokens");
    }
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("packed/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        summary["after_loss"].as_f64() < summary["before_loss"].as_f64(),
        "{summary}"
    );
    let err = run("cut", &["--pack", "--interrupt-after", "2"]);
    assert!(err.contains("interrupted at step 2"), "{err}");
    ok(&qadapt(&["train", "--resume", "cut"], tmp.path()));
    assert_eq!(tokens("cut"), packed);
    let (whole, resumed) = (
        step_losses(&tmp.path().join("packed")),
        step_losses(&tmp.path().join("cut")),
    );
    assert_resumed_like("packed", &whole, &resumed, 4);
}

/// `--device cuda --model DIR` on a bitsandbytes 4-bit checkpoint (`tests/data/tiny_llama_nf4`
/// with a word-level tokenizer) and prompt/completion JSONL: the device streams the checkpoint
/// and trains QLoRA on its own codes, the CPU on their dequantized values; their step losses and
/// held-out losses agree to bf16 tolerance (1 %).
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_trains_a_bitsandbytes_checkpoint_from_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(data("tiny_llama_nf4").join(f), model.join(f)).unwrap();
    }
    std::fs::write(
        model.join("tokenizer.json"),
        crate::generate::tokenizer_json(),
    )
    .unwrap();
    // 40 examples: three prompt words, their "answer" two words derived from them.
    let lines: Vec<String> = (0..40u32)
        .map(|i| {
            let w = |k: u32| format!("w{}", 3 + (i * 7 + k * 13) % 97);
            serde_json::json!({
                "prompt": format!("{} {} {}", w(0), w(1), w(2)),
                "completion": format!(" {} {}", w(3), w(0)),
            })
            .to_string()
        })
        .collect();
    let data_file = tmp.path().join("train.jsonl");
    std::fs::write(&data_file, lines.join("\n")).unwrap();
    let run = |device: &str| {
        let out = format!("run-{device}");
        let args = [
            "train",
            "--device",
            device,
            "--method",
            "qlora",
            "--model",
            s(&model),
            "--data",
            s(&data_file),
            "--steps",
            "4",
            "--batch",
            "4",
            "--lr",
            "1e-3",
            "--output",
            &out,
        ];
        ok(&qadapt(&args, tmp.path()));
        tmp.path().join(out)
    };
    let (cpu, gpu) = (run("cpu"), run("cuda"));
    let (lc, lg) = (step_losses(&cpu), step_losses(&gpu));
    assert_eq!(lc.len(), 4);
    for ((step, c), (_, g)) in lc.iter().zip(&lg) {
        assert!(
            (c - g).abs() <= 0.01 * c.abs(),
            "step {step}: cpu {c} vs cuda {g}"
        );
    }
    let summary = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    };
    let (sc, sg) = (summary(&cpu), summary(&gpu));
    for key in ["before_loss", "after_loss"] {
        let (c, g) = (sc[key].as_f64().unwrap(), sg[key].as_f64().unwrap());
        assert!(
            (c - g).abs() <= 0.01 * c.abs(),
            "{key}: cpu {c} vs cuda {g}"
        );
    }
    assert!(gpu.join("adapter/adapter_model.safetensors").is_file());
}
