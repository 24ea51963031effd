//! The `qadapt` binary.
//!
//! `quantize` and `dequantize` convert safetensors files to and from the bitsandbytes 4-bit
//! layout that transformers reads (see `qadapt::nf4::bnb`). Errors print one line and exit with a
//! non-zero status; an output file is written to a temporary name beside it and renamed into
//! place only when complete, so a failure never leaves a half-written file behind.
#![forbid(unsafe_code)]

mod io;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qadapt::nf4::{Nf4Tensor, Statistics, bnb};
use qadapt::{DType, Device, FloatVec};
use regex::Regex;
use safetensors::{Dtype, SafeTensors};

use crate::io::{Output, read_safetensors};

#[derive(Parser, Debug)]
#[command(
    name = "qadapt",
    version,
    about = "Quantized adapters: NF4 quantization in the bitsandbytes layout, on the CPU or CUDA",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Quantize the floating tensors of a safetensors file to NF4, in the layout that
    /// bitsandbytes and transformers read (T, T.absmax, T.quant_map, [T.nested_absmax,
    /// T.nested_quant_map], T.quant_state.bitsandbytes__nf4). Other tensors are copied unchanged.
    Quantize {
        /// Input safetensors file.
        input: PathBuf,
        /// Output safetensors file (must differ from the input).
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
        /// Quantize only the floating tensors whose name matches this regex. Without it, every
        /// floating tensor with two or more dimensions is quantized (the weights of linear
        /// layers; 1-D norms and biases stay as they are).
        #[arg(long, value_name = "REGEX")]
        only: Option<String>,
    },
    /// Dequantize every NF4 tensor of a file in the bitsandbytes layout (ours or one written by
    /// bitsandbytes/transformers) back to its original key and shape. Other tensors are copied.
    Dequantize {
        /// Input safetensors file with bitsandbytes 4-bit tensors.
        input: PathBuf,
        /// Output safetensors file (must differ from the input).
        output: PathBuf,
        /// Element type of the dequantized tensors (default: the dtype recorded in each tensor's
        /// quant state).
        #[arg(long, value_enum)]
        dtype: Option<OutDType>,
        /// Where to compute: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutDType {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quantize {
            input,
            output,
            blocksize,
            double_quant,
            device,
            only,
        } => quantize(
            &input,
            &output,
            blocksize,
            double_quant,
            &device,
            only.as_deref(),
        ),
        Command::Dequantize {
            input,
            output,
            dtype,
            device,
        } => dequantize(&input, &output, dtype.map(DType::from), &device),
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

fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}

fn progress(total_bytes: u64, verb: &str) -> ProgressBar {
    let pb = ProgressBar::new(total_bytes);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(verb.to_string());
    pb
}

fn quantize(
    input: &Path,
    output: &Path,
    blocksize: usize,
    double_quant: bool,
    device: &str,
    only: Option<&str>,
) -> Result<()> {
    qadapt::nf4::check_blocksize("quantize", blocksize)?;
    let only = only
        .map(Regex::new)
        .transpose()
        .context("--only is not a valid regular expression")?;
    let device = Device::parse(device)?;
    let out = Output::new(input, output)?;
    let (bytes, metadata) = read_safetensors(input)?;
    let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
    let already = bnb::quantized_names(&st);
    if !already.is_empty() {
        bail!(
            "{}: already holds NF4 tensors (e.g. {}); dequantize it first",
            input.display(),
            already[0]
        );
    }
    let statistics = if double_quant {
        Statistics::DoubleQuant
    } else {
        Statistics::Plain
    };
    let mut names = st.names();
    names.sort();
    let total: u64 = names
        .iter()
        .map(|n| st.tensor(n).map(|t| t.data().len() as u64).unwrap_or(0))
        .sum();
    let pb = progress(total, "quantizing");
    let mut tensors = Vec::new();
    let mut quantized = 0usize;
    for name in names {
        let view = st.tensor(name).expect("name listed by the file");
        let selected = match (&only, float_dtype(view.dtype())) {
            (_, None) => false,
            (Some(re), Some(_)) => re.is_match(name),
            (None, Some(_)) => view.shape().len() >= 2,
        };
        if selected && view.shape().iter().product::<usize>() > 0 {
            let dtype = float_dtype(view.dtype()).expect("selected tensors are floating");
            let data = FloatVec::from_bytes(dtype, view.data()).with_context(|| {
                format!("{}: tensor {name} has a truncated payload", input.display())
            })?;
            let q = Nf4Tensor::quantize(&device, &data, view.shape(), blocksize, statistics)
                .with_context(|| format!("quantizing {name}"))?;
            tensors.extend(bnb::encode(name, &q));
            quantized += 1;
        } else {
            tensors.push(bnb::OnDiskTensor {
                name: name.to_string(),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            });
        }
        pb.inc(view.data().len() as u64);
    }
    pb.finish_and_clear();
    if quantized == 0 {
        eprintln!(
            "warning: no tensor of {} was selected for quantization{}; the output is a copy",
            input.display(),
            if only.is_some() {
                " by --only"
            } else {
                " (no floating tensor with 2+ dimensions)"
            }
        );
    }
    out.write(&tensors, metadata)?;
    eprintln!(
        "quantized {quantized} tensor(s) to NF4 (block {blocksize}{}) on {} -> {}",
        if double_quant { ", double quant" } else { "" },
        device.describe(),
        output.display()
    );
    Ok(())
}

fn dequantize(input: &Path, output: &Path, dtype: Option<DType>, device: &str) -> Result<()> {
    let device = Device::parse(device)?;
    let out = Output::new(input, output)?;
    let (bytes, metadata) = read_safetensors(input)?;
    let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
    let quantized = bnb::quantized_names(&st);
    if quantized.is_empty() {
        bail!(
            "{}: no NF4 tensors (no key ends in {})",
            input.display(),
            bnb::QUANT_STATE_SUFFIX
        );
    }
    let mut names = st.names();
    names.sort();
    let pb = progress(names.len() as u64, "dequantizing");
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} tensors eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let mut tensors = Vec::new();
    for name in names {
        pb.inc(1);
        if bnb::is_auxiliary(name, &quantized) {
            continue;
        }
        let view = st.tensor(name).expect("name listed by the file");
        if quantized.binary_search_by(|q| q.as_str().cmp(name)).is_ok() {
            let q = bnb::decode(&st, input, name)?;
            let to = dtype.unwrap_or(q.dtype);
            let values = q
                .dequantize(&device, to)
                .with_context(|| format!("dequantizing {name}"))?;
            tensors.push(bnb::OnDiskTensor {
                name: name.to_string(),
                dtype: safetensors_dtype(to),
                shape: q.shape.clone(),
                data: values.as_bytes().to_vec(),
            });
        } else {
            tensors.push(bnb::OnDiskTensor {
                name: name.to_string(),
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data().to_vec(),
            });
        }
    }
    pb.finish_and_clear();
    out.write(&tensors, metadata)?;
    eprintln!(
        "dequantized {} tensor(s) on {} -> {}",
        quantized.len(),
        device.describe(),
        output.display()
    );
    Ok(())
}
