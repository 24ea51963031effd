//! An HF model directory of our own making: `config.json` (LlamaForCausalLM, transformers 5
//! keys, as `tests/data/tiny_llama`), `model.safetensors` (HF tensor names, `format: pt`
//! metadata) and the tokenizer files copied from the source model. What a run that trains the
//! base (full, top-k, surgical) saves, and what `qadapt pretrain` writes.

use std::path::Path;

use qadapt::DType;
use qadapt::nf4::bnb::OnDiskTensor;

use super::Error;
use super::fs::write_safetensors;
use crate::merge::named_tensors;
use crate::{Llama, LlamaConfig, LlamaWeights};

/// transformers' name of an element type.
pub fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    }
}

/// The safetensors element type of `d`.
pub fn safetensors_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
    }
}

/// HF `config.json` of a model we made (bos 1, eos 2, as the tokenizers `qadapt pretrain` trains).
pub fn config_json(cfg: &LlamaConfig, dtype: DType) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": torch_dtype(dtype),
        "eos_token_id": 2,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "pad_token_id": null,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
    })
}

/// Writes `weights` as an HF `model.safetensors` (HF names, `dtype`, `format: pt` metadata).
pub fn write_weights(
    path: &Path,
    cfg: &LlamaConfig,
    weights: &LlamaWeights<f32>,
    dtype: DType,
) -> Result<(), Error> {
    let tensors: Vec<OnDiskTensor> = named_tensors(cfg, weights, dtype)
        .into_iter()
        .map(|(name, shape, v)| OnDiskTensor {
            name,
            dtype: safetensors_dtype(dtype),
            shape,
            data: v.as_bytes().to_vec(),
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(path, &tensors, Some(meta))
}

/// Writes `config.json` + `model.safetensors` (+ the tokenizer files of `tokenizer_dir`, those
/// it has) into the directory `dir`.
pub fn write_model_files(
    dir: &Path,
    model: &Llama<f32>,
    dtype: DType,
    tokenizer_dir: Option<&Path>,
) -> Result<(), Error> {
    let cfg = &model.config;
    let io = |what: String| move |source| Error::Io { what, source };
    let json = serde_json::to_string_pretty(&config_json(cfg, dtype))
        .map_err(|e| Error::Refused(e.to_string()))?;
    std::fs::write(dir.join("config.json"), json).map_err(io("writing config.json".into()))?;
    write_weights(&dir.join("model.safetensors"), cfg, &model.weights, dtype)?;
    if let Some(src) = tokenizer_dir {
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f))
                    .map_err(io(format!("copying {f} from {}", src.display())))?;
            }
        }
    }
    Ok(())
}
