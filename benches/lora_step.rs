//! Wall-clock time of one LoRA training step: forward, loss, backward (frozen base) and AdamW, on
//! one fixed batch. On the CPU through [`qadapt_train::Trainer`], as `benches/lora_step_torch.py`
//! times the same step with PyTorch + PEFT; with `--device cuda` through the mixed-precision
//! [`qadapt_train::backend::LoraModel`] (bf16 compute, f32 masters; the GPU bundle runs both on one
//! machine). Prints one JSON object on stdout.
//!
//! ```text
//! cargo bench --bench lora_step                       # random model of the default shape
//! cargo bench --bench lora_step -- --model DIR --ids IDS.txt --adapter PEFT_DIR --steps 20
//! ```
//! Options (each also read from `QADAPT_BENCH_<NAME>`, e.g. `QADAPT_BENCH_STEPS=20`; the
//! argument wins):
//! - `--model DIR`: an HF Llama directory (f32/bf16/f16 safetensors, sharded or not, or
//!   bitsandbytes 4-bit; on CUDA streamed to the device tensor by tensor,
//!   `LoraModel::from_checkpoint`). Without it, a random model of
//!   the default shape (hidden 192, MLP 512, 4 layers, 6 heads over 2 kv heads of 32, vocab 512,
//!   untied) is built here.
//! - `--ids FILE`: `batch * seq` whitespace-separated token ids, row-major `[batch, seq]`;
//!   without it, ids are drawn from a fixed seed.
//! - `--batch B --seq T` (16 x 64), `--rank R` (8), `--alpha A` (16), `--targets q_proj,...` (all
//!   seven projections), `--lr` (1e-3; betas 0.9/0.999, eps 1e-8, weight decay 0.01, no clipping).
//! - `--adapter DIR`: start from a PEFT LoRA directory (the hyper-parameters are read from it) so
//!   the losses of every step can be compared with PEFT's; otherwise qadapt's own PEFT-like init.
//! - `--warmup W` (1) untimed steps, then `--steps N` (3) timed ones.
//! - `QADAPT_BENCH_SMOKE=1` replaces all of the above by a one-layer model of hidden 64 and one
//!   step (the virtual device's smoke run; its times mean nothing); `--random-shape` then keeps
//!   its path (made on the device) at that shape, and `--batch auto` stops at 2.
//! - `--device cpu|cuda[:N]` (cpu); `--base dense|nf4` (dense): the frozen projections as they
//!   are or NF4 (block 64, double quant; QLoRA, with paged AdamW moments on CUDA).
//! - The random model's shape: `--hidden`, `--intermediate`, `--layers`, `--heads`,
//!   `--kv-heads`, `--head-dim`, `--vocab` (defaults above; the context is at least `--seq`).
//! - `--random-shape NAME` (CUDA): a published shape (`llama3-8b`, `llama3-70b`, ...,
//!   `LlamaConfig::NAMED`) with random weights made tensor by tensor and put on the device as
//!   they come (`LoraModel::random`; with `--base nf4` each projection is quantized on the
//!   device), so an 8B or 70B model never exists on the host.
//! - `--batch auto` (CUDA): the largest batch whose planned peak (`qadapt_train::memory_plan`)
//!   fits 90 % of the free device memory, at most `--max-batch` (the JSON's `largest_batch` is
//!   the plan's answer before that cap); `--checkpointing none|layers`.
//! - On CUDA the JSON also has `planned_peak_bytes` (the plan of the step) and `peak_bytes`
//!   (`CudaDevice::memory_peak` over the timed steps: the resident model plus the steps'
//!   buffers; managed memory and cuBLAS' workspace not counted on a GPU).
//!
//! Labels are the ids (every next token a target), as `labels=input_ids` in transformers. Threads:
//! rayon's pool (`RAYON_NUM_THREADS`) and matrixmultiply's (`MATMUL_NUM_THREADS`, at most 4) are
//! both sized by the caller; the JSON echoes both variables.

use std::path::PathBuf;
use std::time::Instant;

use qadapt::ops::rope::RopeScaling;
use qadapt::optim::AdamW;
use qadapt_suite::randn;
use qadapt_train::backend::{BaseFormat, Checkpointing, LoraModel, MomentPlacement};
use qadapt_train::cuda::CudaBackend;
use qadapt_train::memory_plan::{self, PlanMethod, PlanOptions};
use qadapt_train::nf4::{Nf4Projections, quantize_projections};
use qadapt_train::weights::Checkpoint;
use qadapt_train::{
    Adapter, Llama, LlamaConfig, LlamaWeights, LoraAdapter, LoraConfig, LoraInit, Proj, Trainable,
    Trainer, peft,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

const ALL_TARGETS: &str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj";

/// The command line, `QADAPT_BENCH_*` as fallback.
struct Opts {
    args: Vec<(String, String)>,
}

impl Opts {
    fn parse() -> Opts {
        let mut args = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            // `cargo bench` passes `--bench` to every harness-less target.
            if a == "--bench" {
                continue;
            }
            let Some(name) = a.strip_prefix("--") else {
                panic!("unexpected argument {a:?} (options are --name value)");
            };
            let v = it
                .next()
                .unwrap_or_else(|| panic!("--{name} needs a value"));
            args.push((name.to_owned(), v));
        }
        if qadapt_suite::bench_smoke() {
            // QADAPT_BENCH_SMOKE=1 (the virtual device): a tiny model and one step, whatever
            // was asked, so the CUDA path runs end to end in seconds; the times mean nothing.
            for (k, v) in [
                ("hidden", "64"),
                ("intermediate", "96"),
                ("layers", "1"),
                ("heads", "2"),
                ("kv-heads", "1"),
                ("head-dim", "32"),
                ("vocab", "128"),
                ("batch", "2"),
                ("seq", "24"),
                ("rank", "4"),
                ("max-batch", "2"),
                ("warmup", "0"),
                ("steps", "1"),
            ] {
                args.push((k.to_owned(), v.to_owned()));
            }
        }
        Opts { args }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                std::env::var(format!("QADAPT_BENCH_{}", name.to_uppercase()))
                    .ok()
                    .filter(|v| !v.is_empty())
            })
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.get(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("--{name}: not a number: {v:?}"))
        })
    }
}

/// The default shape (what the Python side builds with transformers), each size overridable.
fn config(o: &Opts, seq: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: o.num("hidden", 192),
        intermediate_size: o.num("intermediate", 512),
        num_hidden_layers: o.num("layers", 4),
        num_attention_heads: o.num("heads", 6),
        num_key_value_heads: o.num("kv-heads", 2),
        head_dim: o.num("head-dim", 32),
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        vocab_size: o.num("vocab", 512),
        tie_word_embeddings: false,
        max_position_embeddings: seq.max(128),
    }
}

/// Norm weights 1, every other parameter N(0, 0.02²) (transformers' init), from fixed seeds.
fn random_model(cfg: LlamaConfig) -> Llama<f32> {
    let mut w = LlamaWeights::<f32>::zeros(&cfg);
    let names: Vec<String> = qadapt_train::weights::layout(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (i, (name, slot)) in names.iter().zip(w.slots_mut()).enumerate() {
        if name.ends_with("norm.weight") {
            slot.fill(1.0);
        } else {
            *slot = randn(slot.len(), 0.02, 100 + i as u64);
        }
    }
    Llama::new(cfg, w).expect("the layout fits the config")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// `--batch`: a number, or `auto` (CUDA: the largest batch whose planned peak fits 90 % of the
/// device's free memory, the rest left to the allocator's rounding, cuBLAS and the context).
/// Returns the batch, its planned peak and, with `auto`, the largest batch the plan fits before
/// `--max-batch` caps it.
fn resolve_batch(
    o: &Opts,
    cfg: &LlamaConfig,
    plan: Option<(&qadapt::CudaDevice, PlanOptions)>,
) -> (usize, Option<u64>, Option<usize>) {
    let arg = o.get("batch").unwrap_or_else(|| "16".to_owned());
    let planned = |p: &PlanOptions| memory_plan::plan(cfg, p).expect("memory plan").peak();
    match (arg.as_str(), plan) {
        ("auto", Some((dev, p))) => {
            let (free, _) = dev.memory_info().expect("device memory");
            let budget = free as u64 / 10 * 9;
            let largest = memory_plan::largest_batch(cfg, &p, budget)
                .expect("memory plan")
                .unwrap_or_else(|| panic!("not one sequence fits {budget} bytes"));
            let b = largest.min(o.num("max-batch", usize::MAX));
            let p = PlanOptions { batch: b, ..p };
            (b, Some(planned(&p)), Some(largest))
        }
        ("auto", None) => panic!("--batch auto needs --device cuda"),
        (n, plan) => {
            let b: usize = n
                .parse()
                .unwrap_or_else(|_| panic!("--batch: a number or auto, not {n:?}"));
            (
                b,
                plan.map(|(_, p)| planned(&PlanOptions { batch: b, ..p })),
                None,
            )
        }
    }
}

fn main() {
    let o = Opts::parse();
    let seq = o.num("seq", 64usize);
    let (warmup, steps) = (o.num("warmup", 1usize), o.num("steps", 3usize));
    let lr = o.num("lr", 1e-3f32);
    assert!(steps > 0, "--steps must be positive");
    let device = o.get("device").unwrap_or_else(|| "cpu".to_owned());
    let device = qadapt::Device::parse(&device).expect("--device");
    let shape = o.get("random-shape");
    let checkpointing: Checkpointing = o
        .get("checkpointing")
        .map_or(Ok(Checkpointing::None), |c| c.parse())
        .unwrap_or_else(|e| panic!("--checkpointing: {e}"));
    let nf4 = match o.get("base").as_deref() {
        None | Some("dense") => false,
        Some("nf4") => true,
        Some(b) => panic!("--base {b}: dense or nf4"),
    };

    let t0 = Instant::now();
    // With --random-shape the model is made on the device tensor by tensor (LoraModel::random):
    // it never exists on the host.
    let (mut model, cfg, source) = match (o.get("model"), &shape) {
        // On CUDA the checkpoint streams to the device (LoraModel::from_checkpoint).
        (Some(dir), _) if !matches!(device, qadapt::Device::Cpu) => {
            let ck = Checkpoint::open(&PathBuf::from(&dir)).expect("model directory");
            (None, ck.config, dir)
        }
        (Some(dir), _) => {
            let d = qadapt_train::LlamaDir::open(&PathBuf::from(&dir)).expect("model directory");
            let m = d.model().expect("model");
            let cfg = m.config.clone();
            (Some(m), cfg, dir)
        }
        (None, Some(name)) => {
            assert!(
                !matches!(device, qadapt::Device::Cpu),
                "--random-shape builds the model on the device: it needs --device cuda"
            );
            let mut cfg = LlamaConfig::named(name).unwrap_or_else(|| {
                panic!(
                    "--random-shape {name}: one of {}",
                    LlamaConfig::NAMED.join(", ")
                )
            });
            cfg.max_position_embeddings = cfg.max_position_embeddings.max(seq);
            if qadapt_suite::bench_smoke() {
                // The same path (made on the device, batch auto, checkpointing) at the smoke shape.
                (
                    None,
                    config(&o, seq),
                    format!("random {name} (smoke shape)"),
                )
            } else {
                (None, cfg, format!("random {name}"))
            }
        }
        (None, None) => {
            let m = random_model(config(&o, seq));
            let cfg = m.config.clone();
            (Some(m), cfg, "random".to_owned())
        }
    };
    let mut adapter = Adapter::Lora(match o.get("adapter") {
        Some(dir) => match peft::load(&PathBuf::from(&dir), &cfg).expect("adapter directory") {
            Adapter::Lora(l) => l,
            other => panic!("{dir}: a {} adapter, not LoRA", other.peft_type()),
        },
        None => {
            let r = o.num("rank", 8usize);
            let lc = LoraConfig {
                r,
                alpha: o.num("alpha", 16.0f64),
                use_rslora: false,
                dropout: 0.0,
                target_modules: o
                    .get("targets")
                    .unwrap_or_else(|| ALL_TARGETS.to_owned())
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            };
            LoraAdapter::new(&cfg, lc, LoraInit::Peft { seed: 0 }).expect("lora config")
        }
    });
    let Adapter::Lora(lora) = &adapter else {
        unreachable!("built as LoRA above")
    };
    let (rank, targets) = (lora.config.r, lora.config.target_modules.clone());
    let placement = if nf4 {
        MomentPlacement::Paged
    } else {
        MomentPlacement::Device
    };
    let plan = match &device {
        qadapt::Device::Cpu => None,
        qadapt::Device::Cuda(dev) => {
            let method = if nf4 {
                PlanMethod::Qlora
            } else {
                PlanMethod::Lora
            };
            let p = PlanOptions {
                targets: Proj::ALL
                    .into_iter()
                    .filter(|p| lora.pairs[0][p.index()].is_some())
                    .collect(),
                placement,
                checkpointing,
                props: dev.props(),
                ..PlanOptions::new(method, 1, seq, rank)
            };
            Some((dev, p))
        }
    };
    let (batch, planned_peak, largest_batch) = resolve_batch(&o, &cfg, plan);
    let ids: Vec<u32> = match o.get("ids") {
        Some(f) => std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .split_whitespace()
            .map(|t| t.parse().unwrap_or_else(|_| panic!("{f}: bad id {t:?}")))
            .collect(),
        None => {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            (0..batch * seq)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        }
    };
    assert_eq!(ids.len(), batch * seq, "--ids must hold batch * seq ids");
    let codes = match (&mut model, nf4) {
        (Some(m), true) => {
            let none = Nf4Projections::none(cfg.num_hidden_layers);
            Some(quantize_projections(&mut m.weights, &cfg, &none).expect("nf4 base"))
        }
        _ => None,
    };

    let opt = AdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut setup_s = t0.elapsed().as_secs_f64();
    let mut losses = Vec::with_capacity(warmup + steps);
    let mut times_ms = Vec::with_capacity(steps);
    let mut time = |i: usize, step: &mut dyn FnMut() -> f32| {
        let t = Instant::now();
        losses.push(step());
        if i >= warmup {
            times_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    };
    let trainable;
    let mut peak = None;
    let on = match &device {
        qadapt::Device::Cpu => {
            let model = model.as_mut().expect("a model in memory on the CPU");
            let cpu_batch = qadapt_train::Batch::causal(ids.clone(), batch, seq).expect("batch");
            let mut trainer = Trainer::new(opt, None);
            let mut what = Trainable::Adapter(&mut adapter);
            trainable = what.num_params(model).expect("adapter fits the model");
            for i in 0..warmup + steps {
                time(i, &mut || {
                    trainer
                        .step(model, &mut what, &cpu_batch, lr)
                        .expect("train step")
                });
            }
            "cpu".to_owned()
        }
        qadapt::Device::Cuda(dev) => {
            let Adapter::Lora(a) = &adapter else {
                unreachable!("built as LoRA above")
            };
            let be = CudaBackend::new(dev.clone()).expect("cuda backend");
            let mut lm = match (&model, &codes) {
                (Some(m), Some(c)) => LoraModel::new(be, m, BaseFormat::Nf4(c), a, placement),
                (Some(m), None) => LoraModel::new(be, m, BaseFormat::Dense, a, placement),
                (None, _) => {
                    let base = if nf4 {
                        BaseFormat::QuantizeNf4
                    } else {
                        BaseFormat::Dense
                    };
                    match o.get("model") {
                        Some(dir) => {
                            LoraModel::from_checkpoint(be, &PathBuf::from(dir), base, a, placement)
                        }
                        None => LoraModel::random(be, &cfg, 100, base, a, placement),
                    }
                }
            }
            .expect("device model");
            lm.set_checkpointing(checkpointing);
            trainable = lm.num_params();
            dev.synchronize().expect("synchronize");
            setup_s = t0.elapsed().as_secs_f64();
            // From here the high-water mark is the resident model plus the steps' own.
            dev.reset_memory_peak().expect("memory peak");
            let b = qadapt_train::Batch::causal(ids.clone(), batch, seq).expect("batch");
            for i in 0..warmup + steps {
                time(i, &mut || {
                    let loss = lm.step(&b, &opt, None, lr).expect("train step");
                    // The step's AdamW launches are queued: the step ends when they finish.
                    dev.synchronize().expect("synchronize");
                    loss
                });
            }
            peak = dev.memory_peak().expect("memory peak");
            dev.describe()
        }
    };
    let med = median(&times_ms);
    let env = |k: &str| std::env::var(k).ok();
    let out = json!({
        "framework": "qadapt",
        "smoke": qadapt_suite::bench_smoke(),
        "device": on,
        "base": if nf4 { "nf4" } else { "dense" },
        "model": source,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "targets": targets,
        "checkpointing": checkpointing.name(),
        "trainable_params": trainable,
        "warmup": warmup,
        "steps": steps,
        "RAYON_NUM_THREADS": env("RAYON_NUM_THREADS"),
        "MATMUL_NUM_THREADS": env("MATMUL_NUM_THREADS"),
        "setup_s": setup_s,
        "losses": losses,
        "step_ms": times_ms,
        "median_ms": med,
        "min_ms": times_ms.iter().copied().fold(f64::INFINITY, f64::min),
        "tokens_per_s": (batch * seq) as f64 / (med / 1e3),
        "planned_peak_bytes": planned_peak,
        "largest_batch": largest_batch,
        "peak_bytes": peak,
    });
    println!("{out}");
}
