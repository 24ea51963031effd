//! Folding a LoRA adapter into the base weights, and back: `W += s · B A` (merge) and
//! `W -= s · B A` (unmerge) for every targeted projection, `s` the adapter's scaling
//! (alpha/r, or alpha/sqrt(r) with rsLoRA). A merged model computes what base + adapter computes,
//! with no adapter cost at inference; unmerging restores the base up to rounding.
//!
//! Layout: W `[out, in]`, A `[r, in]`, B `[out, r]` row-major, so the update is one GEMM per
//! projection, `general_mat_mul(±s, B, A, 1, W)`.
//!
//! (IA)³ folds too ([`fold_ia3`]): its vector l scales a projection's output (`y = l ⊙ Wx`, so
//! row o of W is multiplied by `l[o]`) or, for a feed-forward module, its input
//! (`y = W(l ⊙ x)`, so column i of W is multiplied by `l[i]`), as PEFT's `merge`. Unmerging divides,
//! which PEFT also does (exact up to rounding unless some l is 0).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use qadapt::ops::Real;
use qadapt::{DType, Error, FloatVec, Result};

use crate::LlamaConfig;
use crate::ia3::Ia3Adapter;
use crate::lora::LoraAdapter;
use crate::weights::{self, LlamaWeights, Proj};

/// Which way [`fold`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// `W += s · B A`.
    Merge,
    /// `W -= s · B A`.
    Unmerge,
}

fn shape_err(what: String) -> Error {
    Error::Shape {
        op: "lora merge",
        expected: "the adapter's matrices to fit the model".into(),
        got: what,
    }
}

/// Adds (or subtracts) every targeted projection's `s · B A` into `weights`.
pub fn fold<T: Real>(
    adapter: &LoraAdapter<T>,
    cfg: &LlamaConfig,
    weights: &mut LlamaWeights<T>,
    how: Fold,
) -> Result<()> {
    if adapter.pairs.len() != cfg.num_hidden_layers || weights.layers.len() != cfg.num_hidden_layers
    {
        return Err(shape_err(format!(
            "{} adapter layers and {} weight layers for a {}-layer model",
            adapter.pairs.len(),
            weights.layers.len(),
            cfg.num_hidden_layers
        )));
    }
    let r = adapter.config.r;
    let s = adapter.config.scaling() * if how == Fold::Merge { 1.0 } else { -1.0 };
    for (l, layer) in adapter.pairs.iter().enumerate() {
        for p in Proj::ALL {
            let Some(Some(pair)) = layer.get(p.index()) else {
                continue;
            };
            let (inp, out) = p.dims(cfg);
            let w = weights.layers[l].proj_mut(p);
            let bad = |what: &str, len: usize| {
                shape_err(format!("layer {l} {p:?} {what} has {len} elements"))
            };
            let b = ArrayView2::from_shape((out, r), &pair.b)
                .map_err(|_| bad("lora_B", pair.b.len()))?;
            let a = ArrayView2::from_shape((r, inp), &pair.a)
                .map_err(|_| bad("lora_A", pair.a.len()))?;
            let wlen = w.len();
            let mut w =
                ArrayViewMut2::from_shape((out, inp), w).map_err(|_| bad("weight", wlen))?;
            general_mat_mul(T::from_f64(s), &b, &a, T::ONE, &mut w);
        }
    }
    Ok(())
}

/// Multiplies (merge) or divides (unmerge) every targeted projection of `weights` by its (IA)³
/// vector: rows for output scaling, columns for feed-forward (input) scaling.
pub fn fold_ia3<T: Real>(
    adapter: &Ia3Adapter<T>,
    cfg: &LlamaConfig,
    weights: &mut LlamaWeights<T>,
    how: Fold,
) -> Result<()> {
    if adapter.scales.len() != cfg.num_hidden_layers
        || weights.layers.len() != cfg.num_hidden_layers
    {
        return Err(shape_err(format!(
            "{} adapter layers and {} weight layers for a {}-layer model",
            adapter.scales.len(),
            weights.layers.len(),
            cfg.num_hidden_layers
        )));
    }
    for l in 0..cfg.num_hidden_layers {
        for p in Proj::ALL {
            let Some(v) = adapter.scale(l, p) else {
                continue;
            };
            let (inp, out) = p.dims(cfg);
            let ff = adapter.config.is_feedforward(l, p);
            let want = if ff { inp } else { out };
            if v.len() != want {
                return Err(shape_err(format!(
                    "layer {l} {p:?} ia3_l has {} elements, the projection needs {want}",
                    v.len()
                )));
            }
            let w = weights.layers[l].proj_mut(p);
            for (o, row) in w.chunks_exact_mut(inp).enumerate() {
                for (i, x) in row.iter_mut().enumerate() {
                    let f = if ff { v[i] } else { v[o] };
                    *x = match how {
                        Fold::Merge => *x * f,
                        Fold::Unmerge => *x / f,
                    };
                }
            }
        }
    }
    Ok(())
}

/// Every parameter of `w` under its HF name with its shape, converted to `dtype` (what a
/// `model.safetensors` of the model holds).
pub fn named_tensors(
    cfg: &LlamaConfig,
    w: &LlamaWeights<f32>,
    dtype: DType,
) -> Vec<(String, Vec<usize>, FloatVec)> {
    weights::layout(cfg)
        .into_iter()
        .zip(w.slots())
        .map(|((name, shape), v)| {
            let data = match dtype {
                DType::F32 => FloatVec::F32(v.clone()),
                DType::BF16 => FloatVec::BF16(v.iter().map(|x| half::bf16::from_f32(*x)).collect()),
                DType::F16 => FloatVec::F16(v.iter().map(|x| half::f16::from_f32(*x)).collect()),
            };
            (name, shape, data)
        })
        .collect()
}
