//! Cached decoding against full recomputation, on `tiny_llama` with every adapter method.
//!
//! - Every step's logits (the prefill's and each decoded token's) equal the last-position logits
//!   of a full [`evaluate`] of the same prefix: `max|err| <= 1e-4 max|want|` (f32 on both sides,
//!   different summation orders: the cache attends with dot products, the full forward with
//!   GEMMs). A wrong RoPE position or a missing prefix moves them by orders of magnitude more.
//! - Greedy decoding picks the argmax of the full recomputation at every step.
//! - A mixed batch (LoRA "a", none, LoRA "b" of another rank and other targets, (IA)³, prefix,
//!   prompt tuning, Houlsby; prompts of different lengths) gives every row the same tokens as
//!   the row run alone, and logits within `1e-5` relative.
//! - The nucleus is the smallest most-likely set reaching `top_p`, sampled renormalized; with
//!   `top_p -> 0` it is greedy; a seed fixes the sample.
//! - The f32 LoRA stack agrees with `qadapt::lora`'s bf16 CPU reference on the same stack and
//!   per-row indices (`max|err| <= 2e-2 max|want|`: bf16 inputs, u and y).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::data;
use half::bf16;
use qadapt::bottleneck::Activation;
use qadapt_train::generate::{LoraScratch, argmax};
use qadapt_train::lora::LoraPair;
use qadapt_train::peft::{self, Adapter};
use qadapt_train::{
    Finish, GenerateOptions, Generator, Grads, HoulsbyAdapter, HoulsbyConfig, Llama, LlamaDir,
    LoraAdapter, LoraConfig, LoraInit, LoraStack, Proj, Prompt, Sampling, evaluate,
};

fn model() -> Llama<f32> {
    LlamaDir::open(&data("tiny_llama"))
        .unwrap()
        .model()
        .unwrap()
}

fn load(m: &Llama<f32>, name: &str) -> Adapter<f32> {
    peft::load(&data(name), &m.config).unwrap()
}

/// Uniform in ±scale from the ChaCha8 stream of `seed`.
fn fill(v: &mut [f32], seed: u64, scale: f32) {
    let mut s = ChaCha8Rng::seed_from_u64(seed);
    for x in v {
        *x = s.random_range(-1.0f32..1.0) * scale;
    }
}

/// A second LoRA adapter: rank 2, other targets than the fixture's, random non-zero B.
fn lora_b(m: &Llama<f32>) -> Adapter<f32> {
    let cfg = LoraConfig {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "k_proj".into(), "up_proj".into()],
    };
    let mut a = LoraAdapter::<f32>::new(&m.config, cfg, LoraInit::Peft { seed: 7 }).unwrap();
    for (i, p) in a.pairs.iter_mut().flatten().flatten().enumerate() {
        fill(&mut p.b, 100 + i as u64, 0.3);
    }
    Adapter::Lora(a)
}

fn houlsby(m: &Llama<f32>) -> Adapter<f32> {
    let cfg = HoulsbyConfig {
        bottleneck: 4,
        activation: Activation::default(),
    };
    let mut h = HoulsbyAdapter::<f32>::new(&m.config, cfg, 0.5, 3).unwrap();
    for (i, p) in h.layers.iter_mut().flatten().enumerate() {
        fill(&mut p.up, 200 + i as u64, 0.5);
        fill(&mut p.up_bias, 300 + i as u64, 0.1);
    }
    Adapter::Houlsby(h)
}

/// The last position's logits of a full forward on `ids`.
fn full_last(m: &Llama<f32>, ids: &[u32], a: Option<&Adapter<f32>>) -> Vec<f32> {
    let ev = evaluate(
        m,
        &qadapt_train::Batch::causal(ids.to_vec(), 1, ids.len()).unwrap(),
        a,
        Grads::None,
        None,
    )
    .unwrap();
    let v = m.config.vocab_size;
    ev.logits[(ev.positions - 1) * v..ev.positions * v].to_vec()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let (err, scale) = crate::common::worst(got, want);
    err / scale
}

fn all_methods(m: &Llama<f32>) -> Vec<(&'static str, Adapter<f32>)> {
    vec![
        ("lora", load(m, "tiny_llama_lora")),
        ("ia3", load(m, "tiny_llama_ia3")),
        ("prefix", load(m, "tiny_llama_prefix")),
        ("prompt", load(m, "tiny_llama_prompt")),
        ("houlsby", houlsby(m)),
        ("lora_b", lora_b(m)),
    ]
}

#[test]
fn every_cached_step_matches_full_recompute_and_greedy_is_its_argmax() {
    let m = model();
    let vocab = m.config.vocab_size;
    let mut cases: Vec<(&str, Option<Adapter<f32>>)> = vec![("base", None)];
    cases.extend(all_methods(&m).into_iter().map(|(n, a)| (n, Some(a))));
    for (name, adapter) in &cases {
        let list: Vec<Adapter<f32>> = adapter.iter().cloned().collect();
        let g = Generator::new(&m, &list).unwrap();
        let row = adapter.as_ref().map(|_| 0);
        let mut ids = vec![1u32, 17, 42, 5, 99, 23];
        let steps = 10;
        let mut cache = g.start(&[row], ids.len() + steps).unwrap();
        let mut logits = vec![0.0; vocab];
        g.feed(&mut cache, &[&ids], &mut logits).unwrap();
        let mut worst = 0.0f32;
        for step in 0..=steps {
            let want = full_last(&m, &ids, adapter.as_ref());
            let e = rel_err(&logits, &want);
            worst = worst.max(e);
            assert!(e <= 1e-4, "{name}, step {step}: relative error {e}");
            let t = argmax(&logits);
            assert_eq!(t, argmax(&want), "{name}, step {step}: greedy differs");
            if step == steps {
                break;
            }
            ids.push(t);
            g.feed(&mut cache, &[&[t]], &mut logits).unwrap();
        }
        println!("{name}: worst relative logit error {worst:.2e}");
        // generate() gives the same greedy tokens.
        let out = g
            .generate(
                &[Prompt {
                    ids: ids[..6].to_vec(),
                    adapter: row,
                }],
                &GenerateOptions {
                    max_new_tokens: steps,
                    sampling: Sampling::Greedy,
                    eos: vec![],
                    seed: 0,
                },
            )
            .unwrap();
        assert_eq!(out[0].tokens, ids[6..], "{name}");
        assert_eq!(out[0].finish, Finish::Length);
    }
}

#[test]
fn a_mixed_batch_gives_each_row_what_it_gets_alone() {
    let m = model();
    let vocab = m.config.vocab_size;
    let methods = all_methods(&m);
    // Adapter "a" is the fixture LoRA (index 0), "b" the rank-2 one (index 5).
    let list: Vec<Adapter<f32>> = methods.into_iter().map(|(_, a)| a).collect();
    let g = Generator::new(&m, &list).unwrap();
    let rows = [Some(0), None, Some(5), Some(1), Some(2), Some(3), Some(4)];
    let prompts: Vec<Prompt> = rows
        .iter()
        .enumerate()
        .map(|(i, &adapter)| Prompt {
            ids: (0..3 + i as u32)
                .map(|j| (7 * j + 11 * i as u32 + 1) % 100)
                .collect(),
            adapter,
        })
        .collect();
    // Prefill logits, batch vs alone.
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap();
    let mut cache = g.start(&rows, longest).unwrap();
    let mut batch_logits = vec![0.0; rows.len() * vocab];
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    g.feed(&mut cache, &ids, &mut batch_logits).unwrap();
    for (b, p) in prompts.iter().enumerate() {
        let mut c1 = g.start(&[p.adapter], p.ids.len()).unwrap();
        let mut solo = vec![0.0; vocab];
        g.feed(&mut c1, &[&p.ids], &mut solo).unwrap();
        let e = rel_err(&batch_logits[b * vocab..(b + 1) * vocab], &solo);
        assert!(e <= 1e-5, "row {b}: {e}");
    }
    // Generated tokens, batch vs alone, greedy and sampled.
    for sampling in [
        Sampling::Greedy,
        Sampling::Nucleus {
            temperature: 0.8,
            top_p: 0.9,
        },
    ] {
        let opts = GenerateOptions {
            max_new_tokens: 8,
            sampling,
            eos: vec![],
            seed: 5,
        };
        let batch = g.generate(&prompts, &opts).unwrap();
        for (b, p) in prompts.iter().enumerate() {
            // Row b of the batch samples from stream seed + b; alone it is row 0.
            let solo_opts = GenerateOptions {
                seed: opts.seed + b as u64,
                ..opts.clone()
            };
            let solo = g.generate(std::slice::from_ref(p), &solo_opts).unwrap();
            assert_eq!(batch[b], solo[0], "row {b}, {sampling:?}");
        }
    }
}

#[test]
fn top_p_near_zero_is_greedy_and_a_seed_fixes_the_sample() {
    let m = model();
    let list = vec![load(&m, "tiny_llama_lora")];
    let g = Generator::new(&m, &list).unwrap();
    let prompts = vec![
        Prompt {
            ids: vec![1, 2, 3],
            adapter: Some(0),
        },
        Prompt {
            ids: vec![9, 8, 7, 6, 5],
            adapter: None,
        },
    ];
    let opts = |sampling, seed| GenerateOptions {
        max_new_tokens: 12,
        sampling,
        eos: vec![],
        seed,
    };
    let greedy = g.generate(&prompts, &opts(Sampling::Greedy, 0)).unwrap();
    let nucleus = Sampling::new(1.5, 1e-7).unwrap();
    assert_eq!(g.generate(&prompts, &opts(nucleus, 1)).unwrap(), greedy);
    assert_eq!(Sampling::new(0.0, 0.5).unwrap(), Sampling::Greedy);
    let hot = Sampling::new(1.5, 1.0).unwrap();
    let a = g.generate(&prompts, &opts(hot, 42)).unwrap();
    assert_eq!(g.generate(&prompts, &opts(hot, 42)).unwrap(), a);
    assert_ne!(g.generate(&prompts, &opts(hot, 43)).unwrap(), a);
    assert_ne!(a, greedy);
    for (t, p) in [(-1.0, 0.5), (f32::NAN, 0.5), (1.0, 0.0), (1.0, 1.5)] {
        assert!(Sampling::new(t, p).is_err(), "{t} {p}");
    }
}

#[test]
fn eos_stops_a_row_and_bad_inputs_are_refused() {
    let m = model();
    let g = Generator::new(&m, &[]).unwrap();
    let p = |ids: Vec<u32>| Prompt { ids, adapter: None };
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: Sampling::Greedy,
        eos: vec![],
        seed: 0,
    };
    let free = g.generate(&[p(vec![4, 5]), p(vec![6])], &opts).unwrap();
    // Stop row 0 at its third token: row 1 is unaffected unless it meets the same id.
    let stop = free[0].tokens[2];
    let out = g
        .generate(
            &[p(vec![4, 5]), p(vec![6])],
            &GenerateOptions {
                eos: vec![stop],
                ..opts.clone()
            },
        )
        .unwrap();
    let first = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(out[0].tokens, free[0].tokens[..=first]);
    assert_eq!(out[0].finish, Finish::Eos);
    if !free[1].tokens.contains(&stop) {
        assert_eq!(out[1], free[1]);
    }
    let err = |r: qadapt::Result<_>| r.map(|_: Vec<_>| ()).unwrap_err().to_string();
    assert!(err(g.generate(&[p(vec![])], &opts)).contains("no tokens"));
    assert!(err(g.generate(&[p(vec![100])], &opts)).contains("outside the vocabulary"));
    let long = GenerateOptions {
        max_new_tokens: 64,
        ..opts.clone()
    };
    assert!(err(g.generate(&[p(vec![1])], &long)).contains("max_position_embeddings"));
    assert!(
        err(g.generate(
            &[Prompt {
                ids: vec![1],
                adapter: Some(0)
            }],
            &opts
        ))
        .contains("adapter 0 of 0")
    );
    // A cache refuses more tokens than it was sized for.
    let mut cache = g.start(&[None], 2).unwrap();
    let mut logits = vec![0.0; m.config.vocab_size];
    let e = g.feed(&mut cache, &[&[1, 2, 3]], &mut logits).unwrap_err();
    assert!(e.to_string().contains("the cache has 2"), "{e}");
    // An adapter for another model is refused.
    let mut other = m.config.clone();
    other.num_hidden_layers = 3;
    let wrong = vec![Adapter::Lora(
        LoraAdapter::<f32>::new(
            &other,
            LoraConfig {
                r: 2,
                alpha: 2.0,
                use_rslora: false,
                dropout: 0.0,
                target_modules: vec!["q_proj".into()],
            },
            LoraInit::Zeros,
        )
        .unwrap(),
    )];
    assert!(Generator::new(&m, &wrong).is_err());
}

#[test]
fn the_f32_lora_stack_matches_qadapts_bf16_multi_adapter_reference() {
    let m = model();
    let (Adapter::Lora(a), Adapter::Lora(b)) = (load(&m, "tiny_llama_lora"), lora_b(&m)) else {
        unreachable!()
    };
    // q_proj of layer 1: both adapters target it, with ranks 4 and 2.
    let (l, p) = (1, Proj::Q);
    let st = LoraStack::new(&m.config, &[&a, &b], l, p).unwrap();
    assert_eq!((st.rank, st.targeted.as_slice()), (4, &[true, true][..]));
    let (inp, out) = (st.inp, st.out);
    let idx = [0, -1, 1, 1, 0];
    let rows = idx.len();
    let mut x = vec![0.0f32; rows * inp];
    fill(&mut x, 9, 1.0);
    let x: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    let w: Vec<f32> = m.weights.layers[l]
        .proj(p)
        .iter()
        .map(|v| bf16::from_f32(*v).to_f32())
        .collect();
    let mut y = vec![0.0f32; rows * out];
    qadapt::ops::linear::forward(
        qadapt::ops::linear::LinearShape { rows, inp, out },
        &x,
        &w,
        &mut y,
        qadapt::ops::Accumulate::Overwrite,
    )
    .unwrap();
    st.forward(&x, &idx, &mut y, &mut LoraScratch::default())
        .unwrap();
    let bst = st.to_bf16().unwrap();
    let shape = qadapt::lora::LoraShape {
        m: rows,
        n: out,
        k: inp,
        rank: bst.rank,
        n_adapters: bst.len(),
    };
    let xb: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
    let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
    let mut u = vec![bf16::ZERO; rows * shape.r_total()];
    let mut yb = vec![bf16::ZERO; rows * out];
    qadapt::lora::cpu::forward(
        &shape,
        &xb,
        qadapt::lora::WeightRef::Dense(&wb),
        qadapt::lora::LoraRef {
            a: &bst.a,
            b: &bst.b,
            scales: &bst.scales,
        },
        Some(&idx[..]),
        None,
        &mut u,
        &mut yb,
        qadapt::ops::Accumulate::Overwrite,
    )
    .unwrap();
    let yb: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
    let e = rel_err(&y, &yb);
    assert!(e <= 2e-2, "{e}");
    // The LoRA term is not negligible: without it the error is far larger.
    let mut base = vec![0.0f32; rows * out];
    qadapt::ops::linear::forward(
        qadapt::ops::linear::LinearShape { rows, inp, out },
        &x,
        &w,
        &mut base,
        qadapt::ops::Accumulate::Overwrite,
    )
    .unwrap();
    assert!(
        rel_err(&base, &yb) > 10.0 * e,
        "{} vs {e}",
        rel_err(&base, &yb)
    );
    // Pairs are copied, padded: adapter b's second-rank rows of A are zero.
    let pb: &LoraPair<f32> = b.pair(l, p).unwrap();
    assert_eq!(&st.a[4 * inp..4 * inp + 2 * inp], &pb.a[..]);
    assert!(st.a[6 * inp..8 * inp].iter().all(|&v| v == 0.0));
}

#[test]
fn the_nucleus_keeps_the_smallest_set_reaching_top_p() {
    use qadapt_train::Sampler;
    // Probabilities 0.5, 0.3, 0.2 (as logits at temperature 1), listed out of order.
    let logits = [0.3f32.ln(), 0.5f32.ln(), 0.2f32.ln()];
    let count = |top_p: f32| {
        let mut s = Sampler::new(Sampling::new(1.0, top_p).unwrap(), 1, 11);
        let mut n = [0usize; 3];
        for _ in 0..4000 {
            n[s.sample(0, &logits) as usize] += 1;
        }
        n
    };
    // 0.5 alone reaches 0.45: always token 1.
    assert_eq!(count(0.45), [0, 4000, 0]);
    // 0.6 needs tokens 1 and 0, renormalized to 5/8 and 3/8; token 2 never.
    let n = count(0.6);
    assert_eq!(n[2], 0);
    assert!((n[1] as f64 / 4000.0 - 0.625).abs() < 0.03, "{n:?}");
    // 1.0 keeps all three at their probabilities.
    let n = count(1.0);
    for (got, want) in n.iter().zip([0.3, 0.5, 0.2]) {
        assert!((*got as f64 / 4000.0 - want).abs() < 0.03, "{n:?}");
    }
    // Ties keep index order, as greedy: equal logits give token 0 with top_p -> 0.
    let mut s = Sampler::new(Sampling::new(1.0, 1e-6).unwrap(), 1, 0);
    assert_eq!(s.sample(0, &[1.0, 1.0, 0.0]), argmax(&[1.0, 1.0, 0.0]));
}

/// `||got - want|| / ||want||`.
fn norm_rel(got: &[f32], want: &[f32]) -> f64 {
    let d: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum();
    let n: f64 = want.iter().map(|b| f64::from(*b).powi(2)).sum();
    (d / n.max(1e-60)).sqrt()
}

/// The device generator against the CPU one, fed the same tokens: a ragged prefill of three rows
/// (the base, the PEFT fixture's LoRA, a second LoRA of another rank and targets), then three
/// single-token steps, one row left out of the second. Every call's logits are within bf16
/// noise of the f32 generator's (the device runs bf16 weights and activations; the trainer's
/// tests measure 2-3 % by norm on this model), on a bf16 base and on NF4 codes (against the CPU
/// model on their dequantized values); the model streamed from its checkpoint (NF4: quantized on
/// the device) gives the same logits bit for bit. Greedy generation on the device is deterministic and
/// starts from the argmax of its prefill logits; a non-LoRA adapter is refused.
#[test]
#[ignore = "needs a CUDA device"]
fn cuda_generator_follows_the_cpu_generator() {
    use qadapt_train::backend::BaseFormat;
    use qadapt_train::cuda::CudaGenerator;
    use qadapt_train::nf4::{Nf4Projections, quantize_projections};
    let dev = qadapt::CudaDevice::new(0).unwrap();
    let m = model();
    let adapters = vec![load(&m, "tiny_llama_lora"), lora_b(&m)];
    let v = m.config.vocab_size;
    let mut q = m.clone();
    let none = Nf4Projections::none(m.config.num_hidden_layers);
    let codes = quantize_projections(&mut q.weights, &m.config, &none).unwrap();
    for (what, cpu_model, base, streamed) in [
        ("bf16", &m, BaseFormat::Dense, BaseFormat::Dense),
        ("nf4", &q, BaseFormat::Nf4(&codes), BaseFormat::QuantizeNf4),
    ] {
        let cpu = Generator::new(cpu_model, &adapters).unwrap();
        let gpu = CudaGenerator::new(dev.clone(), &m, base, &adapters).unwrap();
        // Streamed from the checkpoint (quantized on the device for NF4): the same model.
        let dir = data("tiny_llama");
        let gs = CudaGenerator::from_checkpoint(dev.clone(), &dir, streamed, &adapters).unwrap();
        let mut sc = gs.start(&[None, Some(0), Some(1)], 16).unwrap();
        let rows = [None, Some(0), Some(1)];
        let mut cc = cpu.start(&rows, 16).unwrap();
        let mut gc = gpu.start(&rows, 16).unwrap();
        let calls: [[&[u32]; 3]; 4] = [
            [&[1, 5, 9, 2, 7], &[3, 3, 8], &[4, 1, 6, 6, 2, 9, 11]],
            [&[12], &[13], &[14]],
            [&[15], &[], &[16]],
            [&[17], &[18], &[19]],
        ];
        for (i, call) in calls.iter().enumerate() {
            let (mut lc, mut lg) = (vec![0f32; 3 * v], vec![0f32; 3 * v]);
            cpu.feed(&mut cc, call, &mut lc).unwrap();
            gpu.feed(&mut gc, call, &mut lg).unwrap();
            let mut ls = vec![0f32; 3 * v];
            gs.feed(&mut sc, call, &mut ls).unwrap();
            for b in (0..3).filter(|&b| !call[b].is_empty()) {
                assert_eq!(
                    ls[b * v..][..v],
                    lg[b * v..][..v],
                    "{what}, call {i}, row {b}: streamed"
                );
            }
            for b in 0..3 {
                if call[b].is_empty() {
                    continue;
                }
                let (g, c) = (&lg[b * v..][..v], &lc[b * v..][..v]);
                let e = norm_rel(g, c);
                println!("{what}, call {i}, row {b}: logits {e:.2e}");
                assert!(e < 6e-2, "{what}, call {i}, row {b}: {e}");
            }
            for b in 0..3 {
                assert_eq!(gc.filled(b), cc.filled(b), "{what}: row {b}'s length");
            }
        }
        let prompts: Vec<Prompt> = rows
            .iter()
            .zip([vec![1u32, 5, 9], vec![3, 3, 8, 2], vec![4]])
            .map(|(&adapter, ids)| Prompt { ids, adapter })
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: 5,
            sampling: Sampling::Greedy,
            eos: vec![],
            seed: 0,
        };
        let a = gpu.generate(&prompts, &opts).unwrap();
        assert_eq!(
            a,
            gpu.generate(&prompts, &opts).unwrap(),
            "{what}: not deterministic"
        );
        let mut c0 = gpu.start(&rows, 8).unwrap();
        let mut l0 = vec![0f32; 3 * v];
        let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
        gpu.feed(&mut c0, &ids, &mut l0).unwrap();
        for (b, c) in a.iter().enumerate() {
            assert_eq!(c.tokens.len(), 5);
            assert_eq!(c.tokens[0], argmax(&l0[b * v..][..v]), "{what}, row {b}");
        }
    }
    let err = CudaGenerator::new(dev, &m, BaseFormat::Dense, &[houlsby(&m)]).unwrap_err();
    assert!(err.to_string().contains("LoRA adapters"), "{err}");
}
