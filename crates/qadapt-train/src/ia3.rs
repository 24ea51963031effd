//! (IA)³ adapters (Liu et al. 2022) on the decoder's linear layers, in HF PEFT's format.
//!
//! A targeted projection `y = x W^T` gets a learned vector `l` that rescales either its output
//! (`y = (x W^T) * l`, `l [out]`) or, for a "feed-forward" module, its input
//! (`y = (x * l) W^T`, `l [in]`), as PEFT's `IA3Layer` does. Backward, with `y0 = x W^T` saved
//! for output scaling:
//! ```text
//! output:  dl += sum_rows(dy * y0)      dy0 = dy * l         (then the linear backward of dy0)
//! input:   dxs = dy W                   dl += sum_rows(x * dxs)     dx = dxs * l
//! ```
//! Files: `adapter_config.json` (peft_type "IA3", target_modules, feedforward_modules) and
//! `adapter_model.safetensors` with `base_model.model.<module>.ia3_l`: `[out, 1]` for output
//! scaling, `[1, in]` for feed-forward modules (PEFT's shapes). PEFT initializes every `l` to 1,
//! so the adapted model starts equal to the base. Options that change the math (a regex target,
//! modules_to_save, fan_in_fan_out) are refused.

use std::path::Path;

use qadapt::Result;
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::{Accumulate, Real};
use serde_json::{Value, json};

use crate::config::LlamaConfig;
use crate::peft_io::{read_json, read_tensors, str_list, write_adapter};
use crate::weights::Proj;
use crate::{format_err, invalid};

/// The hyper-parameters of an (IA)³ adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    /// Module names or path suffixes that get a scaling vector.
    pub target_modules: Vec<String>,
    /// The subset whose input (not output) is scaled.
    pub feedforward_modules: Vec<String>,
}

fn matches(list: &[String], layer: usize, p: Proj) -> bool {
    let path = p.module(layer);
    list.iter()
        .any(|t| path == *t || path.ends_with(&format!(".{t}")))
}

impl Ia3Config {
    /// Whether `target_modules` selects this projection.
    pub fn targets(&self, layer: usize, p: Proj) -> bool {
        matches(&self.target_modules, layer, p)
    }

    /// Whether this projection scales its input.
    pub fn is_feedforward(&self, layer: usize, p: Proj) -> bool {
        matches(&self.feedforward_modules, layer, p)
    }
}

/// The side of a projection (IA)³ scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ia3Side {
    /// `y = (x * l) W^T`: the feed-forward modules (PEFT's `feedforward_modules`).
    Input,
    /// `y = (x W^T) * l`: every other targeted projection.
    Output,
}

/// `x * s` in place for every row of `x [rows, s.len()]`: (IA)³'s scaling of an input or an
/// output, and of the output gradient in its backward.
pub fn scale_rows<T: Real>(x: &mut [T], s: &[T]) {
    for row in x.chunks_exact_mut(s.len()) {
        row.iter_mut().zip(s).for_each(|(v, g)| *v *= *g);
    }
}

/// `y (=|+=) x W^T` (shape `sh`, `w [out, inp]`) with each row `t`'s (IA)³ hook `hook(t)`, or
/// none: an input-side row is scaled before the product, an output-side row after it. This is
/// (IA)³'s forward on a projection, written once: the training model gives every row the one
/// attached adapter's hook, the generator each row the hook of its own adapter. `xs` is scratch
/// for the scaled input. Returns whether some row scales its output; then, when `keep` is given,
/// it is left holding the unscaled product `x W^T` (all rows), which the backward's `dl` reads.
/// Overwriting, the output rows are scaled in place; adding, the product goes through `keep`
/// (or a temporary) first.
#[allow(clippy::too_many_arguments)]
pub fn hooked_linear<'s, T: Real>(
    sh: LinearShape,
    x: &[T],
    w: &[T],
    y: &mut [T],
    acc: Accumulate,
    hook: impl Fn(usize) -> Option<(Ia3Side, &'s [T])>,
    xs: &mut Vec<T>,
    keep: Option<&mut Vec<T>>,
) -> Result<bool> {
    let (rows, inp, out) = (sh.rows, sh.inp, sh.out);
    let side = |t: usize, want: Ia3Side| hook(t).filter(|(s, _)| *s == want).map(|(_, v)| v);
    let xin: &[T] = if (0..rows).any(|t| side(t, Ia3Side::Input).is_some()) {
        xs.clear();
        xs.extend_from_slice(x);
        for (t, row) in xs.chunks_exact_mut(inp).enumerate() {
            if let Some(s) = side(t, Ia3Side::Input) {
                scale_rows(row, s);
            }
        }
        xs
    } else {
        x
    };
    if !(0..rows).any(|t| side(t, Ia3Side::Output).is_some()) {
        linear::forward(sh, xin, w, y, acc)?;
        return Ok(false);
    }
    let mut tmp = Vec::new();
    let y0 = match (acc, keep) {
        (Accumulate::Overwrite, keep) => {
            linear::forward(sh, xin, w, y, acc)?;
            if let Some(k) = keep {
                k.clear();
                k.extend_from_slice(y);
            }
            for (t, yr) in y.chunks_exact_mut(out).enumerate() {
                if let Some(s) = side(t, Ia3Side::Output) {
                    scale_rows(yr, s);
                }
            }
            return Ok(true);
        }
        (Accumulate::Add, Some(k)) => k,
        (Accumulate::Add, None) => &mut tmp,
    };
    y0.clear();
    y0.resize(rows * out, T::ZERO);
    linear::forward(sh, xin, w, y0, Accumulate::Overwrite)?;
    for (t, (yr, y0r)) in y
        .chunks_exact_mut(out)
        .zip(y0.chunks_exact(out))
        .enumerate()
    {
        let s = side(t, Ia3Side::Output);
        for (k, (o, v)) in yr.iter_mut().zip(y0r).enumerate() {
            *o += s.map_or(*v, |s| *v * s[k]);
        }
    }
    Ok(true)
}

/// Scaling vectors for every targeted projection.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Adapter<T> {
    /// The hyper-parameters.
    pub config: Ia3Config,
    /// `scales[layer][proj.index()]`: `[in]` for feed-forward modules, `[out]` otherwise.
    pub scales: Vec<Vec<Option<Vec<T>>>>,
}

/// Key of one vector in `adapter_model.safetensors`.
pub fn peft_key(layer: usize, p: Proj) -> String {
    format!("base_model.model.{}.ia3_l", p.module(layer))
}

impl<T: Real> Ia3Adapter<T> {
    /// Whether every vector has the length `model` needs: a projection's input width for a
    /// feed-forward module, its output width otherwise.
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        self.scales.len() == model.num_hidden_layers
            && self.scales.iter().enumerate().all(|(l, layer)| {
                layer.len() == Proj::ALL.len()
                    && Proj::ALL.iter().zip(layer).all(|(&p, s)| {
                        let (inp, out) = p.dims(model);
                        let want = if self.config.is_feedforward(l, p) {
                            inp
                        } else {
                            out
                        };
                        s.as_ref().is_none_or(|s| s.len() == want)
                    })
            })
    }

    /// PEFT's initialization (every vector 1: the base model), or zeros with `ones = false`.
    pub fn new(model: &LlamaConfig, config: Ia3Config, ones: bool) -> Result<Self> {
        const OP: &str = "ia3 adapter";
        for t in config
            .target_modules
            .iter()
            .chain(&config.feedforward_modules)
        {
            let hit = (0..model.num_hidden_layers).any(|l| {
                Proj::ALL
                    .iter()
                    .any(|&p| matches(std::slice::from_ref(t), l, p))
            });
            if !hit {
                return Err(invalid(
                    OP,
                    format!("module {t:?} matches no projection of a decoder layer"),
                ));
            }
        }
        if let Some(f) = config
            .feedforward_modules
            .iter()
            .find(|f| !config.target_modules.contains(f))
        {
            return Err(invalid(
                OP,
                format!("feedforward module {f:?} is not in target_modules"),
            ));
        }
        let v = if ones { T::ONE } else { T::ZERO };
        let scales = (0..model.num_hidden_layers)
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        config.targets(l, p).then(|| {
                            let (inp, out) = p.dims(model);
                            vec![
                                v;
                                if config.is_feedforward(l, p) {
                                    inp
                                } else {
                                    out
                                }
                            ]
                        })
                    })
                    .collect()
            })
            .collect();
        Ok(Ia3Adapter { config, scales })
    }

    /// The vector of one projection, if targeted.
    pub fn scale(&self, layer: usize, p: Proj) -> Option<&[T]> {
        self.scales.get(layer)?.get(p.index())?.as_deref()
    }

    /// The hook on one projection, if targeted: the side it scales and its vector. Every runner
    /// of the decoder layer (training, evaluation, generation) applies (IA)³ through this.
    pub fn hook(&self, layer: usize, p: Proj) -> Option<(Ia3Side, &[T])> {
        let side = if self.config.is_feedforward(layer, p) {
            Ia3Side::Input
        } else {
            Ia3Side::Output
        };
        self.scale(layer, p).map(|s| (side, s))
    }

    /// The same adapter with every vector mapped through `f` (same config, same targets).
    pub fn map<U>(&self, f: impl Fn(&[T]) -> Vec<U>) -> Ia3Adapter<U> {
        Ia3Adapter {
            config: self.config.clone(),
            scales: (self.scales.iter())
                .map(|l| l.iter().map(|o| o.as_deref().map(&f)).collect())
                .collect(),
        }
    }

    /// The same adapter with every vector zero (gradient accumulators).
    pub fn zeros_like(&self) -> Self {
        self.map(|v| vec![T::ZERO; v.len()])
    }

    /// The same adapter in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> Ia3Adapter<U> {
        self.map(|v| v.iter().map(|x| U::from_f64(x.to_f64())).collect())
    }

    /// `(PEFT key, shape, values)` of every vector, layer by layer.
    pub fn named(&self) -> Vec<(String, Vec<usize>, &[T])> {
        let mut out = Vec::new();
        for (l, layer) in self.scales.iter().enumerate() {
            for (&p, s) in Proj::ALL.iter().zip(layer) {
                if let Some(s) = s {
                    let shape = if self.config.is_feedforward(l, p) {
                        vec![1, s.len()]
                    } else {
                        vec![s.len(), 1]
                    };
                    out.push((peft_key(l, p), shape, s.as_slice()));
                }
            }
        }
        out
    }

    /// The vectors, mutable, in [`Self::named`] order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        self.scales.iter_mut().flatten().flatten().collect()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut t = self.config.target_modules.clone();
        t.sort();
        let mut f = self.config.feedforward_modules.clone();
        f.sort();
        let cfg = json!({
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "target_modules": t,
            "feedforward_modules": f,
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
        });
        write_adapter(dir, &cfg, &self.named())
    }
}

/// Reads an (IA)³ `adapter_config.json`.
pub fn read_config(path: &Path) -> Result<Ia3Config> {
    let v = read_json(path)?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    if get("peft_type").and_then(Value::as_str) != Some("IA3") {
        return Err(format_err(path, "peft_type is not \"IA3\""));
    }
    if get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(format_err(path, "fan_in_fan_out is not supported"));
    }
    if get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(format_err(path, "modules_to_save is not supported"));
    }
    Ok(Ia3Config {
        target_modules: str_list(path, &v, "target_modules")?
            .ok_or_else(|| format_err(path, "no \"target_modules\" list"))?,
        feedforward_modules: str_list(path, &v, "feedforward_modules")?.unwrap_or_default(),
    })
}

/// Loads a PEFT (IA)³ adapter directory for `model`.
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<Ia3Adapter<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let config = read_config(&cfg_path)?;
    let mut a =
        Ia3Adapter::<f32>::new(model, config, false).map_err(|e| format_err(&cfg_path, e))?;
    let specs: Vec<(String, Vec<usize>)> = a.named().into_iter().map(|(k, s, _)| (k, s)).collect();
    let values = read_tensors(&dir.join("adapter_model.safetensors"), &specs, ".ia3_l")?;
    for (slot, v) in a.tensors_mut().into_iter().zip(values) {
        *slot = v;
    }
    Ok(a)
}
