//! (IA)³, prompt tuning and prefix tuning against PEFT 0.21.2 (`tests/data/make_peft_golden.py`
//! wrote each adapter on `tiny_llama/` with random parameters, and the golden logits, loss and
//! adapter gradients), and each file format read back after a write.
//!
//! Tolerances (f32 on both sides, different summation orders; run with `--nocapture` for the
//! measured values): logits `max|err| <= 3e-5 max|want|`, loss relative `1e-5`, every adapter
//! gradient `max|err| <= 5e-5 max|want|`. A wrong RoPE offset, RoPE on the prefix keys, or a
//! wrong label shift moves the logits or loss by orders of magnitude more (the test checks two of
//! these alternatives and requires them to miss).

use qadapt_train::{Input, Options};
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::{data, worst};
use qadapt_train::peft::{self, Adapter};
use qadapt_train::{Batch, Grads, LlamaDir, evaluate};
use safetensors::SafeTensors;

struct Golden(Vec<u8>);

impl Golden {
    fn open(name: &str) -> Self {
        Golden(std::fs::read(data(name)).expect("run tests/data/make_peft_golden.py"))
    }
    fn f32s(&self, k: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(k).unwrap_or_else(|_| panic!("golden lacks {k}"));
        (
            t.shape().to_vec(),
            bytemuck::pod_collect_to_vec::<u8, f32>(t.data()),
        )
    }
    /// The golden's `input_ids` as a batch with labels = ids (what the goldens were made with).
    fn batch(&self) -> Batch {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor("input_ids").unwrap();
        let ids = bytemuck::pod_collect_to_vec::<u8, i64>(t.data());
        let ids = ids.into_iter().map(|v| v as u32).collect();
        Batch::causal(ids, t.shape()[0], t.shape()[1]).unwrap()
    }
    fn grad_count(&self) -> usize {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        st.names().iter().filter(|k| k.starts_with("grad.")).count()
    }
}

/// Checks one adapter directory against its golden file; returns the adapter.
fn check(method: &str, positions_extra: usize) -> Adapter<f32> {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let model = dir.model().unwrap();
    let adapter = peft::load(&data(&format!("tiny_llama_{method}")), &dir.config).unwrap();
    let g = Golden::open(&format!("tiny_llama_{method}_golden.safetensors"));
    let b = g.batch();
    let (batch, seq) = (b.batch, b.seq);
    let ev = evaluate(&model, &b, Some(&adapter), Grads::Adapter, None).unwrap();
    assert_eq!(ev.positions, seq + positions_extra);
    let (shape, want) = g.f32s("logits");
    assert_eq!(shape, [batch, ev.positions, dir.config.vocab_size]);
    let (err, scale) = worst(&ev.logits, &want);
    println!("{method}: logits max err {err:.3e} (max |logit| {scale:.3})");
    assert!(err <= 3e-5 * scale, "{method} logits {err} vs {scale}");
    let want_loss = g.f32s("loss").1[0];
    let rel = ((ev.loss - want_loss) / want_loss).abs();
    println!(
        "{method}: loss {} vs PEFT {want_loss} (rel {rel:.3e})",
        ev.loss
    );
    assert!(rel <= 1e-5);
    // The adapter matters: the base model alone is far from PEFT's logits or loss.
    let base = evaluate(&model, &b, None, Grads::None, None).unwrap();
    assert!(
        (base.loss - want_loss).abs() > 1e-2,
        "{method}: adapter has no effect"
    );

    let grads = ev.adapter_grads.unwrap();
    let mut n = 0;
    let mut worst_rel = 0f32;
    for (key, shape, got) in grads.named(&dir.config) {
        let (wshape, want) = g.f32s(&format!("grad.{key}"));
        assert_eq!(wshape, shape, "{key}");
        let (err, scale) = worst(got, &want);
        assert!(
            scale > 0.0 && err <= 5e-5 * scale,
            "{key}: {err} vs {scale}"
        );
        worst_rel = worst_rel.max(err / scale);
        n += 1;
    }
    assert_eq!(n, g.grad_count());
    println!("{method}: {n} gradient tensors, worst max-err / max|g| {worst_rel:.3e}");

    // Write, read back: identical, and the same parameter count.
    let tmp = tempfile::tempdir().unwrap();
    adapter.save(tmp.path(), &dir.config).unwrap();
    let back = peft::load(tmp.path(), &dir.config).unwrap();
    assert_eq!(back, adapter);
    adapter
}

#[test]
fn ia3_matches_peft() {
    let a = check("ia3", 0);
    let Adapter::Ia3(ia3) = &a else {
        panic!("not ia3")
    };
    // k, v: [16, 1]; o: [32, 1]; down (feed-forward, input scaled): [1, 48]; two layers.
    assert_eq!(
        a.num_params(&LlamaDir::open(&data("tiny_llama")).unwrap().config),
        2 * (16 + 16 + 32 + 48)
    );
    assert!(ia3.config.is_feedforward(1, qadapt_train::Proj::Down));
}

#[test]
fn prompt_tuning_matches_peft() {
    let a = check("prompt", 3);
    assert_eq!(
        a.num_params(&LlamaDir::open(&data("tiny_llama")).unwrap().config),
        3 * 32
    );
}

#[test]
fn prefix_tuning_matches_peft() {
    let a = check("prefix", 0);
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    // P * layers * 2 * kv_heads * head_dim.
    assert_eq!(a.num_params(&dir.config), 3 * 2 * 2 * 2 * 8);

    // The alternative reading, RoPE applied to the prefix keys at positions 0..P, misses PEFT
    // by far: PEFT's prefix keys enter the cache as they are.
    let Adapter::Prefix(pt) = &a else { panic!() };
    let c = &dir.config;
    let inv = qadapt::ops::rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).unwrap();
    let table = qadapt::ops::rope::RopeTable::<f32>::new(3, c.head_dim, &inv).unwrap();
    let mut roped = pt.clone();
    for l in 0..c.num_hidden_layers {
        let mut k = pt.gather(c, l, 0);
        let k0 = k.clone();
        table
            .apply(
                &mut k,
                c.num_key_value_heads,
                qadapt::ops::rope::RopeDirection::Forward,
            )
            .unwrap();
        let delta: Vec<f32> = k.iter().zip(&k0).map(|(a, b)| a - b).collect();
        roped.scatter_add(c, l, 0, &delta);
    }
    let model = dir.model().unwrap();
    let g = Golden::open("tiny_llama_prefix_golden.safetensors");
    let b = g.batch();
    let want = g.f32s("logits").1;
    let f = model
        .forward(
            Input::from(&b),
            Options::adapter(qadapt_train::Attached::Prefix(&roped)),
        )
        .unwrap();
    let (err, scale) = worst(&f.logits, &want);
    println!("prefix: with RoPE on the prefix keys, logits max err {err:.3e}");
    assert!(err > 1e-3 * scale);
}

/// Adapters written by this crate (randomized, so no method is at its identity init) reload to
/// the same values; with `QADAPT_EXPORT_DIR` set, each is also written there as
/// `<method>/` with our logits and loss in `<method>_ours.safetensors`, which
/// `tests/data/check_peft_reads_ours.py` loads in PEFT and compares.
#[test]
fn written_adapters_reload_and_export_for_peft() {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let cfg = &dir.config;
    let model = dir.model().unwrap();
    let lora = qadapt_train::LoraAdapter::<f32>::new(
        cfg,
        qadapt_train::LoraConfig {
            r: 2,
            alpha: 4.0,
            use_rslora: false,
            dropout: 0.0,
            target_modules: vec!["k_proj".into(), "up_proj".into()],
        },
        qadapt_train::LoraInit::Peft { seed: 1 },
    )
    .unwrap();
    let ia3 = qadapt_train::Ia3Adapter::<f32>::new(
        cfg,
        qadapt_train::Ia3Config {
            target_modules: vec!["down_proj".into(), "gate_proj".into(), "q_proj".into()],
            feedforward_modules: vec!["down_proj".into()],
        },
        true,
    )
    .unwrap();
    let prompt = qadapt_train::PromptTuning::<f32>::new(
        cfg,
        &dir.weights.embed_tokens,
        2,
        &qadapt_train::PromptInit::Random {
            seed: 3,
            scale: 1.0,
        },
    )
    .unwrap();
    let prefix = qadapt_train::PrefixTuning::<f32>::new(cfg, 2, 4, 1.0).unwrap();
    let export = std::env::var_os("QADAPT_EXPORT_DIR").map(PathBuf::from);
    let ids: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38];
    for (name, mut a, center) in [
        ("lora", Adapter::Lora(lora), 0.0),
        ("ia3", Adapter::Ia3(ia3), 1.0),
        ("prompt", Adapter::Prompt(prompt), 0.0),
        ("prefix", Adapter::Prefix(prefix), 0.0),
    ] {
        let mut s = ChaCha8Rng::seed_from_u64(7);
        for t in a.tensors_mut() {
            for v in t.iter_mut() {
                *v = center + 0.5 * s.random_range(-1.0f32..1.0);
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = export.clone().unwrap_or_else(|| tmp.path().to_owned());
        a.save(&out.join(name), cfg).unwrap();
        assert_eq!(peft::load(&out.join(name), cfg).unwrap(), a, "{name}");
        let ev = evaluate(
            &model,
            &Batch::causal(ids.to_vec(), 2, 5).unwrap(),
            Some(&a),
            Grads::None,
            None,
        )
        .unwrap();
        let ids64: Vec<i64> = ids.iter().map(|&v| v as i64).collect();
        let shape = vec![2, ev.positions, cfg.vocab_size];
        let views = vec![
            (
                "input_ids",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I64,
                    vec![2, 5],
                    bytemuck::cast_slice(&ids64),
                )
                .unwrap(),
            ),
            (
                "logits",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape,
                    bytemuck::cast_slice(&ev.logits),
                )
                .unwrap(),
            ),
            (
                "loss",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![1],
                    bytemuck::cast_slice(std::slice::from_ref(&ev.loss)),
                )
                .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(views, None, &out.join(format!("{name}_ours.safetensors")))
            .unwrap();
    }
}

/// Prefix tuning trained through PEFT's MLP reparameterization (`prefix_projection: true`): our
/// MLP on PEFT's parameters projects to the prefix PEFT saved, gives PEFT's logits and loss, and
/// the gradients of the MLP's parameters; the saved file (the projection alone) loads as a plain
/// prefix with the same logits.
#[test]
fn reparameterized_prefix_matches_peft() {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let cfg = &dir.config;
    let model = dir.model().unwrap();
    let g = Golden::open("tiny_llama_prefix_mlp_golden.safetensors");
    let param = |k: &str| g.f32s(&format!("param.prompt_encoder.{k}"));
    let (w1_shape, w1) = param("transform.0.weight");
    let pm = qadapt_train::PrefixMlp {
        num_virtual_tokens: 3,
        hidden: w1_shape[0],
        embedding: param("embedding.weight").1,
        w1,
        b1: param("transform.0.bias").1,
        w2: param("transform.2.weight").1,
        b2: param("transform.2.bias").1,
    };
    let saved = peft::load(&data("tiny_llama_prefix_mlp"), cfg).unwrap();
    let Adapter::Prefix(saved_prefix) = &saved else {
        panic!("not a prefix")
    };
    let (projected, _) = pm.project(cfg).unwrap();
    let (err, scale) = worst(&projected.values, &saved_prefix.values);
    println!("prefix mlp: projection max err {err:.3e} (max {scale:.3})");
    assert!(err <= 1e-5 * scale);

    let b = g.batch();
    let a = Adapter::PrefixMlp(pm);
    let ev = evaluate(&model, &b, Some(&a), Grads::Adapter, None).unwrap();
    let want = g.f32s("logits").1;
    let (err, scale) = worst(&ev.logits, &want);
    println!("prefix mlp: logits max err {err:.3e} (max |logit| {scale:.3})");
    assert!(err <= 3e-5 * scale);
    let want_loss = g.f32s("loss").1[0];
    assert!(((ev.loss - want_loss) / want_loss).abs() <= 1e-5);
    let file = evaluate(&model, &b, Some(&saved), Grads::None, None).unwrap();
    assert!(worst(&file.logits, &want).0 <= 3e-5 * scale);
    let grads = ev.adapter_grads.unwrap();
    let mut n = 0;
    let mut worst_rel = 0f32;
    for (key, shape, got) in grads.named(cfg) {
        let (wshape, want) = g.f32s(&format!("grad.{key}"));
        assert_eq!(wshape, shape, "{key}");
        let (err, scale) = worst(got, &want);
        assert!(
            scale > 0.0 && err <= 5e-5 * scale,
            "{key}: {err} vs {scale}"
        );
        worst_rel = worst_rel.max(err / scale);
        n += 1;
    }
    assert_eq!(n, g.grad_count());
    println!("prefix mlp: {n} gradient tensors, worst max-err / max|g| {worst_rel:.3e}");
}
