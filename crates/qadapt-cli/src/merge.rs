//! `qadapt merge`: fold a LoRA or (IA)³ adapter into its base model and write an HF model
//! directory that any Llama loader reads without PEFT (`W += s · B A` on every LoRA-targeted
//! projection; rows or columns of W scaled by the (IA)³ vectors; see `qadapt_train::merge`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use qadapt::DType;
use qadapt_train::merge::{Fold, fold, fold_ia3};
use qadapt_train::{Adapter, LlamaDir, peft};

use crate::OutDType;
use crate::io::{copy_other_files, new_directory};

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// HF Llama model directory (config.json + model.safetensors, or shards).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA or IA3 adapter directory (adapter_config.json + adapter_model.safetensors).
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
    let mut weights = dir.weights.clone();
    let what = match peft::load(&a.adapter, &dir.config)? {
        Adapter::Lora(ad) => {
            fold(&ad, &dir.config, &mut weights, Fold::Merge)?;
            format!(
                "{} LoRA projection(s) (r {}, scaling {})",
                ad.pairs.iter().flatten().flatten().count(),
                ad.config.r,
                ad.config.scaling()
            )
        }
        Adapter::Ia3(ad) => {
            fold_ia3(&ad, &dir.config, &mut weights, Fold::Merge)?;
            format!(
                "{} (IA)3 vector(s)",
                ad.scales.iter().flatten().flatten().count()
            )
        }
        other => bail!(
            "{}: a {} adapter does not fold into the weights (merge takes LoRA or IA3)",
            a.adapter.display(),
            other.peft_type()
        ),
    };
    let dtype = a
        .dtype
        .map(DType::from)
        .or_else(|| config_dtype(&a.model))
        .unwrap_or(DType::F32);
    // The base's config.json, less the quantization_config of a 4-bit base: the merged weights
    // are dense, and transformers would try to load them as 4-bit.
    let config_path = a.model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("{}", config_path.display()))?;
    let dequantized = config
        .as_object_mut()
        .and_then(|c| c.remove("quantization_config"))
        .is_some();
    new_directory(&a.out, |tmp| {
        crate::pretrain::write_weights(
            &tmp.join("model.safetensors"),
            &dir.config,
            &weights,
            dtype,
        )?;
        copy_other_files(&a.model, tmp, |f| {
            f.ends_with(".safetensors") || f == "model.safetensors.index.json" || f == "config.json"
        })
        .context("copying the model's other files")?;
        std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )
        .context("writing config.json")
    })?;
    if dequantized {
        eprintln!(
            "note: {} is a bitsandbytes 4-bit checkpoint; the merged model is dense ({dtype}, no \
             quantization_config); `qadapt quantize {} OUT` quantizes it again",
            a.model.display(),
            a.out.display()
        );
    }
    eprintln!(
        "merged {what} into {} -> {} ({dtype})",
        a.model.display(),
        a.out.display()
    );
    Ok(())
}
