//! LoRA adapters on the decoder's linear layers, in HF PEFT's format.
//!
//! A targeted projection `y = x W^T` becomes `y = x W^T + s (x A^T) B^T` with `A [r, in]`,
//! `B [out, r]` and `s = alpha / r`, or `alpha / sqrt(r)` with rsLoRA: the same math as
//! [`qadapt::lora`] (whose fused bf16/NF4 kernels take these matrices through
//! [`LoraAdapter::adapter_stack`]), here in the model's f32 (or f64) with f32 products. With
//! `u = s x A^T` (saved by the forward):
//! ```text
//! dB += dy^T u          g = s dy B          dA += g^T x          dx += g A
//! ```
//! Files: `adapter_config.json` (peft_type "LORA": r, lora_alpha, use_rslora, lora_dropout,
//! target_modules) and `adapter_model.safetensors` with
//! `base_model.model.<module>.lora_A.weight [r, in]` and `.lora_B.weight [out, r]`. A target
//! matches a module whose path equals it or ends with `.<target>` (PEFT's rule for a list of
//! names); only the seven projections of the decoder layers can be targets. PEFT options that
//! change the math (DoRA, biases, fan_in_fan_out, per-module rank or alpha patterns, a regex
//! target) are refused when reading rather than silently ignored.
//!
//! Dropout (`lora_dropout` = p) acts on the adapter's input only, as PEFT's
//! `lora_B(lora_A(dropout(x)))`: in training, `y = x W^T + s (d(x) A^T) B^T` with
//! `d(x) = x ⊙ m`, `m_j = 1/(1-p)` with probability 1-p and 0 otherwise (inverted dropout, so
//! `E[d(x)] = x`). The backward uses the same mask: `dA += g^T d(x)`, `dx += (g A) ⊙ m`. Evaluation
//! (logits, `qadapt logits`, the golden tests) is PEFT's eval mode: no dropout. The masks are not
//! drawn from a running generator but computed from a [`DropoutKey`] (seed, step, micro-batch),
//! the layer and the projection ([`dropout_mask`]), so a run is reproducible, a resumed run draws
//! the masks the uninterrupted one would have, and the backward regenerates the forward's mask
//! instead of storing it.

use std::collections::HashSet;
use std::path::Path;

use half::bf16;
use qadapt::ops::dropout::{DropoutMask, GOLDEN, mix};
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::{Accumulate, Real};
use qadapt::{Error, Result};
use safetensors::SafeTensors;
use serde_json::{Value, json};

use crate::config::LlamaConfig;
use crate::peft_io::write_adapter;
use crate::rng::uniform;
use crate::weights::{Proj, to_f32};
use crate::{format_err, invalid};

/// The hyper-parameters of a LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank r.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `lora_dropout`, applied only in training mode (a [`DropoutKey`] given to the forward).
    pub dropout: f64,
    /// Module names or path suffixes, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
}

impl LoraConfig {
    /// The scale s of the low-rank term.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Whether `target_modules` selects this projection of `layer`.
    pub fn targets(&self, layer: usize, p: Proj) -> bool {
        let path = p.module(layer);
        self.target_modules
            .iter()
            .any(|t| path == *t || path.ends_with(&format!(".{t}")))
    }

    /// Trainable parameters on `model`: `r * (in + out)` per targeted projection, computed
    /// without allocating (`None` on overflow).
    pub fn num_params(&self, model: &LlamaConfig) -> Option<u64> {
        let mut n = 0u64;
        for l in 0..model.num_hidden_layers {
            for &p in &Proj::ALL {
                if self.targets(l, p) {
                    let (inp, out) = p.dims(model);
                    n = n.checked_add(crate::budget::product(&[self.r, inp.checked_add(out)?])?)?;
                }
            }
        }
        Some(n)
    }
}

/// The two matrices of one adapted projection.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair<T> {
    /// `lora_A.weight [r, in]`.
    pub a: Vec<T>,
    /// `lora_B.weight [out, r]`.
    pub b: Vec<T>,
}

/// How [`LoraAdapter::new`] fills A and B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: A uniform in `±1/sqrt(in)` (kaiming-uniform with `a = sqrt(5)`), B = 0, so
    /// the adapted model starts equal to the base. Deterministic in the seed.
    Peft {
        /// Seed of the generator.
        seed: u64,
    },
    /// A = B = 0 (the shape of a gradient).
    Zeros,
}

/// A LoRA adapter for every targeted projection of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter<T> {
    /// The hyper-parameters.
    pub config: LoraConfig,
    /// `pairs[layer][proj.index()]`, `None` where not targeted.
    pub pairs: Vec<Vec<Option<LoraPair<T>>>>,
}

/// Key of one LoRA matrix in `adapter_model.safetensors`.
pub fn peft_key(layer: usize, p: Proj, which: char) -> String {
    format!("base_model.model.{}.lora_{which}.weight", p.module(layer))
}

/// Which dropout masks a training forward draws: one key per forward (per micro-batch), e.g.
/// `step` the optimizer step being computed and `micro` the micro-batch within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DropoutKey {
    /// The run's seed.
    pub seed: u64,
    /// The optimizer step.
    pub step: u64,
    /// The micro-batch within the step.
    pub micro: u64,
}

/// One adapter's LoRA term on a projection, `y (=|+=) u B^T` with `u = s (x A^T)`, for
/// `x [rows, inp]`, `A [r, inp]`, `B [out, r]`, `y [rows, out]`; `u [rows, r]` is left for a
/// backward. The term's math, written once for the CPU model: the training model applies it to
/// the batch (`x` after LoRA dropout) and the generator to each adapter's rows.
#[allow(clippy::too_many_arguments)]
pub fn lora_term<T: Real>(
    x: &[T],
    a: &[T],
    b: &[T],
    (inp, r, out): (usize, usize, usize),
    s: T,
    u: &mut [T],
    y: &mut [T],
    acc: Accumulate,
) -> Result<()> {
    let rows = u.len() / r.max(1);
    let down = LinearShape { rows, inp, out: r };
    linear::forward(down, x, a, u, Accumulate::Overwrite)?;
    u.iter_mut().for_each(|v| *v *= s);
    let up = LinearShape { rows, inp: r, out };
    linear::forward(up, u, b, y, acc)
}

/// The name of the dropout mask of projection `p` of `layer` under `key`: a hash of (seed, step,
/// micro-batch, layer, projection), the `base` of its [`DropoutMask`].
pub fn dropout_base(key: DropoutKey, layer: usize, p: Proj) -> u64 {
    let site = ((layer as u64) << 8) | p.index() as u64;
    [key.step, key.micro, site]
        .into_iter()
        .fold(mix(key.seed), |h, v| mix(h ^ mix(v.wrapping_add(GOLDEN))))
}

/// The dropout multipliers for the `len` input elements (`[n, in]` row-major) of projection `p`
/// of `layer` under `key`: `1/(1-prob)` where kept, 0 where dropped. Element j is dropped iff
/// `u_j < prob`, with `u_j` uniform in [0, 1) from the top 53 bits of a counter-based hash of
/// (key, layer, p, j) ([`DropoutMask`] named by [`dropout_base`]), so any mask can be
/// recomputed alone, on the CPU or on a device. `prob` must be in [0, 1).
pub fn dropout_mask<T: Real>(
    key: DropoutKey,
    prob: f64,
    layer: usize,
    p: Proj,
    len: usize,
) -> Result<Vec<T>> {
    let mask = DropoutMask::new(dropout_base(key, layer, p), prob).map_err(|_| {
        invalid(
            "lora dropout",
            format!("lora_dropout = {prob} must be in [0, 1)"),
        )
    })?;
    let keep = T::from_f64(1.0 / (1.0 - prob));
    Ok((0..len as u64)
        .map(|j| if mask.kept(j) { keep } else { T::ZERO })
        .collect())
}

impl<T: Real> LoraAdapter<T> {
    /// Whether the adapter has a pair exactly where its config targets one, each `A [r, in]`
    /// and `B [out, r]` for `model`'s projection.
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        let r = self.config.r;
        self.pairs.len() == model.num_hidden_layers
            && self.pairs.iter().enumerate().all(|(l, layer)| {
                layer.len() == Proj::ALL.len()
                    && Proj::ALL.iter().zip(layer).all(|(&p, pair)| {
                        let (inp, out) = p.dims(model);
                        pair.as_ref()
                            .is_none_or(|pr| pr.a.len() == r * inp && pr.b.len() == out * r)
                            && (pair.is_some() == self.config.targets(l, p))
                    })
            })
    }

    /// An adapter on `model`, checking that r > 0 and that every target selects some projection.
    pub fn new(model: &LlamaConfig, config: LoraConfig, init: LoraInit) -> Result<Self> {
        const OP: &str = "lora adapter";
        if config.r == 0 {
            return Err(invalid(OP, "rank r must be positive"));
        }
        for t in &config.target_modules {
            let hit = (0..model.num_hidden_layers).any(|l| {
                Proj::ALL.iter().any(|&p| {
                    let path = p.module(l);
                    path == *t || path.ends_with(&format!(".{t}"))
                })
            });
            if !hit {
                return Err(invalid(
                    OP,
                    format!("target module {t:?} matches no projection of a decoder layer"),
                ));
            }
        }
        crate::budget::check_elements(
            &format!("r = {}: the LoRA matrices", config.r),
            config.num_params(model),
            std::mem::size_of::<T>(),
        )
        .map_err(|e| invalid(OP, e))?;
        let mut rng = crate::rng::stream(match init {
            LoraInit::Peft { seed } => seed,
            LoraInit::Zeros => 0,
        });
        let r = config.r;
        let pairs = (0..model.num_hidden_layers)
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        config.targets(l, p).then(|| {
                            let (inp, out) = p.dims(model);
                            let bound = 1.0 / (inp as f64).sqrt();
                            let a = (0..r * inp)
                                .map(|_| match init {
                                    LoraInit::Peft { .. } => T::from_f64(bound * uniform(&mut rng)),
                                    LoraInit::Zeros => T::ZERO,
                                })
                                .collect();
                            LoraPair {
                                a,
                                b: vec![T::ZERO; out * r],
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(LoraAdapter { config, pairs })
    }

    /// The pair of one projection, if it is adapted.
    pub fn pair(&self, layer: usize, p: Proj) -> Option<&LoraPair<T>> {
        self.pairs.get(layer)?.get(p.index())?.as_ref()
    }

    /// The same adapter with every matrix mapped through `f` (same config, same pairs).
    pub fn map<U>(&self, f: impl Fn(&[T]) -> Vec<U>) -> LoraAdapter<U> {
        LoraAdapter {
            config: self.config.clone(),
            pairs: (self.pairs.iter())
                .map(|l| {
                    l.iter()
                        .map(|o| {
                            o.as_ref().map(|p| LoraPair {
                                a: f(&p.a),
                                b: f(&p.b),
                            })
                        })
                        .collect()
                })
                .collect(),
        }
    }

    /// The same adapter with every matrix zero (gradient accumulators).
    pub fn zeros_like(&self) -> Self {
        self.map(|v| vec![T::ZERO; v.len()])
    }

    /// `(PEFT key, shape, values)` of every matrix, layer by layer, A before B.
    pub fn named<'a>(&'a self, model: &LlamaConfig) -> Vec<(String, Vec<usize>, &'a [T])> {
        let r = self.config.r;
        let mut out = Vec::new();
        for (l, layer) in self.pairs.iter().enumerate() {
            for (&p, pair) in Proj::ALL.iter().zip(layer) {
                if let Some(pair) = pair {
                    let (inp, o) = p.dims(model);
                    out.push((peft_key(l, p, 'A'), vec![r, inp], pair.a.as_slice()));
                    out.push((peft_key(l, p, 'B'), vec![o, r], pair.b.as_slice()));
                }
            }
        }
        out
    }

    /// The same adapter in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> LoraAdapter<U> {
        self.map(|v| v.iter().map(|x| U::from_f64(x.to_f64())).collect())
    }

    /// One projection's adapter as a [`qadapt::lora::AdapterStack`] (bf16, one adapter), the input
    /// of the fused LoRA layers and kernels.
    pub fn adapter_stack(&self, layer: usize, p: Proj) -> Result<qadapt::lora::AdapterStack> {
        let pair = self.pair(layer, p).ok_or_else(|| {
            invalid(
                "lora adapter",
                format!("{} is not adapted", p.module(layer)),
            )
        })?;
        let h = |v: &Vec<T>| v.iter().map(|x| bf16::from_f64(x.to_f64())).collect();
        qadapt::lora::AdapterStack::new(
            self.config.r,
            h(&pair.a),
            h(&pair.b),
            vec![self.config.scaling() as f32],
        )
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`.
    pub fn save(&self, dir: &Path, model: &LlamaConfig) -> Result<()> {
        let mut targets = self.config.target_modules.clone();
        targets.sort();
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "r": self.config.r,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "use_rslora": self.config.use_rslora,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        write_adapter(dir, &cfg, &self.named(model))
    }
}

/// Reads the hyper-parameters from an `adapter_config.json`, refusing options this crate does not
/// compute.
pub fn read_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        file: path.to_owned(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format_err(path, e))?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    if get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(format_err(path, "peft_type is not \"LORA\""));
    }
    let refuse = |what: &str| Err(format_err(path, format!("{what} is not supported")));
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return refuse("use_dora");
    }
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return refuse("fan_in_fan_out");
    }
    if get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return refuse("a bias other than \"none\"");
    }
    if get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return refuse("lora_bias");
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return refuse(k);
        }
    }
    for k in [
        "layers_to_transform",
        "layer_replication",
        "target_parameters",
    ] {
        if get(k).is_some() {
            return refuse(k);
        }
    }
    if get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return refuse("modules_to_save");
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| format_err(path, "no integer \"r\""))? as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| format_err(path, "no number \"lora_alpha\""))?;
    let target_modules = match get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format_err(path, "target_modules holds a non-string"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(_)) => return refuse("a regex target_modules"),
        _ => return Err(format_err(path, "no \"target_modules\" list")),
    };
    Ok(LoraConfig {
        r,
        alpha,
        use_rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
        dropout: get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target_modules,
    })
}

/// Loads a PEFT LoRA adapter directory for `model` (matrices widened to f32). Every matrix the
/// config implies must be present with its shape, and the file may hold no other LoRA matrix.
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<LoraAdapter<f32>> {
    let config = read_config(&dir.join("adapter_config.json"))?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        file: path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(&path, e))?;
    let cfg_path = dir.join("adapter_config.json");
    // Which tensors the config implies, from the names alone (nothing is allocated yet).
    let mut known: HashSet<String> = HashSet::new();
    for l in 0..model.num_hidden_layers {
        for &p in &Proj::ALL {
            if config.targets(l, p) {
                known.extend(['A', 'B'].map(|w| peft_key(l, p, w)));
            }
        }
    }
    let mut names = st.names();
    names.sort();
    if let Some(extra) = names
        .into_iter()
        .find(|k| k.contains(".lora_") && !known.contains(*k))
    {
        return Err(format_err(
            &path,
            format!("tensor {extra} belongs to no module of target_modules"),
        ));
    }
    // r sizes every matrix: it must be the rank of the tensors present before anything is
    // allocated by it.
    for l in 0..model.num_hidden_layers {
        for &p in &Proj::ALL {
            if !config.targets(l, p) {
                continue;
            }
            let key = peft_key(l, p, 'A');
            let t = st
                .tensor(&key)
                .map_err(|_| format_err(&path, format!("missing tensor {key}")))?;
            let want = [config.r, p.dims(model).0];
            if t.shape() != want {
                return Err(format_err(
                    &path,
                    format!(
                        "tensor {key} has shape {:?}, expected {want:?} ({}: r = {})",
                        t.shape(),
                        cfg_path.display(),
                        config.r
                    ),
                ));
            }
        }
    }
    let mut adapter = LoraAdapter::<f32>::new(model, config, LoraInit::Zeros)
        .map_err(|e| format_err(&cfg_path, e))?;
    let r = adapter.config.r;
    for (l, layer) in adapter.pairs.iter_mut().enumerate() {
        for (&p, pair) in Proj::ALL.iter().zip(layer.iter_mut()) {
            let Some(pair) = pair else { continue };
            let (inp, out) = p.dims(model);
            for (which, dst, shape) in [('A', &mut pair.a, [r, inp]), ('B', &mut pair.b, [out, r])]
            {
                let key = peft_key(l, p, which);
                let t = st
                    .tensor(&key)
                    .map_err(|_| format_err(&path, format!("missing tensor {key}")))?;
                if t.shape() != shape {
                    return Err(format_err(
                        &path,
                        format!("tensor {key} has shape {:?}, expected {shape:?}", t.shape()),
                    ));
                }
                *dst = to_f32(&path, &key, t.dtype(), t.data())?;
            }
        }
    }
    Ok(adapter)
}
