//! Finite-difference checks in f64 of every adapter method's backward ((IA)³, prompt tuning,
//! prefix tuning, Houlsby): every element of every adapter tensor and of every base parameter,
//! through [`qadapt_train::evaluate`] with [`Grads::All`] (the base trained together with the
//! adapter, which exercises each changed projection's weight gradient too).
//!
//! Central differences with `h = 1e-5` on a tiny random model (GQA, 2 layers); accepted:
//! `|g - fd| <= 1e-6 (1 + |fd|)`, as in `gradcheck.rs`.

use qadapt::bottleneck::Activation;
use qadapt::ops::gradcheck::check_grad_with;
use qadapt::ops::rope::RopeScaling;
use qadapt_train::{
    Adapter, Batch, Evaluation, Grads, HoulsbyAdapter, HoulsbyConfig, Ia3Adapter, Ia3Config, Llama,
    PrefixTuning, PromptInit, PromptTuning, evaluate,
};

use crate::common;
use common::uniform;

/// The shared tiny model, untied with plain RoPE, from `seed`.
fn random_model(seed: u64) -> Llama<f64> {
    common::random_model(config(), &mut common::stream(seed))
}

fn config() -> qadapt_train::LlamaConfig {
    common::tiny_config(false, RopeScaling::None)
}

fn randomize(a: &mut Adapter<f64>, seed: u64, center: f64, scale: f64) {
    let mut s = common::stream(seed);
    for t in a.tensors_mut() {
        t.iter_mut()
            .for_each(|v| *v = center + scale * uniform(&mut s));
    }
}

const IDS: [u32; 10] = [3, 7, 1, 10, 0, 4, 4, 9, 2, 6];

/// [`evaluate`] on the fixed ids, labels = ids, evaluation mode.
fn run(m: &Llama<f64>, a: Option<&Adapter<f64>>, grads: Grads) -> qadapt::Result<Evaluation<f64>> {
    evaluate(m, &Batch::causal(IDS.to_vec(), 2, 5)?, a, grads, None)
}

fn check_all(name: &str, m: &Llama<f64>, a: &Adapter<f64>) {
    let cfg = &m.config;
    let ev = run(m, Some(a), Grads::All).unwrap();
    let ga = ev.adapter_grads.unwrap();
    let gw = ev.base_grads.unwrap();
    // Adapter tensors.
    let named: Vec<(String, Vec<f64>)> = ga
        .named(cfg)
        .into_iter()
        .map(|(k, _, v)| (k, v.to_vec()))
        .collect();
    let mut probe = a.clone();
    for (ti, (key, g)) in named.iter().enumerate() {
        let p = probe.tensors_mut()[ti].to_vec();
        check_grad_with(&format!("{name}: {key}"), &p, g, |i, v| {
            probe.tensors_mut()[ti][i] = v;
            run(m, Some(&probe), Grads::None).unwrap().loss
        })
        .unwrap();
    }
    // Base parameters.
    let names: Vec<String> = qadapt_train::weights::layout(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let grads: Vec<Vec<f64>> = gw.slots().into_iter().cloned().collect();
    let mut mp = m.clone();
    for (ti, (pname, g)) in names.iter().zip(&grads).enumerate() {
        let p = mp.weights.slots()[ti].clone();
        check_grad_with(&format!("{name}: {pname}"), &p, g, |i, v| {
            mp.weights.slots_mut()[ti][i] = v;
            run(&mp, Some(a), Grads::None).unwrap().loss
        })
        .unwrap();
    }
}

#[test]
fn ia3_gradients_match_finite_differences() {
    let m = random_model(5);
    let ic = Ia3Config {
        target_modules: common::all_projections(),
        // Input scaling on an overwritten (q) and an accumulated (down) projection; output
        // scaling on the others, o_proj accumulating into the residual.
        feedforward_modules: vec!["q_proj".into(), "down_proj".into()],
    };
    let a = Ia3Adapter::<f64>::new(&m.config, ic, true).unwrap();
    // PEFT's init (all ones) is the base model.
    let base = run(&m, None, Grads::None).unwrap();
    let mut a = Adapter::Ia3(a);
    let same = run(&m, Some(&a), Grads::None).unwrap();
    assert_eq!(base.logits, same.logits);
    randomize(&mut a, 3, 1.0, 0.4);
    check_all("ia3", &m, &a);
}

#[test]
fn prompt_tuning_gradients_match_finite_differences() {
    let m = random_model(6);
    let p = PromptTuning::<f64>::new(
        &m.config,
        &m.weights.embed_tokens,
        3,
        &PromptInit::FromTokens(vec![4, 9]),
    )
    .unwrap();
    // Initialized from vocabulary rows 4, 9, 4.
    assert_eq!(&p.embeddings[8..16], &m.weights.embed_tokens[72..80]);
    assert_eq!(&p.embeddings[16..24], &m.weights.embed_tokens[32..40]);
    let mut a = Adapter::Prompt(p);
    randomize(&mut a, 4, 0.0, 0.8);
    let ev = run(&m, Some(&a), Grads::None).unwrap();
    assert_eq!(ev.positions, 8);
    check_all("prompt", &m, &a);
}

#[test]
fn prefix_tuning_gradients_match_finite_differences() {
    let m = random_model(7);
    let a = Adapter::Prefix(PrefixTuning::<f64>::new(&m.config, 3, 9, 0.8).unwrap());
    assert_eq!(a.num_params(&m.config), 3 * 2 * 2 * 4);
    check_all("prefix", &m, &a);
}

#[test]
fn houlsby_gradients_match_finite_differences() {
    for (i, act) in [Activation::Silu, Activation::Relu, Activation::GeluTanh]
        .into_iter()
        .enumerate()
    {
        let m = random_model(8 + i as u64);
        let hc = HoulsbyConfig {
            bottleneck: 3,
            activation: act,
        };
        let h = HoulsbyAdapter::<f64>::new(&m.config, hc, 0.01, 1).unwrap();
        let mut a = Adapter::Houlsby(h);
        // Near-identity init: the adapted model is the base model.
        let base = run(&m, None, Grads::None).unwrap();
        let same = run(&m, Some(&a), Grads::None).unwrap();
        assert_eq!(base.logits, same.logits);
        // 2 layers x 2 sites x (2 C b + b + C).
        assert_eq!(a.num_params(&m.config), 4 * (2 * 8 * 3 + 3 + 8));
        randomize(&mut a, 11 + i as u64, 0.0, 0.7);
        check_all(&format!("houlsby {act:?}"), &m, &a);
    }
}

#[test]
fn reparameterized_prefix_gradients_match_finite_differences() {
    let m = random_model(12);
    let pm = qadapt_train::PrefixMlp::<f64>::new(&m.config, 2, 5, 3, 0.8).unwrap();
    // Saved as the prefix it projects to: the same outputs as that plain prefix.
    let (plain, _) = pm.project(&m.config).unwrap();
    let a = Adapter::PrefixMlp(pm);
    let via_mlp = run(&m, Some(&a), Grads::None).unwrap();
    let direct = run(&m, Some(&Adapter::Prefix(plain)), Grads::None).unwrap();
    assert_eq!(via_mlp.logits, direct.logits);
    // E [P, K] + W1 [H, K] + b1 + W2 [L 2 K, H] + b2.
    assert_eq!(a.num_params(&m.config), 2 * 4 + 5 * 4 + 5 + 16 * 5 + 16);
    check_all("prefix mlp", &m, &a);
}
