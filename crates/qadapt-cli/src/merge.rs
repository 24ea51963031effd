//! `qadapt merge`: fold a LoRA adapter into its base model and write an HF model directory that
//! any Llama loader reads without PEFT (`W += s · B A` on every targeted projection; see
//! `qadapt_train::merge`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use qadapt::DType;
use qadapt_train::merge::{Fold, fold};
use qadapt_train::{LlamaDir, lora};

use crate::OutDType;
use crate::io::{copy_other_files, new_directory};

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// HF Llama model directory (config.json + model.safetensors, or shards).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// New output directory (must not exist): config.json, model.safetensors and the model's
    /// other files (tokenizer, generation config).
    #[arg(long)]
    out: PathBuf,
    /// Element type of the merged weights (default: the model's `dtype`/`torch_dtype` from
    /// config.json, else f32).
    #[arg(long, value_enum)]
    dtype: Option<OutDType>,
}

/// The dtype config.json records (transformers 5 writes `dtype`, older ones `torch_dtype`).
fn config_dtype(dir: &Path) -> Option<DType> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| v.get(*k).and_then(|d| d.as_str()).and_then(DType::parse))
}

pub(crate) fn run(a: &MergeArgs) -> Result<()> {
    let dir = LlamaDir::open(&a.model)?;
    let adapter = lora::load(&a.adapter, &dir.config)?;
    let mut weights = dir.weights.clone();
    fold(&adapter, &dir.config, &mut weights, Fold::Merge)?;
    let dtype = a
        .dtype
        .map(DType::from)
        .or_else(|| config_dtype(&a.model))
        .unwrap_or(DType::F32);
    new_directory(&a.out, |tmp| {
        crate::pretrain::write_weights(
            &tmp.join("model.safetensors"),
            &dir.config,
            &weights,
            dtype,
        )?;
        copy_other_files(&a.model, tmp, |f| {
            f.ends_with(".safetensors") || f == "model.safetensors.index.json"
        })
        .context("copying the model's other files")
    })?;
    let targeted = adapter.pairs.iter().flatten().flatten().count();
    eprintln!(
        "merged {targeted} LoRA projection(s) (r {}, scaling {}) into {} -> {} ({dtype})",
        adapter.config.r,
        adapter.config.scaling(),
        a.model.display(),
        a.out.display()
    );
    Ok(())
}
