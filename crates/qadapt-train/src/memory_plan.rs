//! Peak device memory of a CUDA LoRA/QLoRA training step ([`crate::backend::LoraModel`] on
//! [`crate::cuda::CudaBackend`]), predicted from the architecture and the step's shape before
//! anything is allocated.
//!
//! The plan follows what the code allocates, buffer by buffer (bytes: bf16 = 2, f32 = 4, u8 = 1;
//! `n = batch * seq` token rows; `C` hidden, `I` intermediate, `Q = heads * head_dim`,
//! `K = kv_heads * head_dim`, `V` vocabulary, `L` layers, `r` the LoRA rank):
//!
//! **Weights** (frozen, resident): the embedding `V C` bf16, the head `V C` bf16 unless tied,
//! the final norm `C` and two norms per layer `2 C` bf16, and per projection `[out, in]`:
//! - LoRA, not adapted: the bf16 weight `out in` (multiplied by cuBLAS);
//! - LoRA, adapted: the same bf16 weight inside the fused layer;
//! - QLoRA, every projection: NF4 codes `ceil(out in / 2)` bytes, block 64 with double
//!   quantization: one u8 code per block (`nb = ceil(out in / 64)`), one f32 per 256 blocks
//!   (`ceil(nb / 256)`) and the 256-entry f32 code map; a projection without a LoRA pair still
//!   runs through the fused layer with a rank-1 zero placeholder (`in + out` bf16 and one f32
//!   scale);
//! - the bf16 `1` of the residual add (2 bytes).
//!
//! **Adapter** (per adapted projection): the bf16 working copies A `r in` and B `out r` and the f32
//! scale inside the fused layer, the f32 masters `r (in + out)` and their f32 gradient
//! accumulators `r (in + out)`.
//!
//! **Optimizer**: AdamW's f32 moments `m` and `v`, `2 r (in + out)` f32 per adapted projection,
//! allocated by the first step and kept: in device memory (LoRA) or in managed memory that each
//! step prefetches to the device (QLoRA's paged optimizer; counted here, since it is on the device
//! while the step runs).
//!
//! **Saved activations** (what a forward keeps for the backward), per layer: `x`, `xn1`, `q`,
//! `k`, `v`, the attention output, `x_mid`, `xn2`, `gate`, `up`, `h` in bf16, i.e.
//! `n (4 C + 2 Q + 2 K + 3 I)` bf16, plus `rstd1`, `rstd2` (`2 n` f32) and attention's saved
//! log-sum-exp `n heads` f32, and each adapted projection's LoRA intermediate `u = s x A^T`
//! (`n r` bf16, kept so the backward does not form it again); then the final norm's input `n C`
//! bf16 and `rstd` `n` f32, and the
//! RoPE table (cos and sin, `seq head_dim / 2` f32 each; packed rows take a row per token,
//! `n head_dim / 2` each, and their sequence starts, `n` u32).
//!
//! **Logits and loss**: the head and the cross-entropy run fused, `c` rows at a time
//! ([`qadapt::plan::loss_chunk_rows`]: `c = min(n, 2^26 / V)`, or
//! [`PlanOptions::loss_chunk_rows`]), so only one chunk's bf16 logits `c V` and their gradient
//! `c V` exist, with the per-row losses and the i32 targets (`n` each, f32 and i32); the final
//! norm's output `n C` and its gradient `n C` (bf16) are live meanwhile.
//!
//! **Workspace**: the LoRA kernels' scratch (`g`, `n r` bf16; `u`, `n r` bf16 only where a forward
//! keeps nothing, i.e. with checkpointing; and the split partial sums, f32; grown to the largest
//! call and kept: [`qadapt::plan::lora_forward`] and
//! [`qadapt::plan::lora_backward`] give their lengths); the backward's gradient buffers
//! (`dxn`, `dx` of `n C`, `dh`, `dgate`, `dup` of `n I`, `dattn`, `dq` of `n Q`, `dk`, `dv` of
//! `n K`, bf16, and the `C` f32 sink of the norm weights' gradients); and the largest temporary of
//! one op (a fused projection adds into its output, `y += x W^T` or `dx += dy W`, in the kernels'
//! epilogue, without a temporary): an NF4 weight whose `in` is not a multiple of 32 is
//! dequantized to an `out in` bf16 copy for each call; LoRA dropout keeps the dropped-out input
//! and two input gradients (`3 n in` bf16 in the backward, `n in` in the forward); the RMSNorm
//! backward's `[chunks, C]` f32 partial sums ([`qadapt::plan::rmsnorm_dw`]); attention's backward
//! `n heads` f32.
//!
//! The step's peak is the resident part (weights, adapter, optimizer, LoRA scratch) plus the
//! largest of these moments of a step, each with what is live then:
//! - forward, last layer, `o_proj` and `down_proj` (the layers before it saved, this layer's
//!   buffers, the projection's temporary);
//! - head and loss: every saved activation, the final norm's output and its gradient, one chunk's
//!   logits and their gradient, per-row losses and targets;
//! - backward: saved activations, the gradient buffers and the largest temporary of one layer's
//!   backward.
//!
//! The steady state is planned: from the second step on, the moments exist during the
//! forward and backward. The sizes are the requested bytes of each allocation; a real driver
//! rounds each up (to 512 bytes or more) and its stream-ordered pool may keep freed blocks, so a
//! GPU needs somewhat more than the plan, plus the CUDA context itself (not in `cuMemGetInfo`'s
//! free memory).
//!
//! With [`Checkpointing::Layers`] a layer keeps only its input `x` (`n C` bf16) once its forward
//! is done, so the forward phases hold `L - 1` inputs and the current layer's buffers, and the
//! head and loss `L` inputs; the backward runs each layer's forward again before its
//! backward, adding two more phases with the gradient buffers live:
//! the recomputed layer at `o_proj`, and at `down_proj` (the whole layer, the recomputed output
//! `n C` being written); the backward of a layer then holds the `L` inputs plus that layer's
//! recomputed activations (with its kept `u`; the first forward keeps none).

use qadapt::plan::{self, DeviceProps};
use qadapt::{Error, Result};

use crate::backend::{Checkpointing, MomentPlacement};
use crate::config::LlamaConfig;
use crate::weights::Proj;

const BF16: u64 = 2;
const F32: u64 = 4;
/// NF4 block of [`crate::nf4::quantize_projections`].
const NF4_BLOCK: u64 = qadapt::nf4::DEFAULT_BLOCKSIZE as u64;
/// Blocks per f32 of the double-quantized absmax.
const DQ_BLOCK: u64 = qadapt::nf4::DQ_BLOCKSIZE as u64;
/// The fused NF4 kernels stream 32 codes of a row at once: other widths are dequantized first.
const NF4_STREAM: u64 = 32;

/// How the frozen base is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanMethod {
    /// bf16 base (`--method lora`).
    Lora,
    /// NF4 base, block 64, double quantization (`--method qlora`).
    Qlora,
}

impl PlanMethod {
    /// The CLI's name.
    pub fn name(self) -> &'static str {
        match self {
            PlanMethod::Lora => "lora",
            PlanMethod::Qlora => "qlora",
        }
    }

    /// Where the run keeps the AdamW moments for this method (`qadapt train --device cuda`):
    /// paged for QLoRA, device memory for LoRA.
    pub fn placement(self) -> MomentPlacement {
        match self {
            PlanMethod::Lora => MomentPlacement::Device,
            PlanMethod::Qlora => MomentPlacement::Paged,
        }
    }
}

/// What is planned: the model, the step's shape and the adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// bf16 or NF4 base.
    pub method: PlanMethod,
    /// LoRA rank r.
    pub rank: usize,
    /// Adapted projections (the same in every layer).
    pub targets: Vec<Proj>,
    /// Whether LoRA dropout is on (adds its temporaries).
    pub dropout: bool,
    /// Where the moments live (both count: see the module documentation).
    pub placement: MomentPlacement,
    /// Activation checkpointing.
    pub checkpointing: Checkpointing,
    /// The device facts the kernels' launch plans (and so their scratch) depend on.
    pub props: DeviceProps,
    /// Token rows per chunk of the fused head and loss
    /// ([`crate::backend::LoraModel::set_loss_chunk_rows`]; `None`: the default,
    /// [`qadapt::plan::loss_chunk_rows`]).
    pub loss_chunk_rows: Option<usize>,
    /// Packed rows (`qadapt train --pack`): a RoPE table row per token and the sequence starts.
    pub packed: bool,
}

impl PlanOptions {
    /// `method` at rank `rank` on all seven projections, no dropout, the run's moment placement,
    /// on an H200-like device: the defaults of `qadapt train --device cuda`.
    pub fn new(method: PlanMethod, batch: usize, seq: usize, rank: usize) -> Self {
        PlanOptions {
            batch,
            seq,
            method,
            rank,
            targets: Proj::ALL.to_vec(),
            dropout: false,
            placement: method.placement(),
            checkpointing: Checkpointing::None,
            props: DeviceProps::H200,
            loss_chunk_rows: None,
            packed: false,
        }
    }
}

/// A moment of the step whose live bytes the plan compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward of the last layer's `o_proj` (added into the residual through a temporary).
    ForwardAttentionOut,
    /// Forward of the last layer's `down_proj`.
    ForwardMlpOut,
    /// The head fused with the cross-entropy, in row chunks: one chunk's logits and their
    /// gradient, the final norm's output and its gradient.
    CrossEntropy,
    /// With layer checkpointing: a layer's forward run again in the backward, at `o_proj`.
    RecomputeAttentionOut,
    /// The same at `down_proj`.
    RecomputeMlpOut,
    /// The backward through the layers.
    Backward,
}

impl Phase {
    /// A short description.
    pub fn name(self) -> &'static str {
        match self {
            Phase::ForwardAttentionOut => "forward (o_proj of the last layer)",
            Phase::ForwardMlpOut => "forward (down_proj of the last layer)",
            Phase::CrossEntropy => "head and cross-entropy (one chunk of logits)",
            Phase::RecomputeAttentionOut => "backward (a checkpointed layer's o_proj again)",
            Phase::RecomputeMlpOut => "backward (a checkpointed layer's down_proj again)",
            Phase::Backward => "backward (through the layers)",
        }
    }
}

/// The bytes live at one [`Phase`] beyond the resident part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseBytes {
    /// Which moment.
    pub phase: Phase,
    /// Saved activations live then.
    pub activations: u64,
    /// One chunk's logits and their gradient, per-row losses, targets.
    pub logits_loss: u64,
    /// Gradient buffers and temporaries (the LoRA scratch is resident, in [`MemoryPlan`]).
    pub transient: u64,
}

impl PhaseBytes {
    /// Everything this phase adds to the resident bytes.
    pub fn total(&self) -> u64 {
        self.activations + self.logits_loss + self.transient
    }
}

/// Predicted device memory of a training step, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// What was planned.
    pub options: PlanOptions,
    /// Frozen base: embeddings, head, norms, projections (bf16 or NF4 codes and constants).
    pub weights: u64,
    /// LoRA masters, gradient accumulators and bf16 working copies.
    pub adapter: u64,
    /// AdamW moments (device or managed memory, as [`PlanOptions::placement`] says).
    pub optimizer: u64,
    /// The LoRA kernels' scratch (resident once grown).
    pub lora_scratch: u64,
    /// Token rows per chunk of the fused head and loss.
    pub loss_chunk_rows: u64,
    /// Every phase compared, in step order.
    pub phases: Vec<PhaseBytes>,
    /// The phase with the most bytes live.
    pub peak_phase: PhaseBytes,
}

impl MemoryPlan {
    /// Resident bytes: weights, adapter, optimizer, LoRA scratch.
    pub fn resident(&self) -> u64 {
        self.weights + self.adapter + self.optimizer + self.lora_scratch
    }

    /// Saved activations at the peak.
    pub fn activations(&self) -> u64 {
        self.peak_phase.activations
    }

    /// Logits and loss buffers at the peak.
    pub fn logits_loss(&self) -> u64 {
        self.peak_phase.logits_loss
    }

    /// Workspace at the peak: the LoRA scratch plus the phase's gradient buffers and temporaries.
    pub fn workspace(&self) -> u64 {
        self.lora_scratch + self.peak_phase.transient
    }

    /// The predicted peak: resident bytes plus the largest phase.
    pub fn peak(&self) -> u64 {
        self.resident() + self.peak_phase.total()
    }
}

fn invalid(reason: impl ToString) -> Error {
    crate::invalid("memory plan", reason)
}

/// `a * b * ...` in u64, or an error naming the overflow.
fn prod(xs: &[u64]) -> Result<u64> {
    xs.iter()
        .try_fold(1u64, |acc, &x| acc.checked_mul(x))
        .ok_or_else(|| invalid(format!("the product {xs:?} overflows 64 bits")))
}

/// One projection as the trainer builds it.
struct ProjPlan {
    inp: u64,
    out: u64,
    adapted: bool,
    /// Runs through the fused LoRA layer (adapted, or any NF4 projection), not cuBLAS.
    fused: bool,
    /// Bytes of the bf16 copy an NF4 weight is dequantized to per call (0 when streamed).
    nf4_copy: u64,
}

/// Plans the peak device memory of a training step of `config` with `o`.
pub fn plan(config: &LlamaConfig, o: &PlanOptions) -> Result<MemoryPlan> {
    if o.batch == 0 || o.seq == 0 || o.rank == 0 {
        return Err(invalid(format!(
            "batch {}, seq {} and rank {} must be positive",
            o.batch, o.seq, o.rank
        )));
    }
    if o.targets.is_empty() {
        return Err(invalid("no target projection: nothing to train"));
    }
    if config.num_hidden_layers == 0 {
        return Err(invalid("a model without layers"));
    }
    if o.seq > config.max_position_embeddings {
        return Err(invalid(format!(
            "{} positions exceed max_position_embeddings {}",
            o.seq, config.max_position_embeddings
        )));
    }
    let c = config;
    let u = |x: usize| x as u64;
    let (cw, iw, qd, kd) = (
        u(c.hidden_size),
        u(c.intermediate_size),
        u(c.q_dim()),
        u(c.kv_dim()),
    );
    let (layers, vocab, heads, r) = (
        u(c.num_hidden_layers),
        u(c.vocab_size),
        u(c.num_attention_heads),
        u(o.rank),
    );
    let n = prod(&[u(o.batch), u(o.seq)])?;
    let nf4 = o.method == PlanMethod::Qlora;
    let projs: Vec<ProjPlan> = Proj::ALL
        .iter()
        .map(|&p| {
            let (inp, out) = p.dims(c);
            let (inp, out) = (u(inp), u(out));
            let adapted = o.targets.contains(&p);
            ProjPlan {
                inp,
                out,
                adapted,
                fused: adapted || nf4,
                nf4_copy: if nf4 && !inp.is_multiple_of(NF4_STREAM) {
                    out * inp * BF16
                } else {
                    0
                },
            }
        })
        .collect();
    let proj = |p: Proj| &projs[p.index()];

    // ---- resident ----
    let head = if c.tie_word_embeddings { 0 } else { 1 };
    let mut weights = prod(&[vocab, cw, BF16, 1 + head])? + cw * BF16 + BF16;
    let mut per_layer_w = 2 * cw * BF16;
    let mut per_layer_adapter = 0u64;
    let mut per_layer_moments = 0u64;
    for pp in &projs {
        let numel = prod(&[pp.out, pp.inp])?;
        per_layer_w += if nf4 {
            let nb = numel.div_ceil(NF4_BLOCK);
            numel.div_ceil(2) + nb + nb.div_ceil(DQ_BLOCK) * F32 + 256 * F32
        } else {
            numel * BF16
        };
        let lora = r * (pp.inp + pp.out);
        if pp.adapted {
            // Working copies + scale, masters, gradients.
            per_layer_adapter += lora * BF16 + F32 + 2 * lora * F32;
            per_layer_moments += 2 * lora * F32;
        } else if pp.fused {
            // The rank-1 zero placeholder of a frozen NF4 projection.
            per_layer_w += (pp.inp + pp.out) * BF16 + F32;
        }
    }
    weights += prod(&[layers, per_layer_w])?;
    let adapter = prod(&[layers, per_layer_adapter])?;
    let optimizer = prod(&[layers, per_layer_moments])?;
    let ckpt = o.checkpointing == Checkpointing::Layers;
    let lora_scratch = lora_scratch(&projs, n, r, o, ckpt)?;

    // ---- saved activations ----
    let layer_bf16 = 4 * cw + 2 * qd + 2 * kd + 3 * iw;
    let layer_saved = prod(&[n, layer_bf16 * BF16 + 2 * F32 + heads * F32])?;
    let rope = if o.packed {
        prod(&[n, u(c.head_dim), F32])? + n * 4
    } else {
        prod(&[u(o.seq), u(c.head_dim), F32])?
    };
    let x_final = n * cw * BF16;
    let rstd_final = n * F32;
    let chunk = o
        .loss_chunk_rows
        .unwrap_or_else(|| plan::loss_chunk_rows(n as usize, c.vocab_size))
        .clamp(1, n as usize) as u64;
    let chunk_logits = prod(&[chunk, vocab, BF16])?;

    // What a forward that keeps for the backward keeps of its projections
    // (`Backend::proj_forward`'s `keep`): u = s x A^T, `n r` bf16 per adapted projection. Without
    // checkpointing every layer's; with it, the forward keeps nothing and the layer recomputed for
    // its backward keeps its own.
    let kept_u = |ps: &[Proj]| -> u64 {
        ps.iter()
            .filter(|&&p| proj(p).adapted)
            .map(|_| n * r * BF16)
            .sum()
    };
    let layer_u = kept_u(&Proj::ALL);
    let u_at_o = kept_u(&[Proj::Q, Proj::K, Proj::V, Proj::O]);
    let (fwd_u, fwd_u_at_o) = if ckpt { (0, 0) } else { (layer_u, u_at_o) };
    // What a finished layer keeps: everything, or its input alone.
    let kept = if ckpt {
        n * cw * BF16
    } else {
        layer_saved + layer_u
    };
    let saved = prod(&[layers, kept])? + x_final + rstd_final + rope;
    // One layer's buffers before its o_proj: x, xn1, x_mid, rstd1, q, k, v, the attention
    // statistics and output.
    let layer_at_o = n * (3 * cw + 2 * qd + 2 * kd) * BF16 + n * F32 + n * heads * F32;

    // ---- phases ----
    let mut phases = Vec::new();
    // Forward, last layer. Before o_proj: the earlier layers' caches, the rope table, and this
    // layer's buffers.
    let earlier = (layers - 1) * kept + rope;
    phases.push(PhaseBytes {
        phase: Phase::ForwardAttentionOut,
        activations: earlier + layer_at_o + fwd_u_at_o,
        logits_loss: 0,
        transient: forward_temp(proj(Proj::O), n, o.dropout),
    });
    // down_proj: the whole layer live, its output (the final norm's input) being written.
    phases.push(PhaseBytes {
        phase: Phase::ForwardMlpOut,
        activations: earlier + layer_saved + fwd_u + x_final,
        logits_loss: 0,
        transient: forward_temp(proj(Proj::Down), n, o.dropout),
    });
    // The final norm's output and its gradient, while one chunk's logits and their gradient,
    // the per-row losses and the targets exist.
    phases.push(PhaseBytes {
        phase: Phase::CrossEntropy,
        activations: saved,
        logits_loss: 2 * chunk_logits + n * F32 + n * F32,
        transient: 2 * n * cw * BF16,
    });
    // Backward: the gradient buffers (dxn among them, from the loss) are live from the first
    // layer on; the largest temporary of one layer's ops on top.
    let grads = n * (2 * cw + 3 * iw + 2 * qd + 2 * kd) * BF16 + cw * F32;
    let norm_partial = u64::from(plan::rmsnorm_dw(n, cw, &o.props)?.chunks) * cw * F32;
    let temp = [
        backward_temp(proj(Proj::Down), n, o.dropout),
        backward_temp(proj(Proj::Gate), n, o.dropout),
        backward_temp(proj(Proj::Up), n, o.dropout),
        norm_partial,
        backward_temp(proj(Proj::O), n, o.dropout),
        n * heads * F32,
        backward_temp(proj(Proj::Q), n, o.dropout),
        backward_temp(proj(Proj::K), n, o.dropout),
        backward_temp(proj(Proj::V), n, o.dropout),
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if ckpt {
        // The layer's forward again, with the backward's buffers live.
        phases.push(PhaseBytes {
            phase: Phase::RecomputeAttentionOut,
            activations: saved + layer_at_o + u_at_o,
            logits_loss: 0,
            transient: grads + forward_temp(proj(Proj::O), n, o.dropout),
        });
        phases.push(PhaseBytes {
            phase: Phase::RecomputeMlpOut,
            activations: saved + layer_saved + layer_u + n * cw * BF16,
            logits_loss: 0,
            transient: grads + forward_temp(proj(Proj::Down), n, o.dropout),
        });
    }
    phases.push(PhaseBytes {
        phase: Phase::Backward,
        activations: saved + if ckpt { layer_saved + layer_u } else { 0 },
        logits_loss: 0,
        transient: grads + temp,
    });
    let peak_phase = *phases
        .iter()
        .max_by_key(|p| p.total())
        .expect("at least four phases");
    Ok(MemoryPlan {
        options: o.clone(),
        weights,
        adapter,
        optimizer,
        lora_scratch,
        loss_chunk_rows: chunk,
        phases,
        peak_phase,
    })
}

/// Temporaries of one projection's forward that adds into its output (`o_proj`, `down_proj`).
fn forward_temp(pp: &ProjPlan, n: u64, dropout: bool) -> u64 {
    // A residual add (`y += x W^T`) happens in the fused kernels' epilogue: no temporary.
    if dropout && pp.adapted {
        // x~ = m x.
        n * pp.inp * BF16 + pp.nf4_copy
    } else {
        pp.nf4_copy
    }
}

/// Temporaries of one projection's backward.
fn backward_temp(pp: &ProjPlan, n: u64, dropout: bool) -> u64 {
    if dropout && pp.adapted {
        // x~, d1, d0; the mix then writes dx (or x~ before the add) in place.
        3 * n * pp.inp * BF16 + pp.nf4_copy
    } else {
        // A sum of input gradients (`dx += dy W`) happens in the fused kernels' epilogue or in
        // cuBLAS' beta: no temporary.
        pp.nf4_copy
    }
}

/// The LoRA scratch once grown to the largest call of a step: `u` (`n R` bf16 where a call forms
/// it there: a forward that keeps nothing, i.e. with checkpointing, and one element for a
/// base-only call; the step's other calls keep theirs with the saved activations), `g` (backward
/// calls), the partial sums (f32); `g` and the partial sums at least one element.
fn lora_scratch(
    projs: &[ProjPlan],
    n: u64,
    r: u64,
    o: &PlanOptions,
    forward_forms_u: bool,
) -> Result<u64> {
    let (mut u, mut g, mut partial) = (0u64, 1u64, 1u64);
    for pp in projs.iter().filter(|pp| pp.fused) {
        // The ranks each projection is called with: r with its LoRA term; 0 for a frozen NF4
        // projection, and for the base-only calls of LoRA dropout.
        let mut ranks = Vec::new();
        if pp.adapted {
            ranks.push(r);
        }
        if !pp.adapted || o.dropout {
            ranks.push(0);
        }
        for rt in ranks {
            let f = plan::lora_forward(n, pp.out, pp.inp, rt, &o.props)?;
            let xa = match f.xa {
                Some(plan::XaPlan::Rank(p)) => p.partial_len(n, rt),
                _ => 0,
            };
            let split = f.split.map_or(0, |s| s.partial_len(n, pp.out));
            partial = partial.max(xa.max(split));
            let b = plan::lora_backward(n, pp.out, pp.inp, rt, &o.props)?;
            let lens = [
                b.xa.map(|p| p.partial_len(n, rt)),
                b.dyb.map(|p| p.partial_len(n, rt)),
                b.dx_split.map(|s| s.partial_len(n, pp.inp)),
                b.da.map(|p| p.partial_len(pp.inp, rt)),
                b.db.map(|p| p.partial_len(pp.out, rt)),
            ];
            partial = partial.max(lens.into_iter().flatten().max().unwrap_or(0));
            u = u.max(if rt == 0 {
                1
            } else if forward_forms_u {
                n * rt
            } else {
                0
            });
            g = g.max(n * rt);
        }
    }
    Ok((u + g) * BF16 + partial * F32)
}

/// The largest batch of `seq` tokens whose plan fits in `budget` bytes (`None`: not even one
/// sequence). The peak grows with the batch, so this bisects.
pub fn largest_batch(config: &LlamaConfig, o: &PlanOptions, budget: u64) -> Result<Option<usize>> {
    let fits = |batch: usize| -> Result<bool> {
        let mut t = o.clone();
        t.batch = batch;
        Ok(plan(config, &t)?.peak() <= budget)
    };
    if !fits(1)? {
        return Ok(None);
    }
    // Rows stay within the kernels' 32-bit shapes.
    let cap = (u32::MAX as usize / o.seq.max(1)).max(1);
    let mut hi = 1usize;
    while hi < cap && fits((2 * hi).min(cap))? {
        hi = (2 * hi).min(cap);
    }
    if hi == cap {
        return Ok(Some(cap));
    }
    let (mut lo, mut hi) = (hi, (2 * hi).min(cap));
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_checkpointing_keeps_one_input_per_layer() {
        let c = LlamaConfig::llama3_8b();
        let base = PlanOptions::new(PlanMethod::Qlora, 4, 2048, 16);
        let none = plan(&c, &base).unwrap();
        let o = PlanOptions {
            checkpointing: Checkpointing::Layers,
            ..base
        };
        let ckpt = plan(&c, &o).unwrap();
        let (n, cw, q, k, i, h, r) = (8192u64, 4096u64, 4096u64, 1024u64, 14336u64, 32u64, 16u64);
        // A checkpointed forward keeps no u: it forms it in the LoRA scratch (n r bf16 more).
        assert_eq!(ckpt.resident() - none.resident(), n * r * BF16);
        // At the head, each layer holds its input (n C bf16) instead of its whole cache, the
        // seven projections' kept u among it.
        let layer =
            n * ((4 * cw + 2 * q + 2 * k + 3 * i) * BF16 + 2 * F32 + h * F32) + 7 * n * r * BF16;
        let at = |p: &MemoryPlan, ph: Phase| {
            p.phases.iter().find(|x| x.phase == ph).unwrap().activations
        };
        assert_eq!(
            at(&none, Phase::CrossEntropy) - at(&ckpt, Phase::CrossEntropy),
            32 * (layer - n * cw * BF16)
        );
        assert!(at(&none, Phase::CrossEntropy) > 5 * at(&ckpt, Phase::CrossEntropy));
        assert!(ckpt.peak() < none.peak() / 2, "{ckpt:?} vs {none:?}");
        assert!(
            ckpt.phases
                .iter()
                .any(|p| p.phase == Phase::RecomputeMlpOut)
        );
        assert!(
            !none
                .phases
                .iter()
                .any(|p| p.phase == Phase::RecomputeMlpOut)
        );
    }

    #[test]
    fn the_loss_holds_one_chunk_of_logits_not_all_of_them() {
        // Llama-3-8B, 4 x 2048 rows: whole logits would be 8192 x 128256 bf16 (2 GiB, twice).
        let c = LlamaConfig::llama3_8b();
        let o = PlanOptions::new(PlanMethod::Qlora, 4, 2048, 16);
        let p = plan(&c, &o).unwrap();
        let (n, v, cw) = (8192u64, 128_256u64, 4096u64);
        let chunk = (1u64 << 26) / v;
        assert_eq!(chunk, 523);
        assert_eq!(p.loss_chunk_rows, chunk);
        let loss = p
            .phases
            .iter()
            .find(|x| x.phase == Phase::CrossEntropy)
            .unwrap();
        assert_eq!(loss.logits_loss, 2 * chunk * v * BF16 + n * (F32 + F32));
        assert_eq!(loss.transient, 2 * n * cw * BF16);
        assert!(p.phases.iter().all(|x| x.logits_loss < n * v * BF16 / 4));
        // A chunk of 64 rows: 2 x 64 x V bf16 instead; one chunk bigger than the batch is the
        // whole batch.
        let small = PlanOptions {
            loss_chunk_rows: Some(64),
            ..o.clone()
        };
        let ps = plan(&c, &small).unwrap();
        let loss_s = ps.phases.iter().find(|x| x.phase == Phase::CrossEntropy);
        assert_eq!(loss_s.unwrap().logits_loss, 2 * 64 * v * BF16 + n * 8);
        let whole = PlanOptions {
            loss_chunk_rows: Some(1 << 20),
            ..o
        };
        let pw = plan(&c, &whole).unwrap();
        let loss_w = pw.phases.iter().find(|x| x.phase == Phase::CrossEntropy);
        assert_eq!(loss_w.unwrap().logits_loss, 2 * n * v * BF16 + n * 8);
    }

    #[test]
    fn qlora_is_smaller_than_lora_and_the_peak_grows_with_the_batch() {
        let c = LlamaConfig::llama3_8b();
        let lora = plan(&c, &PlanOptions::new(PlanMethod::Lora, 1, 512, 16)).unwrap();
        let qlora = plan(&c, &PlanOptions::new(PlanMethod::Qlora, 1, 512, 16)).unwrap();
        // 8.03e9 parameters: bf16 about 16 GB; NF4 about 0.53 bytes per projection weight.
        assert!(
            (15.5e9..16.5e9).contains(&(lora.weights as f64)),
            "{lora:?}"
        );
        assert!(qlora.weights < lora.weights / 2, "{qlora:?}");
        assert_eq!(lora.adapter, qlora.adapter);
        let big = plan(&c, &PlanOptions::new(PlanMethod::Qlora, 8, 512, 16)).unwrap();
        assert!(big.peak() > qlora.peak());
        assert!(big.activations() > 7 * qlora.activations());
    }

    #[test]
    fn largest_batch_is_the_last_that_fits() {
        let c = LlamaConfig::llama3_8b();
        let o = PlanOptions::new(PlanMethod::Qlora, 1, 1024, 16);
        let budget = 40u64 << 30;
        let b = largest_batch(&c, &o, budget).unwrap().unwrap();
        let at = |batch| {
            let mut t = o.clone();
            t.batch = batch;
            plan(&c, &t).unwrap().peak()
        };
        assert!(at(b) <= budget && at(b + 1) > budget, "{b}");
        assert_eq!(largest_batch(&c, &o, 1 << 20).unwrap(), None);
    }

    #[test]
    fn the_breakdown_adds_up_and_zero_sizes_are_refused() {
        let c = LlamaConfig::llama3_2_1b();
        let p = plan(&c, &PlanOptions::new(PlanMethod::Lora, 2, 256, 8)).unwrap();
        assert_eq!(
            p.peak(),
            p.weights + p.adapter + p.optimizer + p.activations() + p.logits_loss() + p.workspace()
        );
        assert!(p.phases.iter().all(|ph| ph.total() <= p.peak_phase.total()));
        assert!(plan(&c, &PlanOptions::new(PlanMethod::Lora, 0, 256, 8)).is_err());
        let mut o = PlanOptions::new(PlanMethod::Lora, 1, 256, 8);
        o.targets.clear();
        assert!(plan(&c, &o).is_err());
    }
}
