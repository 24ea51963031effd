//! Finite-difference check of the whole model's backward in f64: every element of every
//! parameter and of the input embeddings, for an untied model with plain RoPE and a tied one with
//! llama3 scaling (grouped-query attention in both).
//!
//! `L(p)` is the mean next-token cross-entropy; the central difference with `h = 1e-5` is exact to
//! about 1e-9 here, and we accept `|g - fd| <= 1e-6 (1 + |fd|)`. `checker_catches_a_wrong_gradient`
//! shows the check fails when one gradient element is off by 0.1%.

use qadapt::ops::Real;
use qadapt::ops::cross_entropy;
use qadapt::ops::gradcheck::check_grad;
use qadapt::ops::rope::RopeScaling;
use qadapt_train::{Batch, Input, Options};
use qadapt_train::{Llama, causal_targets};

use crate::common;
use common::{random_model, tiny_config as config};

const IDS: [u32; 10] = [3, 7, 1, 10, 0, 4, 4, 9, 2, 6];
const B: usize = 2;
const T: usize = 5;

fn loss_of(m: &Llama<f64>) -> f64 {
    m.loss(
        &m.forward(Input::ids(&IDS, B, T), Options::default())
            .unwrap(),
    )
    .unwrap()
}

fn check_model(m: &Llama<f64>) {
    let (loss, _, grads) = m
        .loss_and_grads(
            &Batch::causal(IDS.to_vec(), B, T).unwrap(),
            Options::default(),
        )
        .unwrap();
    assert!((loss - loss_of(m)).abs() < 1e-15);
    let cfg = m.config.clone();
    let names = qadapt_train::weights::layout(&cfg);
    for (k, (name, _)) in names.iter().enumerate() {
        let p = m.weights.slots()[k].clone();
        let g = grads.weights.as_ref().unwrap().slots()[k].clone();
        let mut probe = m.clone();
        check_grad(name, &p, &g, |v| {
            *probe.weights.slots_mut()[k] = v.to_vec();
            loss_of(&probe)
        })
        .unwrap();
    }
    // The input embeddings: forward from embeddings with the same targets.
    let mut e = vec![0.0; B * T * cfg.hidden_size];
    qadapt::ops::embedding::forward(
        &IDS,
        &m.weights.embed_tokens,
        cfg.vocab_size,
        cfg.hidden_size,
        &mut e,
    )
    .unwrap();
    let targets = causal_targets(&IDS, B, T).unwrap();
    check_grad("inputs_embeds", &e, &grads.inputs_embeds, |v| {
        let f = m
            .forward(Input::embeds(v.to_vec(), B, T), Options::default())
            .unwrap();
        cross_entropy::forward(&f.logits, &targets, cfg.vocab_size).unwrap()
    })
    .unwrap();
    // Attention must not be uniform for this to test the softmax backward.
    assert!(grads.inputs_embeds.iter().any(|v| v.to_f64().abs() > 1e-3));
}

#[test]
fn untied_plain_rope_backward_matches_finite_differences() {
    check_model(&random_model(
        config(false, RopeScaling::None),
        &mut common::stream(11),
    ));
}

#[test]
fn tied_llama3_rope_backward_matches_finite_differences() {
    let scaling = RopeScaling::Llama3 {
        factor: 4.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16.0,
    };
    check_model(&random_model(
        config(true, scaling),
        &mut common::stream(12),
    ));
}

#[test]
fn checker_catches_a_wrong_gradient() {
    let m = random_model(config(false, RopeScaling::None), &mut common::stream(13));
    let (_, _, grads) = m
        .loss_and_grads(
            &Batch::causal(IDS.to_vec(), B, T).unwrap(),
            Options::default(),
        )
        .unwrap();
    let mut g = grads.weights.unwrap().layers[1].k_proj.clone();
    let i = g
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap()
        .0;
    g[i] *= 1.001;
    let p = m.weights.layers[1].k_proj.clone();
    let mut probe = m.clone();
    let err = check_grad("k_proj", &p, &g, |v| {
        probe.weights.layers[1].k_proj = v.to_vec();
        loss_of(&probe)
    })
    .unwrap_err();
    assert!(err.starts_with(&format!("k_proj[{i}]")), "{err}");
}
