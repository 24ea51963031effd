//! Several named LoRA adapters on the `tiny_llama` fixture: switching gives exactly what
//! evaluating the base with that adapter alone gives, none gives the base, unknown names and
//! adapters for another model are refused, merging computes base + adapter, and the active
//! adapter trains in place.

use crate::common::data;
use qadapt::Error;
use qadapt::optim::AdamW;
use qadapt_train::{
    Adapter, Batch, Evaluation, Grads, Llama, LlamaDir, LoraAdapter, LoraConfig, LoraInit, LoraSet,
    Trainable, Trainer, evaluate, lora,
};

fn model() -> Llama<f32> {
    LlamaDir::open(&data("tiny_llama"))
        .unwrap()
        .model()
        .unwrap()
}

const BATCH: usize = 2;
const SEQ: usize = 9;

fn ids() -> Vec<u32> {
    (0..(BATCH * SEQ) as u32)
        .map(|i| (i * 37 + 5) % 100)
        .collect()
}

/// A second adapter on other projections, B non-zero so that it changes the logits.
fn other_adapter(m: &Llama<f32>) -> LoraAdapter<f32> {
    let lc = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        dropout: 0.1,
        target_modules: vec!["k_proj".into(), "up_proj".into()],
    };
    let mut a = LoraAdapter::new(&m.config, lc, LoraInit::Peft { seed: 9 }).unwrap();
    for (i, pair) in a.pairs.iter_mut().flatten().flatten().enumerate() {
        for (j, v) in pair.b.iter_mut().enumerate() {
            *v = 0.05 * (((i * 31 + j * 7) % 13) as f32 - 6.0);
        }
    }
    a
}

fn alone(m: &Llama<f32>, a: Option<LoraAdapter<f32>>, grads: Grads) -> Evaluation<f32> {
    evaluate(
        m,
        &qadapt_train::Batch::causal(ids().to_vec(), BATCH, SEQ).unwrap(),
        a.map(Adapter::Lora).as_ref(),
        grads,
        None,
    )
    .unwrap()
}

fn in_set(s: &LoraSet, grads: Grads) -> Evaluation<f32> {
    s.evaluate(&Batch::causal(ids(), BATCH, SEQ).unwrap(), grads)
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn switching_gives_each_adapter_alone_and_none_gives_the_base() {
    let m = model();
    let peft = lora::load(&data("tiny_llama_lora"), &m.config).unwrap();
    let other = other_adapter(&m);
    let mut s = LoraSet::new(m.clone());
    s.load("peft", &data("tiny_llama_lora")).unwrap();
    s.add("other", other.clone()).unwrap();
    assert_eq!(s.names(), ["peft", "other"]);
    assert_eq!(s.active(), None);
    assert_eq!(s.get("peft").unwrap(), &peft);

    let base = alone(&m, None, Grads::None);
    let with_peft = alone(&m, Some(peft.clone()), Grads::Adapter);
    let with_other = alone(&m, Some(other.clone()), Grads::Adapter);
    assert!(max_diff(&with_peft.logits, &base.logits) > 1e-2);
    assert!(max_diff(&with_other.logits, &base.logits) > 1e-2);
    assert!(max_diff(&with_peft.logits, &with_other.logits) > 1e-2);

    assert_eq!(in_set(&s, Grads::None).logits, base.logits);
    for _ in 0..2 {
        for (name, want) in [("peft", &with_peft), ("other", &with_other)] {
            s.set_active(Some(name)).unwrap();
            assert_eq!(s.active(), Some(name));
            let got = in_set(&s, Grads::Adapter);
            assert_eq!(got.logits, want.logits, "{name}");
            assert_eq!(got.loss, want.loss, "{name}");
            assert_eq!(got.adapter_grads, want.adapter_grads, "{name}");
        }
        s.set_active(None).unwrap();
        let got = in_set(&s, Grads::None);
        assert_eq!(got.logits, base.logits);
        assert_eq!(got.loss, base.loss);
    }
    assert_eq!(s.model().weights, m.weights);
}

#[test]
fn unknown_names_and_foreign_adapters_are_refused() {
    let m = model();
    let mut s = LoraSet::new(m.clone());
    s.add("a", other_adapter(&m)).unwrap();
    let unknown = |e: Error| {
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("\"nope\"") && msg.contains("[\"a\"]"), "{msg}");
    };
    unknown(s.set_active(Some("nope")).unwrap_err());
    unknown(s.remove("nope").unwrap_err());
    unknown(s.get("nope").unwrap_err());
    assert!(matches!(
        s.add("a", other_adapter(&m)).unwrap_err(),
        Error::Invalid { .. }
    ));
    assert!(s.add("", other_adapter(&m)).is_err());
    assert!(s.merge_active().is_err(), "nothing is active");
    // An adapter made for a one-layer model, and one with a truncated matrix.
    let small = LlamaDir::open(&data("tiny_llama_llama3")).unwrap();
    let foreign =
        LoraAdapter::new(&small.config, other_adapter(&m).config, LoraInit::Zeros).unwrap();
    assert!(s.add("foreign", foreign).is_err());
    let mut cut = other_adapter(&m);
    cut.pairs[1][1].as_mut().unwrap().b.pop();
    assert!(s.add("cut", cut).is_err());
    // A PEFT directory for the one-layer model does not load on this base either.
    let dir = tempfile::tempdir().unwrap();
    LoraAdapter::<f32>::new(&small.config, other_adapter(&m).config, LoraInit::Zeros)
        .unwrap()
        .save(dir.path(), &small.config)
        .unwrap();
    assert!(s.load("foreign", dir.path()).is_err());
    assert_eq!(s.names(), ["a"]);
}

#[test]
fn remove_keeps_the_active_adapter_or_clears_it() {
    let m = model();
    let mut s = LoraSet::new(m.clone());
    for n in ["x", "y", "z"] {
        s.add(n, other_adapter(&m)).unwrap();
    }
    s.set_active(Some("z")).unwrap();
    s.remove("x").unwrap();
    assert_eq!(s.active(), Some("z"));
    let z = s.remove("z").unwrap();
    assert_eq!(z, other_adapter(&m));
    assert_eq!(s.active(), None);
    assert_eq!(s.names(), ["y"]);
}

#[test]
fn merging_computes_base_plus_adapter_and_switching_unmerges() {
    let m = model();
    let peft = lora::load(&data("tiny_llama_lora"), &m.config).unwrap();
    let other = other_adapter(&m);
    let mut s = LoraSet::new(m.clone());
    s.add("peft", peft.clone()).unwrap();
    s.add("other", other.clone()).unwrap();
    s.set_active(Some("peft")).unwrap();
    s.merge_active().unwrap();
    s.merge_active().unwrap();
    assert_eq!(s.merged(), Some("peft"));
    let want = alone(&m, Some(peft), Grads::None).logits;
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    // Merged weights round once to f32 (tests/merge.rs measures the same bound in f64).
    let got = in_set(&s, Grads::None).logits;
    assert!(max_diff(&got, &want) <= 1e-4 * scale);
    let b = Batch::causal(ids(), BATCH, SEQ).unwrap();
    assert!(s.evaluate(&b, Grads::Adapter).is_err());
    assert!(s.train_parts().is_err());
    // Switching unmerges: the base is back up to rounding.
    s.set_active(Some("other")).unwrap();
    assert_eq!(s.merged(), None);
    let d = s
        .model()
        .weights
        .slots()
        .into_iter()
        .zip(m.weights.slots())
        .fold(0f32, |a, (x, y)| a.max(max_diff(x, y)));
    assert!(d <= 1e-6, "unmerged weights off by {d:e}");
    let want = alone(&m, Some(other), Grads::None).logits;
    assert!(max_diff(&in_set(&s, Grads::None).logits, &want) <= 1e-5 * scale);
    let back = s.into_model().unwrap();
    assert!(
        back.weights
            .slots()
            .into_iter()
            .zip(m.weights.slots())
            .all(|(x, y)| max_diff(x, y) <= 1e-6)
    );
}

#[test]
fn the_active_adapter_trains_in_place() {
    let m = model();
    let mut s = LoraSet::new(m.clone());
    s.add("other", other_adapter(&m)).unwrap();
    s.add(
        "peft",
        lora::load(&data("tiny_llama_lora"), &m.config).unwrap(),
    )
    .unwrap();
    assert!(s.train_parts().is_err(), "nothing is active");
    s.set_active(Some("other")).unwrap();
    let before = in_set(&s, Grads::None).loss;
    let mut t = Trainer::new(
        AdamW {
            lr: 1e-2,
            ..AdamW::default()
        },
        Some(1.0),
    );
    for _ in 0..10 {
        let (model, adapter) = s.train_parts().unwrap();
        let b = Batch::causal(ids(), BATCH, SEQ).unwrap();
        t.step(model, &mut Trainable::Adapter(adapter), &b, 1e-2)
            .unwrap();
    }
    let after = in_set(&s, Grads::None).loss;
    assert!(after < before, "{before} -> {after}");
    assert_eq!(s.model().weights, m.weights);
    assert_ne!(s.get("other").unwrap(), &other_adapter(&m));
    // The trained adapter alone gives what the set gives.
    let trained = s.get("other").unwrap().clone();
    assert_eq!(
        alone(&m, Some(trained), Grads::None).logits,
        in_set(&s, Grads::None).logits
    );
}
