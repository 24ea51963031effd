//! qadapt-train: the Llama-family model on qadapt's ops, and (to come) the PEFT methods, optimizers
//! and trainer.
//!
//! What is here: [`LlamaConfig`] from an HF `config.json`, the parameters from `model.safetensors`
//! (or sharded), the tokenizer from `tokenizer.json`, and [`Llama`]: a CPU forward in f32 (or f64)
//! with a hand-written backward for every parameter and the input embeddings, checked against
//! transformers by `tests/golden.rs` and against finite differences in f64 by `tests/gradcheck.rs`;
//! and [`LoraAdapter`]: LoRA on any of the decoder's projections, read and written in PEFT's
//! format, checked against PEFT by `tests/lora.rs`.
//!
//! ```no_run
//! let m = qadapt_train::LlamaDir::open(std::path::Path::new("tests/data/tiny_llama"))?;
//! let model = m.model()?;
//! let (loss, _fwd, grads) = model.loss_and_grads(&[1, 5, 9, 2], 1, 4)?;
//! println!("loss {loss}, {} input-embedding gradients", grads.inputs_embeds.len());
//! # Ok::<(), qadapt::Error>(())
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod dataset;
pub mod lora;
pub mod model;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::LlamaConfig;
pub use lora::{LoraAdapter, LoraConfig, LoraInit};
pub use model::{BaseGrads, Forward, Gradients, Llama, causal_targets};
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
    /// Its weights, widened to f32.
    pub weights: LlamaWeights<f32>,
    /// Its `tokenizer.json`, if the directory has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

impl LlamaDir {
    /// Reads the config, every weight and the tokenizer (if any).
    pub fn open(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let weights = weights::load(dir, &config)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| format_err(&tok_path, e))?,
            )
        } else {
            None
        };
        Ok(LlamaDir {
            dir: dir.to_owned(),
            config,
            weights,
            tokenizer,
        })
    }

    /// The f32 model (the weights are cloned; the directory keeps its copy).
    pub fn model(&self) -> Result<Llama<f32>> {
        Llama::new(self.config.clone(), self.weights.clone())
    }
}
