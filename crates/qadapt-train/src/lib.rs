//! qadapt-train: the Llama-family model on qadapt's ops, the PEFT methods, and CPU training.
//!
//! - [`LlamaConfig`] from an HF `config.json`, the parameters from `model.safetensors` (or
//!   sharded, or a bitsandbytes 4-bit checkpoint, dequantized), the tokenizer from
//!   `tokenizer.json`, and [`Llama`]: a CPU forward in f32 (or f64) with a hand-written backward
//!   for every parameter and the input embeddings (`tests/golden.rs` against transformers,
//!   `tests/gradcheck.rs` against finite differences in f64).
//! - Adapters, each read and written in PEFT's `adapter_config.json` + `adapter_model.safetensors`
//!   layout: [`LoraAdapter`] (`tests/lora.rs`), [`Ia3Adapter`], [`PromptTuning`],
//!   [`PrefixTuning`] and [`PrefixMlp`] (the reparameterized prefix; `tests/peft.rs` against
//!   PEFT), and [`HoulsbyAdapter`] (a documented PEFT-shaped format of our own). [`Adapter`] holds
//!   any of them, [`peft::load`] reads any directory by its `peft_type`, and [`evaluate`] gives
//!   logits, loss and gradients as PEFT computes them (`qadapt logits` uses it). Every backward
//!   is checked in f64 by `tests/methods_gradcheck.rs`.
//! - [`nf4::quantize_projections`]: the QLoRA base (NF4, block 64, double quant, dequantized).
//! - [`LoraSet`]: several named LoRA adapters on one base, one active (switch, merge, unmerge;
//!   `tests/lora_set.rs`).
//! - [`Generator`]: text generation with a KV cache (greedy, temperature, top-p, eos, seed) for
//!   the base and every adapter method, one batch serving a different adapter per row (LoRA through
//!   a per-row-indexed [`LoraStack`]; `tests/generate.rs` checks every step against [`evaluate`]).
//! - Training: [`Selection`] (full fine-tuning, top-k layers, one [`LayerGroup`]) and [`Trainer`]
//!   (AdamW on the CPU, clipping) on any [`Trainable`]; `tests/training.rs` trains every method on
//!   a small task. LoRA dropout applies in training mode only ([`evaluate`] with a
//!   [`DropoutKey`]; `tests/lora_dropout.rs`). [`surgical`]: surgical fine-tuning, by layer group
//!   chosen on validation loss or by Auto-RGN per-tensor rates (`tests/surgical.rs`).
//! - [`layer`]: the decoder layer, defined once (forward and backward over the ops a runner
//!   supplies): [`Llama`] (with [`Input`] and [`Options`]), the [`Generator`] and
//!   [`backend::LoraModel`] run it.
//! - [`backend`]: LoRA and QLoRA training in bf16 over a [`backend::Backend`]: on the GPU
//!   ([`cuda::CudaBackend`]) or on the host ([`backend::CpuBackend`], which checks the wiring).
//! - [`run`]: a whole fine-tuning run from a [`run::Config`] (data, method, checkpoints, exact
//!   resume, interruption, accumulation, evaluation, saving), reporting to a [`run::Observer`];
//!   `qadapt train` is a shell over it.
//!
//! The loss of a 4-token sequence under the repository's `tiny_llama` test model, with the
//! gradient of every input embedding (a fine-tuning run end to end: the [`run`] module's example):
//! ```
//! let m = qadapt_train::LlamaDir::open(std::path::Path::new("../../tests/data/tiny_llama"))?;
//! let model = m.model()?;
//! let batch = qadapt_train::Batch::causal(vec![1, 5, 9, 2], 1, 4)?;
//! let (loss, _fwd, grads) = model.loss_and_grads(&batch, qadapt_train::Options::default())?;
//! assert!(loss.is_finite() && loss > 0.0);
//! assert_eq!(grads.inputs_embeds.len(), 4 * model.config.hidden_size);
//! # Ok::<(), qadapt::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod backend;
pub mod budget;
pub mod config;
pub mod cuda;
pub mod dataset;
pub mod fit;
pub mod generate;
pub mod houlsby;
pub mod ia3;
pub mod layer;
pub mod lora;
pub mod lora_set;
pub mod memory_plan;
pub mod merge;
pub mod model;
pub mod nf4;
pub mod peft;
mod peft_io;
mod pool;
pub mod prefix_attention;
pub mod prompt;
mod rng;
pub mod run;
pub mod select;
pub mod surgical;
pub mod train;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::LlamaConfig;
pub use generate::{
    Completion, Finish, GenerateOptions, Generator, KvCache, LoraStack, Prompt, Sampler, Sampling,
};
pub use houlsby::{HoulsbyAdapter, HoulsbyConfig};
pub use ia3::{Ia3Adapter, Ia3Config};
pub use lora::{DropoutKey, LoraAdapter, LoraConfig, LoraInit};
pub use lora_set::LoraSet;
pub use model::{Attached, BaseGrads, Forward, Gradients, Input, Llama, Options, causal_targets};
pub use peft::{Adapter, Evaluation, Grads, evaluate};
pub use prompt::{PrefixMlp, PrefixTuning, PromptInit, PromptTuning};
pub use select::{LayerGroup, Selection};
pub use train::{Batch, StepStats, Trainable, Trainer, loss_and_grads};
pub use weights::{LayerWeights, LlamaWeights, Proj};

use qadapt::{Error, Result};

pub(crate) fn format_err(file: &Path, reason: impl ToString) -> Error {
    Error::Format {
        file: file.to_owned(),
        reason: reason.to_string(),
    }
}

pub(crate) fn shape_err(op: &'static str, expected: impl ToString, got: impl ToString) -> Error {
    Error::Shape {
        op,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

pub(crate) fn invalid(op: &'static str, reason: impl ToString) -> Error {
    Error::Invalid {
        op,
        reason: reason.to_string(),
    }
}

/// An HF Llama directory: `config.json`, the weights, and `tokenizer.json` when present.
#[derive(Debug)]
pub struct LlamaDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: LlamaConfig,
    /// Its weights, widened to f32 (a projection stored as bitsandbytes 4-bit holds its
    /// dequantized values).
    pub weights: LlamaWeights<f32>,
    /// The NF4 codes of the projections the checkpoint stores as bitsandbytes 4-bit (none for
    /// an unquantized checkpoint): what [`nf4::quantize_projections`] keeps.
    pub nf4: nf4::Nf4Projections,
    /// Its `tokenizer.json`, if the directory has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

impl LlamaDir {
    /// Reads the config, every weight and the tokenizer (if any).
    pub fn open(dir: &Path) -> Result<Self> {
        let (config, tokenizer) = Self::open_config(dir)?;
        let (weights, nf4) = weights::load(dir, &config)?;
        Ok(LlamaDir {
            dir: dir.to_owned(),
            config,
            weights,
            nf4,
            tokenizer,
        })
    }

    /// The config and the tokenizer (if any) of the model directory `dir`, without reading a
    /// weight: what a run that streams the weights elsewhere
    /// ([`backend::LoraModel::from_checkpoint`]) needs on the host.
    pub fn open_config(dir: &Path) -> Result<(LlamaConfig, Option<tokenizers::Tokenizer>)> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| format_err(&tok_path, e))?,
            )
        } else {
            None
        };
        Ok((config, tokenizer))
    }

    /// The f32 model (the weights are cloned; the directory keeps its copy).
    pub fn model(&self) -> Result<Llama<f32>> {
        Llama::new(self.config.clone(), self.weights.clone())
    }
}
