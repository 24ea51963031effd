//! Hostile and careless input on the command line and in files: each is one error line with the
//! CLI's exit status (1 for input, 2 for clap's own), found before anything large is allocated.
//! Every case finishes in seconds; none allocates more than the fixtures' size.

use crate::support::{bin, data};
use std::path::{Path, PathBuf};
use std::process::Output;

fn qadapt(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    bin()
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// The one `error:` line of a run that exited with `code`.
fn error_line(o: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {err}");
    errors[0].to_owned()
}

/// `input_ids` `[1, 4]` as i64.
fn ids_file(dir: &Path) -> PathBuf {
    let header = r#"{"input_ids":{"dtype":"I64","shape":[1,4],"data_offsets":[0,32]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for id in [1i64, 5, 9, 2] {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    let p = dir.join("ids.safetensors");
    std::fs::write(&p, bytes).unwrap();
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn set(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

fn logits(cwd: &Path, model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let ids = ids_file(cwd);
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        ids.to_str().unwrap(),
        "--out",
        "out.safetensors",
    ];
    args.extend_from_slice(extra);
    qadapt(&args, cwd, env)
}

#[test]
fn config_and_adapter_sizes_need_their_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = t.join("model");
    copy_dir(&data("tiny_llama"), &model);
    set(
        &model.join("config.json"),
        "num_hidden_layers",
        (1u64 << 40).into(),
    );
    let e = error_line(&logits(t, &model, &[], &[]), 1);
    assert!(
        e.contains("config.json: num_hidden_layers = 1099511627776 but ")
            && e.ends_with("holds the weights of 2 layer(s)"),
        "{e}"
    );

    let adapter = t.join("lora");
    copy_dir(&data("tiny_llama_lora"), &adapter);
    set(
        &adapter.join("adapter_config.json"),
        "r",
        (1u64 << 20).into(),
    );
    let a = adapter.to_str().unwrap();
    let e = error_line(&logits(t, &data("tiny_llama"), &["--adapter", a], &[]), 1);
    assert!(
        e.contains("lora_A.weight has shape [4, 32], expected [1048576, 32] (")
            && e.ends_with("adapter_config.json: r = 1048576)"),
        "{e}"
    );
    let o = qadapt(
        &[
            "merge",
            "--model",
            data("tiny_llama").to_str().unwrap(),
            "--adapter",
            a,
            "--out",
            "merged",
        ],
        t,
        &[],
    );
    assert!(error_line(&o, 1).contains("r = 1048576)"));
    assert!(!t.join("merged").exists());
}

#[test]
fn shard_names_from_the_index_stay_inside_the_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::copy(
        data("tiny_llama_llama3").join("model-00001-of-00002.safetensors"),
        t.join("outside.safetensors"),
    )
    .unwrap();
    let abs = t.join("outside.safetensors").to_string_lossy().into_owned();
    for entry in ["../outside.safetensors", abs.as_str()] {
        let model = t.join("model");
        let _ = std::fs::remove_dir_all(&model);
        copy_dir(&data("tiny_llama_llama3"), &model);
        let index = model.join("model.safetensors.index.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
        v["weight_map"]["model.embed_tokens.weight"] = entry.into();
        std::fs::write(&index, v.to_string()).unwrap();
        let want = format!("model.safetensors.index.json: entry {entry:?}: ");
        let e = error_line(&logits(t, &model, &[], &[]), 1);
        assert!(e.contains(&want), "{e}");
        let o = qadapt(
            &[
                "merge",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                data("tiny_llama_lora").to_str().unwrap(),
                "--out",
                "merged",
            ],
            t,
            &[],
        );
        assert!(error_line(&o, 1).contains(&want));
        let o = qadapt(&["quantize", model.to_str().unwrap(), "quantized"], t, &[]);
        assert!(error_line(&o, 1).contains(&want));
    }
}

#[test]
fn the_memory_budget_is_the_env_var_when_set() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let o = logits(
        t,
        &data("tiny_llama"),
        &[],
        &[("QADAPT_MEMORY_BUDGET", "1000")],
    );
    let e = error_line(&o, 1);
    assert!(
        e.contains("config.json: the model's parameters in f32 would need ")
            && e.ends_with(
                "over the memory budget of 1000 bytes (QADAPT_MEMORY_BUDGET; set \
                 QADAPT_MEMORY_BUDGET in bytes to change it)"
            ),
        "{e}"
    );
    let o = logits(
        t,
        &data("tiny_llama"),
        &[],
        &[("QADAPT_MEMORY_BUDGET", "lots")],
    );
    assert!(error_line(&o, 1).contains("QADAPT_MEMORY_BUDGET = \"lots\" is not a number"));
    let o = logits(
        t,
        &data("tiny_llama"),
        &[],
        &[("QADAPT_MEMORY_BUDGET", "1000000000")],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn train_flags_are_bounded_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases: [(&[&str], &str); 5] = [
        (&["--batch", "1000000"], "error: --batch 1000000 of "),
        (
            &["--method", "lora", "--rank", "1000000000"],
            "error: --rank 1000000000 is larger than the smaller side of a targeted projection, 64",
        ),
        (
            &["--method", "prefix", "--prefix-mlp", "100000"],
            "error: --prefix-mlp 100000 is larger than the width of the prefix it produces",
        ),
        (
            &["--method", "adapter", "--bottleneck", "1000000000"],
            "error: --bottleneck 1000000000 is larger than the model's hidden_size, 192",
        ),
        (
            &[
                "--method",
                "prompt",
                "--virtual-tokens",
                "18446744073709551615",
            ],
            "error: the context (128 tokens) leaves no room after 18446744073709551615 virtual tokens",
        ),
    ];
    for (i, (flags, want)) in cases.iter().enumerate() {
        let out = format!("run{i}");
        let mut args = vec!["train", "--steps", "1", "--quiet", "--output", &out];
        args.extend_from_slice(flags);
        let e = error_line(&qadapt(&args, t, &[]), 1);
        assert!(e.starts_with(want), "{flags:?}: {e}");
    }
    // Within the limits the budget still speaks: a rank the model allows, a tiny budget.
    let o = qadapt(
        &[
            "train", "--steps", "1", "--quiet", "--output", "runb", "--method", "lora", "--rank",
            "64",
        ],
        t,
        &[("QADAPT_MEMORY_BUDGET", "10000000")],
    );
    let e = error_line(&o, 1);
    assert!(
        e.starts_with("error: --rank 64: the trainable tensors, their gradients and AdamW moments")
            && e.contains("over the memory budget of 9.5 MiB (QADAPT_MEMORY_BUDGET;"),
        "{e}"
    );
    // Zero sizes are clap's one line (exit 2).
    let o = qadapt(&["train", "--batch", "0"], t, &[]);
    assert!(error_line(&o, 2).contains("invalid value '0' for '--batch <BATCH>'"));
}

#[test]
fn a_huge_data_line_is_refused_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let big = format!(
        "{{\"prompt\": \"{}\", \"completion\": \" positive\"}}\n",
        "x".repeat(9 << 20)
    );
    std::fs::write(t.join("big.jsonl"), big).unwrap();
    let o = qadapt(
        &[
            "train",
            "--data",
            "big.jsonl",
            "--steps",
            "1",
            "--quiet",
            "--output",
            "r",
        ],
        t,
        &[],
    );
    // The data path is made absolute (run.toml records it so).
    let err = error_line(&o, 1);
    assert!(err.starts_with("error: /"), "{err}");
    assert!(
        err.ends_with("/big.jsonl:1: a line longer than 8388608 bytes (not read further)"),
        "{err}"
    );
    assert!(!t.join("r").exists(), "a refused run leaves no directory");
}

#[test]
fn pretrain_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::write(t.join("corpus.txt"), "a b c\n").unwrap();
    let o = qadapt(
        &[
            "pretrain",
            "--corpus",
            "corpus.txt",
            "--out",
            "m",
            "--seq",
            "0",
        ],
        t,
        &[],
    );
    assert_eq!(
        error_line(&o, 2),
        "error: invalid value '0' for '--seq <SEQ>': 0 is not in 1..18446744073709551615"
    );
    let o = qadapt(
        &[
            "pretrain",
            "--corpus",
            "corpus.txt",
            "--out",
            "m",
            "--vocab",
            "2147483648",
        ],
        t,
        &[],
    );
    let e = error_line(&o, 1);
    assert!(
        e.starts_with(
            "error: --vocab 2147483648 --hidden 192 --intermediate 512 --layers 4: the model, \
             its gradients and AdamW moments would need 12.0 TiB"
        ),
        "{e}"
    );
    assert!(!t.join("m").exists());
}

#[test]
fn generate_max_new_tokens_is_bounded_by_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let o = qadapt(
        &[
            "generate",
            "--prompt",
            "the soup was",
            "--max-new-tokens",
            "18446744073709551615",
        ],
        tmp.path(),
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: --max-new-tokens lowered to ")
            && err.contains("(max_position_embeddings 128)"),
        "{err}"
    );
}
