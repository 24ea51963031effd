//! Loading an HF Llama directory: every dtype widened to f32, sharded and single files, the
//! tokenizer, and one clear error naming the file and the tensor for each kind of bad input.

use std::collections::HashMap;
use std::path::Path;

use crate::common::data;
use half::f16;
use qadapt_train::{LlamaConfig, LlamaDir};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// A copy of `tiny_llama` whose weights pass through `edit(name, shape, f32 values)`, which may
/// drop a tensor (None) or return it with a new dtype and shape.
fn variant(
    edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        data("tiny_llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(data("tiny_llama/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let v = qadapt_train::weights::to_f32(Path::new("x"), &name, t.dtype(), t.data()).unwrap();
        if let Some((d, s, b)) = edit(&name, t.shape().to_vec(), v) {
            out.push((name, d, s, b));
        }
    }
    let views: HashMap<String, TensorView<'_>> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join("model.safetensors")).unwrap();
    tmp
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

#[test]
fn bf16_f16_and_f32_files_load_to_the_same_f32() {
    let base = LlamaDir::open(&data("tiny_llama")).unwrap();
    assert!(base.tokenizer.is_none());
    let f32_dir = variant(|_, s, v| Some((Dtype::F32, s, f32_bytes(&v))));
    let f16_dir = variant(|_, s, v| {
        let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        Some((Dtype::F16, s, bytemuck::cast_slice(&h).to_vec()))
    });
    let a = LlamaDir::open(f32_dir.path()).unwrap();
    assert_eq!(a.weights, base.weights);
    let b = LlamaDir::open(f16_dir.path()).unwrap();
    let want = base.weights.cast::<f64>();
    for (got, want) in b.weights.slots().iter().zip(want.slots()) {
        for (g, w) in got.iter().zip(want.iter()) {
            assert_eq!(*g, f16::from_f64(*w).to_f32());
        }
    }
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = variant(|n, s, v| {
        (n != "model.layers.1.mlp.up_proj.weight").then(|| (Dtype::F32, s, f32_bytes(&v)))
    });
    let e = LlamaDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_and_bad_dtype_name_file_and_tensor() {
    let dir = variant(|n, s, v| {
        let s = if n == "model.layers.0.self_attn.k_proj.weight" {
            vec![s[1], s[0]]
        } else {
            s
        };
        Some((Dtype::F32, s, f32_bytes(&v)))
    });
    let e = LlamaDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape [32, 16], the config needs [16, 32]"),
        "{e}"
    );
    let dir = variant(|n, s, v| {
        if n == "model.norm.weight" {
            Some((Dtype::I32, s, f32_bytes(&v)))
        } else {
            Some((Dtype::F32, s, f32_bytes(&v)))
        }
    });
    let e = LlamaDir::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tensor model.norm.weight has dtype I32"), "{e}");
}

#[test]
fn sharded_index_without_an_entry_names_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(data("tiny_llama_llama3")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let index = tmp.path().join("model.safetensors.index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight");
    std::fs::write(&index, v.to_string()).unwrap();
    let e = LlamaDir::open(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors.index.json: missing tensor model.norm.weight"),
        "{e}"
    );
    std::fs::remove_file(&index).unwrap();
    let e = LlamaDir::open(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("neither model.safetensors nor model.safetensors.index.json"),
        "{e}"
    );
}

#[test]
fn non_llama_config_is_refused_with_the_file_name() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("tiny_llama/config.json")).unwrap())
            .unwrap();
    v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    v["model_type"] = serde_json::json!("gpt2");
    let path = tmp.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let e = LlamaConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: not a Llama model", path.display())),
        "{e}"
    );
}

const TOKENIZER: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
  "decoder": null, "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2},
  "unk_token": "[UNK]"}}"#;

#[test]
fn tokenizer_json_is_loaded_when_present() {
    let dir = variant(|_, s, v| Some((Dtype::F32, s, f32_bytes(&v))));
    std::fs::write(dir.path().join("tokenizer.json"), TOKENIZER).unwrap();
    let m = LlamaDir::open(dir.path()).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let enc = tok.encode("hello there world", false).unwrap();
    assert_eq!(enc.get_ids(), [1, 0, 2]);
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = LlamaDir::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json: "), "{e}");
}
