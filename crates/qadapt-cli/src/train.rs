//! `qadapt train`: the command line of [`qadapt_train::run`], which owns the run (data,
//! method, checkpoints, resume, accumulation, evaluation, saving; its documentation describes
//! the run directory). This file turns the flags into [`Overrides`] over `--config FILE.toml`
//! over the defaults, gives the run the embedded model and task (see [`crate::assets`]) as its
//! defaults, wires Ctrl-C to the run's stop flag, and observes it through
//! [`crate::console::Console`].
//!
//! With no arguments it fine-tunes the embedded default with QLoRA.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::Args;
use qadapt_train::backend::Checkpointing;
use qadapt_train::run::{AdapterDtype, Config, FineTune, Outcome, Overrides};
pub(crate) use qadapt_train::run::{Method, Summary};

use crate::console::{Console, metric_line};

/// The model and data of a run, shared by `train` and `compare`.
#[derive(Args, Debug, Clone, Default, PartialEq)]
pub(crate) struct Inputs {
    /// HF Llama-family model directory (config.json, safetensors, tokenizer.json); default: the
    /// embedded pretrained model.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Training data: JSONL with "prompt"/"completion" or "text" fields, or plain text
    /// (documents separated by blank lines); default: the embedded sentiment task.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Held-out data in the same formats (default: the embedded task's, or examples split off
    /// --data: `qadapt train --heldout`).
    #[arg(long)]
    pub(crate) heldout_data: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Default, PartialEq)]
pub(crate) struct TrainArgs {
    /// PEFT method: full, top-k, prompt, prefix, adapter, lora, qlora, ia3, surgical or
    /// surgical-auto (default qlora).
    #[arg(long)]
    method: Option<Method>,
    #[command(flatten)]
    inputs: Inputs,
    /// Examples split off --data for held-out evaluation when --heldout-data is not given.
    #[arg(long)]
    heldout: Option<usize>,
    /// cpu (every method) or cuda[:N] (lora and qlora only: bf16 compute, NF4 base and paged
    /// AdamW for qlora).
    #[arg(long)]
    device: Option<String>,
    /// With --device cuda: none (keep every activation for the backward), layers (keep each
    /// decoder layer's input and recompute the layer in the backward: less memory, one more
    /// forward per step, the same result bit for bit) or auto (none when the step's memory plan
    /// fits the device's free memory, else layers).
    #[arg(long, value_parser = parse_checkpointing)]
    checkpointing: Option<CheckpointingArg>,
    /// dtype of the saved adapter's tensors: f32 (default) or bf16 (half the file; PEFT loads
    /// either). Checkpoints stay f32, so a resume is exact.
    #[arg(long)]
    adapter_dtype: Option<AdapterDtype>,
    /// With --device cuda: pack several whole training sequences into each row of --max-len
    /// tokens (the model's context without it; --batch counts rows), each attending only to
    /// itself with its own positions, instead of padding every sequence to the longest.
    #[arg(long)]
    pack: bool,
    /// New output directory (default runs/<method>-<unix time>).
    #[arg(long)]
    output: Option<PathBuf>,
    /// TOML file with any of these settings (snake_case keys, e.g. `grad_accum = 2`); the
    /// command line wins over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this output directory from its checkpoint (its run.toml holds the
    /// settings; other options are not allowed).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    steps: Option<u64>,
    /// Sequences per micro-batch, or `auto` (--device cuda): the largest whose planned peak
    /// memory (`qadapt plan-memory`) fits the device's free memory.
    #[arg(long, value_parser = parse_batch)]
    batch: Option<BatchArg>,
    /// Micro-batches per optimizer step.
    #[arg(long, value_parser = crate::positive())]
    grad_accum: Option<usize>,
    /// Peak learning rate (default: per method, 1e-3 .. 3e-2).
    #[arg(long)]
    lr: Option<f32>,
    /// Final learning rate of the cosine schedule, as a fraction of --lr.
    #[arg(long)]
    min_lr_ratio: Option<f32>,
    /// Linear warmup steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Decoupled AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the global gradient norm to this, or `none` (no clipping) [default: 1].
    #[arg(long, value_parser = parse_clip)]
    max_grad_norm: Option<Clip>,
    /// Seed of initialization, shuffling and dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest sequence in tokens (longer examples are skipped and counted; default: the
    /// model's context).
    #[arg(long, value_parser = crate::positive())]
    max_len: Option<usize>,
    /// Held-out evaluation every N steps (default: only before and after training).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    eval_every: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_every: Option<u64>,
    /// Stop at the first malformed data line instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// LoRA rank r.
    #[arg(long, value_parser = crate::positive())]
    rank: Option<usize>,
    /// LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).
    #[arg(long)]
    alpha: Option<f64>,
    /// LoRA dropout on the adapter input.
    #[arg(long)]
    lora_dropout: Option<f64>,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    rslora: bool,
    /// LoRA target modules, comma-separated.
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Virtual tokens of prompt and prefix tuning.
    #[arg(long, value_parser = crate::positive())]
    virtual_tokens: Option<usize>,
    /// Prompt tuning init: random, vocab (embeddings of random vocabulary tokens) or text:WORDS.
    #[arg(long)]
    prompt_init: Option<String>,
    /// Prefix tuning through an MLP of this hidden width (folded into plain prefixes on save;
    /// default: plain prefixes).
    #[arg(long, value_parser = crate::positive())]
    prefix_mlp: Option<usize>,
    /// Houlsby adapter bottleneck width.
    #[arg(long, value_parser = crate::positive())]
    bottleneck: Option<usize>,
    /// Layers trained by top-k.
    #[arg(long, value_parser = crate::positive())]
    top_k: Option<usize>,
    /// Surgical: decoder layers per group.
    #[arg(long, value_parser = crate::positive())]
    group_size: Option<usize>,
    /// Surgical-auto: batches averaged for the relative gradient norms (refreshed each epoch).
    #[arg(long, value_parser = crate::positive())]
    rgn_batches: Option<usize>,
    /// Testing aid: behave as if Ctrl-C came after this many steps.
    #[arg(long, hide = true)]
    interrupt_after: Option<u64>,
    /// No progress bar or per-run summary on stderr (compare uses this).
    #[arg(long)]
    quiet: bool,
}

/// `--checkpointing none|layers|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointingArg {
    Fixed(Checkpointing),
    Auto,
}

fn parse_checkpointing(s: &str) -> std::result::Result<CheckpointingArg, String> {
    if s == "auto" {
        return Ok(CheckpointingArg::Auto);
    }
    s.parse()
        .map(CheckpointingArg::Fixed)
        .map_err(|_| format!("unknown checkpointing {s:?} (none, layers or auto)"))
}

/// `--max-grad-norm N` or `--max-grad-norm none`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Clip(Option<f64>);

fn parse_clip(s: &str) -> std::result::Result<Clip, String> {
    if s == "none" {
        return Ok(Clip(None));
    }
    s.parse::<f64>()
        .map(|n| Clip(Some(n)))
        .map_err(|_| format!("{s:?} is neither a number nor `none`"))
}

/// `--batch N` or `--batch auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchArg {
    Sequences(usize),
    Auto,
}

fn parse_batch(s: &str) -> std::result::Result<BatchArg, String> {
    if s == "auto" {
        return Ok(BatchArg::Auto);
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(BatchArg::Sequences(n)),
        _ => Err(format!(
            "{s:?} is not a positive number of sequences or `auto`"
        )),
    }
}

impl TrainArgs {
    /// What the flags set.
    fn overrides(&self) -> Overrides {
        Overrides {
            method: self.method,
            model: self.inputs.model.clone().map(Some),
            data: self.inputs.data.clone().map(Some),
            heldout_data: self.inputs.heldout_data.clone().map(Some),
            heldout: self.heldout,
            device: self.device.clone(),
            checkpointing: match self.checkpointing {
                Some(CheckpointingArg::Fixed(c)) => Some(c),
                _ => None,
            },
            checkpointing_auto: self.checkpointing.map(|c| c == CheckpointingArg::Auto),
            adapter_dtype: self.adapter_dtype,
            pack: self.pack.then_some(true),
            steps: self.steps,
            batch: match self.batch {
                Some(BatchArg::Sequences(n)) => Some(n),
                _ => None,
            },
            batch_auto: self.batch.map(|b| b == BatchArg::Auto),
            grad_accum: self.grad_accum,
            lr: self.lr.map(Some),
            min_lr_ratio: self.min_lr_ratio,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm.map(|c| c.0),
            seed: self.seed,
            max_len: self.max_len.map(Some),
            eval_every: self.eval_every.map(Some),
            checkpoint_every: self.checkpoint_every,
            strict: self.strict.then_some(true),
            rank: self.rank,
            alpha: self.alpha,
            lora_dropout: self.lora_dropout,
            rslora: self.rslora.then_some(true),
            targets: self.targets.clone(),
            virtual_tokens: self.virtual_tokens,
            prompt_init: self.prompt_init.clone(),
            prefix_mlp: self.prefix_mlp.map(Some),
            bottleneck: self.bottleneck,
            top_k: self.top_k,
            group_size: self.group_size,
            rgn_batches: self.rgn_batches,
            output: self.output.clone().map(Some),
        }
    }

    /// The defaults, then the TOML file, then the flags.
    fn config(&self) -> Result<Config> {
        let file = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Overrides::from_toml(&text).with_context(|| format!("{}", p.display()))?
            }
            None => Overrides::default(),
        };
        Ok(Config::default().merge(file).merge(self.overrides()))
    }

    /// Whether nothing but `--resume` and the flags that may go with it was given.
    fn only_resume(&self) -> bool {
        let bare = TrainArgs {
            resume: self.resume.clone(),
            interrupt_after: self.interrupt_after,
            quiet: self.quiet,
            ..TrainArgs::default()
        };
        bare == *self
    }
}

pub(crate) fn run(a: &TrainArgs) -> Result<()> {
    let run = match &a.resume {
        Some(dir) => {
            if !a.only_resume() {
                bail!("--resume takes the settings of the run it continues; give no other option");
            }
            FineTune::resume(dir)?
        }
        None => FineTune::new(a.config()?)?,
    };
    let model = match run.config().model {
        None => Some(crate::assets::model_dir()?),
        Some(_) => None,
    };
    let task = match run.config().data {
        None => Some(crate::assets::task_dir()?),
        Some(_) => None,
    };
    let run = run.with_defaults(model, task);
    let stop = run.stop_flag();
    {
        let stop = stop.clone();
        // Ctrl-C: finish the step in flight, checkpoint, exit. A second Ctrl-C kills.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let mut console = Console::new(
        a.quiet,
        a.interrupt_after,
        stop,
        run.output().to_path_buf(),
        run.config().method,
    );
    let outcome = run.fit(&mut console);
    if outcome.is_err() {
        console.abandon();
    }
    match outcome? {
        Outcome::Interrupted {
            step,
            total_steps,
            output,
        } => {
            console.abandon();
            eprintln!(
                "interrupted at step {step} of {total_steps}: checkpoint saved; continue with \
                 `qadapt train --resume {}`",
                output.display()
            );
        }
        Outcome::Finished(end) => {
            console.say(format!(
                "after:  {}",
                metric_line(&end.after, end.summary.completions)
            ));
            console.say(format!(
                "{} steps in {:.1}s ({:.0} tokens/s); wrote {} ({} bytes), log.jsonl, loss.png",
                end.summary.steps,
                end.elapsed_s,
                end.summary.tokens_per_s,
                end.saved.display(),
                end.summary.saved_bytes
            ));
        }
    }
    Ok(())
}
