//! `qadapt train`: fine-tune a Llama-family model with one PEFT method on the CPU, with a
//! progress bar, a JSONL log of every step, a loss-curve PNG, atomic checkpoints, `--resume`,
//! Ctrl-C, and the held-out metric before and after. `--device cuda` trains `--method lora` and
//! `--method qlora` on the GPU ([`qadapt_train::cuda`]: bf16 compute, NF4 base with paged AdamW
//! for QLoRA, LoRA dropout drawing the CPU path's masks); the held-out metric is still computed
//! on the CPU model with the adapter downloaded. Every other method on `--device cuda` is
//! refused.
//!
//! With no arguments it fine-tunes the embedded default (see [`crate::assets`]) with QLoRA.
//!
//! Output directory (`--output`, default `runs/<method>-<unix time>`; an existing one is refused
//! unless it is the `--resume` target):
//! ```text
//! run.toml            the resolved settings, model and data as absolute paths (what --config
//!                     reads; --resume reads it back from any working directory)
//! inputs.json         size and CRC-32 of every model and data file: --resume refuses changed ones
//! log.jsonl           {"step", "loss", "lr", "grad_norm", "tokens" (processed), "target_tokens",
//!                     "tokens_per_s", "elapsed_s"} per step; {"step", "eval_loss", "eval_accuracy"} per evaluation
//! loss.png            the training loss per step
//! checkpoint/         state.json + tensors.safetensors (the trainable tensors, AdamW moments),
//!                     replaced atomically every --checkpoint-every steps, on Ctrl-C and at the end
//! adapter/            the adapter in HF PEFT format (adapter methods), or
//! model/              an HF model directory (full, top-k, surgical: the base itself trains)
//! summary.json        what `qadapt compare` tabulates
//! ```
//!
//! Every file is written through a temporary that is renamed into place, and the checkpoint is
//! swapped with the old one moved aside first (`crate::io`): a kill at any point leaves a run
//! that `--resume` continues, and its leftovers are removed then (tests/crash.rs kills the
//! process at each of these steps).
//!
//! Resuming is exact on the CPU: the sampler position, the step count, the AdamW moments and the
//! trainable tensors are restored, the log is cut back to the checkpoint's step, and LoRA dropout
//! masks are a function of (seed, step), so the resumed run reaches the weights of an
//! uninterrupted one bit for bit. A `--device cuda` run checkpoints the device's step count and
//! moments in the same layout and resumes from them (the adapter's f32 masters are the
//! checkpoint's tensors).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use qadapt::adapter::Activation;
use qadapt::nf4::bnb::OnDiskTensor;
use qadapt::optim::{AdamW, CosineSchedule};
use qadapt_train::cuda::{BaseFormat, CudaBackend, LoraModel, MomentPlacement};
use qadapt_train::dataset::{self, Example, Framing, Overlong, Sequence, Strictness, Tokenize};
use qadapt_train::fit::{Heldout, Sampler, heldout, pack};
use qadapt_train::surgical::AutoRgn;
use qadapt_train::{
    Adapter, HoulsbyAdapter, HoulsbyConfig, Ia3Adapter, Ia3Config, LayerGroup, Llama, LlamaDir,
    LoraAdapter, LoraConfig, LoraInit, PrefixMlp, PrefixTuning, Proj, PromptInit, PromptTuning,
    Selection, Trainable, Trainer,
};
use serde::{Deserialize, Serialize};

use crate::io::{
    new_directory, read_safetensors, recover_directory, remove_temporaries, replace_directory,
    write_file, write_safetensors,
};

/// The PEFT methods `qadapt train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Method {
    /// Every parameter trains.
    Full,
    /// The last --top-k decoder layers, the final norm and the head.
    TopK,
    /// Soft prompt of --virtual-tokens embeddings before the input.
    Prompt,
    /// Per-layer key/value prefixes (--prefix-mlp: reparameterized by an MLP, folded on save).
    Prefix,
    /// Houlsby bottleneck adapters after attention and after the MLP.
    Adapter,
    /// LoRA on --targets.
    Lora,
    /// LoRA over an NF4 base (block 64, double quant).
    Qlora,
    /// (IA)³ scaling vectors on k, v and down.
    Ia3,
    /// Surgical fine-tuning, manual: each layer group trains alone; the best on held-out is kept.
    Surgical,
    /// Surgical fine-tuning, automatic: per-tensor learning rates from relative gradient norms.
    SurgicalAuto,
}

impl Method {
    pub(crate) const ALL: [Method; 10] = [
        Method::Full,
        Method::TopK,
        Method::Prompt,
        Method::Prefix,
        Method::Adapter,
        Method::Lora,
        Method::Qlora,
        Method::Ia3,
        Method::Surgical,
        Method::SurgicalAuto,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::TopK => "top-k",
            Method::Prompt => "prompt",
            Method::Prefix => "prefix",
            Method::Adapter => "adapter",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Ia3 => "ia3",
            Method::Surgical => "surgical",
            Method::SurgicalAuto => "surgical-auto",
        }
    }

    /// Learning rate when none is given: adapters with few parameters take larger steps.
    fn default_lr(self) -> f32 {
        match self {
            Method::Full | Method::TopK | Method::Surgical | Method::SurgicalAuto => 1e-3,
            Method::Lora | Method::Qlora | Method::Adapter => 3e-3,
            Method::Prompt | Method::Prefix | Method::Ia3 => 3e-2,
        }
    }
}

/// Every setting of a run: the defaults, then `--config FILE.toml`, then the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) method: Method,
    /// HF model directory; empty: the embedded default.
    pub(crate) model: String,
    /// Training data; empty: the embedded task.
    pub(crate) data: String,
    /// Held-out data; empty: the embedded task's (with the embedded data) or a split of `data`.
    pub(crate) heldout_data: String,
    /// Examples split off `data` when no held-out file is given.
    pub(crate) heldout: usize,
    pub(crate) device: String,
    pub(crate) steps: u64,
    pub(crate) batch: usize,
    pub(crate) grad_accum: usize,
    /// 0: the method's default.
    pub(crate) lr: f32,
    pub(crate) min_lr_ratio: f32,
    pub(crate) warmup: u64,
    pub(crate) weight_decay: f32,
    /// 0: no clipping.
    pub(crate) max_grad_norm: f64,
    pub(crate) seed: u64,
    /// Longest sequence in tokens; 0: the model's max_position_embeddings.
    pub(crate) max_len: usize,
    pub(crate) eval_every: u64,
    pub(crate) checkpoint_every: u64,
    pub(crate) strict: bool,
    pub(crate) rank: usize,
    pub(crate) alpha: f64,
    pub(crate) lora_dropout: f64,
    pub(crate) rslora: bool,
    pub(crate) targets: Vec<String>,
    pub(crate) virtual_tokens: usize,
    /// `random`, `vocab` or `text:<words>`.
    pub(crate) prompt_init: String,
    /// 0: plain prefix tuning; otherwise the MLP's hidden width.
    pub(crate) prefix_mlp: usize,
    pub(crate) bottleneck: usize,
    pub(crate) top_k: usize,
    /// Surgical: decoder layers per group.
    pub(crate) group_size: usize,
    /// Surgical-auto: batches averaged for the relative gradient norms.
    pub(crate) rgn_batches: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            method: Method::Qlora,
            model: String::new(),
            data: String::new(),
            heldout_data: String::new(),
            heldout: 200,
            device: "cpu".into(),
            steps: 300,
            batch: 16,
            grad_accum: 1,
            lr: 0.0,
            min_lr_ratio: 0.1,
            warmup: 10,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 0,
            max_len: 0,
            eval_every: 0,
            checkpoint_every: 50,
            strict: false,
            rank: 8,
            alpha: 16.0,
            lora_dropout: 0.0,
            rslora: false,
            // Every projection, by its module name (`q_proj`, ..., `down_proj`).
            targets: Proj::ALL
                .iter()
                .map(|p| p.name().rsplit('.').next().unwrap_or(p.name()).to_string())
                .collect(),
            virtual_tokens: 10,
            prompt_init: "vocab".into(),
            prefix_mlp: 0,
            bottleneck: 16,
            top_k: 1,
            group_size: 1,
            rgn_batches: 4,
        }
    }
}

#[derive(Args, Debug, Clone, Default)]
pub(crate) struct TrainArgs {
    /// PEFT method (default qlora).
    #[arg(long, value_enum)]
    method: Option<Method>,
    /// HF Llama-family model directory (config.json, safetensors, tokenizer.json); default: the
    /// embedded pretrained model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data: JSONL with "prompt"/"completion" or "text" fields, or plain text
    /// (documents separated by blank lines); default: the embedded sentiment task.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out data in the same formats (default: the embedded task's, or --heldout examples
    /// split off --data).
    #[arg(long)]
    heldout_data: Option<PathBuf>,
    /// Examples split off --data for held-out evaluation when --heldout-data is not given.
    #[arg(long)]
    heldout: Option<usize>,
    /// cpu (every method) or cuda[:N] (lora and qlora only: bf16 compute, NF4 base and paged
    /// AdamW for qlora).
    #[arg(long)]
    device: Option<String>,
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
    /// Sequences per micro-batch.
    #[arg(long, value_parser = crate::positive())]
    batch: Option<usize>,
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
    /// Clip the global gradient norm to this (0: off).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Seed of initialization, shuffling and dropout.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest sequence in tokens (longer examples are skipped and counted; default: the
    /// model's context).
    #[arg(long)]
    max_len: Option<usize>,
    /// Held-out evaluation every N steps (0: only before and after).
    #[arg(long)]
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
    /// Prefix tuning through an MLP of this hidden width (folded into plain prefixes on save).
    #[arg(long)]
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

impl TrainArgs {
    /// The defaults, then the TOML file, then the flags.
    fn settings(&self) -> Result<Settings> {
        let mut s = match &self.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                parse_config(&text).with_context(|| format!("{}", p.display()))?
            }
            None => Settings::default(),
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { s.$f = v; } )* };
        }
        set!(
            method,
            heldout,
            device,
            steps,
            batch,
            grad_accum,
            lr,
            min_lr_ratio,
            warmup,
            weight_decay,
            max_grad_norm,
            seed,
            max_len,
            eval_every,
            checkpoint_every,
            rank,
            alpha,
            lora_dropout,
            targets,
            virtual_tokens,
            prompt_init,
            prefix_mlp,
            bottleneck,
            top_k,
            group_size,
            rgn_batches
        );
        if let Some(m) = path(&self.model) {
            s.model = m;
        }
        if let Some(d) = path(&self.data) {
            s.data = d;
        }
        if let Some(d) = path(&self.heldout_data) {
            s.heldout_data = d;
        }
        s.strict |= self.strict;
        s.rslora |= self.rslora;
        if s.lr == 0.0 {
            s.lr = s.method.default_lr();
        }
        Ok(s)
    }

    fn only_resume(&self) -> bool {
        let bare = TrainArgs {
            resume: self.resume.clone(),
            interrupt_after: self.interrupt_after,
            quiet: self.quiet,
            ..TrainArgs::default()
        };
        format!("{bare:?}") == format!("{self:?}")
    }
}

/// The settings of a `--config` TOML text (unknown keys refused).
fn parse_config(text: &str) -> Result<Settings> {
    Ok(toml::from_str(text)?)
}

/// The settings with the model and data paths made absolute (canonical), so that `run.toml`
/// means the same files from any working directory (`--resume` reads it from wherever it runs).
fn absolute_paths(mut s: Settings) -> Result<Settings> {
    for (flag, p) in [
        ("--model", &mut s.model),
        ("--data", &mut s.data),
        ("--heldout-data", &mut s.heldout_data),
    ] {
        if !p.is_empty() {
            let abs = std::fs::canonicalize(&*p).with_context(|| format!("{flag} {p}"))?;
            *p = abs
                .to_str()
                .with_context(|| format!("{flag} {p}: the path is not UTF-8"))?
                .to_string();
        }
    }
    Ok(s)
}

fn check(s: &Settings) -> Result<()> {
    let positive = [
        ("steps", s.steps as usize),
        ("batch", s.batch),
        ("grad-accum", s.grad_accum),
        ("checkpoint-every", s.checkpoint_every as usize),
    ];
    for (name, v) in positive {
        if v == 0 {
            bail!("--{name} must be positive");
        }
    }
    if !(s.lr.is_finite() && s.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", s.lr);
    }
    if !(0.0..1.0).contains(&s.lora_dropout) {
        bail!("--lora-dropout must be in [0, 1), got {}", s.lora_dropout);
    }
    // The schedule decays from lr to lr x ratio: outside [0, 1] it would raise the rate or make
    // it negative.
    if !(0.0..=1.0).contains(&s.min_lr_ratio) {
        bail!("--min-lr-ratio must be in [0, 1], got {}", s.min_lr_ratio);
    }
    if !(s.weight_decay.is_finite() && s.weight_decay >= 0.0) {
        bail!(
            "--weight-decay must be 0 or positive, got {}",
            s.weight_decay
        );
    }
    if !(s.max_grad_norm.is_finite() && s.max_grad_norm >= 0.0) {
        bail!(
            "--max-grad-norm must be 0 (no clipping) or positive, got {}",
            s.max_grad_norm
        );
    }
    if !s.alpha.is_finite() {
        bail!("--alpha must be a number, got {}", s.alpha);
    }
    if matches!(s.method, Method::Lora | Method::Qlora) && s.targets.is_empty() {
        bail!(
            "--targets is empty: --method {} would train no parameter (name projections such as \
             q_proj,v_proj)",
            s.method.name()
        );
    }
    Ok(())
}

/// What the settings make the run allocate, checked against the memory budget before any of it
/// is: the trainable tensors with their gradients and AdamW moments (4 f32 each, sized by the
/// method's flag), then one micro-batch of `--batch` sequences of the longest training example
/// (plus `virt` virtual tokens). The error names the flag and its value.
fn check_sizes(
    s: &Settings,
    cfg: &qadapt_train::LlamaConfig,
    train: &[Sequence],
    virt: usize,
) -> Result<()> {
    use qadapt_train::budget;
    let lora = LoraConfig {
        r: s.rank,
        alpha: s.alpha,
        use_rslora: s.rslora,
        dropout: s.lora_dropout,
        target_modules: s.targets.clone(),
    };
    // A size past what the model can use adds parameters and nothing else: refused before the
    // budget is even asked.
    let limit = match s.method {
        Method::Lora | Method::Qlora => Some((
            "--rank",
            s.rank,
            Proj::ALL
                .iter()
                .filter(|&&p| (0..cfg.num_hidden_layers).any(|l| lora.targets(l, p)))
                .map(|p| {
                    let (i, o) = p.dims(cfg);
                    i.min(o)
                })
                .min()
                .unwrap_or(usize::MAX),
            "the smaller side of a targeted projection",
        )),
        Method::Adapter => Some((
            "--bottleneck",
            s.bottleneck,
            cfg.hidden_size,
            "the model's hidden_size",
        )),
        Method::Prefix if s.prefix_mlp > 0 => Some((
            "--prefix-mlp",
            s.prefix_mlp,
            PrefixTuning::<f32>::width(cfg),
            "the width of the prefix it produces (layers x 2 x kv_dim)",
        )),
        _ => None,
    };
    if let Some((flag, v, max, what)) = limit
        && v > max
    {
        bail!("{flag} {v} is larger than {what}, {max}");
    }
    let (flag, params) = match s.method {
        Method::Lora | Method::Qlora => (format!("--rank {}", s.rank), lora.num_params(cfg)),
        Method::Adapter => (
            format!("--bottleneck {}", s.bottleneck),
            HoulsbyConfig {
                bottleneck: s.bottleneck,
                activation: Activation::Relu,
            }
            .num_params(cfg),
        ),
        Method::Prefix if s.prefix_mlp > 0 => (
            format!("--prefix-mlp {}", s.prefix_mlp),
            PrefixMlp::<f32>::num_params(cfg, s.virtual_tokens, s.prefix_mlp),
        ),
        Method::Prefix => (
            format!("--virtual-tokens {}", s.virtual_tokens),
            budget::product(&[s.virtual_tokens, PrefixTuning::<f32>::width(cfg)]),
        ),
        Method::Prompt => (
            format!("--virtual-tokens {}", s.virtual_tokens),
            budget::product(&[s.virtual_tokens, cfg.hidden_size]),
        ),
        Method::Ia3 => (String::from("--method ia3"), Some(0)),
        Method::Full | Method::TopK | Method::Surgical | Method::SurgicalAuto => (
            format!("--method {}", s.method.name()),
            budget::llama_params(cfg),
        ),
    };
    let state = params.and_then(|n| n.checked_mul(16));
    budget::check(
        &format!("{flag}: the trainable tensors, their gradients and AdamW moments"),
        state,
    )
    .map_err(anyhow::Error::msg)?;
    let longest = train.iter().map(|q| q.ids.len()).max().unwrap_or(0);
    let seq = longest.saturating_add(virt);
    budget::check(
        &format!(
            "--batch {} of {seq}-token sequences: the activations (with the trainable state)",
            s.batch
        ),
        budget::activation_bytes(cfg, s.batch, seq, 4)
            .zip(state)
            .and_then(|(a, b)| a.checked_add(b)),
    )
    .map_err(anyhow::Error::msg)
}

/// Token ids through the model's `tokenizer.json`.
struct Tok<'a>(&'a tokenizers::Tokenizer);

impl Tokenize for Tok<'_> {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.0
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }
}

/// bos/eos ids: config.json's `bos_token_id`/`eos_token_id`, else the tokenizer's `<s>`/`</s>`.
fn framing(dir: &Path, tok: &tokenizers::Tokenizer) -> Framing {
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let id = |key: &str, token: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(key))
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .map(|v| v as u32)
            .or_else(|| tok.token_to_id(token))
    };
    Framing {
        bos: id("bos_token_id", "<s>"),
        eos: id("eos_token_id", "</s>"),
    }
}

/// Loaded and tokenized data.
struct Data {
    train: Vec<Sequence>,
    heldout: Vec<Sequence>,
    /// Whether the examples are prompt/completion (exact match means something).
    completions: bool,
}

fn read_examples(path: &Path, strict: bool, quiet: bool) -> Result<Vec<Example>> {
    let strictness = if strict {
        Strictness::Strict
    } else {
        Strictness::Skip
    };
    let loaded = dataset::load(path, strictness)?;
    if !loaded.skipped.is_empty() {
        for s in loaded.skipped.iter().take(5) {
            eprintln!(
                "warning: {}:{}: {} (skipped)",
                path.display(),
                s.line,
                s.reason
            );
        }
        if !quiet || loaded.skipped.len() > 5 {
            eprintln!(
                "warning: {}: {} malformed line(s) skipped (--strict stops at the first)",
                path.display(),
                loaded.skipped.len()
            );
        }
    }
    Ok(loaded.examples)
}

fn tokenize_all(
    what: &str,
    examples: &[Example],
    tok: &tokenizers::Tokenizer,
    framing: Framing,
    max_len: usize,
) -> Result<Vec<Sequence>> {
    let (seqs, stats) = dataset::tokenize(examples, &Tok(tok), framing, max_len, Overlong::Skip)?;
    if stats.dropped > 0 {
        eprintln!(
            "warning: {what}: {} example(s) longer than {max_len} tokens (or with nothing to \
             learn) skipped",
            stats.dropped
        );
    }
    if seqs.is_empty() {
        bail!("{what}: no usable example (all {} skipped)", examples.len());
    }
    Ok(seqs)
}

fn load_data(
    s: &Settings,
    model_dir: &Path,
    tok: &tokenizers::Tokenizer,
    max_len: usize,
    quiet: bool,
) -> Result<Data> {
    let fr = framing(model_dir, tok);
    let (train_ex, held_ex) = if s.data.is_empty() {
        let dir = crate::assets::task_dir()?;
        (
            read_examples(&dir.join("train.jsonl"), s.strict, quiet)?,
            read_examples(&dir.join("heldout.jsonl"), s.strict, quiet)?,
        )
    } else {
        let all = read_examples(Path::new(&s.data), s.strict, quiet)?;
        if s.heldout_data.is_empty() {
            if all.len() < 2 {
                bail!(
                    "{}: {} example(s); need at least 2 to hold one out (or give --heldout-data)",
                    s.data,
                    all.len()
                );
            }
            let n = s.heldout.min(all.len() / 5).max(1);
            let (t, h) = dataset::split_heldout(&all, n, s.seed);
            (t, h)
        } else {
            (
                all,
                read_examples(Path::new(&s.heldout_data), s.strict, quiet)?,
            )
        }
    };
    let completions = train_ex
        .iter()
        .all(|e| matches!(e, Example::PromptCompletion { .. }));
    Ok(Data {
        train: tokenize_all("training data", &train_ex, tok, fr, max_len)?,
        heldout: tokenize_all("held-out data", &held_ex, tok, fr, max_len)?,
        completions,
    })
}

/// The method's trainable state.
enum State {
    Adapter(Adapter<f32>),
    Base(Selection),
}

fn build(s: &Settings, model: &Llama<f32>, tok: &tokenizers::Tokenizer) -> Result<State> {
    let cfg = &model.config;
    Ok(match s.method {
        Method::Full | Method::SurgicalAuto | Method::Surgical => State::Base(Selection::Full),
        Method::TopK => State::Base(Selection::TopK(s.top_k)),
        Method::Lora | Method::Qlora => State::Adapter(Adapter::Lora(LoraAdapter::new(
            cfg,
            LoraConfig {
                r: s.rank,
                alpha: s.alpha,
                use_rslora: s.rslora,
                dropout: s.lora_dropout,
                target_modules: s.targets.clone(),
            },
            LoraInit::Peft { seed: s.seed },
        )?)),
        Method::Ia3 => State::Adapter(Adapter::Ia3(Ia3Adapter::new(
            cfg,
            Ia3Config {
                target_modules: ["k_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
                feedforward_modules: vec!["down_proj".into()],
            },
            true,
        )?)),
        Method::Prompt => {
            let init = match s.prompt_init.as_str() {
                "random" => PromptInit::Random {
                    seed: s.seed,
                    scale: 0.5,
                },
                "vocab" => {
                    // Embeddings of random vocabulary tokens (PEFT's "SAMPLE_VOCAB").
                    let mut st = s.seed ^ 0x5EED;
                    PromptInit::FromTokens(
                        (0..s.virtual_tokens)
                            .map(|_| {
                                st = st
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                ((st >> 33) % cfg.vocab_size as u64) as u32
                            })
                            .collect(),
                    )
                }
                t => match t.strip_prefix("text:") {
                    Some(text) => PromptInit::from_text(tok, text)?,
                    None => bail!("--prompt-init {t:?}: use random, vocab or text:WORDS"),
                },
            };
            State::Adapter(Adapter::Prompt(PromptTuning::new(
                cfg,
                &model.weights.embed_tokens,
                s.virtual_tokens,
                &init,
            )?))
        }
        Method::Prefix if s.prefix_mlp > 0 => State::Adapter(Adapter::PrefixMlp(PrefixMlp::new(
            cfg,
            s.virtual_tokens,
            s.prefix_mlp,
            s.seed,
            0.5,
        )?)),
        Method::Prefix => State::Adapter(Adapter::Prefix(PrefixTuning::new(
            cfg,
            s.virtual_tokens,
            s.seed,
            0.5,
        )?)),
        Method::Adapter => State::Adapter(Adapter::Houlsby(HoulsbyAdapter::new(
            cfg,
            HoulsbyConfig {
                bottleneck: s.bottleneck,
                activation: Activation::Relu,
            },
            1e-3,
            s.seed,
        )?)),
    })
}

/// Copies the adapter trained on the device (its f32 masters) into `state`, where the CPU
/// evaluation, the checkpoint and the PEFT writer read it.
fn download_adapter(gpu: Option<&LoraModel<CudaBackend>>, state: &mut State) -> Result<()> {
    if let (Some(g), State::Adapter(a)) = (gpu, state) {
        *a = Adapter::Lora(g.adapter()?);
    }
    Ok(())
}

impl State {
    fn trainable(&mut self) -> Trainable<'_> {
        match self {
            State::Adapter(a) => Trainable::Adapter(a),
            State::Base(sel) => Trainable::Base(*sel),
        }
    }

    fn adapter(&self) -> Option<&Adapter<f32>> {
        match self {
            State::Adapter(a) => Some(a),
            State::Base(_) => None,
        }
    }
}

/// The checkpoint's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    epoch: u64,
    cursor: usize,
    elapsed_s: f64,
    tokens: u64,
    /// The trainer's own step count (surgical restarts it for each layer group).
    trainer_steps: u64,
    /// Surgical: the group being trained and the best so far.
    #[serde(default)]
    extra: serde_json::Value,
}

fn save_checkpoint(
    out: &Path,
    st: &CheckpointState,
    values: &[&[f32]],
    moments: &[(Vec<f32>, Vec<f32>)],
    extra: &[(String, &[f32])],
) -> Result<()> {
    let f32s = |name: String, v: &[f32]| OnDiskTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape: vec![v.len()],
        data: bytemuck::cast_slice(v).to_vec(),
    };
    let mut tensors = Vec::new();
    for (i, v) in values.iter().enumerate() {
        tensors.push(f32s(format!("param.{i}"), v));
    }
    for (i, (m, v)) in moments.iter().enumerate() {
        tensors.push(f32s(format!("m.{i}"), m));
        tensors.push(f32s(format!("v.{i}"), v));
    }
    for (name, v) in extra {
        tensors.push(f32s(name.clone(), v));
    }
    replace_directory(&out.join("checkpoint"), |tmp| {
        write_safetensors(&tmp.join("tensors.safetensors"), &tensors, None)?;
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(st)?)?;
        Ok(())
    })
}

/// A checkpoint: its state, the trainable tensors, the AdamW moments, and every tensor by name
/// (for the method's own extras).
type Restored = (
    CheckpointState,
    Vec<Vec<f32>>,
    Vec<(Vec<f32>, Vec<f32>)>,
    std::collections::HashMap<String, Vec<f32>>,
);

fn load_checkpoint(out: &Path) -> Result<Restored> {
    let dir = out.join("checkpoint");
    let st: CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("{}: no checkpoint to resume from", out.display()))?,
    )
    .with_context(|| format!("{}", dir.join("state.json").display()))?;
    let path = dir.join("tensors.safetensors");
    let (bytes, _) = read_safetensors(&path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let get = |name: String| -> Option<Vec<f32>> {
        file.tensor(&name)
            .ok()
            .map(|t| bytemuck::pod_collect_to_vec(t.data()))
    };
    let params: Vec<Vec<f32>> = (0..).map_while(|i| get(format!("param.{i}"))).collect();
    let moments = (0..)
        .map_while(|i| Some((get(format!("m.{i}"))?, get(format!("v.{i}"))?)))
        .collect();
    let all = file
        .names()
        .into_iter()
        .filter_map(|n| Some((n.to_string(), get(n.to_string())?)))
        .collect();
    Ok((st, params, moments, all))
}

/// Appends JSON lines to `log.jsonl`.
struct Log(std::fs::File);

impl Log {
    fn open(out: &Path, keep_until: Option<u64>) -> Result<Log> {
        let path = out.join("log.jsonl");
        if let Some(step) = keep_until {
            // A resumed run replays from its checkpoint: drop what came after it.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_file(&path, |f| Ok(f.write_all(kept.as_bytes())?))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Log(f))
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{v}")?;
        Ok(())
    }
}

/// Losses per step from `log.jsonl` (for the plot).
pub(crate) fn read_losses(out: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_f64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub(crate) fn peak_rss() -> Option<u64> {
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

fn metric_line(h: &Heldout, completions: bool) -> String {
    if completions {
        format!(
            "exact match {:.1}% ({}/{}), held-out loss {:.4}",
            100.0 * h.accuracy(),
            h.exact,
            h.total,
            h.loss
        )
    } else {
        format!(
            "held-out loss {:.4}, perplexity {:.2}",
            h.loss,
            h.perplexity()
        )
    }
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) method: String,
    pub(crate) trainable_params: usize,
    pub(crate) total_params: usize,
    pub(crate) peak_rss_bytes: Option<u64>,
    pub(crate) steps: u64,
    pub(crate) mean_step_s: f64,
    pub(crate) tokens_per_s: f64,
    pub(crate) final_train_loss: f64,
    pub(crate) completions: bool,
    pub(crate) before_loss: f64,
    pub(crate) before_accuracy: f64,
    pub(crate) after_loss: f64,
    pub(crate) after_accuracy: f64,
    pub(crate) saved_bytes: u64,
    pub(crate) saved: String,
}

pub(crate) fn run(a: &TrainArgs) -> Result<()> {
    let (s, out, resuming) = match &a.resume {
        Some(dir) => {
            if !a.only_resume() {
                bail!("--resume takes the settings of the run it continues; give no other option");
            }
            let p = dir.join("run.toml");
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!("{}: not a qadapt train output directory", dir.display())
            })?;
            let s: Settings = toml::from_str(&text).with_context(|| format!("{}", p.display()))?;
            (s, dir.clone(), true)
        }
        None => {
            let s = a.settings()?;
            let out = a.output.clone().unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                PathBuf::from("runs").join(format!("{}-{t}", s.method.name()))
            });
            (s, out, false)
        }
    };
    check(&s)?;
    // --device cuda: LoRA and QLoRA train on the mixed-precision path (qadapt_train::cuda);
    // every other method runs on the CPU only. The settings are checked before the device is
    // opened, so a refused method says so on any machine.
    let gpu_backend = if s.device != "cpu" {
        if !matches!(s.method, Method::Lora | Method::Qlora) {
            bail!(
                "--device {} trains --method lora and --method qlora only; --method {} runs on \
                 --device cpu",
                s.device,
                s.method.name()
            );
        }
        match qadapt::Device::parse(&s.device)? {
            qadapt::Device::Cuda(dev) => Some(CudaBackend::new(dev)?),
            qadapt::Device::Cpu => None,
        }
    } else {
        None
    };
    let s = if resuming {
        recover_directory(&out.join("checkpoint"))?;
        for name in ["adapter", "model", "log.jsonl", "loss.png", "summary.json"] {
            remove_temporaries(&out.join(name))?;
        }
        crate::inputs::Inputs::read(&out)?.check_unchanged()?;
        s
    } else {
        if std::fs::symlink_metadata(&out).is_ok() {
            bail!(
                "{} already exists; choose another --output, or --resume {} to continue it",
                out.display(),
                out.display()
            );
        }
        let s = absolute_paths(s)?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        s
    };
    // A new run's directory is made once every input has been read and checked (below), so a
    // refused run leaves nothing; the inputs are fingerprinted as they are now.
    let new_run = if resuming {
        None
    } else {
        Some(crate::inputs::Inputs::of(
            &s.model,
            &[&s.data, &s.heldout_data],
        )?)
    };
    let model_dir = if s.model.is_empty() {
        crate::assets::model_dir()?
    } else {
        PathBuf::from(&s.model)
    };
    let dir = LlamaDir::open(&model_dir)?;
    let tok = dir.tokenizer.as_ref().with_context(|| {
        format!(
            "{}: no tokenizer.json (qadapt train needs the model's tokenizer)",
            model_dir.display()
        )
    })?;
    let mut model = dir.model()?;
    // QLoRA: the CPU model runs on the dequantized codes, the device on the codes themselves (a
    // bitsandbytes checkpoint's own where it stores them).
    let nf4 = if s.method == Method::Qlora {
        Some(qadapt_train::nf4::quantize_projections(
            &mut model.weights,
            &dir.config,
            &dir.nf4,
        )?)
    } else {
        None
    };
    let ctx = dir.config.max_position_embeddings;
    let virt = if matches!(s.method, Method::Prompt | Method::Prefix) {
        s.virtual_tokens
    } else {
        0
    };
    let max_len = if s.max_len == 0 {
        ctx
    } else {
        s.max_len.min(ctx)
    };
    if max_len <= virt.saturating_add(1) {
        bail!("the context ({max_len} tokens) leaves no room after {virt} virtual tokens");
    }
    let mut data = load_data(&s, &model_dir, tok, max_len - virt, a.quiet)?;
    check_sizes(&s, &dir.config, &data.train, virt)?;
    let pad = 0;
    let mut state = build(&s, &model, tok)?;
    // Surgical fine-tuning changes the trainable group as it goes; its count is the model's.
    let total_params = Selection::Full.num_params(&dir.config);
    let trainable_params = state.trainable().num_params(&model)?;
    let before = heldout(&model, None, &data.heldout, 32, pad)?;
    let say = |msg: String| {
        if !a.quiet {
            eprintln!("{msg}");
        }
    };
    say(format!(
        "{}: {} on {} ({} training / {} held-out examples), {} trainable parameters ({:.3}% of \
         {})",
        out.display(),
        s.method.name(),
        if s.model.is_empty() {
            "the embedded model".to_string()
        } else {
            model_dir.display().to_string()
        },
        data.train.len(),
        data.heldout.len(),
        trainable_params,
        100.0 * trainable_params as f64 / total_params as f64,
        total_params
    ));
    if let Some(be) = &gpu_backend {
        say(format!(
            "training on {} (bf16 compute, {} base, f32 LoRA masters)",
            be.device().describe(),
            if s.method == Method::Qlora {
                "NF4"
            } else {
                "bf16"
            }
        ));
    }
    say(format!(
        "before: {}",
        metric_line(&before, data.completions)
    ));

    let new_trainer = || {
        let mut t = Trainer::new(
            AdamW {
                lr: s.lr,
                weight_decay: s.weight_decay,
                ..AdamW::default()
            },
            (s.max_grad_norm > 0.0).then_some(s.max_grad_norm),
        );
        if matches!(s.method, Method::Lora | Method::Qlora) && s.lora_dropout > 0.0 {
            t.dropout_seed = Some(s.seed);
        }
        t
    };
    let mut trainer = new_trainer();
    let mut surgery = Surgery::new(&s, &model, &mut data.train)?;
    let total_steps = surgery.total_steps(s.steps);
    if let Surgery::Manual { groups, per, .. } = &surgery {
        say(format!(
            "surgical: {} layer groups ({}), {per} steps each, validation on {} training \
             examples held back",
            groups.len(),
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            surgery.val_len()
        ));
        state = State::Base(Selection::Group(groups[0]));
    }
    // Manual surgery restarts the schedule with each group's fresh trainer.
    let sched = CosineSchedule {
        base_lr: s.lr,
        min_lr: s.lr * s.min_lr_ratio,
        warmup_steps: s.warmup.min(surgery.phase_steps(total_steps) / 5),
        total_steps: surgery.phase_steps(total_steps),
    };
    let mut sampler = Sampler::new(data.train.len(), s.seed)?;
    let mut ck = CheckpointState {
        step: 0,
        epoch: 0,
        cursor: 0,
        elapsed_s: 0.0,
        tokens: 0,
        trainer_steps: 0,
        extra: serde_json::Value::Null,
    };
    if resuming && out.join("checkpoint").exists() {
        let (st, params, moments, all) = load_checkpoint(&out)?;
        surgery.restore(&st.extra, &all, &mut state)?;
        restore_values(&mut state, &surgery, &mut model, &params)?;
        trainer.restore(st.trainer_steps, moments);
        sampler.seek(st.epoch, st.cursor)?;
        say(format!("resuming at step {} of {total_steps}", st.step));
        ck = st;
    }
    // --device cuda: the model goes to the device with the adapter (a resumed run's), the step
    // count and the moments (none for a new run). The CPU model (NF4 round trip for QLoRA) still
    // evaluates the held-out set, with the adapter downloaded from the device before each
    // evaluation, checkpoint and the final save.
    let mut gpu = match (gpu_backend, state.adapter()) {
        (Some(be), Some(Adapter::Lora(a))) => {
            let (base, placement) = match &nf4 {
                Some(codes) => (BaseFormat::Nf4(codes), MomentPlacement::Paged),
                None => (BaseFormat::Dense, MomentPlacement::Device),
            };
            let mut g = LoraModel::new(be, &model, base, a, placement)?;
            g.restore(trainer.steps(), trainer.moments())?;
            if let Some(seed) = trainer.dropout_seed {
                g.set_dropout_seed(seed);
            }
            Some(g)
        }
        (Some(_), _) => bail!("--device cuda needs a LoRA adapter"),
        (None, _) => None,
    };
    drop(nf4);
    if let Some(inputs) = new_run {
        remove_temporaries(&out)?;
        new_directory(&out, |tmp| {
            std::fs::write(tmp.join("run.toml"), toml::to_string(&s)?)?;
            inputs.write(tmp)
        })?;
    }
    let mut log = Log::open(&out, resuming.then_some(ck.step))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C: finish the step in flight, checkpoint, exit. A second Ctrl-C kills.
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let mut bar = crate::progress::Progress::new(total_steps, s.method.name(), a.quiet);
    bar.set_position(ck.step);
    let t_run = Instant::now();
    let elapsed0 = ck.elapsed_s;
    let mut last_loss = f64::NAN;
    let mut step_times = Vec::new();
    let mut interrupted = false;
    while ck.step < total_steps {
        if stop.load(Ordering::SeqCst) || a.interrupt_after.is_some_and(|n| ck.step >= n) {
            interrupted = true;
            break;
        }
        let t0 = Instant::now();
        surgery.before_step(&s, ck.step, &model, &data.train, pad)?;
        let mut what = state.trainable();
        let mut bad = None;
        let mut seen = 0usize;
        for _ in 0..s.grad_accum {
            let idx = sampler.take(s.batch);
            let refs: Vec<&Sequence> = idx.iter().map(|&i| &data.train[i]).collect();
            seen += refs.iter().map(|r| r.ids.len()).sum::<usize>();
            let b = pack(&refs, pad)?;
            let l = match gpu.as_mut() {
                Some(g) => g.accumulate(&b)?,
                None => trainer.accumulate(&model, &what, &b)?,
            };
            if !l.is_finite() {
                bad = Some(l);
            }
        }
        if let Some(l) = bad {
            bar.abandon();
            bail!(
                "the loss is {l} at step {}: stopping (lower --lr?); the last good checkpoint is \
                 {} (step {})",
                ck.step + 1,
                out.join("checkpoint").display(),
                if out.join("checkpoint").exists() {
                    load_checkpoint(&out).map(|c| c.0.step).unwrap_or(0)
                } else {
                    0
                }
            );
        }
        let st = match gpu.as_mut() {
            Some(g) => {
                let lr = sched.lr(g.steps() + 1);
                (g.apply(&trainer.opt, trainer.max_grad_norm, lr)?, lr)
            }
            None => {
                let lr = sched.lr(trainer.steps() + 1);
                (
                    trainer.apply(&mut model, &mut what, lr, surgery.lr_scales())?,
                    lr,
                )
            }
        };
        let (st, lr) = st;
        ck.step += 1;
        ck.tokens += seen as u64;
        let (epoch, cursor) = sampler.position();
        ck.epoch = epoch;
        ck.cursor = cursor;
        let dt = t0.elapsed().as_secs_f64();
        step_times.push(dt);
        ck.elapsed_s = elapsed0 + t_run.elapsed().as_secs_f64();
        last_loss = f64::from(st.loss);
        log.write(serde_json::json!({
            "step": ck.step,
            "loss": st.loss,
            "lr": lr,
            "grad_norm": st.grad_norm,
            "tokens": seen,
            "target_tokens": st.tokens,
            "tokens_per_s": seen as f64 / dt,
            "elapsed_s": ck.elapsed_s,
        }))?;
        bar.set_message(format!("loss {:.4} {:.0} tok/s", st.loss, seen as f64 / dt));
        bar.inc();
        if let Some(report) = surgery.after_step(ck.step, &mut model, &mut state, pad)? {
            trainer = new_trainer();
            log.write(report)?;
        }
        ck.trainer_steps = gpu.as_ref().map_or(trainer.steps(), |g| g.steps());
        let evaluate =
            s.eval_every > 0 && ck.step.is_multiple_of(s.eval_every) && ck.step < total_steps;
        if evaluate || ck.step.is_multiple_of(s.checkpoint_every) || ck.step == total_steps {
            download_adapter(gpu.as_ref(), &mut state)?;
        }
        if evaluate {
            let h = heldout(&model, state.adapter(), &data.heldout, 32, pad)?;
            log.write(serde_json::json!({
                "step": ck.step, "eval_loss": h.loss, "eval_accuracy": h.accuracy()
            }))?;
        }
        if ck.step.is_multiple_of(s.checkpoint_every) || ck.step == total_steps {
            checkpoint(
                &out,
                &mut ck,
                &mut state,
                &surgery,
                &model,
                &trainer,
                gpu.as_ref(),
            )?;
        }
    }
    if interrupted {
        download_adapter(gpu.as_ref(), &mut state)?;
        checkpoint(
            &out,
            &mut ck,
            &mut state,
            &surgery,
            &model,
            &trainer,
            gpu.as_ref(),
        )?;
        bar.abandon();
        eprintln!(
            "interrupted at step {} of {}: checkpoint saved; continue with `qadapt train --resume \
             {}`",
            ck.step,
            total_steps,
            out.display()
        );
        return Ok(());
    }
    bar.finish();
    download_adapter(gpu.as_ref(), &mut state)?;
    let after = heldout(&model, state.adapter(), &data.heldout, 32, pad)?;
    log.write(serde_json::json!({
        "step": ck.step, "eval_loss": after.loss, "eval_accuracy": after.accuracy()
    }))?;
    let saved = match &state {
        State::Adapter(ad) => {
            let p = out.join("adapter");
            replace_directory(&p, |tmp| Ok(ad.save(tmp, &model.config)?))?;
            p
        }
        State::Base(_) => {
            let p = out.join("model");
            replace_directory(&p, |tmp| {
                crate::pretrain::write_model_files(
                    tmp,
                    &model,
                    qadapt::DType::F32,
                    Some(&model_dir),
                )
            })?;
            p
        }
    };
    let losses = read_losses(&out);
    crate::plot::write_png(
        &out.join("loss.png"),
        &crate::plot::Plot {
            title: &format!("qadapt train --method {}", s.method.name()),
            x_label: "step",
            y_label: "training loss",
            log_y: false,
        },
        &[crate::plot::Series {
            name: s.method.name().to_string(),
            points: losses,
        }],
    )?;
    let mean_step = if step_times.is_empty() {
        0.0
    } else {
        step_times.iter().sum::<f64>() / step_times.len() as f64
    };
    // Manual surgery ends with its kept group as the state.
    let trainable_params = state.trainable().num_params(&model)?;
    if let Surgery::Manual {
        groups,
        best: Some((b, v)),
        per,
        ..
    } = &surgery
    {
        // The kept group's last training loss, not the last group's.
        let end = (*b as u64 + 1) * per;
        if let Some(&(_, l)) = read_losses(&out).iter().find(|(st, _)| *st as u64 == end) {
            last_loss = l;
        }
        say(format!(
            "surgical: kept {} ({} parameters, validation loss {v:.4})",
            groups[*b], trainable_params
        ));
    }
    let summary = Summary {
        method: s.method.name().to_string(),
        trainable_params,
        total_params,
        peak_rss_bytes: peak_rss(),
        steps: ck.step,
        mean_step_s: mean_step,
        tokens_per_s: ck.tokens as f64 / ck.elapsed_s.max(1e-9),
        final_train_loss: last_loss,
        completions: data.completions,
        before_loss: before.loss,
        before_accuracy: before.accuracy(),
        after_loss: after.loss,
        after_accuracy: after.accuracy(),
        saved_bytes: dir_size(&saved),
        saved: saved.to_string_lossy().into_owned(),
    };
    let json = serde_json::to_string_pretty(&summary)?;
    write_file(&out.join("summary.json"), |f| {
        Ok(f.write_all(json.as_bytes())?)
    })?;
    say(format!("after:  {}", metric_line(&after, data.completions)));
    say(format!(
        "{} steps in {:.1}s ({:.0} tokens/s); wrote {} ({} bytes), log.jsonl, loss.png",
        ck.step,
        ck.elapsed_s,
        summary.tokens_per_s,
        saved.display(),
        summary.saved_bytes
    ));
    Ok(())
}

/// Puts checkpointed tensors back into the adapter or the base.
fn restore_values(
    state: &mut State,
    surgery: &Surgery,
    model: &mut Llama<f32>,
    params: &[Vec<f32>],
) -> Result<()> {
    let mut what = match state {
        State::Adapter(a) => Trainable::Adapter(a),
        State::Base(sel) => Trainable::Base(surgery.checkpointed(*sel)),
    };
    let slots = what.params_mut(model)?;
    if slots.len() != params.len() || slots.iter().zip(params).any(|(s, p)| s.len() != p.len()) {
        bail!("the checkpoint's tensors do not match this run's method and model");
    }
    for (s, p) in slots.into_iter().zip(params) {
        s.copy_from_slice(p);
    }
    Ok(())
}

/// Writes the checkpoint of the run's current state: the step count and AdamW moments are the
/// device's on `--device cuda` (in the CPU trainer's layout, so either path can resume it), the
/// trainer's otherwise.
fn checkpoint(
    out: &Path,
    ck: &mut CheckpointState,
    state: &mut State,
    surgery: &Surgery,
    model: &Llama<f32>,
    trainer: &Trainer,
    gpu: Option<&LoraModel<CudaBackend>>,
) -> Result<()> {
    let device_moments;
    let moments = match gpu {
        Some(g) => {
            ck.trainer_steps = g.steps();
            device_moments = g.moments()?;
            &device_moments[..]
        }
        None => {
            ck.trainer_steps = trainer.steps();
            trainer.moments()
        }
    };
    ck.extra = surgery.state_json();
    let what = match state {
        State::Base(sel) => Trainable::Base(surgery.checkpointed(*sel)),
        State::Adapter(a) => Trainable::Adapter(a),
    };
    save_checkpoint(out, ck, &what.values(model)?, moments, &surgery.tensors())
}

/// Surgical fine-tuning's state beyond the trainer's.
enum Surgery {
    /// Not a surgical method.
    Off,
    /// Manual: each layer group trains alone for `per` steps from the same start; the one with
    /// the lowest validation loss is kept.
    Manual {
        groups: Vec<LayerGroup>,
        per: u64,
        phase: usize,
        /// Every base tensor at the start (each group restarts from it).
        start: Vec<Vec<f32>>,
        /// Validation sequences, held back from the training data.
        val: Vec<Sequence>,
        /// The best group so far, its validation loss and its trained tensors.
        best: Option<(usize, f64)>,
        best_values: Vec<Vec<f32>>,
    },
    /// Automatic (Auto-RGN): per-tensor learning-rate scales from relative gradient norms,
    /// refreshed at the start of each epoch on `rgn_batches` batches of its own draw.
    Auto {
        rgn: AutoRgn,
        scales: Option<Vec<f32>>,
        per_epoch: u64,
    },
}

impl Surgery {
    fn new(s: &Settings, model: &Llama<f32>, train: &mut Vec<Sequence>) -> Result<Surgery> {
        let steps_per_epoch = |n: usize| (n as u64).div_ceil((s.batch * s.grad_accum) as u64);
        Ok(match s.method {
            Method::Surgical => {
                let groups = LayerGroup::partition(&model.config, s.group_size.max(1))?;
                let per = s.steps / groups.len() as u64;
                if per == 0 {
                    bail!(
                        "--steps {} is fewer than the {} layer groups surgical fine-tuning tries",
                        s.steps,
                        groups.len()
                    );
                }
                let n_val = (train.len() / 10).clamp(1, 200);
                if train.len() < n_val + 1 {
                    bail!("surgical fine-tuning needs at least 2 training examples");
                }
                let (t, v) = dataset::split_heldout(train, n_val, s.seed ^ 0x5A5A);
                *train = t;
                Surgery::Manual {
                    groups,
                    per,
                    phase: 0,
                    start: model.weights.slots().into_iter().cloned().collect(),
                    val: v,
                    best: None,
                    best_values: Vec::new(),
                }
            }
            Method::SurgicalAuto => Surgery::Auto {
                rgn: AutoRgn::new(s.rgn_batches),
                scales: None,
                per_epoch: steps_per_epoch(train.len()).max(1),
            },
            _ => Surgery::Off,
        })
    }

    fn total_steps(&self, steps: u64) -> u64 {
        match self {
            Surgery::Manual { groups, per, .. } => per * groups.len() as u64,
            _ => steps,
        }
    }

    /// Steps under one schedule: a group's for manual surgery, else the run's.
    fn phase_steps(&self, total: u64) -> u64 {
        match self {
            Surgery::Manual { per, .. } => *per,
            _ => total,
        }
    }

    fn val_len(&self) -> usize {
        match self {
            Surgery::Manual { val, .. } => val.len(),
            _ => 0,
        }
    }

    /// What a checkpoint stores of the base: every tensor under manual surgery (the finished
    /// groups were restored, the current one is training), else the selection.
    fn checkpointed(&self, sel: Selection) -> Selection {
        match self {
            Surgery::Manual { .. } => Selection::Full,
            _ => sel,
        }
    }

    fn lr_scales(&self) -> Option<&[f32]> {
        match self {
            Surgery::Auto { scales, .. } => scales.as_deref(),
            _ => None,
        }
    }

    /// Auto-RGN: fresh scales at the start of each epoch (and of a resumed run without them).
    fn before_step(
        &mut self,
        s: &Settings,
        step: u64,
        model: &Llama<f32>,
        train: &[Sequence],
        pad: u32,
    ) -> Result<()> {
        let Surgery::Auto {
            rgn,
            scales,
            per_epoch,
        } = self
        else {
            return Ok(());
        };
        if scales.is_some() && !step.is_multiple_of(*per_epoch) {
            return Ok(());
        }
        let epoch = step / *per_epoch;
        let mut draw = Sampler::new(train.len(), s.seed ^ 0xA1 ^ epoch.wrapping_mul(0x9E37))?;
        let batches = (0..rgn.batches)
            .map(|_| {
                let idx = draw.take(s.batch);
                let refs: Vec<&Sequence> = idx.iter().map(|&i| &train[i]).collect();
                pack(&refs, pad)
            })
            .collect::<qadapt::Result<Vec<_>>>()?;
        let what = Trainable::Base(Selection::Full);
        *scales = Some(rgn.refresh(model, &what, &batches)?.to_vec());
        Ok(())
    }

    /// Manual surgery at the end of a group's steps: validation loss, keep the best, restore
    /// the start, move to the next group (or, after the last, install the best). Returns the
    /// log line when a group ended (the caller then starts a fresh trainer).
    fn after_step(
        &mut self,
        step: u64,
        model: &mut Llama<f32>,
        state: &mut State,
        pad: u32,
    ) -> Result<Option<serde_json::Value>> {
        let Surgery::Manual {
            groups,
            per,
            phase,
            start,
            val,
            best,
            best_values,
        } = self
        else {
            return Ok(None);
        };
        if !step.is_multiple_of(*per) {
            return Ok(None);
        }
        let group = groups[*phase];
        let mask = Selection::Group(group).mask(&model.config)?;
        let v = heldout(model, None, val, 32, pad)?.loss;
        if v.is_finite() && best.is_none_or(|(_, b)| v < b) {
            *best = Some((*phase, v));
            *best_values = model
                .weights
                .slots()
                .into_iter()
                .zip(&mask)
                .filter(|(_, m)| **m)
                .map(|(t, _)| t.clone())
                .collect();
        }
        for ((dst, src), m) in model
            .weights
            .slots_mut()
            .into_iter()
            .zip(start.iter())
            .zip(&mask)
        {
            if *m {
                dst.copy_from_slice(src);
            }
        }
        let line = serde_json::json!({
            "step": step,
            "group": group.to_string(),
            "params": Selection::Group(group).num_params(&model.config),
            "val_loss": v,
        });
        *phase += 1;
        if *phase < groups.len() {
            *state = State::Base(Selection::Group(groups[*phase]));
        } else {
            let (b, _) = best.context("no layer group reached a finite validation loss")?;
            let bmask = Selection::Group(groups[b]).mask(&model.config)?;
            let slots = model.weights.slots_mut().into_iter().zip(&bmask);
            for (dst, src) in slots
                .filter(|(_, m)| **m)
                .map(|(d, _)| d)
                .zip(best_values.iter())
            {
                dst.copy_from_slice(src);
            }
            *state = State::Base(Selection::Group(groups[b]));
        }
        Ok(Some(line))
    }

    fn state_json(&self) -> serde_json::Value {
        match self {
            Surgery::Manual { phase, best, .. } => serde_json::json!({
                "phase": phase,
                "best": best.map(|(i, v)| serde_json::json!([i, v])),
            }),
            _ => serde_json::Value::Null,
        }
    }

    fn tensors(&self) -> Vec<(String, &[f32])> {
        match self {
            Surgery::Manual { best_values, .. } => best_values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("best.{i}"), v.as_slice()))
                .collect(),
            Surgery::Auto { scales, .. } => scales
                .iter()
                .map(|v| ("rgn_scales".to_string(), v.as_slice()))
                .collect(),
            Surgery::Off => Vec::new(),
        }
    }

    fn restore(
        &mut self,
        extra: &serde_json::Value,
        all: &std::collections::HashMap<String, Vec<f32>>,
        state: &mut State,
    ) -> Result<()> {
        match self {
            Surgery::Manual {
                groups,
                phase,
                best,
                best_values,
                ..
            } => {
                let p = extra
                    .get("phase")
                    .and_then(|p| p.as_u64())
                    .context("the checkpoint has no surgical phase")?
                    as usize;
                if p > groups.len() {
                    bail!("the checkpoint's surgical phase {p} is out of range");
                }
                *phase = p;
                *best = extra
                    .get("best")
                    .and_then(|b| Some((b.get(0)?.as_u64()? as usize, b.get(1)?.as_f64()?)));
                *best_values = (0..)
                    .map_while(|i| all.get(&format!("best.{i}")).cloned())
                    .collect();
                let g = match best {
                    Some((b, _)) if p == groups.len() => groups[*b],
                    _ => groups[p.min(groups.len() - 1)],
                };
                *state = State::Base(Selection::Group(g));
            }
            Surgery::Auto { scales, .. } => *scales = all.get("rgn_scales").cloned(),
            Surgery::Off => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    /// What `--config FILE` goes through before any other file is read: the TOML, the default
    /// learning rate, the checks.
    fn config_text(text: &str) -> Result<Settings> {
        let mut s = parse_config(text)?;
        if s.lr == 0.0 {
            s.lr = s.method.default_lr();
        }
        check(&s)?;
        Ok(s)
    }

    /// The TOML settings are not a libFuzzer target (they live in this binary): the committed
    /// corpus (`tests/fuzz/corpus/toml_config`) and 20 000 seeded mutations of it, with edits
    /// aimed at the values (huge, negative, non-finite numbers, wrong types), must give settings
    /// or an error, never a panic.
    #[test]
    fn toml_settings_survive_the_corpus_and_its_mutations() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz/corpus/toml_config");
        let corpus: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        assert!(corpus.len() >= 3);
        let run_toml = corpus.iter().filter(|t| config_text(t).is_ok()).count();
        assert!(run_toml >= 3, "the seeds are valid settings");
        const VALUES: [&str; 12] = [
            "18446744073709551616",
            "18446744073709551615",
            "-1",
            "0",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "\"\"",
            "[]",
            "{}",
            "true",
        ];
        let mut rng = SmallRng::seed_from_u64(12);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut text = corpus[rng.random_range(0..corpus.len())]
                .clone()
                .into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=text.len());
                match rng.random_range(0..4) {
                    // A value replaced after some `=`.
                    0 => {
                        if let Some(eq) = text[..at].iter().rposition(|&b| b == b'=') {
                            let end = text[eq..]
                                .iter()
                                .position(|&b| b == b'\n')
                                .map_or(text.len(), |n| eq + n);
                            let v = format!(" {}", VALUES[rng.random_range(0..VALUES.len())]);
                            text.splice(eq + 1..end, v.into_bytes());
                        }
                    }
                    1 => text.insert(at, rng.random()),
                    2 => {
                        let end = (at + rng.random_range(0..8)).min(text.len());
                        text.drain(at..end);
                    }
                    _ => {
                        if at < text.len() {
                            text[at] = b"0123456789.-e=[]\"\n "[rng.random_range(0..18)];
                        }
                    }
                }
            }
            match config_text(&String::from_utf8_lossy(&text)) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        // The mutations reach both outcomes.
        assert!(
            ok > 100 && refused > 100,
            "{ok} accepted, {refused} refused"
        );
    }
}
