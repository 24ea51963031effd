//! Hostile input: sizes in config.json and adapter configs are checked against the tensors the
//! files hold before anything is allocated by them, paths from an index stay inside the model
//! directory (an HF-cache layout of symlinks still loads), and data lines are bounded. None of
//! these tests allocates more than the fixtures' few kilobytes.

use std::path::{Path, PathBuf};

use crate::common::data;
use qadapt_train::{HoulsbyAdapter, HoulsbyConfig, LlamaDir, dataset, lora, peft};
use serde_json::Value;

/// A copy of the fixture directory `name` in `tmp`, with `key` of `file` set to `value`.
fn edited(tmp: &Path, name: &str, file: &str, key: &str, value: Value) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(data(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    set(&dir.join(file), key, value);
    dir
}

fn set(path: &Path, key: &str, value: Value) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

fn open_err(dir: &Path) -> String {
    LlamaDir::open(dir).unwrap_err().to_string()
}

#[test]
fn a_layer_count_needs_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(
        tmp.path(),
        "tiny_llama",
        "config.json",
        "num_hidden_layers",
        (1u64 << 40).into(),
    );
    let e = open_err(&dir);
    assert!(
        e.contains("config.json: num_hidden_layers = 1099511627776 but ")
            && e.ends_with("model.safetensors holds the weights of 2 layer(s)"),
        "{e}"
    );
}

#[test]
fn config_sizes_are_checked_against_the_headers_and_for_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited(
        tmp.path(),
        "tiny_llama",
        "config.json",
        "vocab_size",
        (1u64 << 40).into(),
    );
    let e = open_err(&dir);
    assert!(
        e.contains(
            "model.safetensors: tensor model.embed_tokens.weight has shape [100, 32], the \
             config needs [1099511627776, 32] ("
        ) && e.ends_with("config.json: vocab_size = 1099511627776, hidden_size = 32)"),
        "{e}"
    );
    set(&dir.join("config.json"), "vocab_size", 100.into());
    set(&dir.join("config.json"), "hidden_size", (1u64 << 32).into());
    set(&dir.join("config.json"), "head_dim", (1u64 << 31).into());
    let e = open_err(&dir);
    assert!(
        e.contains("overflows 64 bits") && e.contains("config.json: "),
        "{e}"
    );
    set(&dir.join("config.json"), "hidden_size", 0.into());
    let e = open_err(&dir);
    assert!(e.contains("hidden_size = 0 must be positive"), "{e}");
}

#[test]
fn lora_rank_must_be_that_of_the_tensors_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let model = LlamaDir::open(&data("tiny_llama")).unwrap();
    for r in [1u64 << 20, 1 << 40] {
        let dir = edited(
            tmp.path(),
            "tiny_llama_lora",
            "adapter_config.json",
            "r",
            r.into(),
        );
        let e = lora::load(&dir, &model.config).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "lora_A.weight has shape [4, 32], expected [{r}, 32] ("
            )) && e.ends_with(&format!("adapter_config.json: r = {r})")),
            "{e}"
        );
    }
}

#[test]
fn houlsby_bottleneck_must_be_that_of_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = LlamaDir::open(&data("tiny_llama")).unwrap();
    let cfg = HoulsbyConfig {
        bottleneck: 4,
        activation: qadapt::bottleneck::Activation::Relu,
    };
    let dir = tmp.path().join("houlsby");
    HoulsbyAdapter::<f32>::new(&model.config, cfg, 1e-3, 0)
        .unwrap()
        .save(&dir)
        .unwrap();
    assert!(peft::load(&dir, &model.config).is_ok());
    set(
        &dir.join("adapter_config.json"),
        "bottleneck_size",
        (1u64 << 40).into(),
    );
    let e = peft::load(&dir, &model.config).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors: tensor ")
            && e.ends_with("has shape [4, 32], expected [1099511627776, 32]"),
        "{e}"
    );
}

/// A sharded fixture whose index names `entry` for one tensor.
fn index_with(tmp: &Path, entry: &str) -> PathBuf {
    let dir = tmp.join("sharded");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(data("tiny_llama_llama3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let index = dir.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["weight_map"]["model.embed_tokens.weight"] = entry.into();
    std::fs::write(&index, v.to_string()).unwrap();
    dir
}

#[test]
fn shard_names_stay_inside_the_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    // A real shard outside, so only the name can be what is refused.
    let outside = tmp.path().join("outside.safetensors");
    std::fs::copy(
        data("tiny_llama_llama3").join("model-00001-of-00002.safetensors"),
        &outside,
    )
    .unwrap();
    let abs = outside.to_string_lossy().into_owned();
    for (entry, why) in [
        ("../outside.safetensors", "a path with '..' or '.'"),
        (abs.as_str(), "an absolute path"),
        (
            "./model-00001-of-00002.safetensors",
            "a path with '..' or '.'",
        ),
        ("", "not a plain relative file name"),
    ] {
        let dir = index_with(tmp.path(), entry);
        let e = open_err(&dir);
        assert!(
            e.contains("model.safetensors.index.json: entry ")
                && e.contains(&format!("{entry:?}: {why}")),
            "{entry}: {e}"
        );
    }
    // A subdirectory that is a link out of the model directory is refused too.
    let dir = index_with(tmp.path(), "sub/outside.safetensors");
    std::os::unix::fs::symlink(tmp.path(), dir.join("sub")).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("\"sub/outside.safetensors\": its directory resolves outside"),
        "{e}"
    );
}

#[test]
fn an_hf_cache_layout_of_symlinks_loads() {
    // models--x/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays it out.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny_llama", "tiny_llama_llama3"] {
        let repo = tmp.path().join(format!("models--{name}"));
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        for (i, e) in std::fs::read_dir(data(name)).unwrap().enumerate() {
            let e = e.unwrap();
            let blob = format!("{i:040x}");
            std::fs::copy(e.path(), repo.join("blobs").join(&blob)).unwrap();
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(&blob),
                snap.join(e.file_name()),
            )
            .unwrap();
        }
        let linked = LlamaDir::open(&snap).unwrap();
        let plain = LlamaDir::open(&data(name)).unwrap();
        assert_eq!(linked.weights, plain.weights, "{name}");
    }
}

#[test]
fn a_data_line_is_bounded_before_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("big.jsonl");
    let big = "x".repeat(dataset::MAX_LINE_BYTES + 10);
    std::fs::write(
        &path,
        format!("{{\"text\": \"ok\"}}\n{{\"text\": \"{big}\"}}\n"),
    )
    .unwrap();
    let e = dataset::load(&path, dataset::Strictness::Skip)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("big.jsonl:2: a line longer than 8388608 bytes (not read further)"),
        "{e}"
    );
    // Lines under the limit are read as they are.
    let fine = format!("{{\"text\": \"{}\"}}\n", "y".repeat(100));
    std::fs::write(&path, &fine).unwrap();
    assert_eq!(dataset::read_text(&path).unwrap(), fine);
}
