//! `qadapt plan-memory`: the device memory a `qadapt train --device cuda` step of LoRA or QLoRA
//! would need at its peak ([`qadapt_train::memory_plan`]), whether that fits a device of
//! `--device-memory` GB, and the largest batch that does. Nothing is allocated and no weight is
//! read: a named architecture's shapes or a model directory's `config.json` suffice.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use qadapt_train::backend::Checkpointing;
use qadapt_train::memory_plan::{self, MemoryPlan, PlanMethod, PlanOptions};
use qadapt_train::{LlamaConfig, LoraConfig, Proj};

/// Bytes per GB (decimal, as GPU memory sizes are quoted: an H200's 141 GB).
const GB: f64 = 1e9;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum MethodArg {
    /// bf16 base, AdamW moments in device memory.
    Lora,
    /// NF4 base (block 64, double quantization), AdamW moments paged (managed memory).
    Qlora,
}

#[derive(Args, Debug)]
pub(crate) struct PlanMemoryArgs {
    /// A published architecture's shapes (no weights needed): llama3-8b, llama3-70b,
    /// llama3.2-1b, llama3.2-3b, llama2-7b or mistral-7b.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "model",
        conflicts_with = "model"
    )]
    random_shape: Option<String>,
    /// An HF Llama-family model directory: only its config.json is read.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// lora (bf16 base) or qlora (NF4 base).
    #[arg(long, value_enum, default_value = "qlora")]
    method: MethodArg,
    /// Sequences per micro-batch.
    #[arg(long, value_parser = crate::positive(), default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, value_parser = crate::positive(), default_value_t = 512)]
    seq: usize,
    /// LoRA rank r.
    #[arg(long, value_parser = crate::positive(), default_value_t = 8)]
    rank: usize,
    /// LoRA target modules, comma-separated (default: all seven projections, as `qadapt train`).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// none (the forward keeps every activation) or layers (each decoder layer keeps its input
    /// and is recomputed in the backward), as `qadapt train --checkpointing`.
    #[arg(long, default_value = "none")]
    checkpointing: Checkpointing,
    /// Device memory in GB (10^9 bytes) the plan must fit in (default: an H200's 141).
    #[arg(long, value_name = "GB", default_value_t = 141.0)]
    device_memory: f64,
}

fn gb(bytes: u64) -> String {
    format!("{:9.3} GB", bytes as f64 / GB)
}

pub(crate) fn run(args: &PlanMemoryArgs) -> Result<()> {
    let (name, config) = match (&args.random_shape, &args.model) {
        (Some(shape), _) => {
            let c = LlamaConfig::named(shape).with_context(|| {
                format!(
                    "--random-shape {shape}: not one of {}",
                    LlamaConfig::NAMED.join(", ")
                )
            })?;
            (shape.clone(), c)
        }
        (None, Some(dir)) => {
            let c = LlamaConfig::from_file(&dir.join("config.json"))?;
            (dir.display().to_string(), c)
        }
        (None, None) => bail!("give --random-shape NAME or --model DIR"),
    };
    if !(args.device_memory.is_finite() && args.device_memory > 0.0) {
        bail!(
            "--device-memory {} must be a positive number of GB",
            args.device_memory
        );
    }
    let method = match args.method {
        MethodArg::Lora => PlanMethod::Lora,
        MethodArg::Qlora => PlanMethod::Qlora,
    };
    let mut o = PlanOptions::new(method, args.batch, args.seq, args.rank);
    o.checkpointing = args.checkpointing;
    if let Some(t) = &args.targets {
        let lc = LoraConfig {
            r: args.rank,
            alpha: 1.0,
            use_rslora: false,
            dropout: 0.0,
            target_modules: t.clone(),
        };
        o.targets = Proj::ALL
            .into_iter()
            .filter(|&p| lc.targets(0, p))
            .collect();
        if o.targets.is_empty() {
            bail!(
                "--targets {}: names no projection (q_proj, ..., down_proj)",
                t.join(",")
            );
        }
    }
    let p = memory_plan::plan(&config, &o)?;
    let budget = (args.device_memory * GB) as u64;
    let largest = memory_plan::largest_batch(&config, &o, budget)?;
    print!("{}", report(&name, &p, budget, largest));
    Ok(())
}

fn report(name: &str, p: &MemoryPlan, budget: u64, largest: Option<usize>) -> String {
    let o = &p.options;
    let targets: Vec<&str> = o
        .targets
        .iter()
        .map(|t| t.name().rsplit('.').next().unwrap_or_default())
        .collect();
    let (base, moments) = match o.method {
        PlanMethod::Lora => ("bf16 base", "in device memory"),
        PlanMethod::Qlora => (
            "NF4 base",
            "paged (managed memory, on the device during the step)",
        ),
    };
    let mut s = format!(
        "memory plan: {name}, {} ({base}), rank {} on {}, batch {} x {} tokens\n",
        o.method.name(),
        o.rank,
        targets.join(","),
        o.batch,
        o.seq
    );
    for (what, bytes, note) in [
        (
            "weights",
            p.weights,
            "frozen base: embeddings, head, norms, projections".to_string(),
        ),
        (
            "adapter",
            p.adapter,
            "LoRA f32 masters and gradients, bf16 working copies".into(),
        ),
        (
            "optimizer",
            p.optimizer,
            format!("AdamW f32 moments, {moments}"),
        ),
        (
            "activations",
            p.activations(),
            match o.checkpointing {
                Checkpointing::None => "saved for the backward, every layer".into(),
                Checkpointing::Layers => {
                    "each layer's input, and one layer's activations recomputed".into()
                }
            },
        ),
        (
            "logits/loss",
            p.logits_loss(),
            format!(
                "bf16 logits and their gradient for {} token rows at a time, per-row losses",
                p.loss_chunk_rows
            ),
        ),
        (
            "workspace",
            p.workspace(),
            "LoRA kernel scratch, gradient buffers, temporaries".into(),
        ),
    ] {
        s += &format!("  {what:<12}{}  {note}\n", gb(bytes));
    }
    s += &format!(
        "  {:<12}{}  at the {}\n",
        "peak",
        gb(p.peak()),
        p.peak_phase.phase.name()
    );
    let dev = budget as f64 / GB;
    if p.peak() <= budget {
        s += &format!(
            "fits in {dev} GB ({} to spare)\n",
            gb(budget - p.peak()).trim()
        );
    } else {
        s += &format!(
            "does not fit in {dev} GB ({} short)\n",
            gb(p.peak() - budget).trim()
        );
    }
    s += &match largest {
        Some(b) => format!("largest batch of {} tokens that fits: {b}\n", o.seq),
        None => format!("no batch of {} tokens fits\n", o.seq),
    };
    s += &match o.checkpointing {
        Checkpointing::None => "activation checkpointing: none (every layer's activations saved; \
                                --checkpointing layers keeps only each layer's input)\n"
            .to_string(),
        Checkpointing::Layers => "activation checkpointing: layers (each layer's input saved, \
                                  the layer recomputed in the backward)\n"
            .to_string(),
    };
    s += "the plan counts the bytes each allocation asks for; a real GPU adds the CUDA context \
          and its allocator's rounding\n";
    s
}
