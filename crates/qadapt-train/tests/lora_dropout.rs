//! LoRA dropout (PEFT's `lora_B(lora_A(dropout(x)))`, inverted scaling, training mode only): the
//! masks' distribution and determinism, evaluation unchanged by `lora_dropout`, training-mode
//! gradients that depend on the key and only on the key, and a finite-difference check in f64 of
//! every adapter and base gradient with the mask of a fixed key.
//!
//! Finite differences: central, `h = 1e-5`, accepted `|g - fd| <= 1e-6 (1 + |fd|)` as in
//! `gradcheck.rs`; with the key fixed the masks are constants, so the loss is a smooth function
//! of the parameters.

use qadapt::ops::gradcheck::check_grad_with;
use qadapt::ops::rope::RopeScaling;
use qadapt_train::lora::dropout_mask;
use qadapt_train::{
    Adapter, Attached, BaseGrads, Batch, DropoutKey, Evaluation, Grads, Llama, LoraAdapter,
    LoraConfig, LoraInit, Proj, causal_targets, evaluate,
};
use qadapt_train::{Input, Options};

use crate::common;
use common::{random_model, tiny_config, uniform};

const IDS: [u32; 10] = [3, 7, 1, 10, 0, 4, 4, 9, 2, 6];

const KEY: DropoutKey = DropoutKey {
    seed: 11,
    step: 3,
    micro: 0,
};

/// A random f64 model and a LoRA adapter on every projection with random A and B.
fn setup(dropout: f64) -> (Llama<f64>, Adapter<f64>) {
    let cfg = tiny_config(false, RopeScaling::None);
    let mut seed = common::stream(77);
    let model = random_model(cfg.clone(), &mut seed);
    let lc = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        dropout,
        target_modules: common::all_projections(),
    };
    let mut a = LoraAdapter::<f64>::new(&cfg, lc, LoraInit::Peft { seed: 5 }).unwrap();
    for pair in a.pairs.iter_mut().flatten().flatten() {
        pair.b
            .iter_mut()
            .for_each(|v| *v = 0.5 * uniform(&mut seed));
    }
    (model, Adapter::Lora(a))
}

fn targets() -> Vec<Option<u32>> {
    causal_targets(&IDS, 2, 5).unwrap()
}

fn train(m: &Llama<f64>, a: &Adapter<f64>, key: DropoutKey, grads: Grads) -> Evaluation<f64> {
    let b = Batch::new(IDS.to_vec(), 2, 5, targets()).unwrap();
    evaluate(m, &b, Some(a), grads, Some(key)).unwrap()
}

fn eval(m: &Llama<f64>, a: &Adapter<f64>, grads: Grads) -> Evaluation<f64> {
    let b = Batch::new(IDS.to_vec(), 2, 5, targets()).unwrap();
    evaluate(m, &b, Some(a), grads, None).unwrap()
}

/// The adapter gradients' values (the gradient adapter also carries the config).
fn adapter_grads(e: &Evaluation<f64>) -> Vec<Vec<f64>> {
    let cfg = tiny_config(false, RopeScaling::None);
    let g = e.adapter_grads.as_ref().unwrap();
    g.named(&cfg)
        .into_iter()
        .map(|(_, _, v)| v.to_vec())
        .collect()
}

#[test]
fn masks_are_inverted_bernoulli_and_a_function_of_the_key() {
    let n = 40_000;
    let m = dropout_mask::<f32>(KEY, 0.25, 1, Proj::V, n).unwrap();
    let keep = 1.0 / 0.75f32;
    assert!(m.iter().all(|v| *v == 0.0 || *v == keep));
    // Binomial standard deviation sqrt(0.25 · 0.75 / n) = 0.0022; allow 4.5 of them.
    let dropped = m.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
    assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
    assert_eq!(m, dropout_mask::<f32>(KEY, 0.25, 1, Proj::V, n).unwrap());
    let others = [
        dropout_mask::<f32>(DropoutKey { seed: 12, ..KEY }, 0.25, 1, Proj::V, n),
        dropout_mask::<f32>(DropoutKey { step: 4, ..KEY }, 0.25, 1, Proj::V, n),
        dropout_mask::<f32>(DropoutKey { micro: 1, ..KEY }, 0.25, 1, Proj::V, n),
        dropout_mask::<f32>(KEY, 0.25, 0, Proj::V, n),
        dropout_mask::<f32>(KEY, 0.25, 1, Proj::K, n),
    ];
    for (i, o) in others.into_iter().enumerate() {
        let o = o.unwrap();
        let same = o.iter().zip(&m).filter(|(a, b)| a == b).count() as f64 / n as f64;
        // Independent masks agree on 0.25² + 0.75² = 62.5% of the elements.
        assert!((same - 0.625).abs() < 0.02, "variant {i}: {same}");
    }
    // A prefix of a longer mask is the shorter mask (element j depends on j only).
    assert_eq!(
        dropout_mask::<f32>(KEY, 0.25, 1, Proj::V, 100).unwrap(),
        m[..100]
    );
    assert!(
        dropout_mask::<f64>(KEY, 0.0, 0, Proj::Q, 50)
            .unwrap()
            .iter()
            .all(|v| *v == 1.0)
    );
    for p in [1.0, -0.1, f64::NAN] {
        assert!(dropout_mask::<f32>(KEY, p, 0, Proj::Q, 4).is_err(), "{p}");
    }
}

#[test]
fn evaluation_ignores_dropout_and_zero_dropout_trains_as_evaluation() {
    let (m, a0) = setup(0.0);
    let (_, a3) = setup(0.3);
    let e0 = eval(&m, &a0, Grads::All);
    let e3 = eval(&m, &a3, Grads::All);
    assert_eq!(e0.logits, e3.logits);
    assert_eq!(e0.loss, e3.loss);
    assert_eq!(adapter_grads(&e0), adapter_grads(&e3));
    assert_eq!(e0.base_grads, e3.base_grads);
    let t0 = train(&m, &a0, KEY, Grads::All);
    assert_eq!(t0.logits, e0.logits);
    assert_eq!(adapter_grads(&t0), adapter_grads(&e0));
    assert_eq!(t0.base_grads, e0.base_grads);
}

#[test]
fn training_gradients_depend_on_the_key_only() {
    let (m, a) = setup(0.3);
    let ev = eval(&m, &a, Grads::Adapter);
    let t = train(&m, &a, KEY, Grads::Adapter);
    assert_ne!(t.logits, ev.logits);
    assert_ne!(adapter_grads(&t), adapter_grads(&ev));
    let again = train(&m, &a, KEY, Grads::Adapter);
    assert_eq!(again.logits, t.logits);
    assert_eq!(adapter_grads(&again), adapter_grads(&t));
    for other in [
        DropoutKey { step: 4, ..KEY },
        DropoutKey { micro: 1, ..KEY },
        DropoutKey { seed: 12, ..KEY },
    ] {
        assert_ne!(
            adapter_grads(&train(&m, &a, other, Grads::Adapter)),
            adapter_grads(&t),
            "{other:?}"
        );
    }
    // The backward refuses a key other than the forward's.
    let Adapter::Lora(lora) = &a else {
        unreachable!()
    };
    let f = m
        .forward(
            Input::ids(&IDS, 2, 5),
            Options::adapter(Attached::LoraTrain(lora, KEY)),
        )
        .unwrap();
    let other = Attached::LoraTrain(lora, DropoutKey { step: 4, ..KEY });
    assert!(
        m.backward(
            &f,
            &targets(),
            Options::adapter(other).with_base(BaseGrads::Frozen)
        )
        .is_err()
    );
    assert!(
        m.backward(
            &f,
            &targets(),
            Options::adapter(Attached::Lora(lora)).with_base(BaseGrads::Frozen)
        )
        .is_err()
    );
    assert!(
        m.backward(
            &f,
            &targets(),
            Options::adapter(Attached::LoraTrain(lora, KEY)).with_base(BaseGrads::Frozen)
        )
        .is_ok()
    );
}

#[test]
fn dropout_gradients_match_finite_differences() {
    let (m, a) = setup(0.3);
    let cfg = m.config.clone();
    let loss = |m: &Llama<f64>, a: &Adapter<f64>| train(m, a, KEY, Grads::None).loss;
    let ev = train(&m, &a, KEY, Grads::All);
    let ga = ev.adapter_grads.clone().unwrap();
    let named: Vec<(String, Vec<f64>)> = ga
        .named(&cfg)
        .into_iter()
        .map(|(k, _, v)| (k, v.to_vec()))
        .collect();
    let mut probe = a.clone();
    for (ti, (key, g)) in named.iter().enumerate() {
        let p = probe.tensors_mut()[ti].to_vec();
        check_grad_with(key, &p, g, |i, v| {
            probe.tensors_mut()[ti][i] = v;
            loss(&m, &probe)
        })
        .unwrap();
    }
    // Every base parameter: the dropped-out dx reaches the lower layers and the embeddings.
    let names: Vec<String> = qadapt_train::weights::layout(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let gw = ev.base_grads.unwrap();
    let grads: Vec<Vec<f64>> = gw.slots().into_iter().cloned().collect();
    let mut mp = m.clone();
    for (ti, (pname, g)) in names.iter().zip(&grads).enumerate() {
        let p = mp.weights.slots()[ti].clone();
        check_grad_with(pname, &p, g, |i, v| {
            mp.weights.slots_mut()[ti][i] = v;
            loss(&mp, &a)
        })
        .unwrap();
    }
}
