//! `qadapt generate`: text from a Llama model directory and optional adapters, on the CPU in f32
//! through `qadapt_train::generate`, or with `--device cuda` on a GPU through
//! `qadapt_train::cuda::CudaGenerator` (bf16 or NF4 weights, the KV cache on the device, LoRA
//! adapters only) (KV cache, greedy / temperature / top-p sampling, one batch in which every
//! prompt may use a different adapter).
//!
//! Adapters: `--adapter DIR` (named "default") and any number of `--adapter NAME=DIR` (a value
//! that is an existing directory is always a path). "base" is reserved for "no adapter". Which
//! adapter a prompt uses:
//! - `--prompt TEXT` takes TEXT verbatim when no adapter is named; once some adapter is named,
//!   every `--prompt` must be `NAME:TEXT` with NAME an adapter name, "default" or "base".
//! - `--prompts FILE.jsonl`: one object per line, `{"prompt": "...", "adapter": "NAME"}`;
//!   without "adapter" (or with null) the prompt uses the default adapter if there is one, else
//!   the base.
//!
//! Without `--model` the embedded model of `qadapt train` is used. Prompts are encoded with the
//! model directory's `tokenizer.json` with its special tokens (as `tokenizer(text)` does in
//! transformers); generation stops at the `eos_token_id`s of `generation_config.json` or else
//! `config.json`, or after `--max-new-tokens` (lowered, with a warning, to what
//! `max_position_embeddings` leaves). Completions go to stdout (text, or JSON
//! lines with `--format jsonl`), the throughput to stderr.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args, ValueEnum};
use qadapt_train::backend::BaseFormat;
use qadapt_train::cuda::CudaGenerator;
use qadapt_train::peft::Adapter;
use qadapt_train::{Finish, GenerateOptions, Generator, LlamaDir, Prompt, Sampling};
use serde_json::{Value, json};

/// How completions are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutFormat {
    /// Each completion's text, then a newline.
    Text,
    /// One JSON object per prompt: prompt, adapter, completion, tokens, finish ("eos"/"length").
    Jsonl,
}

/// Arguments of `qadapt generate`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
#[command(
    after_help = "Which adapter a prompt uses: with no adapter or only an unnamed --adapter DIR \
(named \"default\"), --prompt TEXT is taken verbatim and uses it. Once some adapter is given as \
NAME=DIR, every --prompt is NAME:TEXT, NAME an adapter name, \"default\", or \"base\" for none. \
A --prompts line without \"adapter\" (or with null) uses the default adapter if there is one, \
else the base. Generation stops at an eos id of generation_config.json or config.json."
)]
pub(crate) struct GenerateArgs {
    /// HF Llama directory (config.json, weights, tokenizer.json); default: the embedded model
    /// that `qadapt train` fine-tunes without --model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// PEFT adapter directory (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, HOULSBY), as DIR (the
    /// adapter "default") or NAME=DIR; repeat for several. A batch may mix adapters of any kind.
    #[arg(long = "adapter", value_name = "[NAME=]DIR")]
    adapters: Vec<String>,
    /// Quantize the base projection weights to NF4 (block 64, double quant) and run on their
    /// dequantized values (as `qadapt logits --nf4`); with --device cuda, on the codes.
    #[arg(long)]
    nf4: bool,
    /// cpu (f32, every adapter method) or cuda[:N] (bf16 weights or NF4 codes, bf16
    /// activations, the KV cache on the GPU; LoRA adapters only).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A prompt; repeat for a batch. With named adapters, NAME:TEXT (NAME an adapter, "default"
    /// or "base").
    #[arg(long = "prompt", value_name = "[NAME:]TEXT")]
    prompt: Vec<String>,
    /// JSON lines `{"prompt": "...", "adapter": "NAME"}` ("adapter" optional: the default
    /// adapter, else the base).
    #[arg(long, value_name = "FILE.jsonl")]
    prompts: Option<PathBuf>,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0 < P <= 1).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (prompt i draws from the stream seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: OutFormat,
}

const DEFAULT: &str = "default";
const BASE: &str = "base";

/// `(name, dir)` of every `--adapter`, in order.
fn adapter_specs(raw: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for s in raw {
        let (name, dir) = match s.split_once('=') {
            Some((n, d)) if !Path::new(s).is_dir() => (n.to_owned(), PathBuf::from(d)),
            _ => (DEFAULT.to_owned(), PathBuf::from(s)),
        };
        if name.is_empty() || name.contains(':') || name == BASE {
            bail!("--adapter {s}: the name must be non-empty, without ':', and not \"{BASE}\"");
        }
        if out.iter().any(|(n, _)| *n == name) {
            bail!("--adapter {s}: the name {name:?} is given twice");
        }
        out.push((name, dir));
    }
    Ok(out)
}

/// A prompt's text and adapter name (`None`: the default rule).
struct RawPrompt {
    text: String,
    adapter: Option<String>,
}

fn read_prompts(a: &GenerateArgs, named: bool) -> Result<Vec<RawPrompt>> {
    if let Some(path) = &a.prompts {
        // Lines are bounded (qadapt_train::dataset::MAX_LINE_BYTES) before they are read whole.
        let text = qadapt_train::dataset::read_text(path)?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {}", path.display(), i + 1);
            let v: Value = serde_json::from_str(line).with_context(at)?;
            let Some(p) = v.get("prompt").and_then(Value::as_str) else {
                bail!("{}: no string \"prompt\"", at());
            };
            let adapter = match v.get("adapter") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => bail!("{}: \"adapter\" must be a string", at()),
            };
            out.push(RawPrompt {
                text: p.to_owned(),
                adapter,
            });
        }
        if out.is_empty() {
            bail!("{}: no prompt", path.display());
        }
        return Ok(out);
    }
    a.prompt
        .iter()
        .map(|p| {
            if !named {
                return Ok(RawPrompt {
                    text: p.clone(),
                    adapter: None,
                });
            }
            let Some((name, text)) = p.split_once(':') else {
                bail!("--prompt {p:?}: with named adapters, write NAME:TEXT (NAME \"{BASE}\" for none)");
            };
            Ok(RawPrompt {
                text: text.to_owned(),
                adapter: Some(name.to_owned()),
            })
        })
        .collect()
}

/// The eos ids: `generation_config.json`'s, else `config.json`'s (a number or a list).
fn eos_ids(dir: &Path) -> Result<Vec<u32>> {
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => vec![n.as_u64()],
            Some(Value::Array(a)) => a.iter().map(Value::as_u64).collect(),
            _ => continue,
        };
        return ids
            .into_iter()
            .map(|i| i.and_then(|i| u32::try_from(i).ok()))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: eos_token_id is not a token id", path.display()));
    }
    Ok(Vec::new())
}

/// Runs the command.
pub(crate) fn run(a: &GenerateArgs) -> Result<()> {
    let sampling = Sampling::new(a.temperature, a.top_p)?;
    let specs = adapter_specs(&a.adapters)?;
    let named = specs.iter().any(|(n, _)| n != DEFAULT);
    let raw = read_prompts(a, named)?;
    let model_path = match &a.model {
        Some(p) => p.clone(),
        None => crate::assets::model_dir()?,
    };
    // On the CPU the f32 model is loaded here; the device streams the checkpoint to itself
    // (`CudaGenerator::from_checkpoint`) and the host reads only the config and tokenizer.
    let device = qadapt::Device::parse(&a.device)?;
    let (config, tokenizer, model) = match device {
        qadapt::Device::Cpu => {
            let mut dir = LlamaDir::open(&model_path)?;
            if a.nf4 {
                qadapt_train::nf4::quantize_projections(&mut dir.weights, &dir.config, &dir.nf4)
                    .context("quantizing the base to NF4")?;
            }
            let model = dir.model()?;
            (dir.config, dir.tokenizer, Some(model))
        }
        qadapt::Device::Cuda(_) => {
            let (config, tokenizer) = LlamaDir::open_config(&model_path)?;
            (config, tokenizer, None)
        }
    };
    let tok = tokenizer.with_context(|| {
        format!(
            "{} has no tokenizer.json (generate needs it to encode prompts and decode tokens)",
            model_path.display()
        )
    })?;
    let adapters = specs
        .iter()
        .map(|(name, d)| {
            qadapt_train::peft::load(d, &config).with_context(|| {
                format!(
                    "adapter {name:?} ({}) does not load for the model {}",
                    d.display(),
                    model_path.display()
                )
            })
        })
        .collect::<Result<Vec<Adapter<f32>>>>()?;
    let index: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let known = || {
        let mut v: Vec<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        v.push(BASE);
        v.join(", ")
    };
    let mut prompts = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        if p.text.trim().is_empty() {
            bail!("prompt {} is empty", i + 1);
        }
        let adapter = match p.adapter.as_deref() {
            None => index.get(DEFAULT).copied(),
            Some(BASE) => None,
            Some(n) => Some(*index.get(n).with_context(|| {
                format!(
                    "prompt {}: unknown adapter {n:?} (known: {})",
                    i + 1,
                    known()
                )
            })?),
        };
        let enc = tok
            .encode(p.text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("prompt {}: tokenizing: {e}", i + 1))?;
        let ids = enc.get_ids().to_vec();
        if ids.is_empty() {
            bail!("prompt {} has no tokens", i + 1);
        }
        prompts.push(Prompt { ids, adapter });
    }
    let generator = model
        .as_ref()
        .map(|m| Generator::new(m, &adapters))
        .transpose()?;
    // Prefix and prompt tuning put positions before the prompt (the device takes LoRA only).
    let positions = prompts
        .iter()
        .map(|p| {
            generator
                .as_ref()
                .map_or(0, |g| g.leading_positions(p.adapter))
                + p.ids.len()
        })
        .max()
        .unwrap_or(0);
    let max_pos = config.max_position_embeddings;
    if positions >= max_pos {
        bail!(
            "a prompt needs {positions} positions; the model has max_position_embeddings {max_pos}"
        );
    }
    let mut max_new = a.max_new_tokens;
    if max_new > max_pos - positions {
        max_new = max_pos - positions;
        eprintln!(
            "warning: --max-new-tokens lowered to {max_new} (max_position_embeddings {max_pos})"
        );
    }
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        sampling,
        eos: eos_ids(&model_path)?,
        seed: a.seed,
    };
    let (out, secs, on) = match (device, &generator) {
        (qadapt::Device::Cpu, Some(g)) => {
            let start = Instant::now();
            let out = g.generate(&prompts, &opts)?;
            (out, start.elapsed().as_secs_f64(), "cpu".to_string())
        }
        (qadapt::Device::Cpu, None) => unreachable!("the CPU model is loaded above"),
        (qadapt::Device::Cuda(dev), _) => {
            let on = dev.describe();
            let base = if a.nf4 {
                BaseFormat::QuantizeNf4
            } else {
                BaseFormat::Dense
            };
            let gpu = CudaGenerator::from_checkpoint(dev, &model_path, base, &adapters)
                .context("--device cuda")?;
            let start = Instant::now();
            let out = gpu.generate(&prompts, &opts)?;
            (out, start.elapsed().as_secs_f64(), on)
        }
    };
    let stdout = std::io::stdout();
    let mut w = stdout.lock();
    for ((c, raw), p) in out.iter().zip(&raw).zip(&prompts) {
        let body = match c.finish {
            Finish::Eos => &c.tokens[..c.tokens.len() - 1],
            Finish::Length => &c.tokens[..],
        };
        let text = tok
            .decode(body, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        match a.format {
            OutFormat::Text => writeln!(w, "{text}")?,
            OutFormat::Jsonl => {
                let adapter = p.adapter.map(|i| specs[i].0.as_str());
                let line = json!({
                    "prompt": raw.text,
                    "adapter": adapter,
                    "completion": text,
                    "tokens": c.tokens,
                    "finish": match c.finish {
                        Finish::Eos => "eos",
                        Finish::Length => "length",
                    },
                });
                writeln!(w, "{line}")?;
            }
        }
    }
    w.flush()?;
    let n: usize = out.iter().map(|c| c.tokens.len()).sum();
    eprintln!(
        "{n} tokens for {} prompt(s) in {secs:.2} s ({:.1} tokens/s) on {on}",
        out.len(),
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}
