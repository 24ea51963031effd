//! Several named LoRA adapters on one base model, one of them active at a time (PEFT's
//! `load_adapter` / `set_adapter` / `delete_adapter` / `merge_and_unmerge` workflow on one
//! `PeftModel`).
//!
//! Evaluation goes through [`crate::peft::evaluate`] with the active adapter (or none), so
//! switching to an adapter gives exactly the logits, loss and gradients that evaluating the base
//! with that adapter alone gives, and no active adapter gives the base. Adapters are checked
//! against the base when added (every targeted projection present with `A [r, in]`,
//! `B [out, r]`, nothing else).
//!
//! Merging folds the active adapter into the base weights (`W += s·B A`, [`crate::merge`]); the
//! set then evaluates the merged weights with no adapter. Unmerging subtracts it again, which
//! restores the base up to f32 rounding (as PEFT's `unmerge_adapter`); switching adapters or
//! removing the merged one unmerges first.

use std::path::Path;

use qadapt::Result;

use crate::lora::{self, LoraAdapter};
use crate::merge::{Fold, fold};
use crate::model::Llama;
use crate::peft::{Adapter, Evaluation, Grads, evaluate};
use crate::train::Batch;
use crate::weights::Proj;
use crate::{invalid, shape_err};

const OP: &str = "lora set";

/// A base model with named LoRA adapters, at most one active.
#[derive(Debug, Clone)]
pub struct LoraSet {
    model: Llama<f32>,
    /// In the order they were added; every entry is an [`Adapter::Lora`].
    adapters: Vec<(String, Adapter<f32>)>,
    active: Option<usize>,
    /// Whether the active adapter is folded into `model`'s weights.
    merged: bool,
}

impl LoraSet {
    /// A set on `model` with no adapter.
    pub fn new(model: Llama<f32>) -> Self {
        LoraSet {
            model,
            adapters: Vec::new(),
            active: None,
            merged: false,
        }
    }

    /// The model (with the active adapter folded in while merged).
    pub fn model(&self) -> &Llama<f32> {
        &self.model
    }

    /// The model, unmerged first if an adapter is merged.
    pub fn into_model(mut self) -> Result<Llama<f32>> {
        self.unmerge()?;
        Ok(self.model)
    }

    /// The adapters' names, in the order they were added.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                invalid(
                    OP,
                    format!(
                        "no adapter named {name:?} (the set holds {:?})",
                        self.names()
                    ),
                )
            })
    }

    /// Adds `adapter` under `name`, refusing an empty or taken name and an adapter whose
    /// matrices do not fit the base. The active adapter does not change.
    pub fn add(&mut self, name: &str, adapter: LoraAdapter<f32>) -> Result<()> {
        if name.is_empty() {
            return Err(invalid(OP, "an adapter name must not be empty"));
        }
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(invalid(OP, format!("an adapter named {name:?} exists")));
        }
        check_fits(&self.model, &adapter)?;
        self.adapters
            .push((name.to_owned(), Adapter::Lora(adapter)));
        Ok(())
    }

    /// Loads a PEFT LoRA directory ([`lora::load`], which checks it against the base) under
    /// `name`.
    pub fn load(&mut self, name: &str, dir: &Path) -> Result<()> {
        let adapter = lora::load(dir, &self.model.config)?;
        self.add(name, adapter)
    }

    /// Removes and returns the adapter `name` (unmerged first when merged; no adapter is active
    /// after removing the active one).
    pub fn remove(&mut self, name: &str) -> Result<LoraAdapter<f32>> {
        let i = self.index(name)?;
        if self.active == Some(i) {
            self.unmerge()?;
            self.active = None;
        }
        let (_, a) = self.adapters.remove(i);
        if let Some(j) = self.active
            && j > i
        {
            self.active = Some(j - 1);
        }
        into_lora(a)
    }

    /// The adapter `name`.
    pub fn get(&self, name: &str) -> Result<&LoraAdapter<f32>> {
        as_lora(&self.adapters[self.index(name)?].1)
    }

    /// Activates the adapter `name`, or none (the base); unmerges a merged adapter first.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        let next = name.map(|n| self.index(n)).transpose()?;
        if next != self.active {
            self.unmerge()?;
        }
        self.active = next;
        Ok(())
    }

    /// The active adapter's name.
    pub fn active(&self) -> Option<&str> {
        self.active.map(|i| self.adapters[i].0.as_str())
    }

    /// The active adapter, as [`crate::peft::evaluate`] takes it.
    pub fn active_adapter(&self) -> Option<&Adapter<f32>> {
        self.active.map(|i| &self.adapters[i].1)
    }

    /// The merged adapter's name, if one is folded into the weights.
    pub fn merged(&self) -> Option<&str> {
        self.active().filter(|_| self.merged)
    }

    /// What the forward attaches: the active adapter unless it is merged. Refuses adapter
    /// gradients while merged (the adapter is inside the weights).
    fn attached(&self, grads: Grads) -> Result<Option<&Adapter<f32>>> {
        if self.merged {
            if grads == Grads::Adapter {
                return Err(invalid(
                    OP,
                    "the active adapter is merged; unmerge it to differentiate it",
                ));
            }
            return Ok(None);
        }
        Ok(self.active_adapter())
    }

    /// [`crate::peft::evaluate`] of the base with the active adapter (evaluation mode).
    pub fn evaluate(&self, b: &Batch, grads: Grads) -> Result<Evaluation<f32>> {
        evaluate(&self.model, b, self.attached(grads)?, grads, None)
    }

    /// Folds the active adapter into the base weights (a no-op when it already is).
    pub fn merge_active(&mut self) -> Result<()> {
        let i = self
            .active
            .ok_or_else(|| invalid(OP, "no active adapter to merge"))?;
        if !self.merged {
            let a = as_lora(&self.adapters[i].1)?;
            fold(a, &self.model.config, &mut self.model.weights, Fold::Merge)?;
            self.merged = true;
        }
        Ok(())
    }

    /// Subtracts the merged adapter from the base weights (a no-op when none is merged); it
    /// stays active.
    pub fn unmerge(&mut self) -> Result<()> {
        if let (true, Some(i)) = (self.merged, self.active) {
            let a = as_lora(&self.adapters[i].1)?;
            fold(
                a,
                &self.model.config,
                &mut self.model.weights,
                Fold::Unmerge,
            )?;
            self.merged = false;
        }
        Ok(())
    }

    /// The base model and the active adapter, mutable, to train the adapter
    /// (`Trainer::apply(model, &mut Trainable::Adapter(adapter), ..)`); refused while merged.
    /// The adapter must stay a LoRA adapter of the same shapes.
    pub fn train_parts(&mut self) -> Result<(&mut Llama<f32>, &mut Adapter<f32>)> {
        if self.merged {
            return Err(invalid(
                OP,
                "the active adapter is merged; unmerge it to train it",
            ));
        }
        let i = self
            .active
            .ok_or_else(|| invalid(OP, "no active adapter to train"))?;
        Ok((&mut self.model, &mut self.adapters[i].1))
    }
}

fn as_lora(a: &Adapter<f32>) -> Result<&LoraAdapter<f32>> {
    match a {
        Adapter::Lora(l) => Ok(l),
        other => Err(invalid(
            OP,
            format!("holds a {} adapter, not LoRA", other.peft_type()),
        )),
    }
}

fn into_lora(a: Adapter<f32>) -> Result<LoraAdapter<f32>> {
    match a {
        Adapter::Lora(l) => Ok(l),
        other => Err(invalid(
            OP,
            format!("holds a {} adapter, not LoRA", other.peft_type()),
        )),
    }
}

/// Every projection the config targets has `A [r, in]` and `B [out, r]` for this base, and no
/// other projection has a pair.
fn check_fits(model: &Llama<f32>, a: &LoraAdapter<f32>) -> Result<()> {
    let c = &model.config;
    let r = a.config.r;
    if a.pairs.len() != c.num_hidden_layers {
        return Err(shape_err(
            OP,
            format!("an adapter of {} layers", c.num_hidden_layers),
            a.pairs.len(),
        ));
    }
    for (l, layer) in a.pairs.iter().enumerate() {
        if layer.len() != Proj::ALL.len() {
            return Err(shape_err(
                OP,
                format!("{} projections in layer {l}", Proj::ALL.len()),
                layer.len(),
            ));
        }
        for (&p, pair) in Proj::ALL.iter().zip(layer) {
            let (inp, out) = p.dims(c);
            let module = p.module(l);
            match (pair, a.config.targets(l, p)) {
                (Some(pr), true) if pr.a.len() == r * inp && pr.b.len() == out * r => {}
                (Some(pr), true) => {
                    return Err(shape_err(
                        OP,
                        format!("{module}: A of {} and B of {}", r * inp, out * r),
                        format!("A of {} and B of {}", pr.a.len(), pr.b.len()),
                    ));
                }
                (None, false) => {}
                (Some(_), false) => {
                    return Err(invalid(
                        OP,
                        format!("{module} has a pair but is not a target"),
                    ));
                }
                (None, true) => {
                    return Err(invalid(OP, format!("{module} is a target without a pair")));
                }
            }
        }
    }
    Ok(())
}
