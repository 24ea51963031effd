//! LoRA and (IA)³ merge/unmerge on the model: the merged weights compute what base + adapter computes, and
//! unmerging gives the base back.

use crate::common::data;
use qadapt_train::merge::{Fold, fold, fold_ia3, named_tensors};
use qadapt_train::{Input, Options};
use qadapt_train::{Llama, LlamaDir, lora};

#[test]
fn merged_model_equals_base_plus_adapter_and_unmerge_restores_the_base() {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let adapter = lora::load(&data("tiny_llama_lora"), &dir.config).unwrap();
    let ids: Vec<u32> = (0..22)
        .map(|i| (i * 37 + 5) % dir.config.vocab_size as u32)
        .collect();
    let (batch, seq) = (2, 11);

    // In f64, so the comparison sees the algebra, not f32 rounding of two summation orders.
    let base = dir.model().unwrap().cast::<f64>();
    let adapter64 = adapter.cast::<f64>();
    let want = base
        .forward(Input::ids(&ids, batch, seq), Options::adapter(&adapter64))
        .unwrap()
        .logits;
    let mut w = dir.weights.clone();
    fold(&adapter, &dir.config, &mut w, Fold::Merge).unwrap();
    let merged = Llama::new(dir.config.clone(), w.clone())
        .unwrap()
        .cast::<f64>();
    let got = merged
        .forward(Input::ids(&ids, batch, seq), Options::default())
        .unwrap()
        .logits;
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    // The merged weights are rounded to f32 once: ~1e-7 relative per weight.
    assert!(
        err <= 1e-5 * scale,
        "merged logits off by {err:e} (max |logit| {scale})"
    );
    let plain = base
        .forward(Input::ids(&ids, batch, seq), Options::default())
        .unwrap()
        .logits;
    let moved = plain
        .iter()
        .zip(&want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        moved > 1e-2 * scale,
        "the adapter must change the logits for this test to mean anything"
    );

    fold(&adapter, &dir.config, &mut w, Fold::Unmerge).unwrap();
    for ((name, _, back), (_, _, orig)) in named_tensors(&dir.config, &w, qadapt::DType::F32)
        .iter()
        .zip(named_tensors(&dir.config, &dir.weights, qadapt::DType::F32).iter())
    {
        let (b, o) = (back.to_f32_vec(), orig.to_f32_vec());
        let worst = b
            .iter()
            .zip(&o)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-6, "{name}: unmerge leaves {worst:e}");
    }
}

#[test]
fn adapter_for_another_model_is_refused() {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let adapter = lora::load(&data("tiny_llama_lora"), &dir.config).unwrap();
    let other = LlamaDir::open(&data("tiny_llama_llama3")).unwrap();
    let mut w = other.weights.clone();
    let mut cfg = other.config.clone();
    cfg.num_hidden_layers += 1;
    assert!(fold(&adapter, &cfg, &mut w, Fold::Merge).is_err());
}

/// (IA)³ folds too: the PEFT fixture `tiny_llama_ia3` (k, v, o scaled at the output, down_proj at
/// its input) merged into the weights gives the adapted model's logits, and unmerging divides
/// the scaling back out.
#[test]
fn merged_ia3_equals_base_plus_adapter_and_unmerge_restores_the_base() {
    let dir = LlamaDir::open(&data("tiny_llama")).unwrap();
    let adapter = qadapt_train::ia3::load(&data("tiny_llama_ia3"), &dir.config).unwrap();
    assert!(
        adapter
            .config
            .feedforward_modules
            .iter()
            .any(|m| m == "down_proj")
    );
    let ids: Vec<u32> = (0..22)
        .map(|i| (i * 29 + 3) % dir.config.vocab_size as u32)
        .collect();
    let base = dir.model().unwrap();
    let with = qadapt_train::Adapter::Ia3(adapter.clone());
    let want = qadapt_train::evaluate(
        &base,
        &qadapt_train::Batch::causal(ids.to_vec(), 2, 11).unwrap(),
        Some(&with),
        qadapt_train::Grads::None,
        None,
    )
    .unwrap()
    .logits;
    let mut w = dir.weights.clone();
    fold_ia3(&adapter, &dir.config, &mut w, Fold::Merge).unwrap();
    let got = Llama::new(dir.config.clone(), w.clone())
        .unwrap()
        .forward(Input::ids(&ids, 2, 11), Options::default())
        .unwrap()
        .logits;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err <= 3e-5 * scale,
        "merged (IA)3 logits off by {err:e} of {scale}"
    );
    let plain = base
        .forward(Input::ids(&ids, 2, 11), Options::default())
        .unwrap()
        .logits;
    let moved = plain
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-2 * scale, "the adapter must change the logits");
    fold_ia3(&adapter, &dir.config, &mut w, Fold::Unmerge).unwrap();
    for (back, orig) in w.slots().iter().zip(dir.weights.slots()) {
        for (x, y) in back.iter().zip(orig.iter()) {
            assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "{x} vs {y}");
        }
    }
}
