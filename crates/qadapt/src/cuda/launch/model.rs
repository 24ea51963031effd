//! Model-op launches (`kernels/{rmsnorm,swiglu,dropout,rope,embedding,cross_entropy,attention,
//! flash_attention}.cu`): RMSNorm, SwiGLU, the dropout-mask blend, RoPE, embedding, cross-entropy,
//! attention (scalar, and on tensor cores).
//!
//! Every function checks what its kernel's memory accesses depend on before it launches: each
//! buffer's length against the shape (so every index the kernel forms is in bounds), that every
//! buffer lives on this device, the 32-bit ranges of the scalar fields, and, for the 16-byte path
//! (`QADAPT_MODEL_VEC`), the alignment of every address and the divisibility of the row length.
//! Index arrays the kernels follow (token ids, targets, the grouping of the embedding backward)
//! are built and checked here on the host, then uploaded, so no device data decides an address
//! that was not checked.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use qadapt_kernels::{ffi, kernels};

use super::{aligned16, blas, launch, on_device};
use crate::cuda::ops::{CudaCacheTokens, CudaSegments};
use crate::cuda::{CudaDevice, Op};
use crate::error::{Result, invalid, shape_err};
use crate::ops::Accumulate;
use crate::ops::attention::AttentionShape;
use crate::ops::dropout::{DropoutMask, MaskCoef};
use crate::ops::rope::RopeDirection;
use crate::plan::{self, DeviceProps, LaunchPlan, ModelWork};

fn need<T>(op: &'static str, what: &str, s: &CudaSlice<T>, len: usize) -> Result<()> {
    if s.len() != len {
        return Err(shape_err(op, format!("{what} of {len} elements"), s.len()));
    }
    Ok(())
}

fn u32_of(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(op, format!("{what} = {v} does not fit in 32 bits")))
}

/// The product of `parts`, refused when it overflows (lengths are compared with it).
fn prod(op: &'static str, parts: &[usize]) -> Result<usize> {
    parts
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| invalid(op, format!("the shape {parts:?} overflows")))
}

/// `QADAPT_MODEL_VEC` when `row % 8 == 0` and every address is 16-byte aligned, else 0.
fn vec_flag(row: usize, addrs: &[u64]) -> u32 {
    if row.is_multiple_of(8) && addrs.iter().all(|a| a.is_multiple_of(16)) {
        ffi::QADAPT_MODEL_VEC
    } else {
        0
    }
}

/// The rows of an RMSNorm over `x` of `len` values with a weight of `dim`: `len` a positive
/// multiple of `dim`; returns `(rows, dim)`.
fn rmsnorm_rows(op: &'static str, len: usize, dim: usize) -> Result<(usize, usize)> {
    if dim == 0 || len == 0 || !len.is_multiple_of(dim) {
        return Err(shape_err(op, format!("x of rows * {dim} elements"), len));
    }
    Ok((len / dim, dim))
}

/// `rmsnorm_fwd_bf16`: `y` and `rstd` overwritten. `x`, `y` are `[rows, dim]`, `w` is `[dim]`.
pub(crate) fn rmsnorm_forward(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    eps: f32,
    y: &mut CudaSlice<bf16>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "rmsnorm forward (cuda)";
    let (rows, dim) = rmsnorm_rows(OP, x.len(), w.len())?;
    need(OP, "y", y, x.len())?;
    need(OP, "rstd", rstd, rows)?;
    let dim32 = u32_of(OP, "dim", dim)?;
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "w", w)?;
    on_device(OP, dev, "y", y)?;
    on_device(OP, dev, "rstd", rstd)?;
    let plan = plan::model_op(rows as u64, ModelWork::WarpPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (xp, _g1) = x.device_ptr(&stream);
    let (wp, _g2) = w.device_ptr(&stream);
    let (yp, _g3) = y.device_ptr_mut(&stream);
    let (rp, _g4) = rstd.device_ptr_mut(&stream);
    let args = ffi::QadaptRmsNormArgs {
        x: xp,
        w: wp,
        rstd: rp,
        y: yp,
        rows: rows as u64,
        dim: dim32,
        eps,
        flags: vec_flag(dim, &[xp, wp, yp]),
        ..Default::default()
    };
    // SAFETY: QadaptRmsNormArgs is what rmsnorm_fwd_bf16 takes; x and y hold rows * dim bf16, w
    // dim bf16 and rstd rows f32 (checked above, all on this device), so every row < rows and
    // column < dim the kernel forms is in bounds; QADAPT_MODEL_VEC is set only when dim % 8 == 0
    // and x, w, y are 16-byte aligned; dy, dx, dw are 0 and unused by this kernel.
    unsafe { launch(dev, kernels::RMSNORM_FWD_BF16, plan, &args) }
}

/// `rmsnorm_bwd_dx_bf16`, then `rmsnorm_bwd_dw_bf16` and `rmsnorm_bwd_dw_reduce` (through an
/// f32 scratch of row-chunk partial sums): `dx` overwritten or accumulated as `acc` says, `dw`
/// accumulated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rmsnorm_backward(
    dev: &CudaDevice,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    rstd: &CudaSlice<f32>,
    dy: &CudaSlice<bf16>,
    dx: &mut CudaSlice<bf16>,
    acc: Accumulate,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "rmsnorm backward (cuda)";
    let (rows, dim) = rmsnorm_rows(OP, x.len(), w.len())?;
    need(OP, "rstd", rstd, rows)?;
    need(OP, "dy", dy, x.len())?;
    need(OP, "dx", dx, x.len())?;
    need(OP, "dw", dw, dim)?;
    let dim32 = u32_of(OP, "dim", dim)?;
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "w", w)?;
    on_device(OP, dev, "rstd", rstd)?;
    on_device(OP, dev, "dy", dy)?;
    on_device(OP, dev, "dx", dx)?;
    on_device(OP, dev, "dw", dw)?;
    let props = dev.props();
    let plan_dx = plan::model_op(rows as u64, ModelWork::WarpPerItem, &props)?;
    let plan_dw = plan::rmsnorm_dw(rows as u64, dim as u64, &props)?;
    let mut partial = dev.zeros::<f32>(plan_dw.chunks as usize * dim)?;
    let stream = dev.stream().clone();
    let (xp, _g1) = x.device_ptr(&stream);
    let (wp, _g2) = w.device_ptr(&stream);
    let (rp, _g3) = rstd.device_ptr(&stream);
    let (dyp, _g4) = dy.device_ptr(&stream);
    let (dxp, _g5) = dx.device_ptr_mut(&stream);
    let (dwp, _g6) = dw.device_ptr_mut(&stream);
    let (pp, _g7) = partial.device_ptr_mut(&stream);
    let args = ffi::QadaptRmsNormArgs {
        x: xp,
        w: wp,
        rstd: rp,
        y: 0,
        dy: dyp,
        dx: dxp,
        dw: dwp,
        partial: pp,
        rows: rows as u64,
        dim: dim32,
        eps: 0.0,
        accumulate: match acc {
            Accumulate::Overwrite => ffi::QADAPT_ACC_OVERWRITE,
            Accumulate::Add => ffi::QADAPT_ACC_ADD,
        },
        flags: vec_flag(dim, &[xp, wp, dyp, dxp]),
        chunk_rows: plan_dw.chunk_rows,
        chunks: plan_dw.chunks,
    };
    // SAFETY: QadaptRmsNormArgs is what rmsnorm_bwd_dx_bf16 takes; x, dy, dx hold rows * dim
    // bf16, w dim bf16, rstd rows f32 (checked above, all on this device); the kernel reads and
    // writes rows < rows, columns < dim only; QADAPT_MODEL_VEC only with dim % 8 == 0 and x, w,
    // dy, dx 16-byte aligned; y is 0 and unused.
    unsafe { launch(dev, kernels::RMSNORM_BWD_DX_BF16, plan_dx, &args) }?;
    // SAFETY: the same struct for rmsnorm_bwd_dw_bf16, which reads x, dy (rows * dim bf16) and
    // rstd (rows f32) for rows < rows and writes partial[chunk * dim + col] for chunk < chunks,
    // col < dim (partial allocated above with chunks * dim f32; the plan's chunks * chunk_rows
    // covers the rows); 2- and 4-byte accesses, and its 8 x 32 shared array fits the plan's 256
    // threads.
    unsafe { launch(dev, kernels::RMSNORM_BWD_DW_BF16, plan_dw.partial, &args) }?;
    // SAFETY: the same struct for rmsnorm_bwd_dw_reduce, queued after the partial sums on the same
    // stream; it reads partial[c * dim + col] for c < chunks, col < dim and adds into dw[col]
    // (dw holds dim f32, checked above).
    unsafe { launch(dev, kernels::RMSNORM_BWD_DW_REDUCE, plan_dw.reduce, &args) }
}

/// The SwiGLU buffers of one launch: forward (`h`) or backward (`dh`, `dgate`, `dup`).
pub(crate) enum SwigluOut<'a> {
    Forward {
        h: &'a mut CudaSlice<bf16>,
    },
    Backward {
        dh: &'a CudaSlice<bf16>,
        dgate: &'a mut CudaSlice<bf16>,
        dup: &'a mut CudaSlice<bf16>,
    },
}

/// `swiglu_fwd_bf16` or `swiglu_bwd_bf16`; every output overwritten.
pub(crate) fn swiglu(
    dev: &CudaDevice,
    gate: &CudaSlice<bf16>,
    up: &CudaSlice<bf16>,
    out: SwigluOut<'_>,
) -> Result<()> {
    const OP: &str = "swiglu (cuda)";
    let n = gate.len();
    if n == 0 {
        return Err(invalid(OP, "no elements"));
    }
    need(OP, "up", up, n)?;
    on_device(OP, dev, "gate", gate)?;
    on_device(OP, dev, "up", up)?;
    let stream = dev.stream().clone();
    let (gp, _g1) = gate.device_ptr(&stream);
    let (upp, _g2) = up.device_ptr(&stream);
    match out {
        SwigluOut::Forward { h } => {
            need(OP, "h", h, n)?;
            on_device(OP, dev, "h", h)?;
            let (hp, _g3) = h.device_ptr_mut(&stream);
            let flags = vec_flag(8, &[gp, upp, hp]);
            let items = if flags != 0 { n.div_ceil(8) } else { n };
            let plan = plan::model_op(items as u64, ModelWork::ThreadPerItem, &dev.props())?;
            let args = ffi::QadaptSwigluArgs {
                gate: gp,
                up: upp,
                h: hp,
                n: n as u64,
                flags,
                ..Default::default()
            };
            // SAFETY: QadaptSwigluArgs is what swiglu_fwd_bf16 takes; gate, up and h hold n bf16
            // each (checked above, all on this device) and the kernel touches indices < n only
            // (full groups of 8 below n, then the tail one by one); QADAPT_MODEL_VEC only when
            // all three addresses are 16-byte aligned.
            unsafe { launch(dev, kernels::SWIGLU_FWD_BF16, plan, &args) }
        }
        SwigluOut::Backward { dh, dgate, dup } => {
            need(OP, "dh", dh, n)?;
            need(OP, "dgate", dgate, n)?;
            need(OP, "dup", dup, n)?;
            on_device(OP, dev, "dh", dh)?;
            on_device(OP, dev, "dgate", dgate)?;
            on_device(OP, dev, "dup", dup)?;
            let (dhp, _g3) = dh.device_ptr(&stream);
            let (dgp, _g4) = dgate.device_ptr_mut(&stream);
            let (dup_p, _g5) = dup.device_ptr_mut(&stream);
            let flags = vec_flag(8, &[gp, upp, dhp, dgp, dup_p]);
            let items = if flags != 0 { n.div_ceil(8) } else { n };
            let plan = plan::model_op(items as u64, ModelWork::ThreadPerItem, &dev.props())?;
            let args = ffi::QadaptSwigluArgs {
                gate: gp,
                up: upp,
                h: 0,
                dh: dhp,
                dgate: dgp,
                dup: dup_p,
                n: n as u64,
                flags,
                reserved: 0,
            };
            // SAFETY: QadaptSwigluArgs is what swiglu_bwd_bf16 takes; gate, up, dh, dgate, dup
            // hold n bf16 each (checked above, all on this device), the kernel touches indices
            // < n only; QADAPT_MODEL_VEC only when all five addresses are 16-byte aligned.
            unsafe { launch(dev, kernels::SWIGLU_BWD_BF16, plan, &args) }
        }
    }
}

/// `mask_mix_bf16`: `out[j] = ca(j) a[j] + cb(j) b[j]` with the coefficients `mask` picks for
/// element `j` (no `b` term when `b` is `None`), overwritten; `a`, `b`, `out` of one length.
pub(crate) fn mask_mix(
    dev: &CudaDevice,
    mask: DropoutMask,
    a: &CudaSlice<bf16>,
    ca: MaskCoef,
    b: Option<(&CudaSlice<bf16>, MaskCoef)>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    const OP: &str = "mask mix (cuda)";
    let n = a.len();
    if n == 0 {
        return Err(invalid(OP, "no elements"));
    }
    need(OP, "out", out, n)?;
    on_device(OP, dev, "a", a)?;
    on_device(OP, dev, "out", out)?;
    if let Some((b, _)) = b {
        need(OP, "b", b, n)?;
        on_device(OP, dev, "b", b)?;
    }
    let cb = b.map_or(MaskCoef::new(0.0, 0.0), |(_, cb)| cb);
    let stream = dev.stream().clone();
    let (ap, _g1) = a.device_ptr(&stream);
    let b_ptr = b.map(|(b, _)| b.device_ptr(&stream));
    let bp = b_ptr.as_ref().map_or(0, |(p, _)| *p);
    let (outp, _g3) = out.device_ptr_mut(&stream);
    let flags = match b_ptr {
        Some(_) => vec_flag(8, &[ap, bp, outp]),
        None => vec_flag(8, &[ap, outp]),
    };
    let items = if flags != 0 { n.div_ceil(8) } else { n };
    let plan = plan::model_op(items as u64, ModelWork::ThreadPerItem, &dev.props())?;
    let args = ffi::QadaptMaskMixArgs {
        a: ap,
        b: bp,
        out: outp,
        n: n as u64,
        base: mask.base,
        threshold: mask.threshold,
        a_keep: ca.keep,
        a_drop: ca.drop,
        b_keep: cb.keep,
        b_drop: cb.drop,
        flags,
        reserved: 0,
    };
    // SAFETY: QadaptMaskMixArgs is what mask_mix_bf16 takes; a, out and b when present hold n
    // bf16 each (checked above, all on this device; the guards _g1, b_ptr, _g3 live until the
    // launch is queued), b is 0 only when absent, and then the kernel never reads it; the kernel
    // touches indices < n only (full groups of 8 below n, then the tail one by one), and sets
    // QADAPT_MODEL_VEC only when every address it reads or writes is 16-byte aligned.
    unsafe { launch(dev, kernels::MASK_MIX_BF16, plan, &args) }
}

/// `rope_bf16`: rotates `x [rows, heads * head_dim]` in place with the f32 tables
/// `cos`, `sin [seq, head_dim / 2]`; `rows` must be a multiple of `seq`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    dev: &CudaDevice,
    x: &mut CudaSlice<bf16>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    seq: usize,
    head_dim: usize,
    heads: usize,
    dir: RopeDirection,
) -> Result<()> {
    const OP: &str = "rope (cuda)";
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(
            OP,
            format!("head_dim {head_dim} must be even and positive"),
        ));
    }
    let row = prod(OP, &[heads, head_dim])?;
    if row == 0 || seq == 0 || x.is_empty() || !x.len().is_multiple_of(prod(OP, &[row, seq])?) {
        return Err(shape_err(
            OP,
            format!("x of batch * {seq} * {row} elements"),
            x.len(),
        ));
    }
    let table = prod(OP, &[seq, head_dim])? / 2;
    need(OP, "cos", cos, table)?;
    need(OP, "sin", sin, table)?;
    let rows = x.len() / row;
    let args_seq = u32_of(OP, "seq", seq)?;
    let args_heads = u32_of(OP, "heads", heads)?;
    let args_dim = u32_of(OP, "head_dim", head_dim)?;
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "cos", cos)?;
    on_device(OP, dev, "sin", sin)?;
    let plan = plan::model_op((rows * heads) as u64, ModelWork::WarpPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (xp, _g1) = x.device_ptr_mut(&stream);
    let (cp, _g2) = cos.device_ptr(&stream);
    let (sp, _g3) = sin.device_ptr(&stream);
    let args = ffi::QadaptRopeArgs {
        x: xp,
        cos: cp,
        sin: sp,
        rows: rows as u64,
        seq: args_seq,
        heads: args_heads,
        head_dim: args_dim,
        direction: match dir {
            RopeDirection::Forward => ffi::QADAPT_ROPE_FORWARD,
            RopeDirection::Backward => ffi::QADAPT_ROPE_BACKWARD,
        },
    };
    // SAFETY: QadaptRopeArgs is what rope_bf16 takes; x holds rows * heads * head_dim bf16 and
    // cos, sin hold seq * head_dim / 2 f32 (checked above, all on this device); the kernel
    // touches x[(row * heads + h) * head_dim + i] for i < head_dim and the tables at
    // (row % seq) * head_dim / 2 + i for i < head_dim / 2, all in bounds; 2- and 4-byte accesses.
    unsafe { launch(dev, kernels::ROPE_BF16, plan, &args) }
}

/// Checks `ids` against the vocabulary (the first bad one is reported, as the CPU does).
fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(invalid(
            op,
            format!(
                "token id {} at {i} is outside the vocabulary of {vocab}",
                ids[i]
            ),
        )),
    }
}

/// The checks of both embedding launches: at least one token and a non-empty row, every id
/// `< vocab` ([`check_ids`]), the (gradient) table `[vocab, dim]` and the token rows
/// `[ids.len(), dim]` on this device, and the sizes the kernels take in 32 bits; returns
/// `(vocab, dim)` as the kernels take them.
fn embedding_checks<T, U>(
    op: &'static str,
    dev: &CudaDevice,
    ids: &[u32],
    (vocab, dim): (usize, usize),
    (table_name, table): (&str, &CudaSlice<T>),
    (rows_name, rows): (&str, &CudaSlice<U>),
) -> Result<(u32, u32)> {
    if ids.is_empty() || dim == 0 {
        return Err(invalid(op, "no tokens or an empty embedding"));
    }
    need(op, table_name, table, prod(op, &[vocab, dim])?)?;
    need(op, rows_name, rows, prod(op, &[ids.len(), dim])?)?;
    check_ids(op, ids, vocab)?;
    u32_of(op, "tokens", ids.len())?;
    on_device(op, dev, table_name, table)?;
    on_device(op, dev, rows_name, rows)?;
    Ok((u32_of(op, "vocab", vocab)?, u32_of(op, "dim", dim)?))
}

/// `embedding_fwd_bf16`: `out [ids.len(), dim] = table[ids]`, overwritten.
pub(crate) fn embedding_forward(
    dev: &CudaDevice,
    ids: &[u32],
    table: &CudaSlice<bf16>,
    vocab: usize,
    dim: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    const OP: &str = "embedding forward (cuda)";
    let (vocab32, dim32) =
        embedding_checks(OP, dev, ids, (vocab, dim), ("table", table), ("out", out))?;
    let ids_dev = dev.upload(ids)?;
    let plan = plan::model_op(ids.len() as u64, ModelWork::WarpPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (ip, _g1) = ids_dev.device_ptr(&stream);
    let (tp, _g2) = table.device_ptr(&stream);
    let (op, _g3) = out.device_ptr_mut(&stream);
    let args = ffi::QadaptEmbeddingArgs {
        ids: ip,
        table: tp,
        out: op,
        tokens: ids.len() as u64,
        vocab: vocab32,
        dim: dim32,
        flags: vec_flag(dim, &[tp, op]),
        ..Default::default()
    };
    // SAFETY: QadaptEmbeddingArgs is what embedding_fwd_bf16 takes; ids (uploaded above from the
    // host slice, every id < vocab checked) holds `tokens` u32, table vocab * dim bf16 and out
    // tokens * dim bf16 (checked above, all on this device), so every row copied is in bounds
    // (the kernel also skips an id >= vocab); QADAPT_MODEL_VEC only with dim % 8 == 0 and table,
    // out 16-byte aligned.
    unsafe { launch(dev, kernels::EMBEDDING_FWD_BF16, plan, &args) }
}

/// The tokens grouped by id for the deterministic scatter-add: the distinct ids ascending, the
/// start of each group (plus the end), and the token indices of each group in ascending order
/// (a stable counting sort).
pub(crate) fn group_by_id(ids: &[u32], vocab: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut count = vec![0u32; vocab];
    for &t in ids {
        count[t as usize] += 1;
    }
    let mut uniq = Vec::new();
    let mut offsets = vec![0u32];
    let mut start = vec![0u32; vocab];
    let mut total = 0u32;
    for (v, &c) in count.iter().enumerate() {
        if c > 0 {
            uniq.push(v as u32);
            start[v] = total;
            total += c;
            offsets.push(total);
        }
    }
    let mut order = vec![0u32; ids.len()];
    for (n, &t) in ids.iter().enumerate() {
        let s = &mut start[t as usize];
        order[*s as usize] = n as u32;
        *s += 1;
    }
    (uniq, offsets, order)
}

/// `embedding_bwd_bf16`: `dtable[ids[n]] += dout[n]` for every n, f32, in ascending n per id.
pub(crate) fn embedding_backward(
    dev: &CudaDevice,
    ids: &[u32],
    dout: &CudaSlice<bf16>,
    vocab: usize,
    dim: usize,
    dtable: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "embedding backward (cuda)";
    let (vocab32, dim32) = embedding_checks(
        OP,
        dev,
        ids,
        (vocab, dim),
        ("dtable", dtable),
        ("dout", dout),
    )?;
    let (uniq, offsets, order) = group_by_id(ids, vocab);
    let (uniq_d, off_d, order_d) = (
        dev.upload(&uniq)?,
        dev.upload(&offsets)?,
        dev.upload(&order)?,
    );
    let plan = plan::model_op(uniq.len() as u64, ModelWork::WarpPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (up, _g1) = uniq_d.device_ptr(&stream);
    let (offp, _g2) = off_d.device_ptr(&stream);
    let (orp, _g3) = order_d.device_ptr(&stream);
    let (dop, _g4) = dout.device_ptr(&stream);
    let (dtp, _g5) = dtable.device_ptr_mut(&stream);
    let args = ffi::QadaptEmbeddingArgs {
        dout: dop,
        dtable: dtp,
        uniq: up,
        offsets: offp,
        order: orp,
        tokens: ids.len() as u64,
        vocab: vocab32,
        dim: dim32,
        n_uniq: uniq.len() as u32,
        ..Default::default()
    };
    // SAFETY: QadaptEmbeddingArgs is what embedding_bwd_bf16 takes; uniq, offsets, order were
    // built above by group_by_id from ids checked < vocab: every uniq[u] < vocab, offsets has
    // n_uniq + 1 ascending entries ending at tokens, every order[k] < tokens; dout holds
    // tokens * dim bf16 and dtable vocab * dim f32 (checked above, all on this device), so every
    // row the kernel reads or adds into is in bounds; 2- and 4-byte accesses only.
    unsafe { launch(dev, kernels::EMBEDDING_BWD_BF16, plan, &args) }
}

/// The targets as the kernel reads them (`-1` = ignored), after checking each is `< vocab`;
/// returns them with the number of rows that have a target.
pub(crate) fn targets_i32(
    op: &'static str,
    targets: &[Option<u32>],
    vocab: usize,
) -> Result<(Vec<i32>, usize)> {
    if let Some(i) = targets
        .iter()
        .position(|t| t.is_some_and(|t| t as usize >= vocab))
    {
        return Err(invalid(
            op,
            format!(
                "target {:?} at {i} is outside the vocabulary of {vocab}",
                targets[i]
            ),
        ));
    }
    let t: Vec<i32> = targets.iter().map(|t| t.map_or(-1, |v| v as i32)).collect();
    let n = targets.iter().filter(|t| t.is_some()).count();
    Ok((t, n))
}

/// `cross_entropy_bf16`: `loss [rows]` overwritten with each row's `lse - z[t]` (0 when ignored)
/// and, when given, `dlogits` overwritten with `grad_scale * (softmax - onehot)`.
pub(crate) fn cross_entropy(
    dev: &CudaDevice,
    logits: &CudaSlice<bf16>,
    targets: &[Option<u32>],
    vocab: usize,
    grad_scale: f32,
    loss: &mut CudaSlice<f32>,
    dlogits: Option<&mut CudaSlice<bf16>>,
) -> Result<()> {
    const OP: &str = "cross_entropy (cuda)";
    let rows = targets.len();
    if rows == 0 || vocab == 0 {
        return Err(invalid(OP, "no rows or an empty vocabulary"));
    }
    let total = prod(OP, &[rows, vocab])?;
    need(OP, "logits", logits, total)?;
    need(OP, "loss", loss, rows)?;
    let (t, _) = targets_i32(OP, targets, vocab)?;
    let vocab32 = vocab_i32(OP, vocab)?;
    on_device(OP, dev, "logits", logits)?;
    on_device(OP, dev, "loss", loss)?;
    if let Some(d) = dlogits.as_deref() {
        need(OP, "dlogits", d, total)?;
        on_device(OP, dev, "dlogits", d)?;
    }
    let t_dev = dev.upload(&t)?;
    let stream = dev.stream().clone();
    let (lp, _g1) = logits.device_ptr(&stream);
    let (tp, _g2) = t_dev.device_ptr(&stream);
    let (lossp, _g3) = loss.device_ptr_mut(&stream);
    let (dp, _g4) = match dlogits {
        Some(d) => {
            let (p, g) = d.device_ptr_mut(&stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    // SAFETY: logits (and dlogits when given) hold rows * vocab bf16, loss rows f32 (checked
    // above), t_dev rows i32 built by targets_i32 (each -1 or < vocab), all on this device.
    unsafe { cross_entropy_raw(dev, [lp, tp, lossp, dp, 0], rows, vocab32, grad_scale) }
}

/// The vocabulary as the kernel's u32, refused unless an i32 target cannot wrap (31 bits).
fn vocab_i32(op: &'static str, vocab: usize) -> Result<u32> {
    i32::try_from(vocab).map_err(|_| invalid(op, "vocab must fit in 31 bits"))?;
    u32_of(op, "vocab", vocab)
}

/// Launches `cross_entropy_bf16` on the addresses `[logits, targets, loss, dlogits, top]`
/// (`dlogits` and `top` 0 for none) of `rows` rows.
///
/// # Safety
/// `logits` (and `dlogits` when non-zero) hold `rows * vocab` bf16, `loss` `rows` f32, `top`
/// (when non-zero) `rows` u32 and `targets` `rows` i32, each -1 or `< vocab`, all on `dev`, with
/// their buffers' guards held by the caller until this returns; `vocab < 2^31`, `rows > 0`.
unsafe fn cross_entropy_raw(
    dev: &CudaDevice,
    [lp, tp, lossp, dp, topp]: [u64; 5],
    rows: usize,
    vocab: u32,
    grad_scale: f32,
) -> Result<()> {
    let plan = plan::model_op(rows as u64, ModelWork::CtaPerItem, &dev.props())?;
    let addrs: &[u64] = if dp != 0 { &[lp, dp] } else { &[lp] };
    let args = ffi::QadaptCrossEntropyArgs {
        logits: lp,
        targets: tp,
        loss: lossp,
        dlogits: dp,
        rows: rows as u64,
        vocab,
        grad_scale,
        flags: vec_flag(vocab as usize, addrs),
        reserved: 0,
        top: topp,
    };
    // SAFETY: QadaptCrossEntropyArgs is what cross_entropy_bf16 takes; by this function's
    // contract every z[row, c], z[row, t], loss[row] and dz[row, c] the kernel touches is in
    // bounds; QADAPT_MODEL_VEC only with vocab % 8 == 0 and logits, dlogits 16-byte aligned; the
    // kernel's shared arrays are sized for the plan's 256 threads.
    unsafe { launch(dev, kernels::CROSS_ENTROPY_BF16, plan, &args) }
}

/// The LM head fused with the cross-entropy, `chunk_rows` token rows at a time: per chunk, the
/// logits `z = xn[chunk] H^T` (cuBLAS, into one `[chunk_rows, vocab]` buffer reused by every
/// chunk), `cross_entropy_bf16` on them (the chunk's rows of `loss`, and `dz` into a second
/// reused buffer when `dxn` is given), then `dxn[chunk] = dz H` (cuBLAS). `xn [rows, hidden]`,
/// the head `H [vocab, hidden]`, `loss [rows]` f32, `dxn [rows, hidden]`, all overwritten; `top
/// [rows]` u32, when given, overwritten with whether each row's target is its logits' first
/// argmax (the kernel's argmax test). The full `[rows, vocab]` logits never exist.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lm_head_cross_entropy(
    dev: &CudaDevice,
    xn: &CudaSlice<bf16>,
    head: &CudaSlice<bf16>,
    (rows, hidden, vocab): (usize, usize, usize),
    targets: &[Option<u32>],
    chunk_rows: usize,
    grad_scale: f32,
    loss: &mut CudaSlice<f32>,
    mut dxn: Option<&mut CudaSlice<bf16>>,
    mut top: Option<&mut CudaSlice<u32>>,
) -> Result<()> {
    const OP: &str = "lm_head cross_entropy (cuda)";
    if rows == 0 || hidden == 0 || vocab == 0 || chunk_rows == 0 {
        return Err(invalid(
            OP,
            format!("an empty shape ({rows} x {hidden} -> {vocab}) or chunk ({chunk_rows} rows)"),
        ));
    }
    if targets.len() != rows {
        return Err(shape_err(OP, format!("{rows} targets"), targets.len()));
    }
    let chunk = chunk_rows.min(rows);
    if chunk.max(hidden).max(vocab) > i32::MAX as usize {
        return Err(invalid(OP, "a dimension exceeds cuBLAS' 32-bit range"));
    }
    need(OP, "xn", xn, prod(OP, &[rows, hidden])?)?;
    need(OP, "head", head, prod(OP, &[vocab, hidden])?)?;
    need(OP, "loss", loss, rows)?;
    let vocab32 = vocab_i32(OP, vocab)?;
    let (t, _) = targets_i32(OP, targets, vocab)?;
    on_device(OP, dev, "xn", xn)?;
    on_device(OP, dev, "head", head)?;
    on_device(OP, dev, "loss", loss)?;
    if let Some(d) = dxn.as_deref() {
        need(OP, "dxn", d, rows * hidden)?;
        on_device(OP, dev, "dxn", d)?;
    }
    if let Some(d) = top.as_deref() {
        need(OP, "top", d, rows)?;
        on_device(OP, dev, "top", d)?;
    }
    let chunk_len = prod(OP, &[chunk, vocab])?;
    let t_dev = dev.upload(&t)?;
    let mut z = dev.zeros::<bf16>(chunk_len)?;
    let mut dz = match dxn {
        Some(_) => Some(dev.zeros::<bf16>(chunk_len)?),
        None => None,
    };
    let stream = dev.stream().clone();
    for r0 in (0..rows).step_by(chunk) {
        let m = chunk.min(rows - r0);
        let x = xn.slice(r0 * hidden..(r0 + m) * hidden);
        // SAFETY: x is m * hidden bf16 of xn, the head vocab * hidden, z at least m * vocab
        // (m <= chunk), all on this device (checked above); m, vocab, hidden are non-zero and
        // fit in an i32.
        unsafe {
            blas::gemm_unchecked(
                dev,
                &x,
                Op::N,
                head,
                Op::T,
                &mut z,
                (m, vocab, hidden),
                1.0,
                0.0,
            )
        }?;
        {
            let (zp, _g1) = z.device_ptr(&stream);
            let (tp, _g2) = t_dev.device_ptr(&stream);
            let (lp, _g3) = loss.device_ptr_mut(&stream);
            let (dp, _g4) = match dz.as_mut() {
                Some(d) => {
                    let (p, g) = d.device_ptr_mut(&stream);
                    (p, Some(g))
                }
                None => (0, None),
            };
            let (topp, _g5) = match top.as_deref_mut() {
                Some(d) => {
                    let (p, g) = d.device_ptr_mut(&stream);
                    (p, Some(g))
                }
                None => (0, None),
            };
            let row = 4 * r0 as u64;
            let top_row = if topp == 0 { 0 } else { topp + row };
            // SAFETY: z and dz hold chunk * vocab >= m * vocab bf16; t_dev, loss and top (when
            // given) hold rows i32, f32 and u32, so their entries r0..r0 + m (r0 + m <= rows)
            // are in bounds at byte offset 4 r0; the targets were checked by targets_i32; all on
            // this device, the guards held until the launch is queued.
            unsafe {
                cross_entropy_raw(
                    dev,
                    [zp, tp + row, lp + row, dp, top_row],
                    m,
                    vocab32,
                    grad_scale,
                )
            }?;
        }
        if let (Some(dz), Some(dxn)) = (dz.as_ref(), dxn.as_deref_mut()) {
            let g = dz.slice(0..m * vocab);
            let mut dx = dxn.slice_mut(r0 * hidden..(r0 + m) * hidden);
            // SAFETY: g is m * vocab bf16 of dz, the head vocab * hidden, dx m * hidden of dxn
            // (checked above), all on this device; the dimensions fit in an i32.
            unsafe {
                blas::gemm_unchecked(
                    dev,
                    &g,
                    Op::N,
                    head,
                    Op::N,
                    &mut dx,
                    (m, hidden, vocab),
                    1.0,
                    0.0,
                )
            }?;
        }
    }
    Ok(())
}

/// Checks an attention call's shape and buffers (lengths, 4-byte alignment of the bf16 rows the
/// kernels read as 32-bit words, this device) and returns the argument struct's scalars.
fn attention_shape(op: &'static str, sh: &AttentionShape) -> Result<(u32, u32, u32, u32, u32)> {
    if sh.batch == 0 || sh.seq == 0 || sh.heads == 0 {
        return Err(invalid(op, "empty batch, sequence or heads"));
    }
    if sh.kv_heads == 0 || !sh.heads.is_multiple_of(sh.kv_heads) {
        return Err(invalid(
            op,
            format!(
                "heads {} must be a multiple of kv_heads {}",
                sh.heads, sh.kv_heads
            ),
        ));
    }
    let max_d = ffi::QADAPT_ATTN_MAX_HEAD_DIM as usize;
    if sh.head_dim == 0 || !sh.head_dim.is_multiple_of(2) || sh.head_dim > max_d {
        return Err(invalid(
            op,
            format!(
                "head_dim {} must be even, positive and at most {max_d}",
                sh.head_dim
            ),
        ));
    }
    // The largest length (q's; heads >= kv_heads) must not overflow: every other product below it.
    prod(op, &[sh.batch, sh.seq, sh.heads, sh.head_dim])?;
    Ok((
        u32_of(op, "batch", sh.batch)?,
        u32_of(op, "seq", sh.seq)?,
        u32_of(op, "heads", sh.heads)?,
        u32_of(op, "kv_heads", sh.kv_heads)?,
        sh.head_dim as u32,
    ))
}

fn aligned4(op: &'static str, what: &str, addr: u64) -> Result<()> {
    if !addr.is_multiple_of(4) {
        return Err(invalid(op, format!("{what} is not 4-byte aligned")));
    }
    Ok(())
}

/// The element count of an attention operand: `Q` `[batch * seq, heads * D]` (q, out, dout,
/// dq), `Kv` `[batch * seq, kv_heads * D]` (k, v, dk, dv), `Rows` `[batch, heads, seq]` (lse).
#[derive(Clone, Copy)]
enum AttnLen {
    Q,
    Kv,
    Rows,
}

fn attention_len(sh: &AttentionShape, l: AttnLen) -> usize {
    let n = sh.batch * sh.seq;
    match l {
        AttnLen::Q => n * sh.heads * sh.head_dim,
        AttnLen::Kv => n * sh.kv_heads * sh.head_dim,
        AttnLen::Rows => n * sh.heads,
    }
}

/// Checks each named operand's length ([`AttnLen`]) and that it lives on `dev`.
macro_rules! attention_operands {
    ($op:expr, $dev:expr, $sh:expr; $($name:ident: $kind:ident),+ $(,)?) => {
        $(
            need($op, stringify!($name), $name, attention_len(&$sh, AttnLen::$kind))?;
            on_device($op, $dev, stringify!($name), $name)?;
        )+
    };
}

/// Checks packed rows' segments against the call: the same rows and length, this device.
fn check_segments(
    op: &'static str,
    dev: &CudaDevice,
    sh: &AttentionShape,
    segments: Option<&CudaSegments>,
) -> Result<()> {
    if let Some(s) = segments {
        if (s.batch, s.seq) != (sh.batch, sh.seq) {
            return Err(shape_err(
                op,
                format!("segments of {} rows of {}", sh.batch, sh.seq),
                format!("{} rows of {}", s.batch, s.seq),
            ));
        }
        on_device(op, dev, "segments", &s.starts)?;
    }
    Ok(())
}

/// The device address of `segments`' starts (0 for none) and its guard.
macro_rules! segments_ptr {
    ($segments:expr, $stream:expr) => {
        match $segments {
            Some(s) => {
                let (p, g) = s.starts.device_ptr($stream);
                (p, Some(g))
            }
            None => (0, None),
        }
    };
}

/// The shape part of the attention kernels' arguments (the addresses are the caller's).
fn attention_args(
    sh: &AttentionShape,
    (batch, seq, heads, kv_heads, head_dim): (u32, u32, u32, u32, u32),
) -> ffi::QadaptAttentionArgs {
    ffi::QadaptAttentionArgs {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        scale: (1.0 / (sh.head_dim as f64).sqrt()) as f32,
        ..Default::default()
    }
}

/// Head sizes `kernels/flash_attention.cu` is instantiated for ([`AttentionKernels::Flash`]);
/// any other `head_dim` (e.g. the 8 of the tiny test models) takes [`AttentionKernels::Scalar`].
pub const FLASH_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

/// Checks what the flash kernels add to [`attention_shape`]: a head size they are built for.
fn flash_shape(op: &'static str, sh: &AttentionShape) -> Result<(u32, u32, u32, u32, u32)> {
    let dims = attention_shape(op, sh)?;
    if !FLASH_HEAD_DIMS.contains(&sh.head_dim) {
        return Err(invalid(
            op,
            format!(
                "head_dim {} is not one of the flash kernels' {FLASH_HEAD_DIMS:?} (use the scalar \
                 attention kernels)",
                sh.head_dim
            ),
        ));
    }
    Ok(dims)
}

/// Which kernels `ops::attention_forward` and `ops::attention_backward` run; both families take
/// one argument struct (`QadaptAttentionArgs`) and the layouts of [`crate::ops::attention`].
/// [`AttentionKernels::for_shape`] picks `Flash` where it takes the head size. A shape or buffer
/// the chosen kernels do not take is [`crate::Error::Invalid`] before anything runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKernels {
    /// `kernels/attention.cu`: any even `head_dim` up to `QADAPT_ATTN_MAX_HEAD_DIM` (256),
    /// 4-byte aligned buffers; a CTA per `QADAPT_ATTN_ROWS` query rows of a head, 32-bit reads
    /// of each row.
    Scalar,
    /// `kernels/flash_attention.cu` (FlashAttention-2 style, on tensor cores): `head_dim` one of
    /// [`FLASH_HEAD_DIMS`] and every bf16 buffer 16-byte aligned (cudarc's allocations are); a
    /// CTA per `QADAPT_FLASH_BLOCK` query rows, 16-byte `cp.async` row copies. P is rounded to
    /// bf16 before it multiplies V, so `out` is within a few bf16 ulps of the f32 reference
    /// (bounds in `crates/qadapt/tests/ops/flash_attention.rs`).
    Flash,
}

impl AttentionKernels {
    /// The flash kernels where they take the shape's head size, else the scalar ones.
    pub fn for_shape(sh: &AttentionShape) -> AttentionKernels {
        if FLASH_HEAD_DIMS.contains(&sh.head_dim) {
            AttentionKernels::Flash
        } else {
            AttentionKernels::Scalar
        }
    }

    /// The shape's checks for these kernels, and the shape part of their arguments.
    fn dims(self, op: &'static str, sh: &AttentionShape) -> Result<(u32, u32, u32, u32, u32)> {
        match self {
            AttentionKernels::Scalar => attention_shape(op, sh),
            AttentionKernels::Flash => flash_shape(op, sh),
        }
    }

    /// The launch of one CTA per (row, head, query block) for `heads` heads.
    fn plan(self, sh: &AttentionShape, heads: usize, props: &DeviceProps) -> Result<LaunchPlan> {
        let rows = match self {
            AttentionKernels::Scalar => ffi::QADAPT_ATTN_ROWS,
            AttentionKernels::Flash => ffi::QADAPT_FLASH_BLOCK,
        };
        let ctas = (sh.batch * heads * sh.seq.div_ceil(rows as usize)) as u64;
        match self {
            AttentionKernels::Scalar => plan::model_op(ctas, ModelWork::CtaPerItem, props),
            AttentionKernels::Flash => plan::flash_attention(ctas, props),
        }
    }

    /// The alignment the kernels' row reads need of a bf16 operand's base (0, absent, passes).
    fn aligned(self, op: &'static str, what: &str, addr: u64) -> Result<()> {
        match self {
            AttentionKernels::Scalar => aligned4(op, what, addr),
            AttentionKernels::Flash => aligned16(op, what, addr),
        }
    }
}

/// `attention_fwd_bf16` or `flash_attention_fwd_bf16`: `out` and `lse [batch, heads, seq]`
/// overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_forward(
    kind: AttentionKernels,
    dev: &CudaDevice,
    sh: AttentionShape,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    segments: Option<&CudaSegments>,
    lse: &mut CudaSlice<f32>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    let (op, kernel) = match kind {
        AttentionKernels::Scalar => ("attention forward (cuda)", kernels::ATTENTION_FWD_BF16),
        AttentionKernels::Flash => (
            "flash attention forward (cuda)",
            kernels::FLASH_ATTENTION_FWD_BF16,
        ),
    };
    let dims = kind.dims(op, &sh)?;
    attention_operands!(op, dev, sh; q: Q, k: Kv, v: Kv, out: Q, lse: Rows);
    check_segments(op, dev, &sh, segments)?;
    let plan = kind.plan(&sh, sh.heads, &dev.props())?;
    let stream = dev.stream().clone();
    let (qp, _g1) = q.device_ptr(&stream);
    let (kp, _g2) = k.device_ptr(&stream);
    let (vp, _g3) = v.device_ptr(&stream);
    let (lp, _g4) = lse.device_ptr_mut(&stream);
    let (outp, _g5) = out.device_ptr_mut(&stream);
    let (sp, _g6) = segments_ptr!(segments, &stream);
    for (what, a) in [("q", qp), ("k", kp), ("v", vp), ("out", outp)] {
        kind.aligned(op, what, a)?;
    }
    aligned4(op, "lse", lp)?;
    let args = ffi::QadaptAttentionArgs {
        q: qp,
        k: kp,
        v: vp,
        out: outp,
        lse: lp,
        seg_start: sp,
        ..attention_args(&sh, dims)
    };
    // SAFETY: QadaptAttentionArgs is what both forward kernels take; q, out hold
    // batch * seq * heads * head_dim bf16, k, v batch * seq * kv_heads * head_dim bf16 and lse
    // batch * heads * seq f32, segments (when given) batch * seq u32 starts, each <= its token's
    // position and non-decreasing along a row (checked when made; lengths and device checked
    // above), so the first key block either kernel reads is at most the block's own; heads is a
    // multiple of kv_heads. Scalar: head_dim even and <= QADAPT_ATTN_MAX_HEAD_DIM (the shared
    // tiles' size) and every base 4-byte aligned, so its 32-bit row reads and writes are in
    // bounds and aligned; the plan has the 256 threads (8 warps) it assumes. Flash: head_dim one
    // of FLASH_HEAD_DIMS (its instantiations, multiples of 8) and every bf16 base 16-byte
    // aligned, so each 16-byte cp.async row copy (rows < seq only) and each store is in bounds
    // and aligned; the plan has QADAPT_FLASH_THREADS threads and no dynamic shared memory.
    unsafe { launch(dev, kernel, plan, &args) }
}

/// The backward of either family: `dq`, `dk`, `dv` overwritten from the forward's `lse` (and,
/// for the flash kernels, its `out` where kept). Each family runs a kernel for `dq` (a CTA per
/// query block of a head) and one for `dk`, `dv` (a CTA per key block of a KV head), both
/// reading `delta = rowsum(dout * out)` per (token, head):
/// - scalar: `attention_bwd_dq_bf16` computes delta from the probabilities it recomputes and
///   writes it for `attention_bwd_dkv_bf16`;
/// - flash: `flash_attention_bwd_delta_bf16` computes it from `out` (a warp per (token, head)),
///   or `flash_attention_bwd_delta_recompute_bf16` without `out` (recomputing P per tile).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    kind: AttentionKernels,
    dev: &CudaDevice,
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
    let (op, kernel_dq, kernel_dkv) = match kind {
        AttentionKernels::Scalar => (
            "attention backward (cuda)",
            kernels::ATTENTION_BWD_DQ_BF16,
            kernels::ATTENTION_BWD_DKV_BF16,
        ),
        AttentionKernels::Flash => (
            "flash attention backward (cuda)",
            kernels::FLASH_ATTENTION_BWD_DQ_BF16,
            kernels::FLASH_ATTENTION_BWD_DKV_BF16,
        ),
    };
    let dims = kind.dims(op, &sh)?;
    let n = sh.batch * sh.seq;
    if let Some(out) = out {
        attention_operands!(op, dev, sh; out: Q);
    }
    attention_operands!(op, dev, sh;
        q: Q, k: Kv, v: Kv, lse: Rows, dout: Q, dq: Q, dk: Kv, dv: Kv);
    check_segments(op, dev, &sh, segments)?;
    let mut delta = dev.zeros::<f32>(n * sh.heads)?;
    let props = dev.props();
    let plan_dq = kind.plan(&sh, sh.heads, &props)?;
    let plan_dkv = kind.plan(&sh, sh.kv_heads, &props)?;
    let stream = dev.stream().clone();
    let (qp, _g1) = q.device_ptr(&stream);
    let (kp, _g2) = k.device_ptr(&stream);
    let (vp, _g3) = v.device_ptr(&stream);
    let (outp, _g4) = match out {
        Some(o) => {
            let (p, g) = o.device_ptr(&stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (lp, _g5) = lse.device_ptr(&stream);
    let (dop, _g6) = dout.device_ptr(&stream);
    let (dqp, _g7) = dq.device_ptr_mut(&stream);
    let (dkp, _g8) = dk.device_ptr_mut(&stream);
    let (dvp, _g9) = dv.device_ptr_mut(&stream);
    let (dp, _g10) = delta.device_ptr_mut(&stream);
    let (sp, _g11) = segments_ptr!(segments, &stream);
    for (what, a) in [
        ("q", qp),
        ("k", kp),
        ("v", vp),
        ("out", outp), // 0 when absent: aligned
        ("dout", dop),
        ("dq", dqp),
        ("dk", dkp),
        ("dv", dvp),
    ] {
        kind.aligned(op, what, a)?;
    }
    aligned4(op, "lse", lp)?;
    let args = ffi::QadaptAttentionArgs {
        q: qp,
        k: kp,
        v: vp,
        out: outp,
        lse: lp,
        dout: dop,
        dq: dqp,
        dk: dkp,
        dv: dvp,
        delta: dp,
        seg_start: sp,
        ..attention_args(&sh, dims)
    };
    match (kind, out.is_some()) {
        (AttentionKernels::Scalar, _) => {}
        (AttentionKernels::Flash, true) => {
            let plan = plan::model_op((n * sh.heads) as u64, ModelWork::WarpPerItem, &props)?;
            // SAFETY: QadaptAttentionArgs is what flash_attention_bwd_delta_bf16 takes; out
            // (present: a non-zero address) and dout hold batch * seq * heads * head_dim bf16 and
            // delta (allocated above) batch * heads * seq f32, all on this device (checked
            // above); head_dim is even and the bases 16-byte aligned (checked), so the kernel's
            // 32-bit reads of each (token, head) row are in bounds and aligned; any whole number
            // of warps per CTA works (the plan's 256 threads).
            unsafe { launch(dev, kernels::FLASH_ATTENTION_BWD_DELTA_BF16, plan, &args) }?;
        }
        (AttentionKernels::Flash, false) => {
            // SAFETY: the struct of flash_attention_bwd_delta_recompute_bf16, which reads q, dout
            // (batch * seq * heads * head_dim bf16), k, v (batch * seq * kv_heads * head_dim),
            // lse (batch * heads * seq f32) and writes delta (allocated above, the same length),
            // never out (0 here); all on this device, lengths checked above; head_dim one of
            // FLASH_HEAD_DIMS and every bf16 base 16-byte aligned, so each 16-byte row copy
            // (rows < seq only) is in bounds and aligned; plan_dq is a CTA per (row, head, query
            // block) of QADAPT_FLASH_THREADS threads, no dynamic shared memory.
            unsafe {
                launch(
                    dev,
                    kernels::FLASH_ATTENTION_BWD_DELTA_RECOMPUTE_BF16,
                    plan_dq,
                    &args,
                )
            }?;
        }
    }
    // SAFETY: QadaptAttentionArgs is what both dq kernels take, queued after any delta kernel
    // on the same stream (so the flash kernel's delta is written; the scalar one writes delta
    // itself); q, dout, dq hold batch * seq * heads * head_dim bf16, k, v
    // batch * seq * kv_heads * head_dim, lse and delta batch * heads * seq f32, segments (when
    // given) batch * seq starts <= their positions (all checked above, on this device); heads is
    // a multiple of kv_heads. Scalar: head_dim even and <= QADAPT_ATTN_MAX_HEAD_DIM, bases 4-byte
    // aligned, 256 threads a CTA. Flash: head_dim one of FLASH_HEAD_DIMS, bf16 bases 16-byte
    // aligned, QADAPT_FLASH_THREADS threads, no dynamic shared memory. So each row read or
    // written is in bounds and aligned.
    unsafe { launch(dev, kernel_dq, plan_dq, &args) }?;
    // SAFETY: the same struct and checks for the dkv kernel, queued after the dq kernel (so
    // delta is written in both families); it writes dk, dv (batch * seq * kv_heads * head_dim
    // bf16 each, checked) and reads q, k, v, dout, lse, delta within the bounds above; plan_dkv
    // is a CTA per (row, KV head, key block) of the family's thread count.
    unsafe { launch(dev, kernel_dkv, plan_dkv, &args) }
}

/// The checks of both KV-cache kernels: the cache's shape (head size even and at most
/// `QADAPT_ATTN_MAX_HEAD_DIM`, the kernels' per-lane registers), the caches' and the tokens'
/// lengths, this device; returns the argument struct's shape part.
fn kv_cache_args(
    op: &'static str,
    dev: &CudaDevice,
    tokens: &CudaCacheTokens,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
) -> Result<ffi::QadaptKvCacheArgs> {
    let sh = tokens.shape;
    let max_d = ffi::QADAPT_ATTN_MAX_HEAD_DIM as usize;
    if sh.head_dim == 0 || !sh.head_dim.is_multiple_of(2) || sh.head_dim > max_d {
        return Err(invalid(
            op,
            format!(
                "head_dim {} must be even, positive and at most {max_d}",
                sh.head_dim
            ),
        ));
    }
    let cache = prod(op, &[sh.batch, sh.cap, sh.kv_heads, sh.head_dim])?;
    need(op, "kc", kc, cache)?;
    need(op, "vc", vc, cache)?;
    on_device(op, dev, "kc", kc)?;
    on_device(op, dev, "vc", vc)?;
    on_device(op, dev, "row", &tokens.row)?;
    on_device(op, dev, "pos", &tokens.pos)?;
    Ok(ffi::QadaptKvCacheArgs {
        tokens: tokens.len() as u64,
        cap: u32_of(op, "cap", sh.cap)?,
        heads: u32_of(op, "heads", sh.heads)?,
        kv_heads: u32_of(op, "kv_heads", sh.kv_heads)?,
        head_dim: u32_of(op, "head_dim", sh.head_dim)?,
        scale: (1.0 / (sh.head_dim as f64).sqrt()) as f32,
        ..Default::default()
    })
}

/// `kv_cache_write_bf16`: the tokens' keys and values into their cache slots.
pub(crate) fn kv_cache_write(
    dev: &CudaDevice,
    tokens: &CudaCacheTokens,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    kc: &mut CudaSlice<bf16>,
    vc: &mut CudaSlice<bf16>,
) -> Result<()> {
    const OP: &str = "kv cache write (cuda)";
    let shape = kv_cache_args(OP, dev, tokens, kc, vc)?;
    let sh = tokens.shape;
    let kd = prod(OP, &[tokens.len(), sh.kv_heads, sh.head_dim])?;
    need(OP, "k", k, kd)?;
    need(OP, "v", v, kd)?;
    on_device(OP, dev, "k", k)?;
    on_device(OP, dev, "v", v)?;
    let plan = plan::model_op((kd / 2) as u64, ModelWork::ThreadPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (kp, _g1) = k.device_ptr(&stream);
    let (vp, _g2) = v.device_ptr(&stream);
    let (kcp, _g3) = kc.device_ptr_mut(&stream);
    let (vcp, _g4) = vc.device_ptr_mut(&stream);
    let (rp, _g5) = tokens.row.device_ptr(&stream);
    let (pp, _g6) = tokens.pos.device_ptr(&stream);
    for (what, a) in [("k", kp), ("v", vp), ("kc", kcp), ("vc", vcp)] {
        aligned4(OP, what, a)?;
    }
    let args = ffi::QadaptKvCacheArgs {
        k: kp,
        v: vp,
        kc: kcp,
        vc: vcp,
        row: rp,
        pos: pp,
        ..shape
    };
    // SAFETY: QadaptKvCacheArgs is what kv_cache_write_bf16 takes; k and v hold tokens *
    // kv_heads * head_dim bf16, kc and vc batch * cap * kv_heads * head_dim, row and pos tokens
    // u32 each < batch and < cap (checked when the tokens were made for this shape), all on this
    // device and 4-byte aligned (checked above), head_dim even: every 32-bit word the kernel
    // copies, at (row * cap + pos) * kv_heads * head_dim / 2 + w, is in bounds.
    unsafe { launch(dev, kernels::KV_CACHE_WRITE_BF16, plan, &args) }
}

/// `attention_cached_bf16`: each token's attention over its row's cache, `out` overwritten.
pub(crate) fn attention_cached(
    dev: &CudaDevice,
    tokens: &CudaCacheTokens,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    const OP: &str = "cached attention (cuda)";
    let shape = kv_cache_args(OP, dev, tokens, kc, vc)?;
    let sh = tokens.shape;
    let qd = prod(OP, &[tokens.len(), sh.heads, sh.head_dim])?;
    need(OP, "q", q, qd)?;
    need(OP, "out", out, qd)?;
    on_device(OP, dev, "q", q)?;
    on_device(OP, dev, "out", out)?;
    let items = (tokens.len() * sh.heads) as u64;
    let plan = plan::model_op(items, ModelWork::WarpPerItem, &dev.props())?;
    let stream = dev.stream().clone();
    let (qp, _g1) = q.device_ptr(&stream);
    let (kcp, _g2) = kc.device_ptr(&stream);
    let (vcp, _g3) = vc.device_ptr(&stream);
    let (op, _g4) = out.device_ptr_mut(&stream);
    let (rp, _g5) = tokens.row.device_ptr(&stream);
    let (pp, _g6) = tokens.pos.device_ptr(&stream);
    let args = ffi::QadaptKvCacheArgs {
        q: qp,
        kc: kcp,
        vc: vcp,
        out: op,
        row: rp,
        pos: pp,
        ..shape
    };
    // SAFETY: QadaptKvCacheArgs is what attention_cached_bf16 takes; q and out hold tokens *
    // heads * head_dim bf16, kc and vc batch * cap * kv_heads * head_dim, row and pos tokens u32
    // each < batch and < cap (checked when the tokens were made for this shape), heads a multiple
    // of kv_heads and head_dim even and <= QADAPT_ATTN_MAX_HEAD_DIM (the lanes' registers), all on
    // this device: every key and value the kernel reads, (row * cap + j) * kv_heads * head_dim +
    // g * head_dim + e for j <= pos < cap, is in bounds.
    unsafe { launch(dev, kernels::ATTENTION_CACHED_BF16, plan, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_id_is_a_stable_counting_sort() {
        let ids = [4u32, 1, 4, 0, 4, 1];
        let (uniq, offsets, order) = group_by_id(&ids, 6);
        assert_eq!(uniq, [0, 1, 4]);
        assert_eq!(offsets, [0, 1, 3, 6]);
        assert_eq!(order, [3, 1, 5, 0, 2, 4]);
        let (u, o, r) = group_by_id(&[2], 3);
        assert_eq!((u, o, r), (vec![2], vec![0, 1], vec![0]));
    }

    #[test]
    fn targets_and_ids_are_checked_against_the_vocabulary() {
        let (t, n) = targets_i32("t", &[Some(2), None, Some(0)], 3).unwrap();
        assert_eq!((t, n), (vec![2, -1, 0], 2));
        let err = targets_i32("t", &[None, Some(3)], 3).unwrap_err();
        assert!(err.to_string().contains("at 1"), "{err}");
        assert!(check_ids("e", &[0, 2], 3).is_ok());
        let err = check_ids("e", &[2, 3, 0], 3).unwrap_err();
        assert!(err.to_string().contains("token id 3 at 1"), "{err}");
    }

    #[test]
    fn the_16_byte_path_needs_aligned_rows_of_8() {
        assert_eq!(vec_flag(64, &[0, 16, 4096]), ffi::QADAPT_MODEL_VEC);
        assert_eq!(vec_flag(60, &[0, 16]), 0);
        assert_eq!(vec_flag(64, &[0, 8]), 0);
    }
}
