//! The f32 forward and backward against transformers 5.24 (`tests/data/make_llama_golden.py`):
//! logits, loss, the gradient of every parameter and of the input embeddings, for two tiny random
//! models: untied bf16 weights with plain RoPE (`tiny_llama`), and tied, sharded f16 weights with
//! llama3 RoPE scaling (`tiny_llama_llama3`).
//!
//! Tolerances (both are f32 computations that sum in different orders; measured worst cases are
//! printed by each test, run with `--nocapture`):
//! - logits: `max|got - want| <= 1e-5 * max|want|` (measured: 1.1e-6);
//! - loss: relative `1e-5` (measured: 8.5e-8);
//! - gradients: per tensor, `max|got - want| <= 5e-5 * max|want|` (measured: 4.6e-6 at worst). A
//!   backward bug gives an O(1) relative error, so this separates bugs from rounding by orders of
//!   magnitude.

use crate::common::{data, worst};
use qadapt_train::{Batch, Input, Options};
use qadapt_train::{LlamaDir, causal_targets};
use safetensors::SafeTensors;

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(name: &str) -> Self {
        Golden {
            bytes: std::fs::read(data(name))
                .expect("golden file (run tests/data/make_llama_golden.py)"),
        }
    }

    fn get(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("golden lacks {key}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
        (
            t.shape().to_vec(),
            bytemuck::pod_collect_to_vec::<u8, f32>(t.data()),
        )
    }

    fn ids(&self) -> (usize, usize, Vec<u32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor("input_ids").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64);
        let ids = bytemuck::pod_collect_to_vec::<u8, i64>(t.data());
        (
            t.shape()[0],
            t.shape()[1],
            ids.into_iter().map(|v| v as u32).collect(),
        )
    }
}

fn check_against_transformers(model_dir: &str, golden: &str) {
    let dir = LlamaDir::open(&data(model_dir)).unwrap();
    let model = dir.model().unwrap();
    let g = Golden::open(golden);
    let (batch, seq, ids) = g.ids();
    let (loss, fwd, grads) = model
        .loss_and_grads(
            &Batch::causal(ids.to_vec(), batch, seq).unwrap(),
            Options::default(),
        )
        .unwrap();

    let (shape, want_logits) = g.get("logits");
    assert_eq!(shape, [batch, seq, dir.config.vocab_size]);
    let (err, scale) = worst(&fwd.logits, &want_logits);
    println!("{model_dir}: logits max err {err:.3e} (max |logit| {scale:.3})");
    assert!(err <= 1e-5 * scale, "logits: {err} vs scale {scale}");

    let want_loss = g.get("loss").1[0];
    let rel = ((loss - want_loss) / want_loss).abs();
    println!("{model_dir}: loss {loss} vs {want_loss} (rel {rel:.3e})");
    assert!(rel <= 1e-5);
    assert_eq!(model.loss(&fwd).unwrap(), loss);

    let mut worst_rel = 0f32;
    let mut checked = 0;
    let named = grads.weights.as_ref().unwrap().named(&dir.config);
    for (name, shape, got) in &named {
        let (wshape, want) = g.get(&format!("grad.{name}"));
        assert_eq!(&wshape, shape, "{name}");
        let (err, scale) = worst(got, &want);
        worst_rel = worst_rel.max(err / scale);
        assert!(
            err <= 5e-5 * scale,
            "grad {name}: max err {err} vs max |g| {scale}"
        );
        checked += 1;
    }
    let (_, want) = g.get("grad.inputs_embeds");
    let (err, scale) = worst(&grads.inputs_embeds, &want);
    worst_rel = worst_rel.max(err / scale);
    assert!(err <= 5e-5 * scale, "grad inputs_embeds: {err} vs {scale}");
    println!(
        "{model_dir}: {checked} parameter gradients + inputs_embeds, worst max-err / max|g| {worst_rel:.3e}"
    );
    // The backward needs no targets beyond the causal ones the loss used.
    assert_eq!(causal_targets(&ids, batch, seq).unwrap().len(), batch * seq);
}

#[test]
fn untied_bf16_plain_rope_matches_transformers() {
    check_against_transformers("tiny_llama", "tiny_llama_golden.safetensors");
}

#[test]
fn tied_sharded_llama3_rope_matches_transformers() {
    let dir = LlamaDir::open(&data("tiny_llama_llama3")).unwrap();
    assert!(dir.config.tie_word_embeddings && dir.weights.lm_head.is_none());
    assert!(matches!(
        dir.config.rope_scaling,
        qadapt::ops::rope::RopeScaling::Llama3 { .. }
    ));
    check_against_transformers("tiny_llama_llama3", "tiny_llama_llama3_golden.safetensors");

    // The fixture exercises the scaling: without it the logits move far outside the tolerance.
    let mut config = dir.config.clone();
    config.rope_scaling = qadapt::ops::rope::RopeScaling::None;
    let plain = qadapt_train::Llama::new(config, dir.weights.clone()).unwrap();
    let g = Golden::open("tiny_llama_llama3_golden.safetensors");
    let (batch, seq, ids) = g.ids();
    let f = plain
        .forward(Input::ids(&ids, batch, seq), Options::default())
        .unwrap();
    let (err, scale) = worst(&f.logits, &g.get("logits").1);
    assert!(err > 1e-2 * scale, "unscaled rope gives {err}");
}
