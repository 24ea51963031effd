//! The model ops on a CUDA device, on device-resident buffers: the model-op kernels (`kernels/rmsnorm.cu` ... `attention.cu`)
//! behind the same signatures as the CPU references in [`crate::ops`] (same argument order, same
//! overwrite/accumulate contracts), with bf16 activations and f32 math.
//!
//! | op | CPU reference | here |
//! |---|---|---|
//! | RMSNorm | [`crate::ops::rmsnorm`] | [`rmsnorm_forward`], [`rmsnorm_backward`] (`rstd` and `dw` f32) |
//! | SwiGLU | [`crate::ops::swiglu`] | [`swiglu_forward`], [`swiglu_backward`] |
//! | dropout-mask blend | [`crate::ops::dropout::mask_mix`] | [`mask_mix`] (bit-equal to the f32 reference rounded to bf16) |
//! | RoPE | [`crate::ops::rope::RopeTable::apply`] | [`CudaRopeTable::apply`] (the same f32 table, uploaded) |
//! | embedding | [`crate::ops::embedding`] | [`embedding_forward`], [`embedding_backward`] (`dtable` f32) |
//! | cross-entropy | [`crate::ops::cross_entropy`] | [`cross_entropy_forward`], [`cross_entropy_backward`], [`cross_entropy_fused`] |
//! | LM head + cross-entropy, in row chunks | [`crate::ops::cross_entropy::lm_head`] | [`lm_head_cross_entropy`] (bf16 logits per chunk) |
//! | LM head scores (loss, argmax test per row) | [`crate::ops::cross_entropy::lm_head_scores`] | [`lm_head_scores`] |
//! | attention, scalar or on tensor cores ([`AttentionKernels`]) | [`crate::ops::attention`] | [`attention_forward`], [`attention_backward`] (saves `lse`, not `p`) |
//! | KV cache (decoding) | [`crate::ops::attention::kv_cache_write`], [`crate::ops::attention::attention_cached`] | [`kv_cache_write`], [`attention_cached`] ([`CudaCacheTokens`]) |
//!
//! Token ids and targets are host slices, as in the CPU references: they are checked against the
//! vocabulary on the host (an id out of range is [`crate::Error::Invalid`] before anything runs)
//! and uploaded with the launch. Every function checks shapes first and returns typed errors;
//! work is queued on the device's stream (only the cross-entropy mean reads back, and says so).
//!
//! Results agree with the CPU reference run in f32 on the same (bf16-valued) inputs within a few
//! bf16 ulps (each output is rounded to bf16 once); the embedding and the mask blend are
//! bit-exact. The tolerances are written in `crates/qadapt/tests/ops/model_ops_cuda.rs`.

use cudarc::driver::CudaSlice;
use half::bf16;

use super::CudaDevice;
use super::launch::{self, SwigluOut};
use crate::error::{Result, shape_err};
use crate::ops::Accumulate;
use crate::ops::attention::{AttentionShape, CacheShape};
use crate::ops::cross_entropy::{LmHeadShape, RowScore};
use crate::ops::dropout::{DropoutMask, MaskCoef};
use crate::ops::rope::{RopeDirection, RopeTable};

pub use launch::{AttentionKernels, FLASH_HEAD_DIMS};

/// `y = w * x / sqrt(mean(x^2) + eps)` row by row: `x`, `y` are `[rows, w.len()]` bf16, `rstd`
/// is `[rows]` f32 (overwritten with `1/sqrt(mean(x^2) + eps)`, saved for the backward).
pub fn rmsnorm_forward(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    eps: f64,
    y: &mut CudaSlice<bf16>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    launch::rmsnorm_forward(dev, x, w, eps as f32, y, rstd)
}

/// Backward of [`rmsnorm_forward`]: `dx` overwritten or accumulated as `acc` says (bf16), `dw`
/// (f32, `[w.len()]`) accumulated; `rstd` is what the forward saved.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<bf16>,
    dx: &mut CudaSlice<bf16>,
    acc: Accumulate,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    launch::rmsnorm_backward(dev, x, w, rstd, dy, dx, acc, dw)
}

/// `h = silu(gate) * up`, elementwise; all three have the same length.
pub fn swiglu_forward(
    dev: &CudaDevice,
    gate: &CudaSlice<bf16>,
    up: &CudaSlice<bf16>,
    h: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::swiglu(dev, gate, up, SwigluOut::Forward { h })
}

/// Backward of [`swiglu_forward`]: `dgate`, `dup` overwritten.
pub fn swiglu_backward(
    dev: &CudaDevice,
    gate: &CudaSlice<bf16>,
    up: &CudaSlice<bf16>,
    dh: &CudaSlice<bf16>,
    dgate: &mut CudaSlice<bf16>,
    dup: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::swiglu(dev, gate, up, SwigluOut::Backward { dh, dgate, dup })
}

/// [`crate::ops::dropout::mask_mix`] on bf16: out overwritten, f32 arithmetic, one rounding.
pub fn mask_mix(
    dev: &CudaDevice,
    mask: DropoutMask,
    a: &CudaSlice<bf16>,
    ca: MaskCoef,
    b: Option<(&CudaSlice<bf16>, MaskCoef)>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::mask_mix(dev, mask, a, ca, b, out)
}

/// A [`RopeTable`] on the device: the f32 cos and sin `[seq, head_dim / 2]` the CPU reference
/// builds, uploaded once.
#[derive(Debug)]
pub struct CudaRopeTable {
    seq: usize,
    head_dim: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl CudaRopeTable {
    /// Uploads `table` (build it with [`RopeTable::new`] and [`crate::ops::rope::inv_freq`]).
    pub fn new(dev: &CudaDevice, table: &RopeTable<f32>) -> Result<CudaRopeTable> {
        let want = table.seq * table.head_dim / 2;
        for (what, v) in [("cos", &table.cos), ("sin", &table.sin)] {
            if v.len() != want {
                return Err(shape_err(
                    "rope table (cuda)",
                    format!("{what} of {want} elements"),
                    v.len(),
                ));
            }
        }
        Ok(CudaRopeTable {
            seq: table.seq,
            head_dim: table.head_dim,
            cos: dev.upload(&table.cos)?,
            sin: dev.upload(&table.sin)?,
        })
    }

    /// Positions covered.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Head size D.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotates every head of `x [batch * seq, heads * head_dim]` in place (token n is at position
    /// `n % seq`); [`RopeDirection::Backward`] applies the transpose (the gradient).
    pub fn apply(
        &self,
        dev: &CudaDevice,
        x: &mut CudaSlice<bf16>,
        heads: usize,
        dir: RopeDirection,
    ) -> Result<()> {
        launch::rope(
            dev,
            x,
            &self.cos,
            &self.sin,
            self.seq,
            self.head_dim,
            heads,
            dir,
        )
    }
}

/// `out [ids.len(), dim] = table[ids]`; `table` is `[vocab, dim]` (bit-exact copy).
pub fn embedding_forward(
    dev: &CudaDevice,
    ids: &[u32],
    table: &CudaSlice<bf16>,
    vocab: usize,
    dim: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::embedding_forward(dev, ids, table, vocab, dim, out)
}

/// `dtable[ids[n]] += dout[n]` for every n (f32, accumulated). Deterministic and bit-exact with
/// the CPU reference: each row of `dtable` gets its tokens' rows added one at a time in ascending
/// n, without atomics.
pub fn embedding_backward(
    dev: &CudaDevice,
    ids: &[u32],
    dout: &CudaSlice<bf16>,
    vocab: usize,
    dim: usize,
    dtable: &mut CudaSlice<f32>,
) -> Result<()> {
    launch::embedding_backward(dev, ids, dout, vocab, dim, dtable)
}

/// The number of rows with a target, refusing a batch without any (as the CPU reference does).
fn count_targets(op: &'static str, targets: &[Option<u32>], vocab: usize) -> Result<usize> {
    let (_, n) = launch::targets_i32(op, targets, vocab)?;
    if n == 0 {
        return Err(shape_err(op, "at least one row with a target", "none"));
    }
    Ok(n)
}

/// The fused cross-entropy: `row_loss [rows]` (f32) overwritten with `logsumexp(z[n]) - z[n, t[n]]`
/// (0 for ignored rows) and, when given, `dlogits` (bf16 `[rows, vocab]`) overwritten with the
/// gradient of `dloss * mean loss` (0 for ignored rows). The mean is [`cross_entropy_mean`].
pub fn cross_entropy_fused(
    dev: &CudaDevice,
    logits: &CudaSlice<bf16>,
    targets: &[Option<u32>],
    vocab: usize,
    dloss: f32,
    row_loss: &mut CudaSlice<f32>,
    dlogits: Option<&mut CudaSlice<bf16>>,
) -> Result<()> {
    const OP: &str = "cross_entropy (cuda)";
    let n = count_targets(OP, targets, vocab)?;
    launch::cross_entropy(
        dev,
        logits,
        targets,
        vocab,
        dloss / n as f32,
        row_loss,
        dlogits,
    )
}

/// The mean of `row_loss` over the rows with a target, summed in f32 in row order as the CPU
/// reference does. Reads `row_loss` back (synchronizes the stream).
pub fn cross_entropy_mean(
    dev: &CudaDevice,
    row_loss: &CudaSlice<f32>,
    targets: &[Option<u32>],
) -> Result<f32> {
    const OP: &str = "cross_entropy mean (cuda)";
    if row_loss.len() != targets.len() {
        return Err(shape_err(
            OP,
            format!("row_loss of {} elements", targets.len()),
            row_loss.len(),
        ));
    }
    let n = targets.iter().filter(|t| t.is_some()).count();
    if n == 0 {
        return Err(shape_err(OP, "at least one row with a target", "none"));
    }
    let mut total = 0f32;
    for (v, t) in dev.download(row_loss)?.into_iter().zip(targets) {
        if t.is_some() {
            total += v;
        }
    }
    Ok(total / n as f32)
}

/// The mean loss over the rows of `logits [targets.len(), vocab]` that have a target (reads the
/// per-row losses back: synchronizes the stream).
pub fn cross_entropy_forward(
    dev: &CudaDevice,
    logits: &CudaSlice<bf16>,
    targets: &[Option<u32>],
    vocab: usize,
) -> Result<f32> {
    count_targets("cross_entropy forward (cuda)", targets, vocab)?;
    let mut row_loss = dev.zeros::<f32>(targets.len())?;
    cross_entropy_fused(dev, logits, targets, vocab, 0.0, &mut row_loss, None)?;
    cross_entropy_mean(dev, &row_loss, targets)
}

/// `dlogits` (overwritten) of `dloss * loss`, as [`crate::ops::cross_entropy::backward`].
pub fn cross_entropy_backward(
    dev: &CudaDevice,
    logits: &CudaSlice<bf16>,
    targets: &[Option<u32>],
    vocab: usize,
    dloss: f32,
    dlogits: &mut CudaSlice<bf16>,
) -> Result<()> {
    count_targets("cross_entropy backward (cuda)", targets, vocab)?;
    let mut row_loss = dev.zeros::<f32>(targets.len())?;
    cross_entropy_fused(
        dev,
        logits,
        targets,
        vocab,
        dloss,
        &mut row_loss,
        Some(dlogits),
    )
}

/// The mean cross-entropy of `z = xn H^T` against `targets` without the full logits: the head
/// GEMM, the fused cross-entropy and (with `dxn`) the input gradient `dxn = dz H` of
/// `dloss * loss` run `chunk_rows` token rows at a time, so only `chunk_rows x vocab` bf16 logits
/// and as many gradients exist at once ([`crate::plan::loss_chunk_rows`] picks a chunk). `xn`
/// `[rows, hidden]`, the head `[vocab, hidden]` (frozen: no gradient), `dxn` overwritten. As
/// [`crate::ops::cross_entropy::lm_head`]; reads the per-row losses back (synchronizes).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy(
    dev: &CudaDevice,
    xn: &CudaSlice<bf16>,
    head: &CudaSlice<bf16>,
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
    dloss: f32,
    dxn: Option<&mut CudaSlice<bf16>>,
) -> Result<f32> {
    const OP: &str = "lm_head cross_entropy (cuda)";
    let LmHeadShape {
        rows,
        hidden,
        vocab,
    } = shape;
    if targets.len() != rows {
        return Err(shape_err(OP, format!("{rows} targets"), targets.len()));
    }
    let n = count_targets(OP, targets, vocab)?;
    let mut row_loss = dev.zeros::<f32>(rows)?;
    launch::lm_head_cross_entropy(
        dev,
        xn,
        head,
        (rows, hidden, vocab),
        targets,
        chunk_rows,
        dloss / n as f32,
        &mut row_loss,
        dxn,
        None,
    )?;
    cross_entropy_mean(dev, &row_loss, targets)
}

/// Each row's loss and argmax test under `z = xn H^T`, `chunk_rows` rows at a time, as
/// [`crate::ops::cross_entropy::lm_head_scores`]: the kernel tests the target against every
/// bf16 logit in the pass that finds the row's maximum. Reads the scores back (synchronizes).
pub fn lm_head_scores(
    dev: &CudaDevice,
    xn: &CudaSlice<bf16>,
    head: &CudaSlice<bf16>,
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
) -> Result<Vec<RowScore<f32>>> {
    const OP: &str = "lm_head scores (cuda)";
    let rows = shape.rows;
    if targets.len() != rows {
        return Err(shape_err(OP, format!("{rows} targets"), targets.len()));
    }
    count_targets(OP, targets, shape.vocab)?;
    let mut row_loss = dev.zeros::<f32>(rows)?;
    let mut top = dev.zeros::<u32>(rows)?;
    launch::lm_head_cross_entropy(
        dev,
        xn,
        head,
        (rows, shape.hidden, shape.vocab),
        targets,
        chunk_rows,
        0.0,
        &mut row_loss,
        None,
        Some(&mut top),
    )?;
    let loss = dev.download(&row_loss)?;
    let top = dev.download(&top)?;
    Ok(loss
        .into_iter()
        .zip(top)
        .map(|(loss, top)| RowScore {
            loss,
            top: top != 0,
        })
        .collect())
}

/// Packed rows' sequence starts on the device: the `segments` of [`crate::ops::attention`]
/// (query i of a row sees only the keys of its own sequence), checked once when made
/// ([`crate::ops::attention::check_segments`]) and then read by every attention launch of the
/// batch.
#[derive(Debug)]
pub struct CudaSegments {
    pub(crate) starts: CudaSlice<u32>,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
}

impl CudaSegments {
    /// Uploads `starts [batch * seq]` after checking them.
    pub fn new(dev: &CudaDevice, batch: usize, seq: usize, starts: &[u32]) -> Result<Self> {
        crate::ops::attention::check_segments("attention segments (cuda)", batch, seq, starts)?;
        Ok(CudaSegments {
            starts: dev.upload(starts)?,
            batch,
            seq,
        })
    }
}

/// One call's new tokens of a KV cache on the device: each token's row and absolute position
/// ([`crate::ops::attention::CacheShape`]), checked against the shape when made and then read
/// by every layer's [`kv_cache_write`] and [`attention_cached`].
#[derive(Debug)]
pub struct CudaCacheTokens {
    pub(crate) row: CudaSlice<u32>,
    pub(crate) pos: CudaSlice<u32>,
    pub(crate) shape: CacheShape,
}

impl CudaCacheTokens {
    /// Uploads `row` and `pos` after checking them against `shape`.
    pub fn new(dev: &CudaDevice, shape: CacheShape, row: &[u32], pos: &[u32]) -> Result<Self> {
        let n = shape.check_tokens("kv cache tokens (cuda)", row, pos)?;
        if n == 0 {
            return Err(shape_err("kv cache tokens (cuda)", "at least one token", 0));
        }
        Ok(CudaCacheTokens {
            row: dev.upload(row)?,
            pos: dev.upload(pos)?,
            shape,
        })
    }

    /// New tokens of the call.
    pub fn len(&self) -> usize {
        self.row.len()
    }

    /// Whether the call has no token (never: [`Self::new`] refuses it).
    pub fn is_empty(&self) -> bool {
        self.row.is_empty()
    }
}

/// `kc[row[t], pos[t]] = k[t]`, `vc[row[t], pos[t]] = v[t]` for the tokens of `tokens`
/// (`k`, `v [tokens, kv_heads * head_dim]`, the caches `[batch, cap, kv_heads * head_dim]`), as
/// [`crate::ops::attention::kv_cache_write`].
pub fn kv_cache_write(
    dev: &CudaDevice,
    tokens: &CudaCacheTokens,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    kc: &mut CudaSlice<bf16>,
    vc: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::kv_cache_write(dev, tokens, k, v, kc, vc)
}

/// Each token's attention over its row's cache up to its own position (`out [tokens, heads *
/// head_dim]` overwritten), as [`crate::ops::attention::attention_cached`]; the tokens' keys and
/// values must have been written ([`kv_cache_write`]) first.
pub fn attention_cached(
    dev: &CudaDevice,
    tokens: &CudaCacheTokens,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::attention_cached(dev, tokens, q, kc, vc, out)
}

/// Causal grouped-query attention forward (layouts of [`crate::ops::attention`]) on `kernels`:
/// `out [batch * seq, heads * head_dim]` overwritten, and `lse [batch, heads, seq]` (f32)
/// overwritten with each query row's log-sum-exp of its scaled scores. The CPU reference saves
/// the probabilities `p [batch, heads, seq, seq]`; the kernels save `lse` instead (seq times
/// smaller) and recompute the probabilities in the backward; neither family allocates a
/// `[seq, seq]` buffer. Packed rows attend within their `segments`. No padding mask and no
/// prefix keys/values.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    dev: &CudaDevice,
    kernels: AttentionKernels,
    sh: AttentionShape,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    segments: Option<&CudaSegments>,
    lse: &mut CudaSlice<f32>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::attention_forward(kernels, dev, sh, q, k, v, segments, lse, out)
}

/// Backward of [`attention_forward`] on `kernels`: `dq`, `dk`, `dv` overwritten (a kv head sums
/// the gradients of all its query heads; the flash kernels do it in registers: deterministic,
/// no atomics); `lse` is what the forward saved. Both need `delta = rowsum(P * dP)` per query
/// row and allocate a `[batch, heads, seq]` f32 scratch for it. The scalar kernels recompute it
/// and ignore `out`. The flash kernels, given the forward's `out`, take
/// `delta = rowsum(dout * out)` (equal up to the bf16 rounding of `out`) at the cost of one
/// read of `out`; with `None` (a caller that kept only `lse`) a kernel recomputes
/// `rowsum(P * dP)` block by block, about as costly as the dq kernel's S and dP again.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dev: &CudaDevice,
    kernels: AttentionKernels,
    sh: AttentionShape,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    segments: Option<&CudaSegments>,
    out: Option<&CudaSlice<bf16>>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    dq: &mut CudaSlice<bf16>,
    dk: &mut CudaSlice<bf16>,
    dv: &mut CudaSlice<bf16>,
) -> Result<()> {
    launch::attention_backward(
        kernels, dev, sh, q, k, v, segments, out, lse, dout, dq, dk, dv,
    )
}
