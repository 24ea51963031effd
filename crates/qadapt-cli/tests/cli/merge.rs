//! `qadapt merge`: the written directory is the base with the LoRA folded in, loadable as a plain
//! model; bad input is refused with one line and leaves nothing behind.

use crate::support::{bin, data};
use qadapt_train::{Input, Options};
use std::path::Path;

use qadapt_train::{LlamaDir, lora};

fn merge(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    bin()
        .arg("merge")
        .arg("--model")
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn merged_directory_computes_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let r = merge(
        &data("tiny_llama"),
        &data("tiny_llama_lora"),
        &out,
        &["--dtype", "f32"],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());

    let base = LlamaDir::open(&data("tiny_llama")).unwrap();
    let adapter = lora::load(&data("tiny_llama_lora"), &base.config).unwrap();
    let merged = LlamaDir::open(&out).unwrap();
    let ids: Vec<u32> = (0..22).map(|i| (i * 13 + 3) % 100).collect();
    let want = base
        .model()
        .unwrap()
        .forward(Input::ids(&ids, 2, 11), Options::adapter(&adapter))
        .unwrap()
        .logits;
    let got = merged
        .model()
        .unwrap()
        .forward(Input::ids(&ids, 2, 11), Options::default())
        .unwrap()
        .logits;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Same math, two f32 summation orders: a few ulps of the largest logit.
    assert!(
        err <= 2e-5 * scale,
        "merged logits off by {err:e} of {scale}"
    );

    // Default dtype follows config.json (bf16 for this model).
    let out16 = tmp.path().join("merged16");
    assert!(
        merge(&data("tiny_llama"), &data("tiny_llama_lora"), &out16, &[])
            .status
            .success()
    );
    let bytes = std::fs::read(out16.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .dtype(),
        safetensors::Dtype::BF16
    );
}

#[test]
fn bad_merges_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    // Not an adapter that folds into the weights.
    let r = merge(&data("tiny_llama"), &data("tiny_llama_prefix"), &out, &[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.starts_with("error: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    // An existing output directory is never overwritten.
    std::fs::create_dir(&out).unwrap();
    let r = merge(&data("tiny_llama"), &data("tiny_llama_lora"), &out, &[]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    let leftovers = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok());
    assert!(
        leftovers
            .into_iter()
            .all(|e| !e.file_name().to_string_lossy().contains("partial"))
    );
}

#[test]
fn ia3_merges_and_other_methods_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let r = merge(
        &data("tiny_llama"),
        &data("tiny_llama_ia3"),
        &out,
        &["--dtype", "f32"],
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("(IA)3 vector(s)"), "{err}");
    let merged = LlamaDir::open(&out).unwrap();
    let base = LlamaDir::open(&data("tiny_llama")).unwrap();
    let adapter = qadapt_train::ia3::load(&data("tiny_llama_ia3"), &base.config).unwrap();
    let mut want = base.weights.clone();
    qadapt_train::merge::fold_ia3(
        &adapter,
        &base.config,
        &mut want,
        qadapt_train::merge::Fold::Merge,
    )
    .unwrap();
    assert!(merged.weights == want);
    let r = merge(
        &data("tiny_llama"),
        &data("tiny_llama_prompt"),
        &tmp.path().join("p"),
        &[],
    );
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("PROMPT_TUNING") && err.contains("does not fold"),
        "{err}"
    );
    assert!(!tmp.path().join("p").exists());
}

/// The Hugging Face cache keeps a snapshot's files as symlinks into `blobs/`: merge and quantize
/// read through them and write a directory with real copies of every file.
#[test]
fn a_symlinked_model_directory_gives_a_self_contained_output() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let snapshot = tmp.path().join("snapshots/abc");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    let mut names = Vec::new();
    for (i, e) in std::fs::read_dir(data("tiny_llama")).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = blobs.join(format!("blob{i}"));
        std::fs::copy(e.path(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snapshot.join(e.file_name()))
            .unwrap();
        names.push(e.file_name());
    }
    // A file that neither command writes itself, only copies.
    std::fs::write(blobs.join("tok"), "{}").unwrap();
    std::os::unix::fs::symlink("../../blobs/tok", snapshot.join("README.md")).unwrap();
    names.push("README.md".into());
    let out = tmp.path().join("merged");
    let r = merge(&snapshot, &data("tiny_llama_lora"), &out, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let quantized = tmp.path().join("nf4");
    let r = bin()
        .arg("quantize")
        .arg(&snapshot)
        .arg(&quantized)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for dir in [&out, &quantized] {
        for name in &names {
            let p = dir.join(name);
            let m = std::fs::symlink_metadata(&p).unwrap_or_else(|_| panic!("{p:?} missing"));
            assert!(m.is_file(), "{p:?} is a copy, not a link");
        }
    }
}

/// A LoRA merged onto a bitsandbytes 4-bit base gives a dense model, and its config.json no
/// longer claims 4-bit weights (transformers would fail to load it).
#[test]
fn a_merge_onto_a_4bit_base_drops_its_quantization_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = data("tiny_llama_nf4");
    let before: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    assert!(before.get("quantization_config").is_some());
    let out = tmp.path().join("merged");
    let r = merge(&base, &data("tiny_llama_lora"), &out, &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("no quantization_config"), "{err}");
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(after.get("quantization_config").is_none());
    assert_eq!(after["hidden_size"], before["hidden_size"]);
    // Dense weights: no tensor of the bitsandbytes layout is left.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().all(|n| !n.contains("quant_state")));
    LlamaDir::open(&out).unwrap();
}
