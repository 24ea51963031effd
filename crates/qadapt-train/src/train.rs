//! One optimizer step of any method on the CPU: the loss and gradients from
//! [`crate::peft::evaluate`], optional clipping by global norm (torch's `clip_grad_norm_`), and
//! [`qadapt::optim::adamw_cpu`] on exactly the trainable tensors, with AdamW moments kept per
//! tensor. What trains:
//! - [`Trainable::Adapter`]: every tensor of the adapter; the base is frozen (its gradients are
//!   never computed).
//! - [`Trainable::Base`]: the base parameters a [`Selection`] picks (full fine-tuning or the top k
//!   layers); the others are neither updated nor decayed.

use qadapt::Result;
use qadapt::optim::{AdamW, adamw_cpu, clip_coefficient, sum_squares_cpu};

use crate::model::Llama;
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

/// AdamW state across steps.
#[derive(Debug, Clone)]
pub struct Trainer {
    /// Hyper-parameters (the learning rate is `opt.lr` unless a step passes another).
    pub opt: AdamW,
    /// Clip the global gradient norm to this value, if set.
    pub max_grad_norm: Option<f64>,
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    t: u64,
}

impl Trainer {
    /// A trainer with zero moments.
    pub fn new(opt: AdamW, max_grad_norm: Option<f64>) -> Self {
        Trainer {
            opt,
            max_grad_norm,
            moments: Vec::new(),
            t: 0,
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One step on ids `[batch, seq]` (labels = ids) at learning rate `lr`; returns the loss
    /// before the update.
    pub fn step(
        &mut self,
        model: &mut Llama<f32>,
        what: &mut Trainable<'_>,
        ids: &[u32],
        batch: usize,
        seq: usize,
        lr: f32,
    ) -> Result<f32> {
        let (loss, grads, mut params): (f32, Vec<Vec<f32>>, Vec<&mut Vec<f32>>) = match what {
            Trainable::Adapter(a) => {
                let ev = evaluate(model, ids, batch, seq, Some(&**a), Grads::Adapter)?;
                let g = ev
                    .adapter_grads
                    .ok_or_else(|| invalid("train step", "no adapter gradients"))?;
                let gv = g
                    .named(&model.config)
                    .into_iter()
                    .map(|(_, _, v)| v.to_vec())
                    .collect();
                (ev.loss, gv, a.tensors_mut())
            }
            Trainable::Base(sel) => {
                let mask = sel.mask(&model.config)?;
                let ev = evaluate(model, ids, batch, seq, None, Grads::All)?;
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
                let params = model
                    .weights
                    .slots_mut()
                    .into_iter()
                    .zip(mask)
                    .filter(|(_, m)| *m)
                    .map(|(v, _)| v)
                    .collect();
                (ev.loss, gv, params)
            }
        };
        if self.moments.is_empty() {
            self.moments = params
                .iter()
                .map(|p| (vec![0.0; p.len()], vec![0.0; p.len()]))
                .collect();
        }
        if self.moments.len() != params.len()
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
            Some(max) => {
                let norm = grads.iter().map(|g| sum_squares_cpu(g)).sum::<f64>().sqrt();
                clip_coefficient(norm, max)
            }
            None => 1.0,
        };
        self.t += 1;
        let s = self.opt.step(self.t, lr, scale)?;
        for ((p, g), (m, v)) in params.iter_mut().zip(&grads).zip(&mut self.moments) {
            adamw_cpu(p, None, g, m, v, &s)?;
        }
        Ok(loss)
    }
}
