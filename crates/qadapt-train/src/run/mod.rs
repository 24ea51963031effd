//! A fine-tuning run as a library: [`FineTune`] takes a [`Config`] and trains one PEFT method
//! on the CPU (LoRA and QLoRA also on CUDA), reporting to an [`Observer`]. It owns everything
//! between the settings and the saved result: data loading, tokenization and framing
//! ([`data`]), the method's construction ([`method`]), the checkpoint format and exact resume
//! ([`checkpoint`]), interruption, gradient accumulation, evaluation and saving. `qadapt train`
//! is one of its users: it turns its flags into [`Overrides`], wires Ctrl-C to
//! [`FineTune::stop_flag`], and draws the progress bar, `log.jsonl` and the loss plot from the
//! [`Observer`] calls.
//!
//! The run directory ([`Config::output`]):
//! ```text
//! run.toml            the resolved settings, model and data as absolute paths (what a resume
//!                     reads back, from any working directory)
//! inputs.json         size and CRC-32 of every model and data file: a resume refuses changed ones
//! checkpoint/         state.json + tensors.safetensors (the trainable tensors, AdamW moments),
//!                     replaced atomically every `checkpoint_every` steps, on interruption and at
//!                     the end
//! adapter/            the adapter in HF PEFT format (adapter methods), or
//! model/              an HF model directory (full, top-k, surgical: the base itself trains)
//! summary.json        the [`Summary`]
//! ```
//! (`qadapt train` adds `log.jsonl`, one [`LogRow::to_json`] per line, and `loss.png`.) Every
//! file is written through a temporary renamed into place, and the checkpoint is swapped with
//! the old one moved aside first ([`fs`]): a kill at any point leaves a run that resumes, and
//! its leftovers are removed then.
//!
//! **Steps.** One optimizer step accumulates `grad_accum` micro-batches of `batch` sequences
//! drawn by a seeded shuffling sampler (epoch after epoch), each micro-batch's loss the mean
//! over its target tokens, and applies AdamW with the cosine schedule's rate (linear warmup of
//! `min(warmup, steps / 5)` steps, then cosine decay to `lr · min_lr_ratio`), the global gradient
//! norm clipped to `max_grad_norm`. A non-finite loss stops the run with an error naming the last
//! good checkpoint.
//!
//! **Resume** is exact on the CPU: the sampler position, the step count, the AdamW moments and
//! the trainable tensors are restored, and LoRA dropout masks are a function of (seed, step), so
//! the resumed run reaches the weights of an uninterrupted one bit for bit. A CUDA run
//! checkpoints the device's step count and moments in the same layout (the adapter's f32
//! masters are the checkpoint's tensors), so either path resumes it.
//!
//! **Surgical** methods run the schedules of [`crate::surgical`]: manual surgery holds back a
//! tenth of the training examples (1 to 200) for validation and splits `steps` evenly between
//! the layer groups of `group_size` layers, each with a fresh trainer and schedule; Auto-RGN
//! refreshes its per-tensor rates at the start of every epoch on `rgn_batches` batches of its own
//! draw.
//!
//! Two steps of LoRA on the `tiny_llama` test model (given a word-level tokenizer) and eight
//! prompt/completion lines, one of them held out:
//! ```
//! use qadapt_train::run::{Config, FineTune, Method, Outcome, Silent};
//!
//! let dir = tempfile::tempdir()?;
//! let model = dir.path().join("model");
//! std::fs::create_dir(&model)?;
//! for f in ["config.json", "model.safetensors"] {
//!     std::fs::copy(format!("../../tests/data/tiny_llama/{f}"), model.join(f))?;
//! }
//! std::fs::write(model.join("tokenizer.json"), r#"{"version": "1.0", "truncation": null,
//!   "padding": null, "added_tokens": [], "normalizer": null,
//!   "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
//!   "model": {"type": "WordLevel", "unk_token": "[UNK]",
//!             "vocab": {"[UNK]": 0, "the": 5, "cat": 17, "sat": 42, "down": 8}}}"#)?;
//! let data = dir.path().join("train.jsonl");
//! let line = r#"{"prompt": "the cat", "completion": " sat down"}"#;
//! std::fs::write(&data, format!("{line}\n").repeat(8))?;
//! let config = Config {
//!     method: Method::Lora,
//!     model: Some(model),
//!     data: Some(data),
//!     steps: 2,
//!     batch: 2,
//!     output: Some(dir.path().join("run")),
//!     ..Config::default()
//! };
//! let Outcome::Finished(end) = FineTune::new(config)?.fit(&mut Silent)? else {
//!     unreachable!("nothing raised the stop flag");
//! };
//! assert_eq!(end.summary.steps, 2);
//! assert!(end.summary.final_train_loss.is_finite());
//! assert!(end.summary.after_loss < end.summary.before_loss);
//! assert!(end.saved.join("adapter_model.safetensors").is_file());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod fs;
mod inputs;
pub mod method;
pub mod observer;
pub mod save;
mod steps;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub use config::{AdapterDtype, Config, Method, Overrides};
pub use observer::{Finished, LogRow, Observer, ObserverError, Outcome, Silent, Start, Summary};

use crate::dataset::DataError;

/// Why a run stopped or did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model, an op or an adapter failed.
    #[error(transparent)]
    Qadapt(#[from] qadapt::Error),
    /// A data file could not be read or parsed.
    #[error(transparent)]
    Dataset(#[from] DataError),
    /// A setting that cannot run (the message names the flag).
    #[error("{0}")]
    Config(String),
    /// The data gives nothing to train or evaluate on.
    #[error("{0}")]
    Data(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A file of the run directory is malformed.
    #[error("{file}: {reason}")]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The run directory's state forbids the operation (it exists, its inputs changed, it has
    /// no checkpoint, ...).
    #[error("{0}")]
    Refused(String),
    /// The loss became NaN or infinite.
    #[error(
        "the loss is {loss} at step {step}: stopping (lower --lr?); {}",
        match last_good {
            Some((dir, n)) => format!("the last good checkpoint is {} (step {n})", dir.display()),
            None => "no checkpoint was saved before it".to_string(),
        }
    )]
    Diverged {
        /// The loss.
        loss: f32,
        /// The step (1-based) that produced it.
        step: u64,
        /// The checkpoint directory and its step, if one was saved.
        last_good: Option<(PathBuf, u64)>,
    },
    /// The observer failed.
    #[error("{0}")]
    Observer(ObserverError),
}

/// A fine-tuning run, new or resumed. See the module documentation.
#[derive(Debug)]
pub struct FineTune {
    config: Config,
    output: PathBuf,
    resuming: bool,
    default_model: Option<PathBuf>,
    default_task: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl FineTune {
    /// A new run of `config` (checked here), into `config.output` or `runs/<method>-<unix
    /// time>`; nothing is read or written before [`Self::fit`].
    pub fn new(config: Config) -> Result<FineTune, Error> {
        config.check()?;
        let output = config.output.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from("runs").join(format!("{}-{t}", config.method.name()))
        });
        Ok(FineTune {
            config,
            output,
            resuming: false,
            default_model: None,
            default_task: None,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Continues the run in `dir` from its checkpoint, with the settings of its `run.toml`.
    pub fn resume(dir: &Path) -> Result<FineTune, Error> {
        let p = dir.join("run.toml");
        let text = std::fs::read_to_string(&p).map_err(|_| {
            Error::Refused(format!(
                "{}: not a qadapt train output directory",
                dir.display()
            ))
        })?;
        let o = Overrides::from_toml(&text).map_err(|e| Error::Format {
            file: p,
            reason: e.to_string(),
        })?;
        let mut run = FineTune::new(Config::default().merge(o))?;
        run.output = dir.to_path_buf();
        run.config.output = Some(dir.to_path_buf());
        run.resuming = true;
        Ok(run)
    }

    /// The model directory used when the config names none, and the task directory
    /// (`train.jsonl`, `heldout.jsonl`) used when it names no data.
    pub fn with_defaults(mut self, model: Option<PathBuf>, task: Option<PathBuf>) -> FineTune {
        self.default_model = model;
        self.default_task = task;
        self
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The run directory.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Whether this run continues a checkpoint.
    pub fn is_resumed(&self) -> bool {
        self.resuming
    }

    /// The flag that interrupts the run: once it is set, the step in flight finishes, a
    /// checkpoint is written and [`Self::fit`] returns [`Outcome::Interrupted`].
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Trains to the end (or to an interruption), reporting to `obs`.
    pub fn fit(self, obs: &mut dyn Observer) -> Result<Outcome, Error> {
        steps::Run::prepare(self, obs)?.train(obs)
    }
}

/// The directory's absolute, UTF-8 spelling, so that run.toml means the same files from any
/// working directory.
fn absolute(flag: &str, p: &mut Option<PathBuf>) -> Result<(), Error> {
    if let Some(path) = p {
        let abs = std::fs::canonicalize(&*path).map_err(|source| Error::Io {
            what: format!("{flag} {}", path.display()),
            source,
        })?;
        if abs.to_str().is_none() {
            return Err(Error::Config(format!(
                "{flag} {}: the path is not UTF-8",
                path.display()
            )));
        }
        *path = abs;
    }
    Ok(())
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn observer(e: ObserverError) -> Error {
    Error::Observer(e)
}
