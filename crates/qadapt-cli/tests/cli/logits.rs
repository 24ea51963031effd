//! `qadapt logits` end to end against the committed golden files: transformers' logits and loss
//! for `tiny_llama`, PEFT's logits, loss and adapter gradients for the LoRA, (IA)³, prompt- and
//! prefix-tuning adapters on it; `--nf4` against bitsandbytes-layout checkpoints written by
//! `qadapt quantize` and by transformers itself (the same dequantized weights, so the same bits);
//! and the error paths.
//!
//! Tolerances as in the training crate's golden tests (f32 on both sides, different summation
//! orders): logits `max|err| <= 3e-5 max|want|`, loss relative `1e-5`, gradients
//! `max|err| <= 5e-5 max|want|`.

use crate::support::{data, qadapt, s};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

fn f32s(st: &SafeTensors<'_>, k: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(k).unwrap_or_else(|_| panic!("missing {k}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
    (
        t.shape().to_vec(),
        bytemuck::pod_collect_to_vec::<u8, f32>(t.data()),
    )
}

fn worst(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    (err, want.iter().map(|v| v.abs()).fold(0.0, f32::max))
}

/// Writes the golden file's `input_ids` alone into `dir/tokens.safetensors`.
fn tokens_of(golden: &SafeTensors<'_>, dir: &Path) -> PathBuf {
    let path = dir.join("tokens.safetensors");
    let ids = golden.tensor("input_ids").unwrap();
    let views: Vec<(&str, TensorView<'_>)> = vec![("input_ids", ids)];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

/// Runs `qadapt logits` on the golden's ids and compares everything the golden holds.
fn check(model: &str, adapter: Option<&str>, golden: &str, grads: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let gbytes = std::fs::read(data(golden)).unwrap();
    let g = SafeTensors::deserialize(&gbytes).unwrap();
    let tokens = tokens_of(&g, tmp.path());
    let out = tmp.path().join("out.safetensors");
    let model_dir = data(model);
    let adapter_dir = adapter.map(data);
    let mut args = vec![
        "logits",
        "--model",
        s(&model_dir),
        "--tokens",
        s(&tokens),
        "--out",
        s(&out),
    ];
    if let Some(a) = &adapter_dir {
        args.extend(["--adapter", s(a)]);
    }
    if grads {
        args.push("--grads");
    }
    let r = qadapt(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let obytes = std::fs::read(&out).unwrap();
    let o = SafeTensors::deserialize(&obytes).unwrap();
    let (shape, got) = f32s(&o, "logits");
    let (wshape, want) = f32s(&g, "logits");
    assert_eq!(shape, wshape);
    let (err, scale) = worst(&got, &want);
    println!("{golden}: logits max err {err:.3e} (max {scale:.3})");
    assert!(err <= 3e-5 * scale);
    let (lshape, loss) = f32s(&o, "loss");
    assert_eq!(lshape, [1]);
    let want_loss = f32s(&g, "loss").1[0];
    assert!(((loss[0] - want_loss) / want_loss).abs() <= 1e-5);
    let grad_keys: Vec<&str> = g
        .names()
        .into_iter()
        .filter(|k| k.starts_with("grad.") && adapter.is_some())
        .collect();
    let out_grads = o.names().iter().filter(|k| k.starts_with("grad.")).count();
    if grads {
        assert_eq!(out_grads, grad_keys.len());
        for k in grad_keys {
            let (gs, got) = f32s(&o, k);
            let (ws, want) = f32s(&g, k);
            assert_eq!(gs, ws, "{k}");
            let (err, scale) = worst(&got, &want);
            assert!(err <= 5e-5 * scale, "{k}: {err} vs {scale}");
        }
    } else {
        assert_eq!(out_grads, 0);
    }
}

#[test]
fn base_model_matches_transformers() {
    check("tiny_llama", None, "tiny_llama_golden.safetensors", false);
    check(
        "tiny_llama_llama3",
        None,
        "tiny_llama_llama3_golden.safetensors",
        false,
    );
}

#[test]
fn adapters_match_peft_with_gradients() {
    for m in ["lora", "ia3", "prompt", "prefix"] {
        check(
            "tiny_llama",
            Some(&format!("tiny_llama_{m}")),
            &format!("tiny_llama_{m}_golden.safetensors"),
            true,
        );
    }
    check(
        "tiny_llama",
        Some("tiny_llama_lora"),
        "tiny_llama_lora_golden.safetensors",
        false,
    );
    // A prefix trained through PEFT's MLP reparameterization: the file holds the projection.
    check(
        "tiny_llama",
        Some("tiny_llama_prefix_mlp"),
        "tiny_llama_prefix_mlp_golden.safetensors",
        false,
    );
}

#[test]
fn nf4_flag_equals_a_bitsandbytes_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let gbytes = std::fs::read(data("tiny_llama_lora_golden.safetensors")).unwrap();
    let g = SafeTensors::deserialize(&gbytes).unwrap();
    let tokens = tokens_of(&g, tmp.path());
    // The bitsandbytes layout of the base (every linear weight, double quant, block 64).
    let q_dir = tmp.path().join("tiny_llama_nf4");
    let r = qadapt(&[
        "quantize",
        s(&data("tiny_llama")),
        s(&q_dir),
        "--double-quant",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let run = |model: &Path, nf4: bool, name: &str| {
        let out = tmp.path().join(name);
        let adapter = data("tiny_llama_lora");
        let mut args = vec![
            "logits",
            "--model",
            s(model),
            "--adapter",
            s(&adapter),
            "--tokens",
            s(&tokens),
            "--out",
            s(&out),
            "--grads",
        ];
        if nf4 {
            args.push("--nf4");
        }
        let r = qadapt(&args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        std::fs::read(out).unwrap()
    };
    let flag = run(&data("tiny_llama"), true, "flag.safetensors");
    let ckpt = run(&q_dir, false, "ckpt.safetensors");
    // The same model quantized by transformers + bitsandbytes themselves (load_in_4bit, nf4,
    // double quant; tests/data/make_transformers_nf4.py).
    let theirs = run(&data("tiny_llama_nf4"), false, "theirs.safetensors");
    let a = SafeTensors::deserialize(&flag).unwrap();
    for (other, what) in [(&ckpt, "qadapt quantize"), (&theirs, "transformers")] {
        let b = SafeTensors::deserialize(other).unwrap();
        let mut names = a.names();
        names.sort();
        assert!(names.len() > 2);
        for k in names {
            assert_eq!(
                f32s(&a, k),
                f32s(&b, k),
                "{k}: --nf4 and the 4-bit checkpoint of {what} differ"
            );
        }
    }
    // NF4 moves the logits (this tiny random model has large weights and activations, so the
    // 4-bit error is amplified; the weight-level error is bounded in qadapt-train's nf4 tests).
    let (err, scale) = worst(&f32s(&a, "logits").1, &f32s(&g, "logits").1);
    println!("nf4: logits max err vs the f32 base {err:.3e} (max {scale:.3})");
    assert!(err > 1e-4 * scale, "{err} vs {scale}");
}

#[test]
fn errors_are_one_line_and_leave_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let bad = tmp.path().join("bad.safetensors");
    let v = [1.0f32, 2.0];
    let view = TensorView::new(
        safetensors::Dtype::F32,
        vec![1, 2],
        bytemuck::cast_slice(&v),
    )
    .unwrap();
    safetensors::serialize_to_file(vec![("ids", view)], None, &bad).unwrap();
    let model = data("tiny_llama");
    let golden = data("tiny_llama_golden.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--tokens", s(&bad)], "no tensor \"input_ids\""),
        (
            vec!["--tokens", s(&golden), "--grads"],
            "--grads needs --adapter",
        ),
        (
            vec!["--tokens", s(&golden), "--adapter", s(&model)],
            "adapter_config.json",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["logits", "--model", s(&model), "--out", s(&out)];
        args.extend(extra);
        let r = qadapt(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{err}");
        assert!(!out.exists());
    }
    let r = qadapt(&["logits", "--help"]);
    assert!(r.status.success());
    assert!(String::from_utf8_lossy(&r.stdout).contains("--nf4"));
}

#[test]
fn identity_houlsby_adapter_gives_the_base_logits() {
    // A Houlsby adapter in its documented format with the up projections zero is the identity:
    // the logits and loss are transformers' for the base model; --grads writes all 16 tensors.
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("houlsby");
    std::fs::create_dir(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type": "HOULSBY", "task_type": "CAUSAL_LM", "bottleneck_size": 4, "non_linearity": "gelu_new"}"#,
    )
    .unwrap();
    let (c, b) = (32usize, 4usize);
    let down: Vec<f32> = (0..b * c)
        .map(|i| ((i as f32) * 0.37).sin() * 0.1)
        .collect();
    let zeros_up = vec![0f32; c * b];
    let (zb, zc) = (vec![0.1f32; b], vec![0f32; c]);
    let mut owned: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for l in 0..2 {
        for site in ["self_attn", "mlp"] {
            let k = |t: &str| format!("base_model.model.model.layers.{l}.{site}.adapter.{t}");
            owned.push((k("down.weight"), vec![b, c], &down));
            owned.push((k("down.bias"), vec![b], &zb));
            owned.push((k("up.weight"), vec![c, b], &zeros_up));
            owned.push((k("up.bias"), vec![c], &zc));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(k, sh, v)| {
            (
                k.clone(),
                TensorView::new(safetensors::Dtype::F32, sh.clone(), bytemuck::cast_slice(v))
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &ad.join("adapter_model.safetensors")).unwrap();
    let gbytes = std::fs::read(data("tiny_llama_golden.safetensors")).unwrap();
    let g = SafeTensors::deserialize(&gbytes).unwrap();
    let tokens = tokens_of(&g, tmp.path());
    let out = tmp.path().join("out.safetensors");
    let model = data("tiny_llama");
    let r = qadapt(&[
        "logits",
        "--model",
        s(&model),
        "--adapter",
        s(&ad),
        "--tokens",
        s(&tokens),
        "--out",
        s(&out),
        "--grads",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let obytes = std::fs::read(&out).unwrap();
    let o = SafeTensors::deserialize(&obytes).unwrap();
    let (err, scale) = worst(&f32s(&o, "logits").1, &f32s(&g, "logits").1);
    assert!(err <= 1e-5 * scale, "{err} vs {scale}");
    let want_loss = f32s(&g, "loss").1[0];
    assert!(((f32s(&o, "loss").1[0] - want_loss) / want_loss).abs() <= 1e-5);
    let grads: Vec<&str> = o
        .names()
        .into_iter()
        .filter(|k| k.starts_with("grad."))
        .collect();
    assert_eq!(grads.len(), 16);
    // The up projections get a gradient at the identity; the down projections do not (yet).
    let up = f32s(
        &o,
        "grad.base_model.model.model.layers.1.mlp.adapter.up.weight",
    )
    .1;
    assert!(up.iter().any(|v| *v != 0.0));
    let dn = f32s(
        &o,
        "grad.base_model.model.model.layers.1.mlp.adapter.down.weight",
    )
    .1;
    assert!(dn.iter().all(|v| *v == 0.0));
}
