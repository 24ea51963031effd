//! The Llama decoder layer, written once: the order of its ops, forward and backward, over a
//! [`LayerRun`] (forward) or [`LayerBackRun`] (backward) that supplies each op. Three runners
//! implement them:
//! - [`crate::Llama`]'s CPU forward and backward (training and evaluation, `T` = f32 or f64,
//!   every adapter method, one adapter for the whole batch);
//! - [`crate::Generator`]'s cached decoding (f32, a ragged batch of new tokens whose rows each
//!   pick an adapter, keys and values appended to a [`crate::KvCache`]);
//! - [`crate::backend::LoraModel`] over a [`crate::backend::Backend`] (bf16 activations on a CUDA
//!   device or the CPU, LoRA or QLoRA training).
//!
//! One layer, as transformers computes it (`N` tokens, token-major `[N, *]` activations):
//! ```text
//! xn1 = rmsnorm(x, w_in)                 q = rope(xn1 Wq^T)  k = rope(xn1 Wk^T)  v = xn1 Wv^T
//! attn = attention(q, k, v)              x_mid = x + out(attn Wo^T)
//! xn2 = rmsnorm(x_mid, w_post)           h = silu(xn2 Wg^T) * (xn2 Wu^T)
//! y   = x_mid + out(h Wd^T)
//! ```
//! `out` is the identity, or a Houlsby bottleneck adapter (`site` 0 after attention, 1 after the
//! MLP). What a runner adds lives in its ops: the adapter hooks on a projection (LoRA's low-rank
//! term and its dropout, (IA)³'s scaling) in [`LayerRun::project`], prefix keys and values or a
//! KV cache in [`LayerRun::attention`], the RoPE positions (a prefix's shift, a cached row's own
//! position) in [`LayerRun::rope`], Houlsby in [`LayerRun::residual`].
//!
//! Each hook's math is written once, in its method's module, and every runner applies it
//! through that one definition:
//!
//! | hook | written once in | applied by |
//! | --- | --- | --- |
//! | LoRA term `s (x A^T) B^T`, dropout on its input | [`crate::lora::lora_term`] (f32/f64 CPU model), [`qadapt::lora`] (bf16: CPU reference and fused kernels), [`crate::lora::dropout_mask`] | `project` (one adapter, or each adapter's rows through [`crate::LoraStack`] when generating) |
//! | (IA)³ scaling of a projection's input or output | [`crate::ia3::hooked_linear`] (per row, from [`crate::Ia3Adapter::hook`]) | `project` |
//! | Houlsby bottleneck on a sublayer's output | [`crate::HoulsbyAdapter::forward`] | `residual` |
//! | prefix keys and values | [`crate::prefix_attention`] (training), the KV cache's first positions (generation) | `attention`, `rope` |
//! | soft prompt | [`crate::PromptTuning`]'s embeddings before the first layer | the runner's input, not a layer op |
//!
//! What differs between runners is which rows a hook covers (the whole batch in training, each
//! row's own adapter in generation: the generator gathers an adapter's rows, applies the same
//! function, and adds the result back) and what is saved for a backward (training only). The
//! bf16 runner ([`crate::backend::LoraModel`]) trains LoRA and QLoRA only, through the fused
//! kernels or their CPU reference.
//!
//! The backward, with `dy` the gradient of the layer output (it becomes the gradient of the
//! layer input in place):
//! ```text
//! dh = proj^T(down, h, out^T(1, dy))          dgate, dup = swiglu^T(gate, up, dh)
//! dxn = proj^T(gate, xn2, dgate) + proj^T(up, xn2, dup)
//! dy += rmsnorm^T(x_mid, dxn)                  (dy is now the gradient of x_mid)
//! dattn = proj^T(o, attn, out^T(0, dy))        dq, dk, dv = attention^T(dattn)
//! dq, dk = rope^T(dq), rope^T(dk)
//! dxn = proj^T(q, xn1, dq) + proj^T(k, xn1, dk) + proj^T(v, xn1, dv)
//! dy += rmsnorm^T(x, dxn)                      (dy is now the gradient of x)
//! ```
//! each `proj^T` adding into the runner's parameter gradients where it trains any.

use qadapt::Result;
use qadapt::ops::Accumulate;

use crate::weights::Proj;

/// A layer's two RMSNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Before attention (`input_layernorm`).
    Input,
    /// Before the MLP (`post_attention_layernorm`).
    Post,
}

/// The Houlsby site of a sublayer's output projection: 0 after attention (`o_proj`), 1 after
/// the MLP (`down_proj`).
pub fn site(p: Proj) -> usize {
    usize::from(p == Proj::Down)
}

/// The ops of one decoder layer's forward, as one runner computes them.
pub trait LayerRun {
    /// An activation, `[N, width]`.
    type Act;
    /// An RMSNorm's saved `1 / rms` per token.
    type Stats;
    /// What attention keeps for its backward (probabilities, log-sum-exps, or nothing).
    type Att;

    /// `rmsnorm(x)` with layer `l`'s weight of `norm`, and its statistics.
    fn rmsnorm(&mut self, l: usize, norm: Norm, x: &Self::Act) -> Result<(Self::Act, Self::Stats)>;
    /// `x W^T` for projection `p` of layer `l`, with the runner's adapter on it.
    fn project(&mut self, l: usize, p: Proj, x: &Self::Act) -> Result<Self::Act>;
    /// Rotates the queries and keys at their positions.
    fn rope(&mut self, l: usize, q: &mut Self::Act, k: &mut Self::Act) -> Result<()>;
    /// Attention of the (rotated) queries over the keys and values: the saved state and the
    /// output, `[N, heads * D]`.
    fn attention(
        &mut self,
        l: usize,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
    ) -> Result<(Self::Att, Self::Act)>;
    /// `resid + out(x Wp^T)` for a sublayer's output projection `p` (`o_proj` or `down_proj`).
    fn residual(
        &mut self,
        l: usize,
        p: Proj,
        x: &Self::Act,
        resid: &Self::Act,
    ) -> Result<Self::Act>;
    /// `silu(gate) * up`.
    fn swiglu(&mut self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act>;
}

/// Every activation of one layer's forward (named as in the module's diagram): what its
/// backward reads.
#[derive(Debug, Clone)]
pub struct LayerActs<A, S, P> {
    pub x: A,
    pub rstd1: S,
    pub xn1: A,
    /// After RoPE.
    pub q: A,
    /// After RoPE.
    pub k: A,
    pub v: A,
    pub att: P,
    pub attn: A,
    pub x_mid: A,
    pub rstd2: S,
    pub xn2: A,
    pub gate: A,
    pub up: A,
    pub h: A,
}

/// The activations of a runner's forward.
pub type Acts<R> = LayerActs<<R as LayerRun>::Act, <R as LayerRun>::Stats, <R as LayerRun>::Att>;

/// Layer `l` on `x`: its activations and its output.
pub fn forward<R: LayerRun>(run: &mut R, l: usize, x: R::Act) -> Result<(Acts<R>, R::Act)> {
    let (xn1, rstd1) = run.rmsnorm(l, Norm::Input, &x)?;
    let mut q = run.project(l, Proj::Q, &xn1)?;
    let mut k = run.project(l, Proj::K, &xn1)?;
    let v = run.project(l, Proj::V, &xn1)?;
    run.rope(l, &mut q, &mut k)?;
    let (att, attn) = run.attention(l, &q, &k, &v)?;
    let x_mid = run.residual(l, Proj::O, &attn, &x)?;
    let (xn2, rstd2) = run.rmsnorm(l, Norm::Post, &x_mid)?;
    let gate = run.project(l, Proj::Gate, &xn2)?;
    let up = run.project(l, Proj::Up, &xn2)?;
    let h = run.swiglu(&gate, &up)?;
    let out = run.residual(l, Proj::Down, &h, &x_mid)?;
    Ok((
        LayerActs {
            x,
            rstd1,
            xn1,
            q,
            k,
            v,
            att,
            attn,
            x_mid,
            rstd2,
            xn2,
            gate,
            up,
            h,
        },
        out,
    ))
}

/// The ops of one decoder layer's backward, as one runner computes them.
pub trait LayerBackRun {
    /// An activation or its gradient.
    type Act;
    /// An RMSNorm's saved statistics.
    type Stats;
    /// Attention's saved state.
    type Att;

    /// `dx (=|+=) rmsnorm^T(x, dy)` with layer `l`'s weight of `norm` (and its weight gradient
    /// where the runner trains it).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &mut self,
        l: usize,
        norm: Norm,
        x: &Self::Act,
        rstd: &Self::Stats,
        dy: &Self::Act,
        dx: &mut Self::Act,
        acc: Accumulate,
    ) -> Result<()>;
    /// `dx (=|+=)` the input gradient of projection `p` (with its adapter) at input `x`, adding
    /// into the gradients the runner trains.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &mut self,
        l: usize,
        p: Proj,
        x: &Self::Act,
        dy: &Self::Act,
        dx: &mut Self::Act,
        acc: Accumulate,
    ) -> Result<()>;
    /// The gradient reaching projection `p`'s output from the residual gradient `dres`: `None`
    /// when `out` is the identity (it is `dres` itself), else `out^T(dres)`.
    fn out_backward(&mut self, l: usize, p: Proj, dres: &Self::Act) -> Result<Option<Self::Act>>;
    /// `dgate, dup = swiglu^T(gate, up, dh)` (overwritten).
    fn swiglu_backward(
        &mut self,
        gate: &Self::Act,
        up: &Self::Act,
        dh: &Self::Act,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
    ) -> Result<()>;
    /// `dq, dk, dv` (overwritten) of attention from `dattn`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        l: usize,
        acts: &LayerActs<Self::Act, Self::Stats, Self::Att>,
        dattn: &Self::Act,
        dq: &mut Self::Act,
        dk: &mut Self::Act,
        dv: &mut Self::Act,
    ) -> Result<()>;
    /// RoPE's transpose on the query and key gradients.
    fn rope_backward(&mut self, dq: &mut Self::Act, dk: &mut Self::Act) -> Result<()>;
}

/// The gradient buffers of a backward, reused by every layer: `[N, I]` for the MLP's, `[N, Q]`
/// and `[N, K]` for attention's, `[N, C]` for a norm's input.
#[derive(Debug)]
pub struct BackBufs<A> {
    pub dh: A,
    pub dgate: A,
    pub dup: A,
    pub dattn: A,
    pub dq: A,
    pub dk: A,
    pub dv: A,
    pub dxn: A,
}

/// Layer `l`'s backward: `dy`, the gradient of its output on entry, is the gradient of its input
/// on return.
pub fn backward<R: LayerBackRun>(
    run: &mut R,
    l: usize,
    acts: &LayerActs<R::Act, R::Stats, R::Att>,
    dy: &mut R::Act,
    b: &mut BackBufs<R::Act>,
) -> Result<()> {
    let (ow, add) = (Accumulate::Overwrite, Accumulate::Add);
    // MLP branch: dy is the gradient of the layer output (= of x_mid through the residual).
    match run.out_backward(l, Proj::Down, dy)? {
        Some(d) => run.project_backward(l, Proj::Down, &acts.h, &d, &mut b.dh, ow)?,
        None => run.project_backward(l, Proj::Down, &acts.h, dy, &mut b.dh, ow)?,
    }
    run.swiglu_backward(&acts.gate, &acts.up, &b.dh, &mut b.dgate, &mut b.dup)?;
    run.project_backward(l, Proj::Gate, &acts.xn2, &b.dgate, &mut b.dxn, ow)?;
    run.project_backward(l, Proj::Up, &acts.xn2, &b.dup, &mut b.dxn, add)?;
    run.rmsnorm_backward(l, Norm::Post, &acts.x_mid, &acts.rstd2, &b.dxn, dy, add)?;
    // Attention branch: dy is now the gradient of x_mid (= of x through the residual).
    match run.out_backward(l, Proj::O, dy)? {
        Some(d) => run.project_backward(l, Proj::O, &acts.attn, &d, &mut b.dattn, ow)?,
        None => run.project_backward(l, Proj::O, &acts.attn, dy, &mut b.dattn, ow)?,
    }
    run.attention_backward(l, acts, &b.dattn, &mut b.dq, &mut b.dk, &mut b.dv)?;
    run.rope_backward(&mut b.dq, &mut b.dk)?;
    run.project_backward(l, Proj::Q, &acts.xn1, &b.dq, &mut b.dxn, ow)?;
    run.project_backward(l, Proj::K, &acts.xn1, &b.dk, &mut b.dxn, add)?;
    run.project_backward(l, Proj::V, &acts.xn1, &b.dv, &mut b.dxn, add)?;
    run.rmsnorm_backward(l, Norm::Input, &acts.x, &acts.rstd1, &b.dxn, dy, add)
}
