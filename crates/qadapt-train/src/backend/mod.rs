//! The model's mixed-precision path for LoRA and QLoRA training, written once over a
//! [`Backend`]: forward, hand-written backward and AdamW with bf16 activations, f32
//! accumulation, a bf16 or NF4 double-quant base, f32 LoRA masters with bf16 working copies and
//! moments on the device or paged, as the QLoRA paper describes it (Dettmers et al. 2023).
//!
//! [`LoraModel`] holds the orchestration (the [`crate::layer`] sequence's ops, saved activations,
//! LoRA wiring, GQA, RoPE, tied or untied head, gradient accumulation, clipping, the optimizer
//! step). [`Backend`]'s methods mirror the signatures of `qadapt::cuda::ops`,
//! `qadapt::lora::CudaLoraLinear`, `CudaDevice::gemm_bf16` and `qadapt::optim`. Two backends:
//! - [`crate::cuda::CudaBackend`]: those ops on device buffers (needs a GPU at run time);
//! - [`CpuBackend`]: the CPU references on host vectors, rounding to bf16 where the device stores
//!   bf16 ([`Precision::Bf16`]) or nothing ([`Precision::F32`]).
//!
//! So the orchestration is checked on any machine against the CPU [`crate::Llama`]
//! (`tests/cuda_path.rs`: to f32 rounding with [`Precision::F32`], to bf16 tolerances with
//! [`Precision::Bf16`]), while each device op is checked against its CPU reference by qadapt's
//! own GPU tests; `tests/cuda_path.rs` also runs the CUDA backend against the CPU model
//! (ignored without a GPU).
//!
//! Adapters come from and go back to [`crate::LoraAdapter`] (f32), so loading, initialization and
//! the PEFT writer are the CPU path's.
//!
//! Each [`Backend`] method mirrors one safe CUDA op of `qadapt` (same argument order, same
//! overwrite/accumulate contract, bf16 activations, f32 statistics and gradients).
//!
//! Buffers: `Act` holds bf16 activations or bf16 weights (`[rows, cols]` row-major, token-major
//! as in [`qadapt::ops`]); `F32` holds f32 values (RMSNorm's `rstd`, attention's saved
//! statistics, LoRA master weights, gradients). A `Proj` is one resident projection: its frozen
//! base weight (dense bf16 or NF4) and, when adapted, the bf16 working copy of its LoRA pair.

mod cpu;
mod model;

pub use cpu::{CpuBackend, CpuProj, Precision};
pub use model::{BaseData, BaseFormat, Checkpointing, LoraModel};
pub(crate) use model::{checked_source, checkpoint_tensors, model_tensors};

use half::bf16;
use qadapt::Result;
use qadapt::nf4::Nf4Tensor;
use qadapt::ops::Accumulate;
use qadapt::ops::attention::AttentionShape;
use qadapt::ops::cross_entropy::{LmHeadShape, RowScore};
use qadapt::ops::dropout::{DropoutMask, MaskCoef};
use qadapt::ops::rope::{RopeDirection, RopeTable};
use qadapt::optim::AdamWStep;

/// Where the AdamW moments of the LoRA tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MomentPlacement {
    /// Device memory next to the parameters.
    Device,
    /// Managed memory paged between host and device ([`qadapt::optim::PagedAdamState`]): QLoRA's
    /// paged optimizer. The CPU backend keeps host vectors either way.
    Paged,
}

/// A frozen base weight `[out, in]` as handed to [`Backend::proj`].
#[derive(Debug, Clone, Copy)]
pub enum BaseRef<'a> {
    /// f32 values, held by the backend as bf16 (rounded to nearest).
    Dense(&'a [f32]),
    /// NF4 codes with their (double-quantized) block scales.
    Nf4(&'a Nf4Tensor),
    /// f32 values the backend quantizes to NF4 (block 64, double quantization, as
    /// [`crate::nf4::quantize_projections`]) where it keeps its weights: a GPU backend uploads
    /// them and quantizes on the device, so a model can be loaded one tensor at a time without
    /// its dense projections ever existing on the device together.
    QuantizeNf4(&'a [f32]),
}

/// The LoRA pair of an adapted projection as handed to [`Backend::proj`]: A `[r, in]`,
/// B `[out, r]` (the f32 masters; the backend keeps their bf16 rounding) and the scale s.
#[derive(Debug, Clone, Copy)]
pub struct LoraRef<'a> {
    /// Rank r.
    pub rank: usize,
    /// `lora_A.weight`.
    pub a: &'a [f32],
    /// `lora_B.weight`.
    pub b: &'a [f32],
    /// `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f32,
}

/// Which matrix of a LoRA pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMatrix {
    /// A `[r, in]`.
    A,
    /// B `[out, r]`.
    B,
}

/// The terms of a projection's forward ([`Backend::proj_forward`]).
#[derive(Debug)]
pub enum Terms<'a, A> {
    /// `x W^T` alone, even on an adapted projection (the base part of LoRA dropout's split, or
    /// a run that evaluates the base model).
    Base,
    /// `x W^T` plus the LoRA term where the projection is adapted; with `keep`
    /// ([`Backend::proj_keep_len`] values), what the backward reuses is written there.
    Adapted { keep: Option<&'a mut A> },
}

/// The terms of a projection's backward ([`Backend::proj_backward`]).
#[derive(Debug)]
pub enum BackTerms<'a, A, F> {
    /// `dy W` alone.
    Base,
    /// `dy W` plus the LoRA term where adapted: from what the forward kept (`kept`) where it
    /// kept anything, and adding into the adapter's `(dA, dB)` where `grads` is given.
    Adapted {
        kept: Option<&'a A>,
        grads: Option<(&'a mut F, &'a mut F)>,
    },
}

/// The ops of one device, on its own buffers (see the module doc).
pub trait Backend {
    /// bf16 values.
    type Act;
    /// f32 values.
    type F32;
    /// A RoPE table resident on the backend.
    type Rope;
    /// Packed rows' sequence starts resident on the backend (checked when made).
    type Segments;
    /// A resident projection (base weight and optional LoRA working copy).
    type Proj;
    /// The AdamW moments `(m, v)` of one tensor.
    type Moments;

    /// A short description for logs (`cpu (bf16 activations)`, `cuda:0 (...)`).
    fn describe(&self) -> String;

    /// `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Act>;
    /// `len` zeros in f32.
    fn zeros_f32(&self, len: usize) -> Result<Self::F32>;
    /// f32 host values rounded to bf16.
    fn upload(&self, host: &[f32]) -> Result<Self::Act>;
    /// f32 host values kept in f32.
    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32>;
    /// The values widened to f32 (synchronizes a device).
    fn download(&self, x: &Self::Act) -> Result<Vec<f32>>;
    /// The f32 values (synchronizes a device).
    fn download_f32(&self, x: &Self::F32) -> Result<Vec<f32>>;
    /// A copy of `x`.
    fn duplicate(&self, x: &Self::Act) -> Result<Self::Act>;
    /// `dst += src` elementwise (same length), rounded to bf16 once.
    fn add_assign(&self, dst: &mut Self::Act, src: &Self::Act) -> Result<()>;

    /// Uploads an f32 RoPE table (cos and sin stay f32).
    fn rope(&self, table: &RopeTable<f32>) -> Result<Self::Rope>;
    /// Packed rows' sequence starts `[batch * seq]` ([`qadapt::ops::attention`]'s `segments`),
    /// checked, for every attention call of a batch.
    fn segments(&self, batch: usize, seq: usize, starts: &[u32]) -> Result<Self::Segments>;
    /// Rotates every head of `x [batch * seq, heads * head_dim]` in place.
    fn rope_apply(
        &self,
        rope: &Self::Rope,
        x: &mut Self::Act,
        heads: usize,
        dir: RopeDirection,
    ) -> Result<()>;

    /// `out [ids.len(), dim] = table[ids]`.
    fn embedding(
        &self,
        ids: &[u32],
        table: &Self::Act,
        vocab: usize,
        dim: usize,
        out: &mut Self::Act,
    ) -> Result<()>;

    /// RMSNorm: `y` overwritten, `rstd [rows]` overwritten.
    fn rmsnorm_forward(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        eps: f64,
        y: &mut Self::Act,
        rstd: &mut Self::F32,
    ) -> Result<()>;
    /// RMSNorm backward: `dx` overwritten or accumulated, `dw` accumulated.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        rstd: &Self::F32,
        dy: &Self::Act,
        dx: &mut Self::Act,
        acc: Accumulate,
        dw: &mut Self::F32,
    ) -> Result<()>;

    /// `h = silu(gate) * up`.
    fn swiglu_forward(&self, gate: &Self::Act, up: &Self::Act, h: &mut Self::Act) -> Result<()>;
    /// SwiGLU backward: `dgate`, `dup` overwritten.
    fn swiglu_backward(
        &self,
        gate: &Self::Act,
        up: &Self::Act,
        dh: &Self::Act,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
    ) -> Result<()>;

    /// Length of what the attention forward saves for its backward (the CUDA kernels keep the
    /// row log-sum-exps `[batch, heads, seq]`, the CPU reference the probabilities
    /// `[batch, heads, seq, seq]`).
    fn attention_saved_len(&self, sh: AttentionShape) -> usize;
    /// Causal GQA attention: `out` and `saved` overwritten; with `segments`, each query sees
    /// only its own sequence's keys (packed rows).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        sh: AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        segments: Option<&Self::Segments>,
        saved: &mut Self::F32,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// Attention backward: `dq`, `dk`, `dv` overwritten. `saved` and `out` are what the forward
    /// wrote (a device's tensor-core kernels read `delta = rowsum(dout * out)` from `out` instead
    /// of recomputing it from the scores).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        sh: AttentionShape,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        segments: Option<&Self::Segments>,
        saved: &Self::F32,
        out: &Self::Act,
        dout: &Self::Act,
        dq: &mut Self::Act,
        dk: &mut Self::Act,
        dv: &mut Self::Act,
    ) -> Result<()>;

    /// `y [rows, out] = x [rows, inp] W^T` with W `[out, inp]` bf16 (the LM head).
    fn matmul_wt(
        &self,
        x: &Self::Act,
        w: &Self::Act,
        rows_inp_out: (usize, usize, usize),
        y: &mut Self::Act,
    ) -> Result<()>;
    /// A resident projection `[out, inp]`, adapted when `lora` is given.
    fn proj(
        &self,
        out: usize,
        inp: usize,
        base: BaseRef<'_>,
        lora: Option<LoraRef<'_>>,
    ) -> Result<Self::Proj>;
    /// `y (=|+=) x W^T + s (x A^T) B^T` for `x [rows, inp]`: the LoRA term where `p` is adapted
    /// and `terms` asks for it, and what the backward reuses written into [`Terms::Adapted`]'s
    /// `keep`.
    fn proj_forward(
        &self,
        p: &Self::Proj,
        x: &Self::Act,
        rows: usize,
        y: &mut Self::Act,
        acc: Accumulate,
        terms: Terms<'_, Self::Act>,
    ) -> Result<()>;
    /// Backward of [`Self::proj_forward`]: `dx (=|+=) dy W + s (dy B) A` (the LoRA term where
    /// adapted and `terms` asks for it), and with [`BackTerms::Adapted`]'s `grads`,
    /// `dA += s (dy B)^T x` and `dB += s dy^T (x A^T)` (f32). `x [rows, inp]` is the forward's
    /// input; the fused kernel takes it even when no adapter gradient is formed.
    #[allow(clippy::too_many_arguments)]
    fn proj_backward(
        &self,
        p: &Self::Proj,
        x: &Self::Act,
        dy: &Self::Act,
        rows: usize,
        dx: &mut Self::Act,
        acc: Accumulate,
        terms: BackTerms<'_, Self::Act, Self::F32>,
    ) -> Result<()>;
    /// How many values [`Self::proj_forward`] keeps of `p`'s forward over `rows` rows for its
    /// backward ([`Terms::Adapted`]'s `keep`): the CUDA backend keeps the LoRA intermediate
    /// `u = s x A^T` (`rows x rank`) of an adapted projection; 0 (the default) where the backend
    /// keeps nothing and its backward forms what it needs again.
    fn proj_keep_len(&self, _p: &Self::Proj, _rows: usize) -> usize {
        0
    }
    /// `out = ca a + cb b`, each coefficient chosen per element by `mask`
    /// ([`qadapt::ops::dropout::mask_mix`]; bf16 out), overwritten.
    fn mask_mix(
        &self,
        mask: DropoutMask,
        a: &Self::Act,
        ca: MaskCoef,
        b: Option<(&Self::Act, MaskCoef)>,
        out: &mut Self::Act,
    ) -> Result<()>;

    /// The mean cross-entropy of the logits `xn head^T` against `targets`, `chunk_rows` rows at a
    /// time so the whole `[rows, vocab]` logits never exist, and, when `dxn` is given, the
    /// gradient of `dloss * loss` with respect to `xn` (overwritten), as
    /// [`qadapt::ops::cross_entropy::lm_head`].
    #[allow(clippy::too_many_arguments)]
    fn lm_head_cross_entropy(
        &self,
        xn: &Self::Act,
        head: &Self::Act,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
        dloss: f32,
        dxn: Option<&mut Self::Act>,
    ) -> Result<f32>;

    /// Each row's loss and first-argmax test under the logits `xn head^T`, `chunk_rows` rows at
    /// a time (no gradient), as [`qadapt::ops::cross_entropy::lm_head_scores`]: an evaluation's
    /// loss and exact-match accuracy without the logits.
    fn lm_head_scores(
        &self,
        xn: &Self::Act,
        head: &Self::Act,
        shape: LmHeadShape,
        targets: &[Option<u32>],
        chunk_rows: usize,
    ) -> Result<Vec<RowScore<f32>>>;

    /// `sum x^2` over every element of `xs` (f64 accumulation of the partials; a device
    /// synchronizes once).
    fn sum_squares(&self, xs: &[&Self::F32]) -> Result<f64>;
    /// Zero moments for `len` parameters.
    fn moments(&self, len: usize, placement: MomentPlacement) -> Result<Self::Moments>;
    /// Moments holding `(m, v)` (a resumed run's), placed as `placement` says.
    fn moments_from(
        &self,
        m: &[f32],
        v: &[f32],
        placement: MomentPlacement,
    ) -> Result<Self::Moments>;
    /// The moments `(m, v)` on the host (synchronizes a device).
    fn download_moments(&self, state: &Self::Moments) -> Result<(Vec<f32>, Vec<f32>)>;
    /// One AdamW step on the f32 master `param` with gradient `grad`, then writes the bf16
    /// rounding of the new master into matrix `which` of projection `proj`'s working copy.
    fn adamw(
        &self,
        param: &mut Self::F32,
        proj: &mut Self::Proj,
        which: LoraMatrix,
        grad: &Self::F32,
        state: &mut Self::Moments,
        step: &AdamWStep,
    ) -> Result<()>;
}

/// bf16 rounding of f32 values (nearest, ties to even), as a device upload stores them.
pub(crate) fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}
