//! `qadapt logits`: the reference forward (and backward) of a Llama model with an optional
//! adapter, on token ids from a safetensors file, for comparing against transformers/PEFT.
//!
//! IN holds `input_ids` (i64 or i32 `[B, T]`). OUT gets `logits` (f32 `[B, T', V]`, T' = T plus
//! the virtual tokens for prompt tuning), `loss` (f32 `[1]`, the mean shifted cross-entropy with
//! labels = input_ids, as transformers/PEFT compute it) and, with `--grads`, `grad.<key>` for
//! every tensor of the adapter (its `adapter_model.safetensors` keys). `--nf4` runs the base on
//! the NF4 round trip of its projection weights (block 64, double quant); a model directory whose
//! weights are a bitsandbytes 4-bit checkpoint is dequantized on load either way.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use qadapt::nf4::bnb::OnDiskTensor;
use qadapt_train::{Grads, LlamaDir, evaluate};
use safetensors::{Dtype, SafeTensors};

use crate::io::{Output, read_safetensors};

/// Arguments of `qadapt logits`.
#[derive(Args, Debug)]
pub(crate) struct LogitsArgs {
    /// HF Llama directory (config.json + model.safetensors, or a bitsandbytes 4-bit checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, or HOULSBY).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Quantize the base projection weights to NF4 (block 64, double quant) and run on their
    /// dequantized values.
    #[arg(long)]
    nf4: bool,
    /// Safetensors file holding `input_ids` (integer [batch, seq]).
    #[arg(long)]
    tokens: PathBuf,
    /// Output safetensors file: `logits`, `loss` and with --grads `grad.<adapter key>` (not an
    /// input of the command; an existing file only with --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    force: bool,
    /// Also write the gradient of the loss for every adapter tensor.
    #[arg(long)]
    grads: bool,
}

fn read_ids(path: &Path) -> Result<(usize, usize, Vec<u32>)> {
    let (bytes, _) = read_safetensors(path)?;
    let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
    let t = st
        .tensor("input_ids")
        .map_err(|_| anyhow::anyhow!("{}: no tensor \"input_ids\"", path.display()))?;
    let shape = t.shape();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        bail!(
            "{}: input_ids has shape {shape:?}; [batch, seq] (non-empty) expected",
            path.display()
        );
    }
    let raw: Vec<i64> = match t.dtype() {
        Dtype::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(t.data()),
        Dtype::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(t.data())
            .into_iter()
            .map(i64::from)
            .collect(),
        other => bail!(
            "{}: input_ids has dtype {other:?}; i64 or i32 expected",
            path.display()
        ),
    };
    let ids = raw
        .iter()
        .map(|&v| {
            u32::try_from(v).with_context(|| format!("{}: negative token id {v}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((shape[0], shape[1], ids))
}

fn f32_tensor(name: String, shape: Vec<usize>, v: &[f32]) -> OnDiskTensor {
    OnDiskTensor {
        name,
        dtype: Dtype::F32,
        shape,
        data: bytemuck::cast_slice(v).to_vec(),
    }
}

/// Runs the command.
pub(crate) fn run(a: &LogitsArgs) -> Result<()> {
    let mut inputs = vec![a.tokens.as_path(), a.model.as_path()];
    inputs.extend(a.adapter.as_deref());
    let out = Output::new(&a.out, &inputs, a.force)?;
    let (batch, seq, ids) = read_ids(&a.tokens)?;
    let mut dir = LlamaDir::open(&a.model)?;
    let vocab = dir.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!(
            "{}: token id {bad} is outside the vocabulary of {vocab}",
            a.tokens.display()
        );
    }
    if a.nf4 {
        qadapt_train::nf4::quantize_projections(&mut dir.weights, &dir.config, &dir.nf4)
            .context("quantizing the base to NF4")?;
    }
    let model = dir.model()?;
    let adapter = a
        .adapter
        .as_deref()
        .map(|d| qadapt_train::peft::load(d, &dir.config))
        .transpose()?;
    if a.grads && adapter.is_none() {
        bail!("--grads needs --adapter (it writes the adapter's gradients)");
    }
    let grads = if a.grads { Grads::Adapter } else { Grads::None };
    let ev = evaluate(
        &model,
        &qadapt_train::Batch::causal(ids.to_vec(), batch, seq)?,
        adapter.as_ref(),
        grads,
        None,
    )?;
    let mut tensors = vec![
        f32_tensor(
            "logits".into(),
            vec![batch, ev.positions, vocab],
            &ev.logits,
        ),
        f32_tensor("loss".into(), vec![1], &[ev.loss]),
    ];
    if let Some(g) = &ev.adapter_grads {
        for (key, shape, v) in g.named(&dir.config) {
            tensors.push(f32_tensor(format!("grad.{key}"), shape, v));
        }
    }
    out.write(&tensors, None)?;
    eprintln!(
        "logits [{batch}, {}, {vocab}], loss {:.6}{} -> {}",
        ev.positions,
        ev.loss,
        match &adapter {
            Some(ad) => format!(
                ", adapter {} ({} parameters)",
                ad.peft_type(),
                ad.num_params(&dir.config)
            ),
            None => String::new(),
        },
        a.out.display()
    );
    Ok(())
}
