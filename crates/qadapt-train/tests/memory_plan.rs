//! The memory planner ([`qadapt_train::memory_plan`]) against what the virtual device
//! (`crates/qadapt-vgpu`) records: training steps of the CUDA path at a few shapes, the peak of
//! the device bytes allocated by the test's thread compared with the plan (ignored without a
//! device; on a real GPU, where nothing records the peak, the test says so and fails), and what
//! stays allocated once the model is dropped (the device's LoRA scratch) with the plan's.
//!
//! Each case opens its own [`qadapt::CudaDevice`] (the LoRA kernels' scratch belongs to a
//! device, and one grown by an earlier case would not be allocated again) and reads the peak of
//! its own thread's allocations, since the suite's other GPU tests run in parallel threads on the
//! same device. Two steps run: the first allocates the AdamW moments, the second is the steady
//! state the plan describes.

use crate::common;

use crate::common::data;
use qadapt::cuda::MemoryScope;
use qadapt::ops::rope::RopeScaling;
use qadapt::optim::AdamW;
use qadapt_train::backend::{BaseFormat, Checkpointing, LoraModel};
use qadapt_train::cuda::CudaBackend;
use qadapt_train::dataset::Sequence;
use qadapt_train::fit::pack_rows;
use qadapt_train::memory_plan::{Phase, PlanMethod, PlanOptions, plan};
use qadapt_train::nf4::{Nf4Projections, quantize_projections};
use qadapt_train::{Batch, Llama, LlamaConfig, LlamaDir, LoraAdapter, LoraConfig, LoraInit, Proj};

/// A wider random model than `common::tiny_config`: MLP width 176 (not a multiple of 32, so the
/// QLoRA down projection takes the dequantize-to-bf16 path), `layers` layers, vocabulary `vocab`,
/// the head tied or not.
fn wider(layers: usize, vocab: usize, tied: bool) -> Llama<f32> {
    let cfg = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: layers,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        vocab_size: vocab,
        tie_word_embeddings: tied,
        max_position_embeddings: 64,
    };
    common::random_model(cfg, &mut common::stream(41)).cast()
}

struct Case {
    what: &'static str,
    model: Llama<f32>,
    method: PlanMethod,
    rank: usize,
    targets: Vec<Proj>,
    dropout: f64,
    batch: usize,
    seq: usize,
    /// Where the plan puts the peak (so that the cases cover more than one phase).
    peak_at: Phase,
    checkpointing: Checkpointing,
    /// Rows per chunk of the fused head and loss (`None`: the default).
    loss_chunk_rows: Option<usize>,
    /// Each row holds two sequences (packing: segments and a RoPE row per token).
    packed: bool,
}

/// Two steps of `case` on a fresh device; returns (predicted, measured) peak bytes.
fn run(case: &Case) -> (u64, u64) {
    let m = &case.model;
    let dev = qadapt::CudaDevice::new(0).unwrap_or_else(|e| panic!("needs a CUDA device: {e}"));
    assert!(
        dev.reset_emulator_memory_peak(),
        "not the virtual device: nothing records the peak (run with `just test-vgpu`)"
    );
    let before = dev.emulator_memory(MemoryScope::Thread).unwrap();
    let names = case
        .targets
        .iter()
        .map(|p| p.name().rsplit('.').next().unwrap_or_default().to_string())
        .collect();
    let lc = LoraConfig {
        r: case.rank,
        alpha: 2.0 * case.rank as f64,
        use_rslora: false,
        dropout: case.dropout,
        target_modules: names,
    };
    let a = LoraAdapter::new(&m.config, lc, LoraInit::Peft { seed: 3 }).unwrap();
    let mut base = m.clone();
    let codes = match case.method {
        PlanMethod::Lora => None,
        PlanMethod::Qlora => {
            let none = Nf4Projections::none(m.config.num_hidden_layers);
            Some(quantize_projections(&mut base.weights, &m.config, &none).unwrap())
        }
    };
    let format = codes.as_ref().map_or(BaseFormat::Dense, BaseFormat::Nf4);
    let o = PlanOptions {
        targets: case.targets.clone(),
        dropout: case.dropout > 0.0,
        props: dev.props(),
        checkpointing: case.checkpointing,
        loss_chunk_rows: case.loss_chunk_rows,
        packed: case.packed,
        ..PlanOptions::new(case.method, case.batch, case.seq, case.rank)
    };
    let predicted = plan(&m.config, &o).unwrap();
    assert_eq!(predicted.peak_phase.phase, case.peak_at, "{}", case.what);
    {
        let be = CudaBackend::new(dev.clone()).unwrap();
        let mut lm = LoraModel::new(be, m, format, &a, o.placement).unwrap();
        lm.set_dropout_seed(11);
        lm.set_checkpointing(case.checkpointing);
        lm.set_loss_chunk_rows(case.loss_chunk_rows);
        let vocab = m.config.vocab_size as u32;
        let mut s = common::stream(7);
        for _ in 0..2 {
            let ids: Vec<u32> = (0..case.batch * case.seq)
                .map(|_| ((common::uniform(&mut s) + 1.0) * 0.5 * f64::from(vocab)) as u32 % vocab)
                .collect();
            let b = if case.packed {
                // Each row: a sequence of a third of it, then one of the rest.
                let cut = case.seq / 3;
                let seqs: Vec<Sequence> = ids
                    .chunks(case.seq)
                    .flat_map(|row| [&row[..cut], &row[cut..]])
                    .map(|ids| Sequence {
                        ids: ids.to_vec(),
                        mask: (0..ids.len()).map(|i| i > 0).collect(),
                    })
                    .collect();
                let rows: Vec<Vec<&Sequence>> =
                    seqs.chunks(2).map(|p| p.iter().collect()).collect();
                let b = pack_rows(&rows, 0).unwrap();
                assert_eq!((b.batch, b.seq), (case.batch, case.seq));
                b
            } else {
                Batch::causal(ids, case.batch, case.seq).unwrap()
            };
            lm.step(&b, &AdamW::default(), Some(1.0), 1e-3).unwrap();
        }
    }
    let after = dev.emulator_memory(MemoryScope::Thread).unwrap();
    let measured = after.peak - before.live;
    println!(
        "{}: predicted {} bytes (peak at {}), measured {measured} ({:+.2}%); {predicted:?}",
        case.what,
        predicted.peak(),
        predicted.peak_phase.phase.name(),
        100.0 * (predicted.peak() as f64 / measured as f64 - 1.0),
    );
    // With the model dropped, only the device's LoRA scratch stays, grown to the largest call.
    assert_eq!(
        after.live - before.live,
        predicted.lora_scratch,
        "{}: what stays allocated after the model is dropped",
        case.what
    );
    (predicted.peak(), measured)
}

#[test]
#[ignore = "needs a CUDA device"]
fn the_plan_is_within_5_percent_of_the_virtual_devices_peak() {
    let tiny = || {
        LlamaDir::open(&data("tiny_llama"))
            .unwrap()
            .model()
            .unwrap()
    };
    let cases = [
        Case {
            what: "tiny_llama, QLoRA on all projections, paged moments, 2 x 32",
            model: tiny(),
            method: PlanMethod::Qlora,
            rank: 4,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 2,
            seq: 32,
            peak_at: Phase::Backward,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "tiny_llama, LoRA on q and v (the rest through cuBLAS), 4 x 64",
            model: tiny(),
            method: PlanMethod::Lora,
            rank: 8,
            targets: vec![Proj::Q, Proj::V],
            dropout: 0.0,
            batch: 4,
            seq: 64,
            peak_at: Phase::Backward,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "tiny_llama, QLoRA on o and down with LoRA dropout, 3 x 16",
            model: tiny(),
            method: PlanMethod::Qlora,
            rank: 4,
            targets: vec![Proj::O, Proj::Down],
            dropout: 0.1,
            batch: 3,
            seq: 16,
            peak_at: Phase::Backward,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "wider tied model, QLoRA on all projections, 2 x 48",
            model: wider(3, 256, true),
            method: PlanMethod::Qlora,
            rank: 8,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 2,
            seq: 48,
            peak_at: Phase::Backward,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "wider model, vocabulary 4096, LoRA on all projections, 2 x 32",
            model: wider(2, 4096, false),
            method: PlanMethod::Lora,
            rank: 8,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 2,
            seq: 32,
            peak_at: Phase::CrossEntropy,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "wider tied model, QLoRA on all projections, 2 x 48, layer checkpointing",
            model: wider(3, 256, true),
            method: PlanMethod::Qlora,
            rank: 8,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 2,
            seq: 48,
            peak_at: Phase::RecomputeMlpOut,
            checkpointing: Checkpointing::Layers,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "tiny_llama, QLoRA on o and down with LoRA dropout, 3 x 16, layer checkpointing",
            model: tiny(),
            method: PlanMethod::Qlora,
            rank: 4,
            targets: vec![Proj::O, Proj::Down],
            dropout: 0.1,
            batch: 3,
            seq: 16,
            peak_at: Phase::Backward,
            checkpointing: Checkpointing::Layers,
            loss_chunk_rows: None,
            packed: false,
        },
        Case {
            what: "wider model, vocabulary 4096, LoRA on all projections, 2 x 32, loss in chunks of 10 rows",
            model: wider(2, 4096, false),
            method: PlanMethod::Lora,
            rank: 8,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 2,
            seq: 32,
            peak_at: Phase::CrossEntropy,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: Some(10),
            packed: false,
        },
        Case {
            what: "wider model, QLoRA on all projections, 3 packed rows of 48, two sequences each",
            model: wider(2, 512, false),
            method: PlanMethod::Qlora,
            rank: 8,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
            batch: 3,
            seq: 48,
            peak_at: Phase::CrossEntropy,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            packed: true,
        },
    ];
    for case in &cases {
        let (predicted, measured) = run(case);
        let rel = (predicted as f64 - measured as f64).abs() / measured as f64;
        assert!(
            rel < 0.05,
            "{}: predicted {predicted}, measured {measured}",
            case.what
        );
    }
}
