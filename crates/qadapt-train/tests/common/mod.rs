//! Helpers shared by the training crate's tests: the fixtures under `tests/data`, one tiny Llama
//! configuration (grouped-query, 2 layers) and a random model drawn from a seeded ChaCha8 stream.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use qadapt::ops::rope::RopeScaling;
use qadapt_train::weights::Proj;
use qadapt_train::{Llama, LlamaConfig, LlamaWeights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `tests/data/<rel>` of this checkout (the fixtures written by `tests/data/make_golden.py` and
/// its siblings).
pub(crate) fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel)
}

/// `max|got - want|` and `max|want|`: a comparison's worst absolute error and its scale.
pub(crate) fn worst(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (err, want.iter().map(|v| v.abs()).fold(0.0, f32::max))
}

/// hidden 8, intermediate 12, 2 layers, 2 heads over 1 kv head of 4, vocab 11.
pub(crate) fn tiny_config(tied: bool, scaling: RopeScaling) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: scaling,
        vocab_size: 11,
        tie_word_embeddings: tied,
        max_position_embeddings: 32,
    }
}

/// The tests' random stream.
pub(crate) type Stream = ChaCha8Rng;

/// The stream of `seed`.
pub(crate) fn stream(seed: u64) -> Stream {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The next value of `s`, uniform in [-1, 1).
pub(crate) fn uniform(s: &mut Stream) -> f64 {
    s.random_range(-1.0..1.0)
}

/// A model whose norm weights are 1 ± 0.3 and every other parameter uniform in ±0.8 (large
/// enough that attention is far from uniform), drawn in layout order from `seed`, which advances.
pub(crate) fn random_model(cfg: LlamaConfig, seed: &mut Stream) -> Llama<f64> {
    let mut w = LlamaWeights::<f64>::zeros(&cfg);
    let names: Vec<String> = qadapt_train::weights::layout(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (name, slot) in names.iter().zip(w.slots_mut()) {
        for v in slot.iter_mut() {
            let r = uniform(seed);
            *v = if name.ends_with("norm.weight") {
                1.0 + 0.3 * r
            } else {
                0.8 * r
            };
        }
    }
    Llama::new(cfg, w).unwrap()
}

/// The names of all seven projections (LoRA's or (IA)³'s `target_modules` covering every one).
pub(crate) fn all_projections() -> Vec<String> {
    // `Proj::name` is the path inside a layer (`self_attn.q_proj`); PEFT configs name the leaf.
    Proj::ALL
        .map(|p| p.name().rsplit('.').next().unwrap_or_default().to_string())
        .to_vec()
}
