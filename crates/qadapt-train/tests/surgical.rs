//! Surgical fine-tuning on the `tiny_llama` fixture: manual group selection picks the group with
//! the lowest validation loss and changes only its tensors, every group starts from the same
//! weights, and Auto-RGN's scales follow their definition (hand-computed cases, zero gradients,
//! the maximum) and train the model.
//!
//! Task: continue a repeating 4-token pattern (as `tests/training.rs`), training on three phases of
//! it and validating on the fourth.

use std::path::{Path, PathBuf};

use qadapt::optim::AdamW;
use qadapt_train::surgical::{self, AutoRgn, Budget};
use qadapt_train::{Batch, LayerGroup, Llama, LlamaDir, Selection, Trainable, loss_and_grads};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel)
}

fn model() -> Llama<f32> {
    LlamaDir::open(&data("tiny_llama"))
        .unwrap()
        .model()
        .unwrap()
}

const PATTERN: [u32; 4] = [5, 17, 42, 8];

/// One sequence of 12 tokens of the pattern starting at `phase`.
fn batch(phase: usize) -> Batch {
    let ids = (0..12).map(|i| PATTERN[(i + phase) % 4]).collect();
    Batch::causal(ids, 1, 12).unwrap()
}

fn budget(steps: u64) -> Budget {
    Budget {
        steps,
        micro_batches: 1,
        opt: AdamW {
            lr: 3e-3,
            ..AdamW::default()
        },
        schedule: None,
        max_grad_norm: Some(1.0),
    }
}

fn slots(m: &Llama<f32>) -> Vec<Vec<f32>> {
    m.weights.slots().into_iter().cloned().collect()
}

#[test]
fn manual_keeps_the_group_with_the_lowest_validation_loss() {
    let mut m = model();
    let start = slots(&m);
    let (train, val) = ([batch(0), batch(1), batch(2)], [batch(3)]);
    let groups = LayerGroup::partition(&m.config, 1).unwrap();
    assert_eq!(groups.len(), 4);
    let r = surgical::manual(&mut m, &groups, &train, &val, &budget(12)).unwrap();
    for g in &r.groups {
        println!(
            "{}: {} parameters, train {:.4}, val {:.4} (base {:.4})",
            g.group, g.params, g.train_loss, g.val_loss, r.base_val_loss
        );
    }
    let losses: Vec<f32> = r.groups.iter().map(|g| g.val_loss).collect();
    let argmin = (0..losses.len())
        .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
        .unwrap();
    assert_eq!(r.best, argmin);
    assert!(r.best().val_loss < r.base_val_loss);
    assert_eq!(
        r.groups.iter().map(|g| g.params).collect::<Vec<_>>(),
        groups
            .iter()
            .map(|g| Selection::Group(*g).num_params(&m.config))
            .collect::<Vec<_>>()
    );
    // The model holds the winner: its validation loss, and only its tensors moved.
    assert_eq!(
        surgical::validation_loss(&m, &val).unwrap(),
        r.best().val_loss
    );
    let mask = Selection::Group(r.best().group).mask(&m.config).unwrap();
    let names = qadapt_train::weights::layout(&m.config);
    for (((name, _), old), (new, trained)) in
        names.iter().zip(&start).zip(slots(&m).iter().zip(&mask))
    {
        assert_eq!(old != new, *trained, "{name}");
    }
    // Each group started from the same weights: the last one, trained after the others, gives
    // what it gives alone.
    let last = *groups.last().unwrap();
    let alone = surgical::manual(&mut model(), &[last], &train, &val, &budget(12)).unwrap();
    assert_eq!(alone.groups[0], *r.groups.last().unwrap());
}

#[test]
fn manual_refuses_bad_input() {
    let mut m = model();
    let (train, val) = ([batch(0)], [batch(1)]);
    assert!(surgical::manual(&mut m, &[], &train, &val, &budget(1)).is_err());
    let bad = LayerGroup::Layers { first: 1, count: 2 };
    assert!(surgical::manual(&mut m, &[bad], &train, &val, &budget(1)).is_err());
    assert!(surgical::manual(&mut m, &[LayerGroup::Head], &[], &val, &budget(1)).is_err());
    assert!(surgical::manual(&mut m, &[LayerGroup::Head], &train, &val, &budget(0)).is_err());
    assert_eq!(m.weights, model().weights);
}

#[test]
fn hand_computed_relative_norms_and_scales() {
    // ‖(0, 3, 4)‖ / ‖(2, -1, 2)‖ = 5 / 3.
    let r = surgical::relative_grad_norm(&[0.0, 3.0, 4.0], &[2.0, -1.0, 2.0]);
    assert!((r - 5.0 / 3.0).abs() < 1e-15);
    assert_eq!(surgical::relative_grad_norm(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
    assert_eq!(surgical::relative_grad_norm(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
    assert_eq!(
        surgical::relative_grad_norm(&[1.0, 0.0], &[0.0, 0.0]),
        f64::INFINITY
    );
    assert_eq!(
        surgical::rgn_scales(&[0.5, 2.0, 0.0, f32::INFINITY, 1.0]).unwrap(),
        [0.25, 1.0, 0.0, 1.0, 0.5]
    );
    assert_eq!(
        surgical::rgn_scales(&[0.0, f32::INFINITY]).unwrap(),
        [0.0, 1.0]
    );
    assert!(surgical::rgn_scales(&[0.0, 0.0]).is_err());
    assert!(surgical::rgn_scales(&[1.0, f32::NAN]).is_err());
}

#[test]
fn relative_grad_norms_average_each_batch_ratio() {
    let m = model();
    let what = Trainable::Base(Selection::Full);
    let batches = [batch(0), batch(1)];
    let rgn = surgical::relative_grad_norms(&m, &what, &batches).unwrap();
    let values = what.values(&m).unwrap();
    assert_eq!(rgn.len(), values.len());
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let per_batch: Vec<Vec<f64>> = batches
        .iter()
        .map(|b| {
            let (_, g) = loss_and_grads(&m, &what, b, None).unwrap();
            g.iter()
                .zip(&values)
                .map(|(g, v)| norm(g) / norm(v))
                .collect()
        })
        .collect();
    for (i, r) in rgn.iter().enumerate() {
        let want = (per_batch[0][i] + per_batch[1][i]) / 2.0;
        assert!(
            (f64::from(*r) - want).abs() <= 1e-6 * want,
            "tensor {i}: {r} vs {want}"
        );
    }
    let s = surgical::rgn_scales(&rgn).unwrap();
    assert!(s.iter().all(|s| *s > 0.0 && *s <= 1.0), "{s:?}");
    assert_eq!(s.iter().copied().fold(0.0f32, f32::max), 1.0);
    assert_eq!(s.iter().filter(|s| **s == 1.0).count(), 1);
}

/// The fixture with layer 0's `o_proj` zeroed: its attention branch adds nothing, so its
/// `input_layernorm`, q, k and v get zero gradients while `o_proj` itself (zero, with a gradient)
/// has an infinite RGN.
fn silenced_attention() -> Llama<f32> {
    let mut m = model();
    m.weights.layers[0].o_proj.iter_mut().for_each(|v| *v = 0.0);
    m
}

const SILENT: [&str; 4] = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
];

#[test]
fn zero_gradients_get_zero_scales() {
    let m = silenced_attention();
    let what = Trainable::Base(Selection::Full);
    let names = what.names(&m).unwrap();
    let mut rgn = AutoRgn::new(2);
    assert!(rgn.scales().is_none());
    let s = rgn
        .refresh(&m, &what, &[batch(0), batch(1)])
        .unwrap()
        .to_vec();
    for (n, s) in names.iter().zip(&s) {
        let want_zero = SILENT.contains(&n.as_str());
        assert_eq!(*s == 0.0, want_zero, "{n}: {s}");
        assert!((0.0..=1.0).contains(s), "{n}: {s}");
    }
    let o = names
        .iter()
        .position(|n| n == "model.layers.0.self_attn.o_proj.weight")
        .unwrap();
    assert_eq!(s[o], 1.0);
    assert_eq!(rgn.scales(), Some(s.as_slice()));
}

#[test]
fn auto_rgn_trains_and_leaves_zero_scale_tensors_alone() {
    let mut m = silenced_attention();
    let start = slots(&m);
    let (train, val) = ([batch(0), batch(1), batch(2)], [batch(3)]);
    // One epoch of three steps: one refresh, so the silent tensors never move.
    let r = surgical::auto(&mut m, &train, &val, &budget(3), 2).unwrap();
    assert_eq!(r.refreshes.len(), 1);
    assert_eq!(r.refreshes[0].0, 1);
    assert!(r.val_loss < r.base_val_loss, "{r:?}");
    for ((name, old), new) in r.names.iter().zip(&start).zip(slots(&m)) {
        assert_eq!(
            *old == new,
            SILENT.contains(&name.as_str()),
            "{name} changed or not"
        );
    }
    // Two epochs refresh twice; the moved o_proj now passes gradients to q, k and v.
    let mut m = silenced_attention();
    let r = surgical::auto(&mut m, &train, &val, &budget(6), 2).unwrap();
    println!(
        "auto-rgn: val {:.4} -> {:.4}, train {:.4}",
        r.base_val_loss, r.val_loss, r.train_loss
    );
    assert_eq!(
        r.refreshes.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 4]
    );
    let q = r
        .names
        .iter()
        .position(|n| n == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(r.refreshes[0].1[q], 0.0);
    assert!(r.refreshes[1].1[q] > 0.0);
    assert!(r.val_loss < r.base_val_loss);
}
