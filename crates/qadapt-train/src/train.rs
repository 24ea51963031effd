//! Optimizer steps of any method on the CPU: the loss and gradients from
//! [`crate::peft::evaluate`], gradient accumulation over micro-batches, optional clipping
//! by global norm (torch's `clip_grad_norm_`), and [`qadapt::optim::adamw_cpu`] on exactly the
//! trainable tensors, with AdamW moments kept per tensor. What trains:
//! - [`Trainable::Adapter`]: every tensor of the adapter; the base is frozen (its gradients are
//!   never computed).
//! - [`Trainable::Base`]: the base parameters a [`Selection`] picks (full fine-tuning, the top k
//!   layers, a layer group); the others are neither updated nor decayed.
//!
//! Accumulation is exact: each micro-batch's gradient (of its mean loss over its n_i target
//! tokens) is added with weight n_i, and [`Trainer::apply`] divides by the sum of the n_i, so k
//! micro-batches give the gradient of the mean loss over all their tokens, the same as one batch
//! holding them all (up to f32 summation order).
//!
//! Per-tensor learning rates ([`Trainer::apply`]'s `lr_scales`) multiply the step's learning rate
//! for one tensor; its weight decay scales with it (decoupled decay is `lr·wd·θ`), as in torch's
//! AdamW with one parameter group per tensor.

use qadapt::Result;
use qadapt::optim::{AdamW, adamw_cpu, clip_coefficient, sum_squares_cpu};

use crate::lora::DropoutKey;
use crate::model::{Llama, causal_targets};
use crate::peft::{Adapter, Grads, evaluate};
use crate::select::Selection;
use crate::{invalid, shape_err};

/// What an optimizer step updates.
#[derive(Debug)]
pub enum Trainable<'a> {
    /// An adapter (LoRA, (IA)³, prompt, prefix, Houlsby); the base is frozen.
    Adapter(&'a mut Adapter<f32>),
    /// A subset of the base parameters.
    Base(Selection),
}

impl Trainable<'_> {
    /// Names of the trainable tensors, in the order of the gradients and of `lr_scales`: PEFT keys
    /// for an adapter, HF parameter names for the base.
    pub fn names(&self, model: &Llama<f32>) -> Result<Vec<String>> {
        Ok(match self {
            Trainable::Adapter(a) => a
                .named(&model.config)
                .into_iter()
                .map(|(k, _, _)| k)
                .collect(),
            Trainable::Base(sel) => crate::weights::layout(&model.config)
                .into_iter()
                .zip(sel.mask(&model.config)?)
                .filter(|(_, m)| *m)
                .map(|((n, _), _)| n)
                .collect(),
        })
    }

    /// The trainable tensors' current values, in [`Self::names`] order.
    pub fn values<'m>(&'m self, model: &'m Llama<f32>) -> Result<Vec<&'m [f32]>> {
        Ok(match self {
            Trainable::Adapter(a) => a
                .named(&model.config)
                .into_iter()
                .map(|(_, _, v)| v)
                .collect(),
            Trainable::Base(sel) => model
                .weights
                .slots()
                .into_iter()
                .zip(sel.mask(&model.config)?)
                .filter(|(_, m)| *m)
                .map(|(v, _)| v.as_slice())
                .collect(),
        })
    }

    /// The trainable tensors, mutable, in [`Self::names`] order (the adapter's, or the selected
    /// tensors of `model`).
    pub fn params_mut<'m>(
        &'m mut self,
        model: &'m mut Llama<f32>,
    ) -> Result<Vec<&'m mut Vec<f32>>> {
        Ok(match self {
            Trainable::Adapter(a) => a.tensors_mut(),
            Trainable::Base(sel) => {
                let mask = sel.mask(&model.config)?;
                model
                    .weights
                    .slots_mut()
                    .into_iter()
                    .zip(mask)
                    .filter(|(_, m)| *m)
                    .map(|(v, _)| v)
                    .collect()
            }
        })
    }

    /// Trainable parameters.
    pub fn num_params(&self, model: &Llama<f32>) -> Result<usize> {
        Ok(self.values(model)?.iter().map(|v| v.len()).sum())
    }
}

/// One micro-batch: ids `[batch, seq]` and their next-token targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, row-major `[batch, seq]` (rows padded to `seq` as the caller likes).
    pub ids: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// `targets[b, i]`: the token position i must predict, `None` where no loss is taken
    /// (prompt tokens, padding, the last position).
    pub targets: Vec<Option<u32>>,
    /// Whether the labels are the ids themselves ([`Batch::causal`]): then the first token is a
    /// label too, which only prompt tuning's last virtual position can predict
    /// ([`crate::peft::evaluate`]).
    pub labels_are_ids: bool,
    /// Packed rows ([`crate::fit::pack_rows`]): `segments[b * seq + i]` is the position in row b
    /// where token i's sequence starts (the `segments` of [`qadapt::ops::attention`]): attention
    /// stays within each sequence and RoPE positions restart at each start. `None`: every row is
    /// one sequence. Only [`crate::backend::LoraModel`] runs packed batches.
    pub segments: Option<Vec<u32>>,
}

impl Batch {
    /// Labels = ids (every next token is a target), as transformers' `labels=input_ids`.
    pub fn causal(ids: Vec<u32>, batch: usize, seq: usize) -> Result<Batch> {
        let targets = causal_targets(&ids, batch, seq)?;
        Ok(Batch {
            ids,
            batch,
            seq,
            targets,
            labels_are_ids: true,
            segments: None,
        })
    }

    /// Ids `[batch, seq]` with explicit next-token targets (`targets[b, i]` is what position i
    /// must predict; `None`: no loss there, e.g. prompt tokens and padding).
    pub fn new(
        ids: Vec<u32>,
        batch: usize,
        seq: usize,
        targets: Vec<Option<u32>>,
    ) -> Result<Batch> {
        if ids.len() != batch * seq || targets.len() != ids.len() {
            return Err(crate::shape_err(
                "batch",
                format!("{batch} x {seq} ids and targets"),
                format!("{} ids, {} targets", ids.len(), targets.len()),
            ));
        }
        Ok(Batch {
            ids,
            batch,
            seq,
            targets,
            labels_are_ids: false,
            segments: None,
        })
    }

    /// Each token's RoPE position: its distance from its sequence's start (packed rows) or its
    /// place in the row.
    pub fn positions(&self) -> Vec<u32> {
        match &self.segments {
            Some(s) => s
                .iter()
                .enumerate()
                .map(|(n, &start)| (n % self.seq) as u32 - start)
                .collect(),
            None => (0..self.batch * self.seq)
                .map(|n| (n % self.seq) as u32)
                .collect(),
        }
    }

    /// Positions that carry a loss.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// The loss and gradients of one micro-batch for the trainable tensors, in
/// [`Trainable::names`] order; the base is frozen when an adapter trains. With a `dropout` key
/// (training mode), LoRA's `lora_dropout` applies with that key's masks; `None` is PEFT's eval
/// mode.
pub fn loss_and_grads(
    model: &Llama<f32>,
    what: &Trainable<'_>,
    b: &Batch,
    dropout: Option<DropoutKey>,
) -> Result<(f32, Vec<Vec<f32>>)> {
    match what {
        Trainable::Adapter(a) => {
            let ev = evaluate(model, b, Some(&**a), Grads::Adapter, dropout)?;
            let g = ev
                .adapter_grads
                .ok_or_else(|| invalid("train step", "no adapter gradients"))?;
            let gv = g
                .named(&model.config)
                .into_iter()
                .map(|(_, _, v)| v.to_vec())
                .collect();
            Ok((ev.loss, gv))
        }
        Trainable::Base(sel) => {
            let mask = sel.mask(&model.config)?;
            let ev = evaluate(model, b, None, Grads::All, None)?;
            let g = ev
                .base_grads
                .ok_or_else(|| invalid("train step", "no base gradients"))?;
            let gv = g
                .slots()
                .into_iter()
                .zip(&mask)
                .filter(|(_, m)| **m)
                .map(|(v, _)| v.clone())
                .collect();
            Ok((ev.loss, gv))
        }
    }
}

/// What [`Trainer::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the accumulated target tokens (before the update).
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens accumulated.
    pub tokens: usize,
}

/// AdamW state across steps, and the gradient being accumulated.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// Hyper-parameters (the learning rate is `opt.lr` unless a step passes another).
    pub opt: AdamW,
    /// Clip the global gradient norm to this value, if set.
    pub max_grad_norm: Option<f64>,
    /// Seed of LoRA's dropout masks; `None` trains without dropout whatever the adapter's
    /// `lora_dropout`. Micro-batch m of step t draws the masks of
    /// `DropoutKey { seed, step: t, micro: m }`, so a resumed run draws what the uninterrupted
    /// run would have.
    pub dropout_seed: Option<u64>,
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    t: u64,
    micro: u64,
    acc: Vec<Vec<f32>>,
    acc_tokens: usize,
    acc_loss: f64,
}

impl Trainer {
    /// A trainer with zero moments.
    pub fn new(opt: AdamW, max_grad_norm: Option<f64>) -> Self {
        Trainer {
            opt,
            max_grad_norm,
            dropout_seed: None,
            moments: Vec::new(),
            t: 0,
            micro: 0,
            acc: Vec::new(),
            acc_tokens: 0,
            acc_loss: 0.0,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// The AdamW moments `(m, v)` per trainable tensor (empty before the first step), for
    /// checkpoints.
    pub fn moments(&self) -> &[(Vec<f32>, Vec<f32>)] {
        &self.moments
    }

    /// Continues from a checkpoint: `steps` taken and the moments [`Self::moments`] returned.
    pub fn restore(&mut self, steps: u64, moments: Vec<(Vec<f32>, Vec<f32>)>) {
        self.t = steps;
        self.micro = 0;
        self.moments = moments;
        self.acc.clear();
        self.acc_tokens = 0;
        self.acc_loss = 0.0;
    }

    /// Adds one micro-batch's gradient to the accumulator; returns its mean loss.
    pub fn accumulate(
        &mut self,
        model: &Llama<f32>,
        what: &Trainable<'_>,
        b: &Batch,
    ) -> Result<f32> {
        let n = b.num_targets();
        if n == 0 {
            return Err(invalid("train step", "a micro-batch without target tokens"));
        }
        let key = self.dropout_seed.map(|seed| DropoutKey {
            seed,
            step: self.t + 1,
            micro: self.micro,
        });
        let (loss, grads) = loss_and_grads(model, what, b, key)?;
        self.micro += 1;
        let w = n as f32;
        if self.acc.is_empty() {
            self.acc = grads
                .into_iter()
                .map(|mut g| {
                    g.iter_mut().for_each(|v| *v *= w);
                    g
                })
                .collect();
        } else {
            if self.acc.len() != grads.len()
                || self.acc.iter().zip(&grads).any(|(a, g)| a.len() != g.len())
            {
                return Err(shape_err(
                    "gradient accumulation",
                    "the tensors of the first micro-batch",
                    "another set of tensors",
                ));
            }
            for (a, g) in self.acc.iter_mut().zip(&grads) {
                a.iter_mut().zip(g).for_each(|(a, g)| *a += w * g);
            }
        }
        self.acc_tokens += n;
        self.acc_loss += f64::from(loss) * n as f64;
        Ok(loss)
    }

    /// One AdamW update from the accumulated gradient at learning rate `lr`, each tensor's rate
    /// multiplied by `lr_scales[i]` when given; clears the accumulator.
    pub fn apply(
        &mut self,
        model: &mut Llama<f32>,
        what: &mut Trainable<'_>,
        lr: f32,
        lr_scales: Option<&[f32]>,
    ) -> Result<StepStats> {
        if self.acc_tokens == 0 {
            return Err(invalid("train step", "nothing accumulated"));
        }
        let inv = 1.0 / self.acc_tokens as f32;
        let mut grads = std::mem::take(&mut self.acc);
        grads
            .iter_mut()
            .for_each(|g| g.iter_mut().for_each(|v| *v *= inv));
        let stats = StepStats {
            loss: (self.acc_loss / self.acc_tokens as f64) as f32,
            grad_norm: grads.iter().map(|g| sum_squares_cpu(g)).sum::<f64>().sqrt(),
            tokens: self.acc_tokens,
        };
        self.acc_tokens = 0;
        self.acc_loss = 0.0;
        self.micro = 0;
        let mut params = what.params_mut(model)?;
        if let Some(s) = lr_scales
            && s.len() != params.len()
        {
            return Err(shape_err(
                "train step",
                format!("{} learning-rate scales", params.len()),
                s.len(),
            ));
        }
        if self.moments.is_empty() {
            self.moments = params
                .iter()
                .map(|p| (vec![0.0; p.len()], vec![0.0; p.len()]))
                .collect();
        }
        if self.moments.len() != params.len()
            || grads.len() != params.len()
            || self
                .moments
                .iter()
                .zip(&params)
                .any(|(m, p)| m.0.len() != p.len())
        {
            return Err(shape_err(
                "train step",
                "the tensors of the first step",
                "another set of tensors",
            ));
        }
        let scale = match self.max_grad_norm {
            Some(max) => clip_coefficient(stats.grad_norm, max),
            None => 1.0,
        };
        self.t += 1;
        let base = self.opt.step(self.t, lr, scale)?;
        for (i, ((p, g), (m, v))) in params
            .iter_mut()
            .zip(&grads)
            .zip(&mut self.moments)
            .enumerate()
        {
            match lr_scales {
                Some(s) => {
                    let st = self.opt.step(self.t, lr * s[i], scale)?;
                    adamw_cpu(p, None, g, m, v, &st)?;
                }
                None => adamw_cpu(p, None, g, m, v, &base)?,
            }
        }
        Ok(stats)
    }

    /// One step on the micro-batch `b` at learning rate `lr` (one [`Self::accumulate`], one
    /// [`Self::apply`]); returns the loss before the update.
    pub fn step(
        &mut self,
        model: &mut Llama<f32>,
        what: &mut Trainable<'_>,
        b: &Batch,
        lr: f32,
    ) -> Result<f32> {
        self.accumulate(model, what, b)?;
        Ok(self.apply(model, what, lr, None)?.loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_batches_target_every_next_token() {
        let b = Batch::causal(vec![1, 2, 3, 4, 5, 6], 2, 3).unwrap();
        assert_eq!(b.targets, [Some(2), Some(3), None, Some(5), Some(6), None]);
        assert_eq!(b.num_targets(), 4);
    }
}
