//! The parameters of a Llama model, named and shaped as in HF checkpoints, and their loading from
//! `model.safetensors` or a sharded `model.safetensors.index.json`.
//!
//! Every tensor is row-major with PyTorch's layout (`Linear.weight` is `[out, in]`). The same
//! struct holds gradients (see [`crate::model::Gradients`]). bf16, f16 and f32 files are all
//! widened to f32 on load; a weight stored as a bitsandbytes 4-bit tensor (the keys of
//! [`qadapt::nf4::bnb`], as transformers saves a `load_in_4bit` model) is dequantized to f32. A missing tensor, a shape that does not match the config or an
//! unsupported dtype is one [`qadapt::Error::Format`] naming the file and the tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use qadapt::nf4::bnb;
use qadapt::ops::Real;
use qadapt::{Error, Result};
use safetensors::{Dtype, SafeTensors};

use crate::config::LlamaConfig;
use crate::format_err;
use crate::nf4::Nf4Projections;

/// One decoder layer's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights<T> {
    /// `input_layernorm.weight [C]`.
    pub input_layernorm: Vec<T>,
    /// `self_attn.q_proj.weight [heads * D, C]`.
    pub q_proj: Vec<T>,
    /// `self_attn.k_proj.weight [kv_heads * D, C]`.
    pub k_proj: Vec<T>,
    /// `self_attn.v_proj.weight [kv_heads * D, C]`.
    pub v_proj: Vec<T>,
    /// `self_attn.o_proj.weight [C, heads * D]`.
    pub o_proj: Vec<T>,
    /// `post_attention_layernorm.weight [C]`.
    pub post_attention_layernorm: Vec<T>,
    /// `mlp.gate_proj.weight [I, C]`.
    pub gate_proj: Vec<T>,
    /// `mlp.up_proj.weight [I, C]`.
    pub up_proj: Vec<T>,
    /// `mlp.down_proj.weight [C, I]`.
    pub down_proj: Vec<T>,
}

/// The seven linear layers of a decoder layer, in [`layout`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl Proj {
    /// All seven, in order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    /// The full HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.name())
    }

    /// `(in_features, out_features)` under `cfg`.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (c, i, q, kv) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
        );
        match self {
            Proj::Q => (c, q),
            Proj::K | Proj::V => (c, kv),
            Proj::O => (q, c),
            Proj::Gate | Proj::Up => (c, i),
            Proj::Down => (i, c),
        }
    }

    /// Index in [`Proj::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl<T> LayerWeights<T> {
    /// The weight `[out, in]` of one projection.
    pub fn proj(&self, p: Proj) -> &[T] {
        match p {
            Proj::Q => &self.q_proj,
            Proj::K => &self.k_proj,
            Proj::V => &self.v_proj,
            Proj::O => &self.o_proj,
            Proj::Gate => &self.gate_proj,
            Proj::Up => &self.up_proj,
            Proj::Down => &self.down_proj,
        }
    }

    /// The weight of one projection, mutable.
    pub fn proj_mut(&mut self, p: Proj) -> &mut [T] {
        match p {
            Proj::Q => &mut self.q_proj,
            Proj::K => &mut self.k_proj,
            Proj::V => &mut self.v_proj,
            Proj::O => &mut self.o_proj,
            Proj::Gate => &mut self.gate_proj,
            Proj::Up => &mut self.up_proj,
            Proj::Down => &mut self.down_proj,
        }
    }
}

/// Every parameter of a Llama model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaWeights<T> {
    /// `model.embed_tokens.weight [V, C]`.
    pub embed_tokens: Vec<T>,
    /// `model.layers.{i}.*`.
    pub layers: Vec<LayerWeights<T>>,
    /// `model.norm.weight [C]`.
    pub norm: Vec<T>,
    /// `lm_head.weight [V, C]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<T>>,
}

/// One frozen tensor of a Llama model, named by its place (what a loader that streams the model
/// tensor by tensor asks for: [`crate::backend::LoraModel::from_tensors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseTensor {
    /// `model.embed_tokens.weight [V, C]`.
    Embed,
    /// `lm_head.weight [V, C]` (untied models only).
    Head,
    /// `model.norm.weight [C]`.
    FinalNorm,
    /// `model.layers.{l}.input_layernorm.weight [C]`.
    InputNorm(usize),
    /// `model.layers.{l}.post_attention_layernorm.weight [C]`.
    PostNorm(usize),
    /// A projection's weight `[out, in]` in layer `l`.
    Proj(usize, Proj),
}

impl BaseTensor {
    /// Its HF name.
    pub fn name(self) -> String {
        match self {
            BaseTensor::Embed => "model.embed_tokens.weight".to_owned(),
            BaseTensor::Head => "lm_head.weight".to_owned(),
            BaseTensor::FinalNorm => "model.norm.weight".to_owned(),
            BaseTensor::InputNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            BaseTensor::PostNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            BaseTensor::Proj(l, p) => format!("{}.weight", p.module(l)),
        }
    }

    /// Every tensor of `cfg`'s model in the order of [`LlamaWeights::slots`] (embedding; per
    /// layer its input norm, q, k, v, o, post-attention norm, gate, up, down; the final norm; the
    /// head unless tied).
    pub fn all(cfg: &LlamaConfig) -> Vec<BaseTensor> {
        let mut out = vec![BaseTensor::Embed];
        for l in 0..cfg.num_hidden_layers {
            let proj = |p| BaseTensor::Proj(l, p);
            out.push(BaseTensor::InputNorm(l));
            out.extend([Proj::Q, Proj::K, Proj::V, Proj::O].map(proj));
            out.push(BaseTensor::PostNorm(l));
            out.extend([Proj::Gate, Proj::Up, Proj::Down].map(proj));
        }
        out.push(BaseTensor::FinalNorm);
        if !cfg.tie_word_embeddings {
            out.push(BaseTensor::Head);
        }
        out
    }

    /// Its shape under `cfg` (`[out, in]` for a projection).
    pub fn shape(self, cfg: &LlamaConfig) -> Vec<usize> {
        match self {
            BaseTensor::Embed | BaseTensor::Head => vec![cfg.vocab_size, cfg.hidden_size],
            BaseTensor::FinalNorm | BaseTensor::InputNorm(_) | BaseTensor::PostNorm(_) => {
                vec![cfg.hidden_size]
            }
            BaseTensor::Proj(_, p) => {
                let (inp, out) = p.dims(cfg);
                vec![out, inp]
            }
        }
    }

    /// Its number of elements under `cfg`.
    pub fn len(self, cfg: &LlamaConfig) -> usize {
        match self {
            BaseTensor::Embed | BaseTensor::Head => cfg.vocab_size * cfg.hidden_size,
            BaseTensor::FinalNorm | BaseTensor::InputNorm(_) | BaseTensor::PostNorm(_) => {
                cfg.hidden_size
            }
            BaseTensor::Proj(_, p) => {
                let (inp, out) = p.dims(cfg);
                inp * out
            }
        }
    }

    /// Whether it is an RMSNorm weight.
    pub fn is_norm(self) -> bool {
        matches!(
            self,
            BaseTensor::FinalNorm | BaseTensor::InputNorm(_) | BaseTensor::PostNorm(_)
        )
    }

    /// A number unique to the tensor within a model (a random stream per tensor).
    pub fn ordinal(self) -> u64 {
        let per_layer = 2 + Proj::ALL.len() as u64;
        match self {
            BaseTensor::Embed => 0,
            BaseTensor::Head => 1,
            BaseTensor::FinalNorm => 2,
            BaseTensor::InputNorm(l) => 3 + per_layer * l as u64,
            BaseTensor::PostNorm(l) => 4 + per_layer * l as u64,
            BaseTensor::Proj(l, p) => 5 + per_layer * l as u64 + p.index() as u64,
        }
    }
}

/// Random weights for benchmarks at real shapes (`--random-shape`), one tensor at a time and
/// reproducible: RMSNorm weights are 1; every other element is uniform with the standard
/// deviation 0.02 that transformers initializes Llama with, drawn from ChaCha8 seeded by `seed`
/// on the tensor's own stream ([`BaseTensor::ordinal`]), element `i` from the stream's word `i`,
/// so the values do not depend on the thread count that draws them in parallel.
pub fn random_tensor(cfg: &LlamaConfig, seed: u64, t: BaseTensor) -> Vec<f32> {
    use rand::{RngCore, SeedableRng};
    use rayon::prelude::*;
    let n = t.len(cfg);
    if t.is_norm() {
        return vec![1.0; n];
    }
    // U(-a, a) has standard deviation a / sqrt(3).
    let a = 0.02 * 3f32.sqrt();
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(t.ordinal());
            rng.set_word_pos((c * CHUNK) as u128);
            for v in chunk {
                // 24 random bits: u in [0, 1) exactly representable in f32.
                let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
                *v = (2.0 * u - 1.0) * a;
            }
        });
    out
}

/// HF names and shapes of every parameter, in the order of [`LlamaWeights::slots`].
pub fn layout(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    BaseTensor::all(cfg)
        .into_iter()
        .map(|t| (t.name(), t.shape(cfg)))
        .collect()
}

impl LlamaWeights<f32> {
    /// The random model of [`random_tensor`] in memory (what [`crate::backend::LoraModel::random`]
    /// streams to a backend, for checking it on the CPU).
    pub fn random(cfg: &LlamaConfig, seed: u64) -> Self {
        let mut w = LlamaWeights::zeros(cfg);
        for (t, slot) in BaseTensor::all(cfg).into_iter().zip(w.slots_mut()) {
            *slot = random_tensor(cfg, seed, t);
        }
        w
    }
}

impl<T: Real> LlamaWeights<T> {
    /// All-zero parameters (the start of a gradient accumulation).
    pub fn zeros(cfg: &LlamaConfig) -> Self {
        let mut w = LlamaWeights {
            embed_tokens: Vec::new(),
            layers: (0..cfg.num_hidden_layers)
                .map(|_| LayerWeights {
                    input_layernorm: Vec::new(),
                    q_proj: Vec::new(),
                    k_proj: Vec::new(),
                    v_proj: Vec::new(),
                    o_proj: Vec::new(),
                    post_attention_layernorm: Vec::new(),
                    gate_proj: Vec::new(),
                    up_proj: Vec::new(),
                    down_proj: Vec::new(),
                })
                .collect(),
            norm: Vec::new(),
            lm_head: (!cfg.tie_word_embeddings).then(Vec::new),
        };
        for ((_, shape), slot) in layout(cfg).iter().zip(w.slots_mut()) {
            *slot = vec![T::ZERO; shape.iter().product()];
        }
        w
    }

    /// The tensors in [`layout`] order.
    pub fn slots(&self) -> Vec<&Vec<T>> {
        let mut out = vec![&self.embed_tokens];
        for l in &self.layers {
            out.extend([
                &l.input_layernorm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.post_attention_layernorm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]);
        }
        out.push(&self.norm);
        out.extend(self.lm_head.as_ref());
        out
    }

    /// The tensors in [`layout`] order, mutable.
    pub fn slots_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut out = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            out.extend([
                &mut l.input_layernorm,
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.post_attention_layernorm,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        out.push(&mut self.norm);
        out.extend(self.lm_head.as_mut());
        out
    }

    /// `(HF name, shape, values)` of every tensor.
    pub fn named<'a>(&'a self, cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, &'a [T])> {
        layout(cfg)
            .into_iter()
            .zip(self.slots())
            .map(|((n, s), v)| (n, s, v.as_slice()))
            .collect()
    }

    /// The same parameters converted to another [`Real`] type (f32 <-> f64).
    pub fn cast<U: Real>(&self) -> LlamaWeights<U> {
        let c = |v: &Vec<T>| {
            v.iter()
                .map(|x| U::from_f64(x.to_f64()))
                .collect::<Vec<U>>()
        };
        LlamaWeights {
            embed_tokens: c(&self.embed_tokens),
            layers: self
                .layers
                .iter()
                .map(|l| LayerWeights {
                    input_layernorm: c(&l.input_layernorm),
                    q_proj: c(&l.q_proj),
                    k_proj: c(&l.k_proj),
                    v_proj: c(&l.v_proj),
                    o_proj: c(&l.o_proj),
                    post_attention_layernorm: c(&l.post_attention_layernorm),
                    gate_proj: c(&l.gate_proj),
                    up_proj: c(&l.up_proj),
                    down_proj: c(&l.down_proj),
                })
                .collect(),
            norm: c(&self.norm),
            lm_head: self.lm_head.as_ref().map(c),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        file: path.to_owned(),
        source,
    })
}

/// Widens a bf16/f16/f32 little-endian tensor to f32.
pub fn to_f32(file: &Path, name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(data),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(data)
            .into_iter()
            .map(bf16::to_f32)
            .collect(),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(data)
            .into_iter()
            .map(f16::to_f32)
            .collect(),
        other => {
            return Err(format_err(
                file,
                format!("tensor {name} has dtype {other:?}; bf16, f16 or f32 expected"),
            ));
        }
    })
}

/// The path of a file an index names (a shard of `weight_map`), refused unless `name` is a plain
/// relative path inside `dir`: not absolute, no `..` or `.` component, no backslash, and any
/// subdirectory it goes through resolving inside `dir`. The file itself may be a symlink
/// anywhere (an HF cache snapshot links every file to `../../blobs/<hash>`), so only the name
/// and the directories it passes through are checked, not the link's target. `index` names the
/// file the name came from in the error.
pub fn file_in_dir(dir: &Path, index: &Path, name: &str) -> Result<PathBuf> {
    use std::path::Component;
    let bad = |why: &str| format_err(index, format!("entry {name:?}: {why}"));
    if name.is_empty() || name.contains('\\') || name.contains('\0') {
        return Err(bad("not a plain relative file name"));
    }
    let rel = Path::new(name);
    if rel.is_absolute() || name.starts_with('/') {
        return Err(bad(
            "an absolute path (a shard must be inside the model directory)",
        ));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(
            "a path with '..' or '.' (a shard must be inside the model directory)",
        ));
    }
    let path = dir.join(rel);
    if let Some(sub) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        // A subdirectory may not be a link out of the directory.
        if let (Ok(root), Ok(inner)) = (dir.canonicalize(), dir.join(sub).canonicalize())
            && !inner.starts_with(&root)
        {
            return Err(bad("its directory resolves outside the model directory"));
        }
    }
    Ok(path)
}

/// The tensor names and shapes of a safetensors file's header, read without the data (the
/// header length is checked against the file's size first).
pub fn header_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        file: path.to_owned(),
        source,
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| format_err(path, "not a safetensors file (shorter than 8 bytes)"))?;
    let n = u64::from_le_bytes(len);
    // safetensors' own limit on a header is 100 MB.
    if n > size.saturating_sub(8) || n > 100_000_000 {
        return Err(format_err(
            path,
            format!("not a safetensors file (a header of {n} bytes in a file of {size})"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|source| Error::Io {
        file: path.to_owned(),
        source,
    })?;
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format_err(path, format!("not a safetensors header ({e})")))?;
    Ok(v.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, t)| {
            let shape = t
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|s| {
                    s.iter()
                        .map(|d| d.as_u64().map_or(usize::MAX, |d| d as usize))
                        .collect()
                })
                .unwrap_or_default();
            (k, shape)
        })
        .collect())
}

/// Which file holds each tensor: `model.safetensors`, or the `weight_map` of
/// `model.safetensors.index.json` (that one wins when both exist, as in transformers). Every
/// shard name must stay inside `dir` ([`file_in_dir`]).
fn weight_files(dir: &Path) -> Result<(PathBuf, BTreeMap<String, PathBuf>)> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = String::from_utf8(read(&index)?).map_err(|e| format_err(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format_err(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_err(&index, "no \"weight_map\" object"))?;
        let mut out = BTreeMap::new();
        for (k, f) in map {
            let f = f.as_str().ok_or_else(|| {
                format_err(&index, format!("weight_map[{k:?}] is not a file name"))
            })?;
            out.insert(k.clone(), file_in_dir(dir, &index, f)?);
        }
        return Ok((index, out));
    }
    let single = dir.join("model.safetensors");
    if !single.exists() {
        return Err(format_err(
            dir,
            "neither model.safetensors nor model.safetensors.index.json is here",
        ));
    }
    Ok((single, BTreeMap::new()))
}

/// Refuses a config whose layer count the weights cannot hold (a layer needs its tensors: a
/// count above the distinct `model.layers.N.` of the index or header is refused before anything
/// is sized by it), and a model whose f32 copy does not fit [`crate::budget`].
fn check_config_against(
    dir: &Path,
    cfg: &LlamaConfig,
    source: &Path,
    map: &BTreeMap<String, PathBuf>,
) -> Result<()> {
    let config = dir.join("config.json");
    let mut headers: BTreeMap<&Path, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    let names: Vec<String> = if map.is_empty() {
        let h = header_shapes(source)?;
        let names = h.keys().cloned().collect();
        headers.insert(source, h);
        names
    } else {
        map.keys().cloned().collect()
    };
    let layers: std::collections::BTreeSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_prefix("model.layers.")?.split('.').next())
        .collect();
    if cfg.num_hidden_layers > layers.len() {
        return Err(format_err(
            &config,
            format!(
                "num_hidden_layers = {} but {} holds the weights of {} layer(s)",
                cfg.num_hidden_layers,
                source.display(),
                layers.len()
            ),
        ));
    }
    // Every size the config gives must be that of the tensors present (from the headers: no
    // data is read before this). A bitsandbytes 4-bit weight is checked when it is decoded.
    for (name, shape) in layout(cfg) {
        let file: &Path = if map.is_empty() {
            source
        } else {
            match map.get(&name) {
                Some(f) => f,
                None => continue,
            }
        };
        if !headers.contains_key(file) {
            headers.insert(file, header_shapes(file)?);
        }
        let h = &headers[file];
        if h.contains_key(&format!("{name}{}", bnb::QUANT_STATE_SUFFIX)) {
            continue;
        }
        if let Some(got) = h.get(&name)
            && *got != shape
        {
            return Err(format_err(
                file,
                format!(
                    "tensor {name} has shape {got:?}, the config needs {shape:?} ({}: {})",
                    config.display(),
                    sizes_of(cfg, &name)
                ),
            ));
        }
    }
    crate::budget::check_elements(
        "the model's parameters in f32",
        crate::budget::llama_params(cfg),
        4,
    )
    .map_err(|e| format_err(&config, e))
}

/// The config fields that size the tensor `name`, with their values.
fn sizes_of(cfg: &LlamaConfig, name: &str) -> String {
    let c = format!("hidden_size = {}", cfg.hidden_size);
    let v = format!("vocab_size = {}", cfg.vocab_size);
    let i = format!("intermediate_size = {}", cfg.intermediate_size);
    let heads = format!(
        "num_attention_heads = {}, num_key_value_heads = {}, head_dim = {}",
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    );
    if name.contains("embed_tokens") || name.starts_with("lm_head") {
        format!("{v}, {c}")
    } else if name.contains("mlp.") {
        format!("{i}, {c}")
    } else if name.contains("self_attn.") {
        format!("{heads}, {c}")
    } else {
        c
    }
}

/// One tensor as a checkpoint stores it.
#[derive(Debug, Clone)]
pub enum StoredTensor {
    /// bf16, f16 or f32 values, widened to f32.
    Values(Vec<f32>),
    /// A bitsandbytes 4-bit weight: its NF4 codes and (double-quantized) scales, as stored.
    Nf4(qadapt::nf4::Nf4Tensor),
}

impl StoredTensor {
    /// The values (a 4-bit weight dequantized).
    pub fn into_values(self) -> Result<Vec<f32>> {
        match self {
            StoredTensor::Values(v) => Ok(v),
            StoredTensor::Nf4(q) => crate::nf4::dequantize(&q),
        }
    }
}

/// An HF Llama checkpoint (`model.safetensors`, or the shards of `model.safetensors.index.json`)
/// read one tensor at a time: only the shard holding the tensor asked for is in memory (the
/// last one read stays, so tensors asked for in file order read each shard once), and only that
/// tensor is widened to f32. What streams a large model to a device
/// ([`crate::backend::LoraModel::from_checkpoint`]); [`load`] reads a whole model through it.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model's `config.json`.
    pub config: LlamaConfig,
    source: PathBuf,
    map: BTreeMap<String, PathBuf>,
    shard: Option<(PathBuf, Vec<u8>)>,
    shard_reads: usize,
}

impl Checkpoint {
    /// Reads `dir/config.json` and the index, and checks every tensor's shape in the headers
    /// against the config (no tensor data is read).
    pub fn open(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let (source, map) = weight_files(dir)?;
        check_config_against(dir, &config, &source, &map)?;
        Ok(Checkpoint {
            config,
            source,
            map,
            shard: None,
            shard_reads: 0,
        })
    }

    /// How many times a shard was read from disk so far.
    pub fn shard_reads(&self) -> usize {
        self.shard_reads
    }

    /// Tensor `t`, read from its shard (which is read from disk unless it is the last one read).
    pub fn tensor(&mut self, t: BaseTensor) -> Result<StoredTensor> {
        let name = t.name();
        let shape = t.shape(&self.config);
        let file = if self.map.is_empty() {
            self.source.clone()
        } else {
            self.map
                .get(&name)
                .cloned()
                .ok_or_else(|| format_err(&self.source, format!("missing tensor {name}")))?
        };
        if self.shard.as_ref().is_none_or(|(f, _)| *f != file) {
            // The previous shard is dropped before the next one is read.
            self.shard = None;
            self.shard = Some((file.clone(), read(&file)?));
            self.shard_reads += 1;
        }
        let bytes = &self.shard.as_ref().expect("read above").1;
        let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(&file, e))?;
        if st
            .tensor(&format!("{name}{}", bnb::QUANT_STATE_SUFFIX))
            .is_ok()
        {
            let q = bnb::decode(&st, &file, &name)?;
            if q.shape != shape {
                return Err(format_err(
                    &file,
                    format!(
                        "tensor {name} has shape {:?}, the config needs {shape:?}",
                        q.shape
                    ),
                ));
            }
            return Ok(StoredTensor::Nf4(q));
        }
        let v = st
            .tensor(&name)
            .map_err(|_| format_err(&file, format!("missing tensor {name}")))?;
        if v.shape() != shape.as_slice() {
            return Err(format_err(
                &file,
                format!(
                    "tensor {name} has shape {:?}, the config needs {shape:?}",
                    v.shape()
                ),
            ));
        }
        Ok(StoredTensor::Values(to_f32(
            &file,
            &name,
            v.dtype(),
            v.data(),
        )?))
    }
}

/// Loads every parameter [`layout`] lists from the HF directory `dir`, as f32, with the NF4 codes
/// of the projections a bitsandbytes 4-bit checkpoint stores quantized (kept as they are: see
/// [`crate::nf4`]).
pub fn load(dir: &Path, cfg: &LlamaConfig) -> Result<(LlamaWeights<f32>, Nf4Projections)> {
    let mut ck = Checkpoint::open(dir)?;
    if ck.config != *cfg {
        return Err(format_err(
            dir,
            "the config given is not the directory's config.json",
        ));
    }
    let mut w = LlamaWeights::<f32>::zeros(cfg);
    let mut codes = Nf4Projections::none(cfg.num_hidden_layers);
    for (t, slot) in BaseTensor::all(cfg).into_iter().zip(w.slots_mut()) {
        *slot = match ck.tensor(t)? {
            StoredTensor::Values(v) => v,
            StoredTensor::Nf4(q) => {
                let v = crate::nf4::dequantize(&q)
                    .map_err(|e| format_err(dir, format!("tensor {}: {e}", t.name())))?;
                if let BaseTensor::Proj(l, p) = t {
                    codes.set(l, p, q);
                }
                v
            }
        };
    }
    Ok((w, codes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tensors_are_reproducible_whatever_the_threads_and_sized_like_transformers_init() {
        let cfg = LlamaConfig::llama3_2_1b();
        let t = BaseTensor::Proj(3, Proj::Down);
        let a = random_tensor(&cfg, 9, t);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let b = one.install(|| random_tensor(&cfg, 9, t));
        assert_eq!(a, b);
        assert_eq!(a.len(), 2048 * 8192);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let std = (a.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n - mean * mean).sqrt();
        assert!(
            mean.abs() < 1e-4 && (std - 0.02).abs() < 1e-4,
            "{mean} {std}"
        );
        // Another tensor, another seed: other values; norms are ones.
        assert_ne!(
            random_tensor(&cfg, 9, BaseTensor::Proj(3, Proj::Up))[..64],
            a[..64]
        );
        assert_ne!(random_tensor(&cfg, 10, t)[..64], a[..64]);
        assert!(
            random_tensor(&cfg, 9, BaseTensor::PostNorm(0))
                .iter()
                .all(|&v| v == 1.0)
        );
        // The layout is BaseTensor::all's, named and shaped the same.
        let all = BaseTensor::all(&cfg);
        assert_eq!(all.len(), 1 + 16 * 9 + 1);
        for (t, (name, shape)) in all.iter().zip(layout(&cfg)) {
            assert_eq!((t.name(), t.shape(&cfg)), (name, shape.clone()));
            assert_eq!(t.len(&cfg), shape.iter().product::<usize>());
        }
    }
}
