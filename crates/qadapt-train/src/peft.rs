//! Every adapter method behind one type: [`Adapter`] (LoRA, (IA)³, prompt tuning, prefix tuning,
//! Houlsby), loaded from a PEFT-style directory by its `peft_type`, and [`evaluate`]: logits,
//! loss and the adapter's gradients as PEFT computes them (the reference `qadapt logits` and the
//! golden tests use).
//!
//! Losses: labels = input ids, mean shifted cross-entropy; for prompt tuning the logits include
//! the `P` virtual positions and their labels are -100 (see [`crate::prompt`]), so the output has
//! `P + T` positions per sequence. Gradients come back as an [`Adapter`] of the same shapes, so
//! [`Adapter::named`] gives them under the adapter's PEFT keys.
//!
//! [`evaluate`] runs PEFT's eval mode, or with a [`DropoutKey`] a training step's forward: the
//! same, except that LoRA applies its `lora_dropout` with that key's masks (the other methods have
//! no dropout in PEFT's forward; (IA)³ and prompt/prefix tuning have none at all).

use std::path::Path;

use qadapt::Result;
use qadapt::ops::{Real, cross_entropy};
use serde_json::Value;

use crate::config::LlamaConfig;
use crate::houlsby::{self, HoulsbyAdapter};
use crate::ia3::{self, Ia3Adapter};
use crate::lora::{self, DropoutKey, LoraAdapter};
use crate::model::{Attached, BaseGrads, Input, Llama, Options};
pub use crate::peft_io::adapter_to_bf16;
use crate::peft_io::read_json;
use crate::prompt::{self, PrefixMlp, PrefixTuning, PromptTuning, prompt_targets};
use crate::train::Batch;
use crate::{format_err, invalid};

/// One adapter of any supported method.
#[derive(Debug, Clone, PartialEq)]
pub enum Adapter<T> {
    /// LoRA.
    Lora(LoraAdapter<T>),
    /// (IA)³.
    Ia3(Ia3Adapter<T>),
    /// Prompt tuning.
    Prompt(PromptTuning<T>),
    /// Prefix tuning.
    Prefix(PrefixTuning<T>),
    /// Prefix tuning trained through PEFT's MLP reparameterization; saved as the projected
    /// [`Adapter::Prefix`] (the MLP is dropped).
    PrefixMlp(PrefixMlp<T>),
    /// Houlsby bottleneck adapters.
    Houlsby(HoulsbyAdapter<T>),
}

/// Loads an adapter directory, dispatching on `peft_type` (LORA, IA3, PROMPT_TUNING,
/// PREFIX_TUNING, HOULSBY).
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<Adapter<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_json(&cfg_path)?;
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => lora::load(dir, model).map(Adapter::Lora),
        Some("IA3") => ia3::load(dir, model).map(Adapter::Ia3),
        Some("PROMPT_TUNING") => prompt::load_prompt(dir, model).map(Adapter::Prompt),
        Some("PREFIX_TUNING") => prompt::load_prefix(dir, model).map(Adapter::Prefix),
        Some("HOULSBY") => houlsby::load(dir, model).map(Adapter::Houlsby),
        Some(other) => Err(format_err(
            &cfg_path,
            format!(
                "peft_type {other:?} is not supported (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, HOULSBY)"
            ),
        )),
        None => Err(format_err(&cfg_path, "no \"peft_type\" string")),
    }
}

impl<T: Real> Adapter<T> {
    /// `(key, shape, values)` of every trainable tensor, with the keys of
    /// `adapter_model.safetensors`.
    pub fn named<'a>(&'a self, model: &LlamaConfig) -> Vec<(String, Vec<usize>, &'a [T])> {
        match self {
            Adapter::Lora(a) => a.named(model),
            Adapter::Ia3(a) => a.named(),
            Adapter::Prompt(a) => a.named(model),
            Adapter::Prefix(a) => a.named(model),
            Adapter::PrefixMlp(a) => a.named(model),
            Adapter::Houlsby(a) => a.named(),
        }
    }

    /// The tensors, mutable, in [`Self::named`] order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        match self {
            Adapter::Lora(a) => a
                .pairs
                .iter_mut()
                .flatten()
                .flatten()
                .flat_map(|p| [&mut p.a, &mut p.b])
                .collect(),
            Adapter::Ia3(a) => a.tensors_mut(),
            Adapter::Prompt(a) => vec![&mut a.embeddings],
            Adapter::Prefix(a) => vec![&mut a.values],
            Adapter::PrefixMlp(a) => a.tensors_mut(),
            Adapter::Houlsby(a) => a.tensors_mut(),
        }
    }

    /// Trainable parameters.
    pub fn num_params(&self, model: &LlamaConfig) -> usize {
        self.named(model).iter().map(|(_, _, v)| v.len()).sum()
    }

    /// The PEFT method name (its `peft_type`).
    pub fn peft_type(&self) -> &'static str {
        match self {
            Adapter::Lora(_) => "LORA",
            Adapter::Ia3(_) => "IA3",
            Adapter::Prompt(_) => "PROMPT_TUNING",
            Adapter::Prefix(_) | Adapter::PrefixMlp(_) => "PREFIX_TUNING",
            Adapter::Houlsby(_) => "HOULSBY",
        }
    }

    /// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir`.
    pub fn save(&self, dir: &Path, model: &LlamaConfig) -> Result<()> {
        match self {
            Adapter::Lora(a) => a.save(dir, model),
            Adapter::Ia3(a) => a.save(dir),
            Adapter::Prompt(a) => a.save(dir, model),
            Adapter::Prefix(a) => a.save(dir, model),
            Adapter::PrefixMlp(a) => a.project(model)?.0.save(dir, model),
            Adapter::Houlsby(a) => a.save(dir),
        }
    }

    /// The same adapter in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> Adapter<U> {
        let c = |v: &Vec<T>| v.iter().map(|x| U::from_f64(x.to_f64())).collect();
        match self {
            Adapter::Lora(a) => Adapter::Lora(a.cast()),
            Adapter::Ia3(a) => Adapter::Ia3(a.cast()),
            Adapter::Prompt(a) => Adapter::Prompt(PromptTuning {
                num_virtual_tokens: a.num_virtual_tokens,
                embeddings: c(&a.embeddings),
            }),
            Adapter::Prefix(a) => Adapter::Prefix(PrefixTuning {
                num_virtual_tokens: a.num_virtual_tokens,
                values: c(&a.values),
            }),
            Adapter::PrefixMlp(a) => Adapter::PrefixMlp(a.cast()),
            Adapter::Houlsby(a) => Adapter::Houlsby(a.cast()),
        }
    }

    fn attached(&self, dropout: Option<DropoutKey>) -> Attached<'_, T> {
        match self {
            Adapter::Lora(a) => match dropout {
                Some(k) => Attached::LoraTrain(a, k),
                None => Attached::Lora(a),
            },
            Adapter::Ia3(a) => Attached::Ia3(a),
            Adapter::Prefix(a) => Attached::Prefix(a),
            Adapter::Houlsby(a) => Attached::Houlsby(a),
            Adapter::Prompt(_) | Adapter::PrefixMlp(_) => Attached::None,
        }
    }
}

/// What [`evaluate`] differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grads {
    /// Forward and loss only.
    None,
    /// The adapter's gradients (base frozen).
    Adapter,
    /// The adapter's and every base parameter's.
    All,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone)]
pub struct Evaluation<T> {
    /// `[batch, positions, V]`, row-major.
    pub logits: Vec<T>,
    /// Positions per sequence (T, or P + T for prompt tuning).
    pub positions: usize,
    /// The mean shifted cross-entropy.
    pub loss: T,
    /// The gradient of the loss for every adapter tensor (same structure as the adapter).
    pub adapter_grads: Option<Adapter<T>>,
    /// The gradient for every base parameter, with [`Grads::All`].
    pub base_grads: Option<crate::LlamaWeights<T>>,
}

/// Forward (and, as `grads` asks, backward) of `model` with `adapter` on the micro-batch `b`:
/// the logits, the mean cross-entropy over `b.targets` and the gradients. With a `dropout` key
/// (training mode) a LoRA adapter applies its dropout with that key's masks; `None` is PEFT's
/// evaluation mode.
///
/// Prompt tuning runs its virtual tokens before each row, which get no target, except that with
/// labels = input ids ([`Batch::causal`], [`Batch::labels_are_ids`]) the last virtual position
/// predicts the first token, as PEFT computes `labels=input_ids`.
pub fn evaluate<T: Real>(
    model: &Llama<T>,
    b: &Batch,
    adapter: Option<&Adapter<T>>,
    grads: Grads,
    dropout: Option<DropoutKey>,
) -> Result<Evaluation<T>> {
    let (ids, batch, seq) = (&b.ids[..], b.batch, b.seq);
    if b.targets.len() != batch * seq || ids.len() != batch * seq {
        return Err(crate::shape_err(
            "evaluate",
            format!("{batch} x {seq} ids and targets"),
            format!("{} ids, {} targets", ids.len(), b.targets.len()),
        ));
    }
    if b.segments.is_some() {
        return Err(invalid(
            "evaluate",
            "packed rows (segments) run on the LoRA model (crate::backend::LoraModel), not the \
             CPU model",
        ));
    }
    let cfg = &model.config;
    let base = match grads {
        Grads::All => BaseGrads::Compute,
        _ => BaseGrads::Frozen,
    };
    if let Some(Adapter::Prompt(pt)) = adapter {
        let (p, c) = (pt.num_virtual_tokens, cfg.hidden_size);
        if pt.embeddings.len() != p * c || ids.len() != batch * seq || seq == 0 {
            return Err(invalid(
                "prompt tuning",
                format!("a [{p}, {c}] prompt and {batch} x {seq} ids"),
            ));
        }
        let tok = model.embed(ids)?;
        let mut x = Vec::with_capacity(batch * (p + seq) * c);
        for b in 0..batch {
            x.extend_from_slice(&pt.embeddings);
            x.extend_from_slice(&tok[b * seq * c..(b + 1) * seq * c]);
        }
        let opts = Options::default().with_base(base);
        let opts = if grads == Grads::None {
            opts.eval()
        } else {
            opts
        };
        let f = model.forward(Input::embeds(x, batch, p + seq), opts)?;
        let targets = if b.labels_are_ids {
            prompt_targets(ids, batch, seq, p)
        } else {
            b.targets
                .chunks_exact(seq)
                .flat_map(|row| std::iter::repeat_n(None, p).chain(row.iter().copied()))
                .collect()
        };
        let loss = cross_entropy::forward(&f.logits, &targets, cfg.vocab_size)?;
        let (adapter_grads, base_grads) = if grads == Grads::None {
            (None, None)
        } else {
            let g = model.backward(&f, &targets, opts)?;
            let mut ge = vec![T::ZERO; p * c];
            for b in 0..batch {
                let rows = &g.inputs_embeds[b * (p + seq) * c..][..p * c];
                ge.iter_mut().zip(rows).for_each(|(a, v)| *a += *v);
            }
            let mut bg = g.weights;
            // The real tokens' embedding rows also train the table when the base is trained.
            if let Some(w) = bg.as_mut() {
                let mut real = Vec::with_capacity(batch * seq * c);
                for b in 0..batch {
                    real.extend_from_slice(&g.inputs_embeds[(b * (p + seq) + p) * c..][..seq * c]);
                }
                qadapt::ops::embedding::backward(
                    ids,
                    &real,
                    cfg.vocab_size,
                    c,
                    &mut w.embed_tokens,
                )?;
            }
            (
                Some(Adapter::Prompt(PromptTuning {
                    num_virtual_tokens: p,
                    embeddings: ge,
                })),
                bg,
            )
        };
        return Ok(Evaluation {
            logits: f.logits,
            positions: p + seq,
            loss,
            adapter_grads,
            base_grads,
        });
    }
    // A reparameterized prefix runs as the prefix it projects to.
    let projected = match adapter {
        Some(Adapter::PrefixMlp(pm)) => Some((pm, pm.project(cfg)?)),
        _ => None,
    };
    let att = match (&projected, adapter) {
        (Some((_, (prefix, _))), _) => Attached::Prefix(prefix),
        (None, a) => a.map_or(Attached::None, |a| a.attached(dropout)),
    };
    let opts = Options {
        adapter: att,
        base,
        keep_activations: grads != Grads::None,
    };
    let f = model.forward(Input::ids(ids, batch, seq), opts)?;
    let targets = &b.targets;
    let loss = cross_entropy::forward(&f.logits, targets, cfg.vocab_size)?;
    let (adapter_grads, base_grads) = if grads == Grads::None {
        (None, None)
    } else {
        let g = model.backward(&f, targets, opts)?;
        let ag = match adapter {
            None => None,
            Some(Adapter::Lora(_)) => g.lora.map(Adapter::Lora),
            Some(Adapter::Ia3(_)) => g.ia3.map(Adapter::Ia3),
            Some(Adapter::Prefix(_)) => g.prefix.map(Adapter::Prefix),
            Some(Adapter::PrefixMlp(_)) => {
                let ((pm, (_, h)), gp) = projected
                    .as_ref()
                    .zip(g.prefix.as_ref())
                    .ok_or_else(|| invalid("prefix tuning", "no prefix gradient"))?;
                let mut gm = pm.zeros_like();
                pm.backward(cfg, h, &gp.values, &mut gm)?;
                Some(Adapter::PrefixMlp(gm))
            }
            Some(Adapter::Houlsby(_)) => g.houlsby.map(Adapter::Houlsby),
            Some(Adapter::Prompt(_)) => unreachable!("handled above"),
        };
        (ag, g.weights)
    };
    Ok(Evaluation {
        logits: f.logits,
        positions: seq,
        loss,
        adapter_grads,
        base_grads,
    })
}
