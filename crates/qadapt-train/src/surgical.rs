//! Surgical fine-tuning (Lee et al. 2022, "Surgical Fine-Tuning Improves Adaptation to
//! Distribution Shifts"): train one part of the network and freeze the rest, the part chosen
//! either by hand among [`LayerGroup`]s or automatically per tensor.
//!
//! **Manual** ([`manual`]): every candidate group trains from the same starting weights with a
//! fresh [`Trainer`] for the same [`Budget`]; the group whose weights give the lowest validation
//! loss (token-weighted mean cross-entropy over the validation batches, [`validation_loss`]) wins,
//! and the model keeps its weights. The cost is one training run per group; the memory is one copy
//! of the starting weights plus the best group's tensors.
//!
//! **Automatic** (Auto-RGN, [`auto`]): every base tensor trains, tensor i at learning rate
//! `lr · s_i` with
//! ```text
//! RGN_i = mean over batches b of ‖g_i(b)‖ / ‖θ_i‖        s_i = RGN_i / max_j RGN_j
//! ```
//! (`g_i(b)` the gradient of batch b's mean loss). Tensors whose gradient is large relative to
//! their size train fastest; one whose gradient is zero does not train. A tensor that is all zero
//! while its gradient is not has an infinite RGN: it gets `s = 1` and the maximum is taken over
//! the others ([`rgn_scales`]). The scales are recomputed at the start of every epoch
//! ([`AutoRgn`]). The decoupled weight decay scales with the rate (see [`crate::train`]), so a
//! tensor with `s = 0` is left exactly as it is.

use qadapt::Result;
use qadapt::optim::{AdamW, CosineSchedule, sum_squares_cpu};

use crate::invalid;
use crate::model::Llama;
use crate::peft::{Grads, evaluate_targets};
use crate::select::{LayerGroup, Selection};
use crate::train::{Batch, Trainable, Trainer, loss_and_grads};

/// How long and how fast one training run goes (each group's in [`manual`], the whole of
/// [`auto`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Optimizer steps.
    pub steps: u64,
    /// Micro-batches accumulated per step: step t takes the next ones of the training batches,
    /// cycling through them in order.
    pub micro_batches: usize,
    /// AdamW hyper-parameters; `opt.lr` is the rate unless `schedule` is set.
    pub opt: AdamW,
    /// The learning rate of step t, when set.
    pub schedule: Option<CosineSchedule>,
    /// Clip the global gradient norm to this value, if set.
    pub max_grad_norm: Option<f64>,
}

impl Budget {
    /// The learning rate of step `t` (1-based).
    pub fn lr(&self, t: u64) -> f32 {
        self.schedule.map_or(self.opt.lr, |s| s.lr(t))
    }

    /// Steps in one pass over `n` training batches.
    pub fn steps_per_epoch(&self, n: usize) -> u64 {
        n.div_ceil(self.micro_batches.max(1)) as u64
    }

    fn check(&self, train: &[Batch]) -> Result<()> {
        if self.steps == 0 || self.micro_batches == 0 || train.is_empty() {
            return Err(invalid(
                "surgical fine-tuning",
                "needs at least one step, one micro-batch per step and one training batch",
            ));
        }
        Ok(())
    }
}

/// One group's result in [`manual`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReport {
    /// The group.
    pub group: LayerGroup,
    /// Its trainable parameters.
    pub params: usize,
    /// The loss of the last step (before that step's update).
    pub train_loss: f32,
    /// The validation loss after the last step.
    pub val_loss: f32,
}

/// What [`manual`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SurgicalReport {
    /// The validation loss of the starting weights.
    pub base_val_loss: f32,
    /// One entry per group, in the order given.
    pub groups: Vec<GroupReport>,
    /// Index into `groups` of the winner (lowest validation loss, the first on ties).
    pub best: usize,
}

impl SurgicalReport {
    /// The winning group's entry.
    pub fn best(&self) -> &GroupReport {
        &self.groups[self.best]
    }
}

/// Token-weighted mean cross-entropy of `model` over `batches` (dropout off, no adapter).
pub fn validation_loss(model: &Llama<f32>, batches: &[Batch]) -> Result<f32> {
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for b in batches {
        let n = b.num_targets();
        if n == 0 {
            continue;
        }
        let ev = evaluate_targets(model, &b.ids, b.batch, b.seq, &b.targets, None, Grads::None)?;
        sum += f64::from(ev.loss) * n as f64;
        tokens += n;
    }
    if tokens == 0 {
        return Err(invalid("validation loss", "no batch has a target token"));
    }
    Ok((sum / tokens as f64) as f32)
}

/// Runs `budget` on `what` from `model`'s current weights with a fresh trainer; tensor i's rate
/// is scaled by `scales(step)[i]` when `scales` gives one. Returns the last step's loss.
fn run(
    model: &mut Llama<f32>,
    what: &mut Trainable<'_>,
    train: &[Batch],
    budget: &Budget,
    mut scales: impl FnMut(&Llama<f32>, &Trainable<'_>, u64, usize) -> Result<Option<Vec<f32>>>,
) -> Result<f32> {
    let mut t = Trainer::new(budget.opt, budget.max_grad_norm);
    let mut next = 0usize;
    let mut current: Option<Vec<f32>> = None;
    let mut loss = f32::NAN;
    for step in 1..=budget.steps {
        if let Some(s) = scales(model, what, step, next)? {
            current = Some(s);
        }
        for _ in 0..budget.micro_batches {
            t.accumulate(model, what, &train[next])?;
            next = (next + 1) % train.len();
        }
        loss = t
            .apply(model, what, budget.lr(step), current.as_deref())?
            .loss;
    }
    Ok(loss)
}

/// Manual surgical fine-tuning: trains each of `groups` from `model`'s current weights for
/// `budget` on `train`, measures [`validation_loss`] on `val`, and leaves `model` with the
/// winning group trained (every other tensor as it was). Refuses an empty group list and fails
/// when no group reaches a finite validation loss (the model is then left at its start).
pub fn manual(
    model: &mut Llama<f32>,
    groups: &[LayerGroup],
    train: &[Batch],
    val: &[Batch],
    budget: &Budget,
) -> Result<SurgicalReport> {
    budget.check(train)?;
    if groups.is_empty() {
        return Err(invalid("surgical fine-tuning", "no layer group to try"));
    }
    let masks = groups
        .iter()
        .map(|g| Selection::Group(*g).mask(&model.config))
        .collect::<Result<Vec<_>>>()?;
    let base_val_loss = validation_loss(model, val)?;
    let start: Vec<Vec<f32>> = model.weights.slots().into_iter().cloned().collect();
    let restore = |model: &mut Llama<f32>, mask: &[bool]| {
        for ((dst, src), m) in model.weights.slots_mut().into_iter().zip(&start).zip(mask) {
            if *m {
                dst.copy_from_slice(src);
            }
        }
    };
    let mut reports = Vec::with_capacity(groups.len());
    // The winner so far: its index, validation loss and trained tensors (masked ones only).
    let mut best: Option<(usize, f32, Vec<Vec<f32>>)> = None;
    for (i, (&group, mask)) in groups.iter().zip(&masks).enumerate() {
        let sel = Selection::Group(group);
        let result = run(
            model,
            &mut Trainable::Base(sel),
            train,
            budget,
            |_, _, _, _| Ok(None),
        )
        .and_then(|train_loss| Ok((train_loss, validation_loss(model, val)?)));
        let (train_loss, val_loss) = match result {
            Ok(r) => r,
            Err(e) => {
                restore(model, mask);
                return Err(e);
            }
        };
        reports.push(GroupReport {
            group,
            params: sel.num_params(&model.config),
            train_loss,
            val_loss,
        });
        if val_loss.is_finite() && best.as_ref().is_none_or(|b| val_loss < b.1) {
            let kept = model
                .weights
                .slots()
                .into_iter()
                .zip(mask)
                .filter(|(_, m)| **m)
                .map(|(v, _)| v.clone())
                .collect();
            best = Some((i, val_loss, kept));
        }
        restore(model, mask);
    }
    let (best, _, kept) = best.ok_or_else(|| {
        invalid(
            "surgical fine-tuning",
            "no layer group reached a finite validation loss",
        )
    })?;
    let slots = model.weights.slots_mut().into_iter().zip(&masks[best]);
    for (dst, src) in slots.filter(|(_, m)| **m).map(|(d, _)| d).zip(kept) {
        *dst = src;
    }
    Ok(SurgicalReport {
        base_val_loss,
        groups: reports,
        best,
    })
}

/// `‖g‖ / ‖θ‖` in f64: 0 when the gradient is zero, infinite when only θ is.
pub fn relative_grad_norm(grad: &[f32], theta: &[f32]) -> f64 {
    let g = sum_squares_cpu(grad).sqrt();
    if g == 0.0 {
        return 0.0;
    }
    g / sum_squares_cpu(theta).sqrt()
}

/// The mean relative gradient norm of every trainable tensor of `what` over `batches`, in
/// [`Trainable::names`] order (each batch's gradient is that of its own mean loss).
pub fn relative_grad_norms(
    model: &Llama<f32>,
    what: &Trainable<'_>,
    batches: &[Batch],
) -> Result<Vec<f32>> {
    const OP: &str = "relative gradient norms";
    if batches.is_empty() {
        return Err(invalid(OP, "no batch"));
    }
    let values = what.values(model)?;
    let mut sum = vec![0.0f64; values.len()];
    for b in batches {
        let (_, grads) = loss_and_grads(model, what, b)?;
        for ((s, g), v) in sum.iter_mut().zip(&grads).zip(&values) {
            *s += relative_grad_norm(g, v);
        }
    }
    let n = batches.len() as f64;
    let rgn: Vec<f32> = sum.into_iter().map(|s| (s / n) as f32).collect();
    if let Some(i) = rgn.iter().position(|r| r.is_nan()) {
        let name = what.names(model)?.swap_remove(i);
        return Err(invalid(
            OP,
            format!("tensor {name} has a non-finite gradient"),
        ));
    }
    Ok(rgn)
}

/// Auto-RGN learning-rate scales from relative gradient norms: `rgn_i / max_j rgn_j` over the
/// finite ones, 1 for an infinite one. Every scale is in [0, 1] and the largest is exactly 1.
/// Refuses NaN and an all-zero input (nothing would train).
pub fn rgn_scales(rgn: &[f32]) -> Result<Vec<f32>> {
    const OP: &str = "auto-rgn scales";
    if rgn.iter().any(|r| r.is_nan() || *r < 0.0) {
        return Err(invalid(OP, "a relative gradient norm is NaN or negative"));
    }
    let max = rgn
        .iter()
        .copied()
        .filter(|r| r.is_finite())
        .fold(0.0f32, f32::max);
    let any_inf = rgn.iter().any(|r| r.is_infinite());
    if max == 0.0 && !any_inf {
        return Err(invalid(OP, "every gradient is zero"));
    }
    Ok(rgn
        .iter()
        .map(|&r| match r {
            r if r.is_infinite() => 1.0,
            r if max == 0.0 => r,
            // r == max gives exactly 1.
            r => r / max,
        })
        .collect())
}

/// Auto-RGN's per-tensor scales, recomputed on demand (at the start of each epoch in [`auto`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutoRgn {
    /// Batches whose RGNs are averaged at each refresh.
    pub batches: usize,
    scales: Option<Vec<f32>>,
}

impl AutoRgn {
    /// Averages over up to `batches` batches per refresh (at least one).
    pub fn new(batches: usize) -> Self {
        AutoRgn {
            batches: batches.max(1),
            scales: None,
        }
    }

    /// Recomputes the scales from the first [`Self::batches`] of `batches` and returns them.
    pub fn refresh(
        &mut self,
        model: &Llama<f32>,
        what: &Trainable<'_>,
        batches: &[Batch],
    ) -> Result<&[f32]> {
        let rgn = relative_grad_norms(model, what, &batches[..self.batches.min(batches.len())])?;
        Ok(self.scales.insert(rgn_scales(&rgn)?))
    }

    /// The scales of the last refresh, if any.
    pub fn scales(&self) -> Option<&[f32]> {
        self.scales.as_deref()
    }
}

/// What [`auto`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoReport {
    /// The trained tensors' names, in the order of each refresh's scales.
    pub names: Vec<String>,
    /// `(step, scales)`: each refresh and the step it preceded (1-based).
    pub refreshes: Vec<(u64, Vec<f32>)>,
    /// The loss of the last step (before that step's update).
    pub train_loss: f32,
    /// The validation loss of the starting weights.
    pub base_val_loss: f32,
    /// The validation loss after the last step.
    pub val_loss: f32,
}

/// Auto-RGN surgical fine-tuning: every base parameter trains for `budget`, each tensor's rate
/// scaled by [`rgn_scales`] of its relative gradient norm, recomputed at the start of every epoch
/// (every [`Budget::steps_per_epoch`] steps) on the `rgn_batches` training batches that come next.
pub fn auto(
    model: &mut Llama<f32>,
    train: &[Batch],
    val: &[Batch],
    budget: &Budget,
    rgn_batches: usize,
) -> Result<AutoReport> {
    budget.check(train)?;
    let mut what = Trainable::Base(Selection::Full);
    let names = what.names(model)?;
    let base_val_loss = validation_loss(model, val)?;
    let epoch = budget.steps_per_epoch(train.len());
    let mut rgn = AutoRgn::new(rgn_batches);
    let mut refreshes = Vec::new();
    let train_loss = run(model, &mut what, train, budget, |m, w, step, next| {
        if (step - 1) % epoch != 0 {
            return Ok(None);
        }
        // The epoch's first batches, wrapping around the end.
        let window: Vec<Batch> = (0..rgn.batches.min(train.len()))
            .map(|k| train[(next + k) % train.len()].clone())
            .collect();
        let s = rgn.refresh(m, w, &window)?.to_vec();
        refreshes.push((step, s.clone()));
        Ok(Some(s))
    })?;
    Ok(AutoReport {
        names,
        refreshes,
        train_loss,
        base_val_loss,
        val_loss: validation_loss(model, val)?,
    })
}
