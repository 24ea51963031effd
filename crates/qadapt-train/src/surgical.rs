//! Surgical fine-tuning (Lee et al. 2022, "Surgical Fine-Tuning Improves Adaptation to
//! Distribution Shifts"): train one part of the network and freeze the rest, the part chosen
//! either by hand among [`LayerGroup`]s or automatically per tensor.
//!
//! Both are schedules ([`ManualSchedule`], [`AutoSchedule`]) that the fine-tuning run
//! ([`crate::run`]) and the functions here ([`manual`], [`auto`]) drive alike.
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
use crate::peft::{Grads, evaluate};
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
        let ev = evaluate(model, b, None, Grads::None, None)?;
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

/// Manual surgery as a schedule, shared by [`manual`] and the fine-tuning run
/// ([`crate::run`]): the groups train one after the other, each for `steps_per_group` steps
/// from the same starting weights. At the end of a group ([`ManualSchedule::end_group`]) its
/// validation loss is compared with the best so far (the lower finite one wins, the first on
/// ties), the best group's trained tensors are kept, and the group's tensors go back to the start;
/// after the last group the best one's tensors are installed. Memory: one copy of every base
/// tensor (the start) and the best group's tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct ManualSchedule {
    groups: Vec<LayerGroup>,
    masks: Vec<Vec<bool>>,
    steps_per_group: u64,
    phase: usize,
    start: Vec<Vec<f32>>,
    /// The best group so far: its index, validation loss and last training loss.
    best: Option<(usize, f64, f32)>,
    best_values: Vec<Vec<f32>>,
}

/// A group's end in a [`ManualSchedule`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupEnd {
    /// The group.
    pub group: LayerGroup,
    /// Its trainable parameters.
    pub params: usize,
    /// Its validation loss.
    pub val_loss: f64,
}

impl ManualSchedule {
    /// The schedule of `groups` from `model`'s current weights. Refuses no group and a group
    /// the model does not have.
    pub fn new(model: &Llama<f32>, groups: Vec<LayerGroup>, steps_per_group: u64) -> Result<Self> {
        if groups.is_empty() {
            return Err(invalid("surgical fine-tuning", "no layer group to try"));
        }
        let masks = groups
            .iter()
            .map(|g| Selection::Group(*g).mask(&model.config))
            .collect::<Result<Vec<_>>>()?;
        Ok(ManualSchedule {
            groups,
            masks,
            steps_per_group,
            phase: 0,
            start: model.weights.slots().into_iter().cloned().collect(),
            best: None,
            best_values: Vec::new(),
        })
    }

    /// The groups, in training order.
    pub fn groups(&self) -> &[LayerGroup] {
        &self.groups
    }

    /// Steps each group trains.
    pub fn steps_per_group(&self) -> u64 {
        self.steps_per_group
    }

    /// Steps of the whole schedule.
    pub fn total_steps(&self) -> u64 {
        self.steps_per_group * self.groups.len() as u64
    }

    /// Groups finished.
    pub fn phase(&self) -> usize {
        self.phase
    }

    /// What trains now: the current group, or after the last one the kept group.
    pub fn selection(&self) -> Selection {
        let g = match self.best {
            Some((b, _, _)) if self.phase >= self.groups.len() => b,
            _ => self.phase.min(self.groups.len() - 1),
        };
        Selection::Group(self.groups[g])
    }

    /// The best group so far: its index, validation loss and last training loss.
    pub fn best(&self) -> Option<(usize, f64, f32)> {
        self.best
    }

    fn restore_start(&self, model: &mut Llama<f32>, mask: &[bool]) {
        for ((dst, src), m) in model
            .weights
            .slots_mut()
            .into_iter()
            .zip(&self.start)
            .zip(mask)
        {
            if *m {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Puts the current group's tensors back to the start (a group that failed).
    pub fn abandon_group(&self, model: &mut Llama<f32>) {
        if let Some(mask) = self.masks.get(self.phase) {
            self.restore_start(model, mask);
        }
    }

    /// Ends the current group, whose weights `model` holds: keeps it if `val_loss` is the best
    /// so far, restores its tensors to the start, and moves to the next group; after the last
    /// one installs the best group's tensors (and fails when no group had a finite validation
    /// loss, the model then at its start).
    pub fn end_group(
        &mut self,
        model: &mut Llama<f32>,
        val_loss: f64,
        train_loss: f32,
    ) -> Result<GroupEnd> {
        let (group, mask) = match (self.groups.get(self.phase), self.masks.get(self.phase)) {
            (Some(g), Some(m)) => (*g, m),
            _ => return Err(invalid("surgical fine-tuning", "every group has ended")),
        };
        if val_loss.is_finite() && self.best.is_none_or(|(_, b, _)| val_loss < b) {
            self.best = Some((self.phase, val_loss, train_loss));
            self.best_values = model
                .weights
                .slots()
                .into_iter()
                .zip(mask)
                .filter(|(_, m)| **m)
                .map(|(t, _)| t.clone())
                .collect();
        }
        self.restore_start(model, mask);
        let end = GroupEnd {
            group,
            params: Selection::Group(group).num_params(&model.config),
            val_loss,
        };
        self.phase += 1;
        if self.phase == self.groups.len() {
            let (b, _, _) = self.best.ok_or_else(|| {
                invalid(
                    "surgical fine-tuning",
                    "no layer group reached a finite validation loss",
                )
            })?;
            let slots = model.weights.slots_mut().into_iter().zip(&self.masks[b]);
            for (dst, src) in slots
                .filter(|(_, m)| **m)
                .map(|(d, _)| d)
                .zip(&self.best_values)
            {
                dst.copy_from_slice(src);
            }
        }
        Ok(end)
    }

    /// The checkpoint's JSON of the schedule: `{"phase": groups finished, "best": [index,
    /// validation loss, training loss] or null}`.
    pub fn state_json(&self) -> serde_json::Value {
        serde_json::json!({
            "phase": self.phase,
            "best": self.best.map(|(i, v, t)| serde_json::json!([i, v, t])),
        })
    }

    /// The checkpoint's tensors of the schedule: `best.<i>`, the best group's trained tensors.
    pub fn tensors(&self) -> Vec<(String, &[f32])> {
        self.best_values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("best.{i}"), v.as_slice()))
            .collect()
    }

    /// Back to a checkpoint's [`Self::state_json`] and tensors (by name). The start stays the
    /// one this schedule was made with: the model's weights as loaded. A checkpoint without a
    /// best group's training loss (written before it was recorded) gives NaN for it.
    pub fn restore(
        &mut self,
        extra: &serde_json::Value,
        tensors: &std::collections::HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        const OP: &str = "surgical checkpoint";
        let p = extra
            .get("phase")
            .and_then(|p| p.as_u64())
            .ok_or_else(|| invalid(OP, "the checkpoint has no surgical phase"))?
            as usize;
        if p > self.groups.len() {
            return Err(invalid(
                OP,
                format!("the checkpoint's surgical phase {p} is out of range"),
            ));
        }
        self.phase = p;
        self.best = extra.get("best").and_then(|b| {
            // f32 through JSON and back: exact (a parse off by an f64 ulp rounds back).
            let t = b
                .get(2)
                .and_then(|t| t.as_f64())
                .map_or(f32::NAN, |t| t as f32);
            Some((b.get(0)?.as_u64()? as usize, b.get(1)?.as_f64()?, t))
        });
        if self.best.is_some_and(|(i, _, _)| i >= self.groups.len()) {
            return Err(invalid(OP, "the checkpoint's best group is out of range"));
        }
        self.best_values = (0..)
            .map_while(|i| tensors.get(&format!("best.{i}")).cloned())
            .collect();
        Ok(())
    }
}

/// Manual surgical fine-tuning: trains each of `groups` from `model`'s current weights for
/// `budget` on `train`, measures [`validation_loss`] on `val`, and leaves `model` with the
/// winning group trained (every other tensor as it was), through a [`ManualSchedule`]. Refuses
/// an empty group list and fails when no group reaches a finite validation loss (the model is
/// then left at its start).
pub fn manual(
    model: &mut Llama<f32>,
    groups: &[LayerGroup],
    train: &[Batch],
    val: &[Batch],
    budget: &Budget,
) -> Result<SurgicalReport> {
    budget.check(train)?;
    let mut schedule = ManualSchedule::new(model, groups.to_vec(), budget.steps)?;
    let base_val_loss = validation_loss(model, val)?;
    let mut reports = Vec::with_capacity(groups.len());
    while schedule.phase() < groups.len() {
        let result = run(
            model,
            &mut Trainable::Base(schedule.selection()),
            train,
            budget,
            |_, _, _, _| Ok(None),
        )
        .and_then(|train_loss| Ok((train_loss, validation_loss(model, val)?)));
        let (train_loss, val_loss) = match result {
            Ok(r) => r,
            Err(e) => {
                schedule.abandon_group(model);
                return Err(e);
            }
        };
        let end = schedule.end_group(model, f64::from(val_loss), train_loss)?;
        reports.push(GroupReport {
            group: end.group,
            params: end.params,
            train_loss,
            val_loss,
        });
    }
    let best = schedule.best().map_or(0, |(b, _, _)| b);
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
        let (_, grads) = loss_and_grads(model, what, b, None)?;
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

    /// Sets the scales (a checkpoint's).
    pub fn set_scales(&mut self, scales: Option<Vec<f32>>) {
        self.scales = scales;
    }
}

/// Auto-RGN's refresh schedule, shared by [`auto`] and the fine-tuning run: the scales are
/// recomputed before the first step of every epoch of `steps_per_epoch` steps, and before the
/// next step whenever there are none (a resumed run whose checkpoint has none).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSchedule {
    /// The scales and how many batches a refresh averages.
    pub rgn: AutoRgn,
    /// Optimizer steps per epoch (at least 1).
    pub steps_per_epoch: u64,
}

impl AutoSchedule {
    /// Refreshes averaging `rgn_batches` batches, every `steps_per_epoch` steps.
    pub fn new(rgn_batches: usize, steps_per_epoch: u64) -> Self {
        AutoSchedule {
            rgn: AutoRgn::new(rgn_batches),
            steps_per_epoch: steps_per_epoch.max(1),
        }
    }

    /// Whether the scales must be refreshed before the step that follows `done` steps.
    pub fn due(&self, done: u64) -> bool {
        self.rgn.scales().is_none() || done.is_multiple_of(self.steps_per_epoch)
    }

    /// The epoch of the step that follows `done` steps.
    pub fn epoch(&self, done: u64) -> u64 {
        done / self.steps_per_epoch
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
    let mut schedule = AutoSchedule::new(rgn_batches, budget.steps_per_epoch(train.len()));
    let mut refreshes = Vec::new();
    let train_loss = run(model, &mut what, train, budget, |m, w, step, next| {
        if !schedule.due(step - 1) {
            return Ok(None);
        }
        // The epoch's first batches, wrapping around the end.
        let rgn = &mut schedule.rgn;
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
