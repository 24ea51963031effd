//! `quantize` and `dequantize`: one safetensors file, or a whole HF model directory.
//!
//! A model directory (config.json + model.safetensors, or shards listed by
//! model.safetensors.index.json) is converted shard by shard; the index is rewritten with the new
//! keys, config.json gains (or loses) the `quantization_config` transformers reads to build its
//! 4-bit layers, and every other file (tokenizer, generation config) is copied unchanged. The
//! output directory is assembled under a temporary name beside it and renamed into place at the
//! end, so a failure never leaves a half-written model behind, and an existing one is never
//! overwritten.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use qadapt::nf4::bnb::{self, OnDiskTensor};
use qadapt::nf4::{Nf4Tensor, Statistics};
use qadapt::{DType, Device, FloatVec};
use regex::Regex;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

use crate::io::{Output, copy_other_files, new_directory, read_safetensors, write_safetensors};

/// How a quantize run picks its tensors.
pub(crate) enum Selection {
    /// Floating tensors whose name matches.
    Only(Regex),
    /// Floating tensors with two or more dimensions (a file's default).
    Matrices,
    /// What transformers turns into 4-bit layers: every 2-D weight but the embeddings and the
    /// output head (a model directory's default).
    LinearLayers,
}

impl Selection {
    fn picks(&self, name: &str, view: &TensorView<'_>) -> bool {
        if float_dtype(view.dtype()).is_none() || view.shape().iter().product::<usize>() == 0 {
            return false;
        }
        match self {
            Selection::Only(re) => re.is_match(name),
            Selection::Matrices => view.shape().len() >= 2,
            Selection::LinearLayers => {
                const NOT_LINEAR: [&str; 6] = [
                    "lm_head.",
                    "embed_tokens.",
                    "embed_positions.",
                    "wte.",
                    "wpe.",
                    "word_embeddings.",
                ];
                view.shape().len() == 2
                    && name.ends_with(".weight")
                    && !NOT_LINEAR
                        .iter()
                        .any(|p| name.starts_with(p) || name.contains(&format!(".{p}")))
            }
        }
    }
}

/// The settings of a quantize run.
pub(crate) struct QuantizeOptions {
    pub(crate) blocksize: usize,
    pub(crate) statistics: Statistics,
    pub(crate) device: Device,
    pub(crate) selection: Option<Regex>,
    /// Replace an existing output file.
    pub(crate) force: bool,
}

pub(crate) fn float_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

pub(crate) fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}

fn copy(name: &str, view: &TensorView<'_>) -> OnDiskTensor {
    OnDiskTensor {
        name: name.to_string(),
        dtype: view.dtype(),
        shape: view.shape().to_vec(),
        data: view.data().to_vec(),
    }
}

fn byte_bar(total: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

/// The quantized (or copied) tensors of one file, and how many were quantized.
fn quantize_tensors(
    st: &SafeTensors<'_>,
    file: &Path,
    select: &Selection,
    o: &QuantizeOptions,
    pb: &ProgressBar,
) -> Result<(Vec<OnDiskTensor>, usize)> {
    let already = bnb::quantized_names(st);
    if let Some(name) = already.first() {
        bail!(
            "{}: already holds NF4 tensors (e.g. {name}); dequantize it first",
            file.display()
        );
    }
    let mut names = st.names();
    names.sort();
    let mut out = Vec::new();
    let mut quantized = 0;
    for name in names {
        let view = st.tensor(name).expect("name listed by the file");
        if select.picks(name, &view) {
            let dtype = float_dtype(view.dtype()).expect("selected tensors are floating");
            let data = FloatVec::from_bytes(dtype, view.data()).with_context(|| {
                format!("{}: tensor {name} has a truncated payload", file.display())
            })?;
            if let Some((i, v)) = data.first_non_finite() {
                bail!(
                    "{}: tensor {name} holds {v} at element {i}; NF4 has no code for it (its \
                     block scale would be {v} too): fix the weights or leave the tensor out with \
                     --only",
                    file.display()
                );
            }
            let q = Nf4Tensor::quantize(&o.device, &data, view.shape(), o.blocksize, o.statistics)
                .with_context(|| format!("quantizing {name}"))?;
            out.extend(bnb::encode(name, &q));
            quantized += 1;
        } else {
            out.push(copy(name, &view));
        }
        pb.inc(view.data().len() as u64);
    }
    // A file may already hold a tensor named like a quantized tensor's statistics (`w` and
    // `w.absmax`, without the quant state that marks a bitsandbytes tensor).
    let mut written: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
    written.sort_unstable();
    if let Some(w) = written.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "{}: quantizing would write the tensor {} twice (the file already has a tensor of \
             that name); rename it or leave its base tensor out with --only",
            file.display(),
            w[0]
        );
    }
    Ok((out, quantized))
}

/// The dequantized (or copied) tensors of one file, and how many were dequantized.
fn dequantize_tensors(
    st: &SafeTensors<'_>,
    file: &Path,
    dtype: Option<DType>,
    device: &Device,
    pb: &ProgressBar,
) -> Result<(Vec<OnDiskTensor>, usize)> {
    let quantized = bnb::quantized_names(st);
    if let Some(name) = quantized.iter().find(|q| st.tensor(q).is_err()) {
        bail!(
            "{}: {name} has a quant state ({name}{}) but no tensor of codes named {name}",
            file.display(),
            bnb::QUANT_STATE_SUFFIX
        );
    }
    let mut names = st.names();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let view = st.tensor(name).expect("name listed by the file");
        pb.inc(view.data().len() as u64);
        if bnb::is_auxiliary(name, &quantized) {
            continue;
        }
        if quantized.binary_search_by(|q| q.as_str().cmp(name)).is_ok() {
            let q = bnb::decode(st, file, name)?;
            let to = dtype.unwrap_or(q.dtype);
            let values = q
                .dequantize(device, to)
                .with_context(|| format!("dequantizing {name}"))?;
            out.push(OnDiskTensor {
                name: name.to_string(),
                dtype: safetensors_dtype(to),
                shape: q.shape.clone(),
                data: values.as_bytes().to_vec(),
            });
        } else {
            out.push(copy(name, &view));
        }
    }
    Ok((out, quantized.len()))
}

fn file_size(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// `qadapt quantize` on a file or a model directory.
pub(crate) fn quantize(input: &Path, output: &Path, o: QuantizeOptions) -> Result<()> {
    let describe = o.device.describe();
    let what = if o.statistics == Statistics::DoubleQuant {
        ", double quant"
    } else {
        ""
    };
    if input.is_dir() {
        let select = o
            .selection
            .clone()
            .map_or(Selection::LinearLayers, Selection::Only);
        let n = convert_dir(
            input,
            output,
            "quantizing",
            |st, file, pb| quantize_tensors(st, file, &select, &o, pb),
            |cfg| {
                cfg.insert(
                    "quantization_config".into(),
                    quantization_config(o.statistics),
                );
            },
        )?;
        eprintln!(
            "quantized {n} tensor(s) to NF4 (block {}{what}) on {describe} -> {}",
            o.blocksize,
            output.display()
        );
        return Ok(());
    }
    let out = Output::new(output, &[input], o.force)?;
    let (bytes, metadata) = read_safetensors(input)?;
    let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
    let select = o
        .selection
        .clone()
        .map_or(Selection::Matrices, Selection::Only);
    let pb = byte_bar(file_size(input), "quantizing");
    let (tensors, n) = quantize_tensors(&st, input, &select, &o, &pb)?;
    pb.finish_and_clear();
    if n == 0 {
        eprintln!(
            "warning: no tensor of {} was selected for quantization{}; the output is a copy",
            input.display(),
            if o.selection.is_some() {
                " by --only"
            } else {
                " (no floating tensor with 2+ dimensions)"
            }
        );
    }
    out.write(&tensors, metadata)?;
    eprintln!(
        "quantized {n} tensor(s) to NF4 (block {}{what}) on {describe} -> {}",
        o.blocksize,
        output.display()
    );
    Ok(())
}

/// `qadapt dequantize` on a file or a model directory.
pub(crate) fn dequantize(
    input: &Path,
    output: &Path,
    dtype: Option<DType>,
    device: &Device,
    force: bool,
) -> Result<()> {
    if input.is_dir() {
        let n = convert_dir(
            input,
            output,
            "dequantizing",
            |st, file, pb| dequantize_tensors(st, file, dtype, device, pb),
            |cfg| {
                cfg.remove("quantization_config");
            },
        )?;
        if n == 0 {
            bail!("{}: no NF4 tensors in any shard", input.display());
        }
        eprintln!(
            "dequantized {n} tensor(s) on {} -> {}",
            device.describe(),
            output.display()
        );
        return Ok(());
    }
    let out = Output::new(output, &[input], force)?;
    let (bytes, metadata) = read_safetensors(input)?;
    let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
    if bnb::quantized_names(&st).is_empty() {
        bail!(
            "{}: no NF4 tensors (no key ends in {})",
            input.display(),
            bnb::QUANT_STATE_SUFFIX
        );
    }
    let pb = byte_bar(file_size(input), "dequantizing");
    let (tensors, n) = dequantize_tensors(&st, input, dtype, device, &pb)?;
    pb.finish_and_clear();
    out.write(&tensors, metadata)?;
    eprintln!(
        "dequantized {n} tensor(s) on {} -> {}",
        device.describe(),
        output.display()
    );
    Ok(())
}

/// What transformers writes for `BitsAndBytesConfig(load_in_4bit=True, nf4, bf16 compute)`.
fn quantization_config(statistics: Statistics) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": statistics == Statistics::DoubleQuant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

const INDEX: &str = "model.safetensors.index.json";

/// Converts every shard of the model directory `input` into a new directory `output` with
/// `convert`, edits config.json with `edit_config`, copies the other files; returns how many
/// tensors `convert` changed.
fn convert_dir(
    input: &Path,
    output: &Path,
    verb: &str,
    mut convert: impl FnMut(&SafeTensors<'_>, &Path, &ProgressBar) -> Result<(Vec<OnDiskTensor>, usize)>,
    edit_config: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<usize> {
    let config_path = input.join("config.json");
    let config_text = fs::read_to_string(&config_path).with_context(|| {
        format!(
            "{} is not a model directory (no readable config.json)",
            input.display()
        )
    })?;
    let mut config: Value = serde_json::from_str(&config_text)
        .map_err(|e| anyhow!("{}: not valid JSON ({e})", config_path.display()))?;
    let Some(config_map) = config.as_object_mut() else {
        bail!("{}: not a JSON object", config_path.display());
    };
    edit_config(config_map);
    let (shards, index) = shard_files(input)?;
    new_directory(output, |tmp| {
        let total: u64 = shards.iter().map(|s| file_size(&input.join(s))).sum();
        let pb = byte_bar(total, verb);
        let mut changed = 0;
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for shard in &shards {
            let path = input.join(shard);
            let (bytes, metadata) = read_safetensors(&path)?;
            let st = SafeTensors::deserialize(&bytes).expect("validated by read_safetensors");
            let (tensors, n) = convert(&st, &path, &pb)?;
            changed += n;
            for t in &tensors {
                weight_map.insert(t.name.clone(), Value::String(shard.clone()));
                total_size += t.data.len() as u64;
            }
            write_safetensors(&tmp.join(shard), &tensors, metadata)?;
        }
        pb.finish_and_clear();
        if let Some(mut index) = index.clone() {
            index["weight_map"] = Value::Object(weight_map.into_iter().collect());
            if let Some(meta) = index.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("total_size".into(), json!(total_size));
            }
            fs::write(
                tmp.join(INDEX),
                serde_json::to_string_pretty(&index)? + "\n",
            )?;
        }
        fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&config)? + "\n",
        )?;
        copy_other_files(input, tmp, |file| {
            file == "config.json" || file == INDEX || shards.iter().any(|s| s == file)
        })?;
        Ok(changed)
    })
}

/// The safetensors files of a model directory (sorted), and its index when sharded.
fn shard_files(dir: &Path) -> Result<(Vec<String>, Option<Value>)> {
    let index_path = dir.join(INDEX);
    if index_path.is_file() {
        let index: Value = serde_json::from_str(&fs::read_to_string(&index_path)?)
            .map_err(|e| anyhow!("{}: not valid JSON ({e})", index_path.display()))?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no weight_map", index_path.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        shards.sort();
        shards.dedup();
        for s in &shards {
            // Inside the directory (no absolute path, no '..'), as the loader requires.
            qadapt_train::weights::file_in_dir(dir, &index_path, s)?;
            // The output writes each shard under its name: a plain file name only.
            if s.contains('/') || s.contains('\\') || !dir.join(s).is_file() {
                bail!("{}: shard {s} is missing", index_path.display());
            }
        }
        return Ok((shards, Some(index)));
    }
    if dir.join("model.safetensors").is_file() {
        return Ok((vec!["model.safetensors".into()], None));
    }
    bail!("{}: no model.safetensors nor {INDEX}", dir.display())
}
