//! The `qadapt` binary.
//!
//! `quantize` and `dequantize` convert safetensors files and HF model directories to and from the
//! bitsandbytes 4-bit layout that transformers reads (see `qadapt::nf4::bnb` and `convert`);
//! `logits`, `merge` and `generate` run a model with PEFT adapters; `pretrain`, `train` and
//! `compare` train (see `train` for the run directory); `plan-memory` predicts a CUDA training
//! step's peak device memory. Errors print one line and exit with a
//! non-zero status; outputs are written beside their final name and renamed into place only when
//! complete, so a failure never leaves a half-written file behind.
#![forbid(unsafe_code)]
// The doc comments of the argument structs are clap's `--help` text, written for a terminal:
// `cuda[:N]` and `runs/<method>` are meant literally, not as links or HTML.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod assets;
mod compare;
mod console;
mod convert;
mod generate;
mod io;
mod logits;
mod merge;
mod plan_memory;
mod plot;
mod pretrain;
mod progress;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use qadapt::nf4::Statistics;
use qadapt::{DType, Device};
use regex::Regex;

#[derive(Parser, Debug)]
#[command(
    name = "qadapt",
    version,
    about = "Quantized adapters: NF4 in the bitsandbytes layout, every PEFT method trained on the CPU, PEFT files in and out",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize the floating tensors of a safetensors file, or of every shard of an HF model
    /// directory, to NF4 in the layout that bitsandbytes and transformers read (T, T.absmax,
    /// T.quant_map, [T.nested_absmax, T.nested_quant_map], T.quant_state.bitsandbytes__nf4).
    /// Other tensors are copied unchanged. A model directory gets the quantization_config that
    /// makes transformers load it as a 4-bit model.
    Quantize {
        /// Input safetensors file, or HF model directory (config.json + safetensors).
        input: PathBuf,
        /// Output file (not the input; an existing one only with --force), or a new directory for
        /// a model directory.
        output: PathBuf,
        /// Elements per quantization block: a power of two from 32 to 4096.
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Also quantize the block absmax values (8-bit, blocks of 256), as QLoRA does.
        #[arg(long)]
        double_quant: bool,
        /// Where to compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Quantize only the floating tensors whose name matches this regex. Without it, a file
        /// has every floating tensor with two or more dimensions quantized, and a model directory
        /// every linear layer's weight (2-D, not the embeddings nor lm_head), as transformers does.
        #[arg(long, value_name = "REGEX")]
        only: Option<String>,
        /// Replace the output file if it exists (never a directory, a FIFO or a device, nor an
        /// input of this command).
        #[arg(long)]
        force: bool,
    },
    /// Dequantize every NF4 tensor of a file or model directory in the bitsandbytes layout (ours
    /// or one written by bitsandbytes/transformers) back to its original key and shape. Other
    /// tensors are copied; a model directory loses its quantization_config.
    Dequantize {
        /// Input safetensors file or HF model directory with bitsandbytes 4-bit tensors.
        input: PathBuf,
        /// Output file (not the input; an existing one only with --force), or a new directory for
        /// a model directory.
        output: PathBuf,
        /// Element type of the dequantized tensors (default: the dtype recorded in each tensor's
        /// quant state).
        #[arg(long, value_enum)]
        dtype: Option<OutDType>,
        /// Where to compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Replace the output file if it exists (never a directory, a FIFO or a device, nor an
        /// input of this command).
        #[arg(long)]
        force: bool,
    },
    /// Logits, loss and (with --grads) adapter gradients of a Llama model with an optional
    /// adapter (LoRA, IA3, prompt/prefix tuning, Houlsby) on token ids, as transformers/PEFT
    /// compute them (CPU, f32).
    Logits(logits::LogitsArgs),
    /// Fold a LoRA or (IA)³ adapter into its base model (W += s·BA, or W's rows/columns scaled by
    /// the (IA)³ vectors) and write an HF model directory that loads without PEFT.
    Merge(merge::MergeArgs),
    /// Generate text from a model and optional adapters (KV cache, greedy or temperature/top-p
    /// sampling); one batch may serve several adapters, each prompt naming its own.
    Generate(generate::GenerateArgs),
    /// Train a small Llama from scratch on a text corpus (tokenizer included) and write an HF
    /// model directory; makes the embedded default model.
    Pretrain(pretrain::PretrainArgs),
    /// Fine-tune a model with one PEFT method, on the CPU or (LoRA, QLoRA) a CUDA device (no
    /// arguments: QLoRA on the CPU, on the embedded model and task); writes the adapter, a JSONL
    /// log, a loss plot and checkpoints.
    Train(Box<train::TrainArgs>),
    /// Run every PEFT method on the same model, data and budget and print the table to choose
    /// by (also written as Markdown, CSV and a plot of all loss curves).
    Compare(compare::CompareArgs),
    /// Predict the peak device memory of a `train --device cuda` step (LoRA or QLoRA) before
    /// anything is allocated: the breakdown, whether it fits --device-memory, and the largest
    /// batch that does (without activation checkpointing, which the trainer does not have yet).
    PlanMemory(plan_memory::PlanMemoryArgs),
}

/// clap's parser for a size flag that must be at least 1 (`--seq 0` is clap's one-line error).
pub(crate) fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OutDType {
    F32,
    Bf16,
    F16,
}

impl From<OutDType> for DType {
    fn from(d: OutDType) -> DType {
        match d {
            OutDType::F32 => DType::F32,
            OutDType::Bf16 => DType::BF16,
            OutDType::F16 => DType::F16,
        }
    }
}

/// On x86-64, `src/cpu_check.c` has already run (an ELF constructor): a CPU without the
/// extensions this build uses never gets here.
fn main() -> ExitCode {
    if let Some(advice) = qadapt::cpu_features::build_advice() {
        eprintln!("warning: {advice}");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quantize {
            input,
            output,
            blocksize,
            double_quant,
            device,
            only,
            force,
        } => quantize(
            &input,
            &output,
            blocksize,
            double_quant,
            &device,
            only.as_deref(),
            force,
        ),
        Command::Dequantize {
            input,
            output,
            dtype,
            device,
            force,
        } => dequantize(&input, &output, dtype.map(DType::from), &device, force),
        Command::Logits(args) => logits::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Pretrain(args) => pretrain::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::PlanMemory(args) => plan_memory::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the cause chain holds (regex errors span several lines).
            let msg = format!("{e:#}");
            eprintln!(
                "error: {}",
                msg.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

fn quantize(
    input: &Path,
    output: &Path,
    blocksize: usize,
    double_quant: bool,
    device: &str,
    only: Option<&str>,
    force: bool,
) -> Result<()> {
    qadapt::nf4::check_blocksize("quantize", blocksize)?;
    let selection = only
        .map(Regex::new)
        .transpose()
        .context("--only is not a valid regular expression")?;
    let statistics = if double_quant {
        Statistics::DoubleQuant
    } else {
        Statistics::Plain
    };
    let device = Device::parse(device)?;
    convert::quantize(
        input,
        output,
        convert::QuantizeOptions {
            blocksize,
            statistics,
            device,
            selection,
            force,
        },
    )
}

fn dequantize(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    device: &str,
    force: bool,
) -> Result<()> {
    let device = Device::parse(device)?;
    convert::dequantize(input, output, dtype, &device, force)
}
