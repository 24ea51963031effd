//! Houlsby bottleneck adapters (Houlsby et al. 2019) in every decoder layer: one after the
//! attention block and one after the MLP, each applied to the sublayer's output before the
//! residual add, with [`qadapt::bottleneck`]'s op:
//! ```text
//! x_mid = x + A_attn(attn Wo^T)          out = x_mid + A_mlp(h Wd^T)
//! A(y)  = y + act(y Wd^T + bd) Wu^T + bu
//! ```
//! Near-identity start ([`qadapt::bottleneck::BottleneckParams::init`]): the down projection is
//! small and random, the up projection and its bias zero, so the adapted model starts equal to
//! the base and every parameter still gets a gradient after one step.
//!
//! PEFT has no Houlsby adapter; the files follow its layout so the same tools read them:
//! `adapter_config.json`
//! ```json
//! {"peft_type": "HOULSBY", "task_type": "CAUSAL_LM", "bottleneck_size": 8,
//!  "non_linearity": "silu", "base_model_name_or_path": null}
//! ```
//! (`non_linearity`: relu, silu/swish, gelu_new/gelu_pytorch_tanh) and
//! `adapter_model.safetensors` with, for each layer `l` and `site` in {`self_attn`, `mlp`}:
//! `base_model.model.model.layers.<l>.<site>.adapter.down.weight [b, C]`, `.down.bias [b]`,
//! `.up.weight [C, b]`, `.up.bias [C]` (f32, PyTorch's `nn.Linear` layout).

use std::path::Path;

use qadapt::Result;
use qadapt::bottleneck::{self, Activation, BottleneckParams, BottleneckShape};
use qadapt::ops::Real;
use serde_json::{Value, json};

use crate::config::LlamaConfig;
use crate::layer;
use crate::peft_io::{read_json, read_tensors, usize_field, write_adapter};
use crate::weights::Proj;
use crate::{format_err, invalid};

/// The hyper-parameters of a Houlsby adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HoulsbyConfig {
    /// Bottleneck width b.
    pub bottleneck: usize,
    /// Nonlinearity between the projections.
    pub activation: Activation,
}

impl HoulsbyConfig {
    /// Trainable parameters on `model` (two sites per layer, each `2 b C + b + C`), computed
    /// without allocating (`None` on overflow).
    pub fn num_params(&self, model: &LlamaConfig) -> Option<u64> {
        let (b, c) = (self.bottleneck as u64, model.hidden_size as u64);
        b.checked_mul(c)?
            .checked_mul(2)?
            .checked_add(b)?
            .checked_add(c)?
            .checked_mul(2)?
            .checked_mul(model.num_hidden_layers as u64)
    }
}

/// Every tensor's key and shape for `model`, in [`HoulsbyAdapter::named`] order.
fn specs(model: &LlamaConfig, b: usize) -> Vec<(String, Vec<usize>)> {
    let c = model.hidden_size;
    let mut out = Vec::new();
    for l in 0..model.num_hidden_layers {
        for site in SITES {
            let k = |t: &str| format!("base_model.model.model.layers.{l}.{site}.adapter.{t}");
            out.push((k("down.weight"), vec![b, c]));
            out.push((k("down.bias"), vec![b]));
            out.push((k("up.weight"), vec![c, b]));
            out.push((k("up.bias"), vec![c]));
        }
    }
    out
}

/// Where an adapter sits in a layer.
pub const SITES: [&str; 2] = ["self_attn", "mlp"];

/// Two bottleneck adapters per layer: `[after attention, after the MLP]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HoulsbyAdapter<T> {
    /// The hyper-parameters.
    pub config: HoulsbyConfig,
    /// `layers[l][site]`.
    pub layers: Vec<[BottleneckParams<T>; 2]>,
}

impl<T: Real> HoulsbyAdapter<T> {
    /// Whether every tensor has the shape `model` needs (one pair of sites per layer, down
    /// `[b, C]`, up `[C, b]` and their biases).
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        let (b, c) = (self.config.bottleneck, model.hidden_size);
        self.layers.len() == model.num_hidden_layers
            && self.layers.iter().flatten().all(|p| {
                p.down.len() == b * c
                    && p.up.len() == b * c
                    && p.down_bias.len() == b
                    && p.up_bias.len() == c
            })
    }

    /// The hook after sublayer output projection `p` (`o_proj` or `down_proj`) of layer `l`,
    /// on `yin [rows, C]` (the projection's output, before the residual add):
    /// `y = A(yin)` overwritten, and `z [rows, b]` (the pre-activation its backward reads).
    /// Every runner of the decoder layer applies Houlsby through this.
    pub fn forward(&self, l: usize, p: Proj, yin: &[T], z: &mut [T], y: &mut [T]) -> Result<()> {
        let w = &self.layers[l][layer::site(p)];
        let hidden = w.up_bias.len();
        let sh = BottleneckShape {
            rows: yin.len() / hidden.max(1),
            hidden,
            bottleneck: self.config.bottleneck,
        };
        bottleneck::forward(sh, self.config.activation, yin, w, z, y)
    }

    /// Near-identity adapters (down projection uniform in `±init_scale` from `seed`).
    pub fn new(
        model: &LlamaConfig,
        config: HoulsbyConfig,
        init_scale: f64,
        seed: u64,
    ) -> Result<Self> {
        if config.bottleneck == 0 {
            return Err(invalid(
                "houlsby adapter",
                "bottleneck_size must be positive",
            ));
        }
        crate::budget::check_elements(
            &format!("bottleneck_size = {}: the adapters", config.bottleneck),
            config.num_params(model),
            std::mem::size_of::<T>(),
        )
        .map_err(|e| invalid("houlsby adapter", e))?;
        let c = model.hidden_size;
        let layers = (0..model.num_hidden_layers)
            .map(|l| {
                [0, 1].map(|s| {
                    BottleneckParams::init(
                        c,
                        config.bottleneck,
                        init_scale,
                        seed + (2 * l + s) as u64,
                    )
                })
            })
            .collect();
        Ok(HoulsbyAdapter { config, layers })
    }

    /// Same shapes, all zero (gradient accumulators).
    pub fn zeros_like(&self) -> Self {
        let z =
            |p: &BottleneckParams<T>| BottleneckParams::zeros(p.up_bias.len(), p.down_bias.len());
        HoulsbyAdapter {
            config: self.config,
            layers: self.layers.iter().map(|[a, b]| [z(a), z(b)]).collect(),
        }
    }

    /// The same adapter in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> HoulsbyAdapter<U> {
        let c = |v: &Vec<T>| v.iter().map(|x| U::from_f64(x.to_f64())).collect();
        let p = |p: &BottleneckParams<T>| BottleneckParams {
            down: c(&p.down),
            down_bias: c(&p.down_bias),
            up: c(&p.up),
            up_bias: c(&p.up_bias),
        };
        HoulsbyAdapter {
            config: self.config,
            layers: self.layers.iter().map(|[a, b]| [p(a), p(b)]).collect(),
        }
    }

    /// `(key, shape, values)` of every tensor: layer, site, then down.weight, down.bias,
    /// up.weight, up.bias.
    pub fn named(&self) -> Vec<(String, Vec<usize>, &[T])> {
        let mut out = Vec::new();
        for (l, sites) in self.layers.iter().enumerate() {
            for (site, p) in SITES.iter().zip(sites) {
                let (c, b) = (p.up_bias.len(), p.down_bias.len());
                let k = |t: &str| format!("base_model.model.model.layers.{l}.{site}.adapter.{t}");
                out.push((k("down.weight"), vec![b, c], p.down.as_slice()));
                out.push((k("down.bias"), vec![b], p.down_bias.as_slice()));
                out.push((k("up.weight"), vec![c, b], p.up.as_slice()));
                out.push((k("up.bias"), vec![c], p.up_bias.as_slice()));
            }
        }
        out
    }

    /// The tensors, mutable, in [`Self::named`] order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        self.layers
            .iter_mut()
            .flat_map(|s| s.iter_mut())
            .flat_map(|p| [&mut p.down, &mut p.down_bias, &mut p.up, &mut p.up_bias])
            .collect()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let cfg = json!({
            "peft_type": "HOULSBY",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "bottleneck_size": self.config.bottleneck,
            "non_linearity": self.config.activation.name(),
        });
        write_adapter(dir, &cfg, &self.named())
    }
}

/// Loads a Houlsby adapter directory for `model`.
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<HoulsbyAdapter<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_json(&cfg_path)?;
    if v.get("peft_type").and_then(Value::as_str) != Some("HOULSBY") {
        return Err(format_err(&cfg_path, "peft_type is not \"HOULSBY\""));
    }
    let bottleneck = usize_field(&cfg_path, &v, "bottleneck_size")?;
    let act = v
        .get("non_linearity")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    let activation = Activation::parse(act)
        .ok_or_else(|| format_err(&cfg_path, format!("non_linearity {act:?} is not supported")))?;
    if bottleneck == 0 {
        return Err(format_err(
            &cfg_path,
            "bottleneck_size = 0 must be positive",
        ));
    }
    // The tensors present (their shapes checked against bottleneck_size) come first: the
    // adapter is allocated only for a size the file holds.
    let values = read_tensors(
        &dir.join("adapter_model.safetensors"),
        &specs(model, bottleneck),
        ".adapter.",
    )?;
    let mut a = HoulsbyAdapter::<f32>::new(
        model,
        HoulsbyConfig {
            bottleneck,
            activation,
        },
        0.0,
        0,
    )
    .map_err(|e| format_err(&cfg_path, e))?;
    for (slot, v) in a.tensors_mut().into_iter().zip(values) {
        *slot = v;
    }
    Ok(a)
}
