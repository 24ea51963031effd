//! Training on a small task with every method: the loss falls, only the intended tensors change,
//! and the trainable-parameter count matches its formula.
//!
//! Task: continue a repeating 4-token pattern (two sequences of 12 tokens, different phases) with
//! the random `tiny_llama` fixture as the "pretrained" model, AdamW (CPU, weight decay 0.01),
//! gradient clipping at 1.0, a fixed number of steps per method. The pattern is learnable from the
//! context, so even a soft prompt can cut the loss: we require the final loss to be below a stated
//! fraction of the first (the measured values are printed with `--nocapture`).

use crate::common::data;
use qadapt::bottleneck::Activation;
use qadapt::optim::AdamW;
use qadapt_train::{
    Adapter, Batch, HoulsbyAdapter, HoulsbyConfig, Ia3Adapter, Ia3Config, Llama, LlamaDir,
    LoraAdapter, LoraConfig, LoraInit, PrefixTuning, Proj, PromptInit, PromptTuning, Selection,
    Trainable, Trainer,
};

const PATTERN: [u32; 4] = [5, 17, 42, 8];

fn batch() -> Vec<u32> {
    (0..2)
        .flat_map(|b| (0..12).map(move |i| PATTERN[(i + b) % 4]))
        .collect()
}

fn model() -> Llama<f32> {
    LlamaDir::open(&data("tiny_llama"))
        .unwrap()
        .model()
        .unwrap()
}

/// Trains `what` for `steps` at `lr`; returns the first and the last loss.
fn train(m: &mut Llama<f32>, what: &mut Trainable<'_>, steps: usize, lr: f32) -> (f32, f32) {
    let ids = batch();
    let mut t = Trainer::new(AdamW::default(), Some(1.0));
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..steps {
        let b = qadapt_train::Batch::causal(ids.clone(), 2, 12).unwrap();
        last = t.step(m, what, &b, lr).unwrap();
        first.get_or_insert(last);
    }
    // The loss after the last update, on the same targets as the steps.
    let b = qadapt_train::Batch::causal(ids.clone(), 2, 12).unwrap();
    let after = qadapt_train::evaluate(
        m,
        &b,
        match what {
            Trainable::Adapter(a) => Some(&**a),
            Trainable::Base(_) => None,
        },
        qadapt_train::Grads::None,
        None,
    )
    .unwrap()
    .loss;
    assert!(after <= last);
    (first.unwrap(), after)
}

/// Trains an adapter; checks the base is untouched, every adapter tensor moved, the loss fell
/// below `frac` of its start and the count is `params`.
fn adapter_case(name: &str, mut a: Adapter<f32>, params: usize, steps: usize, lr: f32, frac: f32) {
    let mut m = model();
    let base = m.weights.clone();
    assert_eq!(a.num_params(&m.config), params, "{name}: parameter count");
    let before = a.clone();
    let (first, after) = train(&mut m, &mut Trainable::Adapter(&mut a), steps, lr);
    println!("{name}: loss {first:.4} -> {after:.4} in {steps} steps ({params} parameters)");
    assert!(after < frac * first, "{name}: {first} -> {after}");
    assert_eq!(m.weights, base, "{name}: the base changed");
    let cfg = m.config.clone();
    for ((k, _, old), (_, _, new)) in before.named(&cfg).into_iter().zip(a.named(&cfg)) {
        assert!(old != new, "{name}: {k} did not change");
    }
}

#[test]
fn lora_trains() {
    let m = model();
    let lc = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    let a = LoraAdapter::new(&m.config, lc, LoraInit::Peft { seed: 3 }).unwrap();
    // r (in + out) per adapted projection: q 4 (32 + 32), v 4 (32 + 16), two layers.
    adapter_case(
        "lora",
        Adapter::Lora(a),
        2 * (4 * 64 + 4 * 48),
        30,
        1e-2,
        0.5,
    );
}

#[test]
fn ia3_trains() {
    let m = model();
    let ic = Ia3Config {
        target_modules: vec!["k_proj".into(), "v_proj".into(), "down_proj".into()],
        feedforward_modules: vec!["down_proj".into()],
    };
    let a = Ia3Adapter::new(&m.config, ic, true).unwrap();
    assert_eq!(a.scale(0, Proj::Down).unwrap().len(), 48);
    // out of k and v (16 each) + in of down (48), two layers.
    adapter_case("ia3", Adapter::Ia3(a), 2 * (16 + 16 + 48), 40, 5e-2, 0.4);
}

#[test]
fn prompt_tuning_trains() {
    let m = model();
    let p = PromptTuning::new(
        &m.config,
        &m.weights.embed_tokens,
        4,
        &PromptInit::FromTokens(vec![1, 2, 3]),
    )
    .unwrap();
    adapter_case("prompt", Adapter::Prompt(p), 4 * 32, 40, 5e-2, 0.5);
}

#[test]
fn prefix_tuning_trains() {
    let m = model();
    let p = PrefixTuning::new(&m.config, 4, 1, 0.5).unwrap();
    // P * layers * 2 * kv_dim.
    adapter_case("prefix", Adapter::Prefix(p), 4 * 2 * 2 * 16, 40, 5e-2, 0.5);
}

#[test]
fn houlsby_trains() {
    let m = model();
    let hc = HoulsbyConfig {
        bottleneck: 8,
        activation: Activation::Silu,
    };
    let h = HoulsbyAdapter::new(&m.config, hc, 1e-2, 5).unwrap();
    // layers * 2 sites * (2 C b + b + C).
    // The documented file format round-trips.
    let tmp = tempfile::tempdir().unwrap();
    let mut trained = Adapter::Houlsby(h.clone());
    let mut mm = model();
    train(&mut mm, &mut Trainable::Adapter(&mut trained), 3, 1e-2);
    trained.save(tmp.path(), &mm.config).unwrap();
    let cfg_text = std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap();
    assert!(
        cfg_text.contains("\"peft_type\": \"HOULSBY\"")
            && cfg_text.contains("\"bottleneck_size\": 8")
    );
    assert_eq!(
        qadapt_train::peft::load(tmp.path(), &mm.config).unwrap(),
        trained
    );
    adapter_case(
        "houlsby",
        Adapter::Houlsby(h),
        2 * 2 * (2 * 32 * 8 + 8 + 32),
        30,
        1e-2,
        0.2,
    );
}

fn base_case(sel: Selection, want_params: usize, frac: f32) {
    let mut m = model();
    let cfg = m.config.clone();
    let mask = sel.mask(&cfg).unwrap();
    let counted: usize = m
        .weights
        .slots()
        .iter()
        .zip(&mask)
        .filter(|(_, k)| **k)
        .map(|(v, _)| v.len())
        .sum();
    assert_eq!(sel.num_params(&cfg), want_params);
    assert_eq!(counted, want_params);
    let before = m.weights.clone();
    let (first, after) = train(&mut m, &mut Trainable::Base(sel), 30, 3e-3);
    println!("{sel:?}: loss {first:.4} -> {after:.4} ({want_params} parameters)");
    assert!(after < frac * first, "{sel:?}: {first} -> {after}");
    let names = qadapt_train::weights::layout(&cfg);
    for (((name, _), old), (new, trained)) in names
        .iter()
        .zip(before.slots())
        .zip(m.weights.slots().into_iter().zip(&mask))
    {
        assert_eq!(old != new, *trained, "{sel:?}: {name}");
    }
}

#[test]
fn full_fine_tuning_trains_every_parameter() {
    // V C + L (2C + C Q + 2 C K + Q C + 3 C I) + C + V C (untied head).
    let per_layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48;
    base_case(
        Selection::Full,
        100 * 32 + 2 * per_layer + 32 + 100 * 32,
        0.05,
    );
}

#[test]
fn top_k_trains_only_the_top_layers() {
    let per_layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48;
    base_case(Selection::TopK(1), per_layer + 32 + 100 * 32, 0.1);
    let cfg = model().config;
    assert!(Selection::TopK(0).mask(&cfg).is_err());
    assert!(Selection::TopK(3).mask(&cfg).is_err());
    assert_eq!(
        Selection::TopK(2).num_params(&cfg) + 100 * 32,
        Selection::Full.num_params(&cfg)
    );
}

#[test]
fn reparameterized_prefix_trains_and_saves_the_projection() {
    let m = model();
    let pm = qadapt_train::PrefixMlp::new(&m.config, 4, 16, 2, 0.5).unwrap();
    // E [4, 16] + W1 [16, 16] + b1 [16] + W2 [64, 16] + b2 [64].
    let params = 4 * 16 + 16 * 16 + 16 + 64 * 16 + 64;
    let mut a = Adapter::PrefixMlp(pm);
    adapter_case("prefix mlp", a.clone(), params, 40, 1e-2, 0.5);
    // After training, the file holds the projected prefix only (the MLP is dropped), and loads
    // back as a plain prefix with the same outputs.
    let mut mm = model();
    train(&mut mm, &mut Trainable::Adapter(&mut a), 5, 1e-2);
    let tmp = tempfile::tempdir().unwrap();
    a.save(tmp.path(), &mm.config).unwrap();
    let back = qadapt_train::peft::load(tmp.path(), &mm.config).unwrap();
    assert!(matches!(back, Adapter::Prefix(_)));
    let ids = batch();
    let e1 = qadapt_train::evaluate(
        &mm,
        &qadapt_train::Batch::causal(ids.to_vec(), 2, 12).unwrap(),
        Some(&a),
        qadapt_train::Grads::None,
        None,
    )
    .unwrap();
    let e2 = qadapt_train::evaluate(
        &mm,
        &qadapt_train::Batch::causal(ids.to_vec(), 2, 12).unwrap(),
        Some(&back),
        qadapt_train::Grads::None,
        None,
    )
    .unwrap();
    assert_eq!(e1.logits, e2.logits);
}

fn lora(dropout: f64) -> Adapter<f32> {
    let cfg = model().config;
    let lc = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: false,
        dropout,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    // A non-zero B so that dropout on the adapter input changes the first step's gradients.
    let mut a = LoraAdapter::new(&cfg, lc, LoraInit::Peft { seed: 3 }).unwrap();
    for p in a.pairs.iter_mut().flatten().flatten() {
        p.b.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 0.01 * ((i % 7) as f32 - 3.0));
    }
    Adapter::Lora(a)
}

/// Runs `steps` LoRA steps with the trainer's dropout seed; returns the adapter and losses.
fn lora_run(dropout: f64, seed: Option<u64>, steps: usize) -> (Adapter<f32>, Vec<f32>) {
    let mut m = model();
    let mut a = lora(dropout);
    let mut t = Trainer::new(AdamW::default(), Some(1.0));
    t.dropout_seed = seed;
    let ids = batch();
    let losses = (0..steps)
        .map(|_| {
            let b = qadapt_train::Batch::causal(ids.clone(), 2, 12).unwrap();
            t.step(&mut m, &mut Trainable::Adapter(&mut a), &b, 1e-2)
                .unwrap()
        })
        .collect();
    (a, losses)
}

#[test]
fn lora_dropout_trains_reproducibly_and_only_with_a_seed() {
    let (plain, l0) = lora_run(0.5, None, 4);
    let (d1, l1) = lora_run(0.5, Some(9), 4);
    let (d2, l2) = lora_run(0.5, Some(9), 4);
    let (d3, _) = lora_run(0.5, Some(10), 4);
    assert!(d1 == d2, "same seed, same masks, same weights");
    assert_eq!(l1, l2);
    assert!(d1 != d3, "another seed draws other masks");
    assert!(plain != d1, "dropout changes the updates");
    // Without a seed the trainer runs in evaluation mode: as if lora_dropout were 0.
    let values = |a: &Adapter<f32>| -> Vec<f32> {
        a.named(&model().config)
            .into_iter()
            .flat_map(|(_, _, v)| v.to_vec())
            .collect()
    };
    assert!(values(&plain) == values(&lora_run(0.0, None, 4).0));
    assert!(l1[3] < l1[0] && l0[3] < l0[0], "{l1:?} {l0:?}");
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    let ids = batch();
    let (one, two) = (
        Batch::causal(ids.clone(), 2, 12).unwrap(),
        [
            Batch::causal(ids[..12].to_vec(), 1, 12).unwrap(),
            Batch::causal(ids[12..].to_vec(), 1, 12).unwrap(),
        ],
    );
    let run = |micro: &[Batch]| {
        let mut m = model();
        let mut a = lora(0.0);
        let mut t = Trainer::new(AdamW::default(), Some(1.0));
        let mut stats = Vec::new();
        for _ in 0..3 {
            for b in micro {
                t.accumulate(&m, &Trainable::Adapter(&mut a), b).unwrap();
            }
            stats.push(
                t.apply(&mut m, &mut Trainable::Adapter(&mut a), 1e-2, None)
                    .unwrap(),
            );
        }
        (a, stats)
    };
    let (a1, s1) = run(std::slice::from_ref(&one));
    let (a2, s2) = run(&two);
    for (x, y) in s1.iter().zip(&s2) {
        assert_eq!(x.tokens, y.tokens);
        assert!((x.loss - y.loss).abs() < 1e-5, "{x:?} {y:?}");
        assert!(
            (x.grad_norm - y.grad_norm).abs() < 1e-5 * x.grad_norm,
            "{x:?} {y:?}"
        );
    }
    let (n1, n2) = (a1.named(&model().config), a2.named(&model().config));
    for ((k, _, v1), (_, _, v2)) in n1.iter().zip(&n2) {
        for (x, y) in v1.iter().zip(v2.iter()) {
            assert!((x - y).abs() < 1e-5, "{k}: {x} vs {y}");
        }
    }
}
