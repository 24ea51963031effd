//! What a run tells its caller while it goes: [`Observer`] receives the start, every log row
//! (one per optimizer step, per evaluation and per finished surgical group), warnings about the
//! data, and the end. `qadapt train` implements it with a progress bar, `log.jsonl` and the
//! loss plot; [`Silent`] ignores everything.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Method;
use crate::fit::Heldout;
use crate::select::LayerGroup;

/// What an observer's failure carries (it stops the run).
pub type ObserverError = Box<dyn std::error::Error + Send + Sync>;

/// One row of a run's log. [`LogRow::to_json`] is the line `qadapt train` appends to
/// `log.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRow {
    /// An optimizer step.
    Step {
        /// 1-based step of the run.
        step: u64,
        /// Mean loss of the step's micro-batches (before its update).
        loss: f32,
        /// Learning rate of the step.
        lr: f32,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Tokens processed (padding excluded).
        tokens: usize,
        /// Target tokens of the loss.
        target_tokens: usize,
        /// `tokens` over the step's wall time.
        tokens_per_s: f64,
        /// Training time of the whole run so far (resumed runs included).
        elapsed_s: f64,
        /// On a device: the most device memory the step held at once
        /// ([`qadapt::CudaDevice::memory_peak`]); `None` on the CPU.
        device_peak_bytes: Option<u64>,
    },
    /// A held-out evaluation.
    Eval {
        /// After this step.
        step: u64,
        /// Mean cross-entropy per target token.
        eval_loss: f64,
        /// Exact-match accuracy.
        eval_accuracy: f64,
    },
    /// Manual surgery: a layer group finished.
    Group {
        /// Its last step.
        step: u64,
        /// The group.
        group: LayerGroup,
        /// Its trainable parameters.
        params: usize,
        /// Its validation loss.
        val_loss: f64,
    },
}

impl LogRow {
    /// The step the row belongs to.
    pub fn step(&self) -> u64 {
        match self {
            LogRow::Step { step, .. } | LogRow::Eval { step, .. } | LogRow::Group { step, .. } => {
                *step
            }
        }
    }

    /// The row as one JSON object (keys sorted, as `log.jsonl` has always held them).
    pub fn to_json(&self) -> serde_json::Value {
        match *self {
            LogRow::Step {
                step,
                loss,
                lr,
                grad_norm,
                tokens,
                target_tokens,
                tokens_per_s,
                elapsed_s,
                device_peak_bytes,
            } => {
                let mut row = serde_json::json!({
                    "step": step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "target_tokens": target_tokens,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": elapsed_s,
                });
                if let Some(b) = device_peak_bytes {
                    row["device_peak_bytes"] = b.into();
                }
                row
            }
            LogRow::Eval {
                step,
                eval_loss,
                eval_accuracy,
            } => serde_json::json!({
                "step": step, "eval_loss": eval_loss, "eval_accuracy": eval_accuracy
            }),
            LogRow::Group {
                step,
                group,
                params,
                val_loss,
            } => serde_json::json!({
                "step": step,
                "group": group.to_string(),
                "params": params,
                "val_loss": val_loss,
            }),
        }
    }
}

/// What a run is about to do, once the model and data are loaded and the start is evaluated.
#[derive(Debug, Clone)]
pub struct Start {
    /// The run directory.
    pub output: PathBuf,
    /// The method.
    pub method: Method,
    /// The model directory, `None` for the default model.
    pub model: Option<PathBuf>,
    /// Training and held-out sequences.
    pub train_examples: usize,
    /// Held-out sequences.
    pub heldout_examples: usize,
    /// Trainable parameters at the start (manual surgery: the whole model's).
    pub trainable_params: usize,
    /// Every parameter of the model.
    pub total_params: usize,
    /// The accelerator the run trains on (`None`: the CPU).
    pub device: Option<String>,
    /// The held-out metric of the start.
    pub before: Heldout,
    /// Whether the examples are prompt/completion pairs (exact match means something).
    pub completions: bool,
    /// Manual surgery: the layer groups, the steps of each, the validation sequences.
    pub surgical: Option<(Vec<LayerGroup>, u64, usize)>,
    /// The step a resumed run continues from (`None`: a new run).
    pub resumed_at: Option<u64>,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
}

/// What a finished run reports (`summary.json`, what `qadapt compare` tabulates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The method's name.
    pub method: String,
    /// Trainable parameters (manual surgery: the kept group's).
    pub trainable_params: usize,
    /// Parameters of the model.
    pub total_params: usize,
    /// Peak resident memory of the process (Linux), if known.
    pub peak_rss_bytes: Option<u64>,
    /// Optimizer steps.
    pub steps: u64,
    /// Mean wall time of the steps this process ran.
    pub mean_step_s: f64,
    /// Tokens per second over the whole run.
    pub tokens_per_s: f64,
    /// The last step's loss (manual surgery: the kept group's last).
    pub final_train_loss: f64,
    /// Whether the examples are prompt/completion pairs.
    pub completions: bool,
    /// Held-out loss before training.
    pub before_loss: f64,
    /// Held-out exact match before training.
    pub before_accuracy: f64,
    /// Held-out loss after training.
    pub after_loss: f64,
    /// Held-out exact match after training.
    pub after_accuracy: f64,
    /// Bytes of what was saved.
    pub saved_bytes: u64,
    /// The adapter or model directory saved.
    pub saved: String,
}

/// The end of a run that went to its last step.
#[derive(Debug, Clone)]
pub struct Finished {
    /// What `summary.json` holds.
    pub summary: Summary,
    /// The held-out metric after training.
    pub after: Heldout,
    /// Training time of the whole run (resumed runs included).
    pub elapsed_s: f64,
    /// The adapter or model directory written.
    pub saved: PathBuf,
    /// Manual surgery: the kept group and its validation loss.
    pub kept: Option<(LayerGroup, f64)>,
}

/// How [`super::FineTune::fit`] returned.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Every step ran; the result is saved.
    Finished(Box<Finished>),
    /// The stop flag was raised: the step in flight finished and was checkpointed.
    Interrupted {
        /// Steps done.
        step: u64,
        /// Steps of the whole run.
        total_steps: u64,
        /// The run directory (resume from it).
        output: PathBuf,
    },
}

/// Receives a run's progress. Every method has a default that does nothing; an error stops the
/// run (checkpoints already written stay).
pub trait Observer {
    /// The run is set up (model, data, method, the start's held-out metric); nothing is trained
    /// yet. A resumed run's log must be cut back to `start.resumed_at` here.
    fn started(&mut self, start: &Start) -> Result<(), ObserverError> {
        let _ = start;
        Ok(())
    }

    /// Something about the inputs that did not stop the run (skipped data lines or examples).
    fn warning(&mut self, message: &str) {
        let _ = message;
    }

    /// A log row, in order of steps.
    fn log(&mut self, row: &LogRow) -> Result<(), ObserverError> {
        let _ = row;
        Ok(())
    }

    /// The run went to its end and saved its result; called before `summary.json` is written.
    fn finished(&mut self, end: &Finished) -> Result<(), ObserverError> {
        let _ = end;
        Ok(())
    }
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {}
