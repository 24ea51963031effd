//! Fused LoRA launches (`kernels/lora_fwd.cu`, `lora_bwd.cu`, `lora_rank.cu`). Forward: the LoRA
//! intermediate `u` (`lora_xa_bf16` on the gemv path, the split rank product `lora_rank_xa_bf16`
//! and its `lora_rank_reduce_bf16` on the GEMM path), then the gemv or GEMM kernel for a dense or
//! NF4 base weight, as [`plan::lora_forward`] decides. Backward: `u` and `g` as rank products,
//! then dx, then dA and dB as rank products.
//!
//! The fused NF4 kernels read 32 codes of one row as 16 aligned bytes, so they need
//! `k % 32 == 0`, 16-byte aligned packed codes and a 16-byte aligned x; otherwise the weight is
//! dequantized to a bf16 scratch buffer first (`nf4_dequantize_bf16`) and the dense kernels run.
//!
//! Scratch (`u`, `g`, the split partial sums) is the device's [`LoraScratch`], grown on demand:
//! no allocation per call once the largest shape has been seen. A projection without a LoRA term
//! (`rank * n_adapters == 0`) runs the base gemv/GEMM (and the dx GEMM) only.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use qadapt_kernels::{KernelName, ffi, kernels};

use super::{CudaScalesRef, Swizzle, launch, nf4_dequantize, on_device, tensor_map_2d};
use crate::cuda::CudaDevice;
use crate::error::{Result, invalid, shape_err};
use crate::lora::LoraShape;
use crate::nf4::{check_blocksize, num_blocks, packed_len};
use crate::ops::Accumulate;
use crate::plan::{self, LoraPath, LoraRankPlan, XaPlan};

/// The LoRA launches' device scratch: `u` and `g` (`[m, R]` bf16) and the split partial sums
/// (f32), each grown to the largest length asked so far and never shrunk. Every kernel that reads
/// a part of it wrote that part earlier in the same call (same stream), so stale contents from an
/// earlier call are never read.
#[derive(Default)]
pub(crate) struct LoraScratch {
    u: Option<CudaSlice<bf16>>,
    g: Option<CudaSlice<bf16>>,
    partial: Option<CudaSlice<f32>>,
}

/// `slot`, reallocated (zeroed) when it holds fewer than `len` (at least 1) elements.
fn grown<'a, T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    let len = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = None; // free the smaller buffer before allocating the larger one
        *slot = Some(dev.zeros::<T>(len)?);
    }
    slot.as_mut()
        .ok_or_else(|| invalid("lora scratch", "internal: the buffer was just allocated"))
}

/// The base weight on the device, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CudaWeightRef<'a> {
    Dense(&'a CudaSlice<bf16>),
    Nf4 {
        packed: &'a CudaSlice<u8>,
        scales: CudaScalesRef<'a>,
        blocksize: usize,
    },
}

/// The adapter stack on the device: A `[na, r, k]`, B `[na, n, r]`, scales `[na]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudaLoraRef<'a> {
    pub(crate) a: &'a CudaSlice<bf16>,
    pub(crate) b: &'a CudaSlice<bf16>,
    pub(crate) scales: &'a CudaSlice<f32>,
}

fn is16(addr: u64) -> bool {
    addr.is_multiple_of(16)
}

/// Device addresses of the base weight, with the guards that keep them stream-ordered.
struct WeightPtrs<G> {
    w: u64,
    absmax: u64,
    absmax_codes: u64,
    nested_absmax: u64,
    dynamic_map: u64,
    offset: f32,
    blocksize: u32,
    nf4: bool,
    _guards: Vec<G>,
}

/// Checks the weight against `n x k`, and returns a dense bf16 scratch copy when an NF4 weight
/// cannot be streamed by the fused kernels (`k % 32 != 0`, or codes or `row_ptr` not 16-byte
/// aligned).
fn nf4_scratch(
    op: &'static str,
    dev: &CudaDevice,
    n: usize,
    k: usize,
    w: CudaWeightRef<'_>,
    row_ptr: u64,
) -> Result<Option<CudaSlice<bf16>>> {
    match w {
        CudaWeightRef::Dense(d) => {
            if d.len() != n * k {
                return Err(shape_err(op, format!("W of {n}x{k}"), d.len()));
            }
            on_device(op, dev, "W", d)?;
            Ok(None)
        }
        CudaWeightRef::Nf4 {
            packed,
            scales,
            blocksize,
        } => {
            check_blocksize(op, blocksize)?;
            if packed.len() != packed_len(n * k) {
                return Err(shape_err(
                    op,
                    format!("{} packed bytes", packed_len(n * k)),
                    packed.len(),
                ));
            }
            on_device(op, dev, "NF4 codes", packed)?;
            let nb = num_blocks(n * k, blocksize);
            scales.check(op, dev, nb)?;
            let stream = dev.stream().clone();
            let (pp, _g) = packed.device_ptr(&stream);
            if !k.is_multiple_of(32) || !is16(pp) || !is16(row_ptr) {
                let mut d = dev.zeros::<bf16>(n * k)?;
                nf4_dequantize(dev, packed, scales, blocksize, &mut d)?;
                return Ok(Some(d));
            }
            Ok(None)
        }
    }
}

fn weight_ptrs<'s>(
    stream: &'s std::sync::Arc<cudarc::driver::CudaStream>,
    w: CudaWeightRef<'s>,
) -> WeightPtrs<cudarc::driver::SyncOnDrop<'s>> {
    match w {
        CudaWeightRef::Dense(d) => {
            let (p, g) = d.device_ptr(stream);
            WeightPtrs {
                w: p,
                absmax: 0,
                absmax_codes: 0,
                nested_absmax: 0,
                dynamic_map: 0,
                offset: 0.0,
                blocksize: 0,
                nf4: false,
                _guards: vec![g],
            }
        }
        CudaWeightRef::Nf4 {
            packed,
            scales,
            blocksize,
        } => {
            let (p, g) = packed.device_ptr(stream);
            let mut out = WeightPtrs {
                w: p,
                absmax: 0,
                absmax_codes: 0,
                nested_absmax: 0,
                dynamic_map: 0,
                offset: 0.0,
                blocksize: blocksize as u32,
                nf4: true,
                _guards: vec![g],
            };
            match scales {
                CudaScalesRef::Absmax(a) => {
                    let (p, g) = a.device_ptr(stream);
                    out.absmax = p;
                    out._guards.push(g);
                }
                CudaScalesRef::Double {
                    codes,
                    nested_absmax,
                    map,
                    offset,
                } => {
                    let (c, g1) = codes.device_ptr(stream);
                    let (na, g2) = nested_absmax.device_ptr(stream);
                    let (mp, g3) = map.device_ptr(stream);
                    out.absmax_codes = c;
                    out.nested_absmax = na;
                    out.dynamic_map = mp;
                    out.offset = offset;
                    out._guards.extend([g1, g2, g3]);
                }
            }
            out
        }
    }
}

fn main_kernel(path: LoraPath, nf4: bool) -> KernelName {
    match (path, nf4) {
        (LoraPath::Gemv, false) => kernels::LORA_GEMV_DENSE_BF16,
        (LoraPath::Gemv, true) => kernels::LORA_GEMV_NF4_BF16,
        (LoraPath::GemvWide, false) => kernels::LORA_GEMV_WIDE_DENSE_BF16,
        (LoraPath::GemvWide, true) => kernels::LORA_GEMV_WIDE_NF4_BF16,
        (LoraPath::Gemm, false) => kernels::LORA_GEMM_DENSE_BF16,
        (LoraPath::Gemm, true) => kernels::LORA_GEMM_NF4_BF16,
    }
}

/// The adapter-stack checks shared by forward and backward.
fn check_lora(
    op: &'static str,
    dev: &CudaDevice,
    shape: &LoraShape,
    lora: CudaLoraRef<'_>,
    adapter_idx: Option<&CudaSlice<i32>>,
) -> Result<()> {
    let (m, n, k, r, na) = (shape.m, shape.n, shape.k, shape.rank, shape.n_adapters);
    if shape.r_total() > 0
        && (lora.a.len() != na * r * k || lora.b.len() != na * n * r || lora.scales.len() != na)
    {
        return Err(shape_err(
            op,
            format!("A of {na}x{r}x{k}, B of {na}x{n}x{r}, {na} scales"),
            format!("{}, {}, {}", lora.a.len(), lora.b.len(), lora.scales.len()),
        ));
    }
    on_device(op, dev, "A", lora.a)?;
    on_device(op, dev, "B", lora.b)?;
    on_device(op, dev, "scales", lora.scales)?;
    if let Some(i) = adapter_idx {
        if i.len() != m {
            return Err(shape_err(op, format!("{m} adapter indices"), i.len()));
        }
        on_device(op, dev, "adapter_idx", i)?;
    }
    Ok(())
}

/// The fused forward: `y [m, n]` overwritten, or added into with [`Accumulate::Add`] (in the
/// kernels' epilogue, `QADAPT_LORA_ACCUMULATE`), and its scratch `u [m, n_adapters*rank]`.
/// Adapter indices are not read back to the host: the kernels treat any index outside
/// `0..n_adapters` as -1 (base only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_forward(
    dev: &CudaDevice,
    shape: &LoraShape,
    x: &CudaSlice<bf16>,
    w: CudaWeightRef<'_>,
    lora: CudaLoraRef<'_>,
    adapter_idx: Option<&CudaSlice<i32>>,
    bias: Option<&CudaSlice<bf16>>,
    y: &mut CudaSlice<bf16>,
    acc: Accumulate,
    u_out: Option<&mut CudaSlice<bf16>>,
) -> Result<()> {
    const OP: &str = "lora forward (cuda)";
    let (m, n, k) = (shape.m, shape.n, shape.k);
    let rt = shape.r_total();
    if x.len() != m * k {
        return Err(shape_err(OP, format!("x of {m}x{k}"), x.len()));
    }
    if y.len() != m * n {
        return Err(shape_err(OP, format!("y of {m}x{n}"), y.len()));
    }
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "y", y)?;
    if let Some(u) = &u_out {
        check_kept_u(OP, dev, u, m, rt)?;
    }
    check_lora(OP, dev, shape, lora, adapter_idx)?;
    if let Some(b) = bias {
        if b.len() != n {
            return Err(shape_err(OP, format!("bias of {n}"), b.len()));
        }
        on_device(OP, dev, "bias", b)?;
    }
    let plan = plan::lora_forward(m as u64, n as u64, k as u64, rt as u64, &dev.props())?;
    let stream = dev.stream().clone();
    let (x_ptr, _gx) = x.device_ptr(&stream);
    let scratch = nf4_scratch(OP, dev, n, k, w, x_ptr)?;
    let w = scratch.as_ref().map_or(w, CudaWeightRef::Dense);
    let mut ws = dev.lora_scratch()?;
    let ws = &mut *ws;
    // The u product's partial sums, then (after its reduction has read them, same stream) the
    // split y GEMM's: one buffer for the larger.
    let partial_len = match plan.xa {
        Some(XaPlan::Rank(r)) => r.partial_len(m as u64, rt as u64) as usize,
        _ => 0,
    }
    .max(
        plan.split
            .map_or(0, |s| s.partial_len(m as u64, n as u64) as usize),
    );
    // u in the caller's buffer (kept for the backward) or in the scratch.
    let u = match u_out {
        Some(u) => u,
        None => grown(dev, &mut ws.u, m * rt)?,
    };
    let partial = grown(dev, &mut ws.partial, partial_len)?;
    let wp = weight_ptrs(&stream, w);
    let (a_ptr, _ga) = lora.a.device_ptr(&stream);
    let (b_ptr, _gb) = lora.b.device_ptr(&stream);
    let (s_ptr, _gs) = lora.scales.device_ptr(&stream);
    let (u_ptr, _gu) = u.device_ptr_mut(&stream);
    let (p_ptr, _gp) = partial.device_ptr_mut(&stream);
    let (y_ptr, _gy) = y.device_ptr_mut(&stream);
    let idx = adapter_idx.map(|i| i.device_ptr(&stream));
    let idx_ptr = idx.as_ref().map_or(0, |p| p.0);
    let bias_p = bias.map(|b| b.device_ptr(&stream));
    let vec =
        k.is_multiple_of(8) && is16(x_ptr) && (rt == 0 || is16(a_ptr)) && (wp.nf4 || is16(wp.w));
    let args = ffi::QadaptLoraFwdArgs {
        x: x_ptr,
        w: wp.w,
        absmax: wp.absmax,
        absmax_codes: wp.absmax_codes,
        nested_absmax: wp.nested_absmax,
        dynamic_map: wp.dynamic_map,
        lora_a: a_ptr,
        lora_b: b_ptr,
        scales: s_ptr,
        adapter_idx: idx_ptr,
        bias: bias_p.as_ref().map_or(0, |p| p.0),
        u: u_ptr,
        y: y_ptr,
        partial: if plan.split.is_some() { p_ptr } else { 0 },
        m: m as u32,
        n: n as u32,
        k: k as u32,
        rank: if rt > 0 { shape.rank as u32 } else { 0 },
        n_adapters: shape.n_adapters as u32,
        blocksize: wp.blocksize,
        offset: wp.offset,
        flags: if vec { ffi::QADAPT_LORA_VEC } else { 0 }
            | if acc == Accumulate::Add {
                ffi::QADAPT_LORA_ACCUMULATE
            } else {
                0
            },
        splits: plan.split.map_or(0, |s| s.splits),
        split_steps: plan.split.map_or(0, |s| s.steps),
    };
    if wp.nf4 && (!k.is_multiple_of(32) || !is16(wp.w) || !is16(x_ptr)) {
        return Err(invalid(
            OP,
            "internal: the fused NF4 path needs k % 32 == 0 and aligned rows",
        ));
    }
    match plan.xa {
        None => {}
        Some(XaPlan::Gemv(xa)) => {
            // SAFETY: QadaptLoraFwdArgs is what lora_xa_bf16 takes. It reads x [m*k], A [na*r*k]
            // and scales [na] (lengths checked by check_lora and above), adapter_idx [m] when
            // non-zero (checked), and writes u[0..m*na*r] (the scratch holds at least that);
            // 16-byte loads only under QADAPT_LORA_VEC, set only when k % 8 == 0 and x and A are
            // 16-byte aligned. The grid is the CTA-per-element grid-stride (plan). Indices
            // outside 0..na read as -1. All buffers are on this device.
            unsafe { launch(dev, kernels::LORA_XA_BF16, xa, &args) }?;
        }
        Some(XaPlan::Rank(xa)) => {
            let ra = RankPtrs {
                lhs: x_ptr,
                rhs: a_ptr,
                scales: s_ptr,
                adapter_idx: idx_ptr,
                partial: p_ptr,
                out: u_ptr,
                vec_lhs: k.is_multiple_of(8) && is16(x_ptr),
                vec_rhs: k.is_multiple_of(8) && is16(a_ptr),
            };
            // u = mask(s x Acat^T): p = m, t = k; partial holds the plan's [splits, m, R] (grown
            // above), u [m*R].
            rank_product(dev, RankOp::Xa, &xa, shape, m, k, &ra)?;
        }
    }
    if wp.nf4 && dev.hopper_kernels() {
        let rank = if rt > 0 { shape.rank as u64 } else { 0 };
        let sm90 = plan::lora_sm90(
            m as u64,
            n as u64,
            k as u64,
            rank,
            wp.blocksize,
            &dev.props(),
        );
        let aligned = is16(x_ptr) && is16(y_ptr) && (rt == 0 || (is16(u_ptr) && is16(b_ptr)));
        if let (Some(sp), true) = (sm90, aligned) {
            return launch_sm90(dev, sp, &args, rt);
        }
    }
    let main = match plan.path {
        LoraPath::Gemm => plan::LaunchPlan {
            block: plan::lora_gemm_threads(wp.nf4),
            ..plan.main
        },
        LoraPath::Gemv | LoraPath::GemvWide => plan.main,
    };
    // SAFETY: QadaptLoraFwdArgs is what every lora_gemv_*/lora_gemm_* kernel takes. Checked
    // above: x [m*k], y [m*n], u (scratch of at least m*na*r, written by the xa launch above),
    // A [na*r*k], B [na*n*r], scales [na], bias [n], adapter_idx [m]; a dense W of n*k bf16, or
    // NF4 codes of ceil(n*k/2) bytes with ceil(n*k/bs) block scales (and ceil(nb/256) nested
    // absmax and a 256-entry map for double quant), bs a power of two >= 32 (nf4_scratch). The
    // NF4 kernels run only when k % 32 == 0 and the codes and x are 16-byte aligned (their
    // unconditional 16-byte loads, checked just above); the dense kernels use 16-byte loads and
    // cp.async only under QADAPT_LORA_VEC (k % 8 == 0, x/W/A aligned). The GEMM grid is exactly
    // ceil(n/128)*ceil(m/128) CTAs (times `splits` with a split k, whose ranges of split_steps
    // slices cover k, plan::gemm_split) of the kernel's thread count (plan; lora_gemm_threads,
    // which its __launch_bounds__ match); a split GEMM writes only partial [splits*m*n] (the
    // scratch holds at least that), not y. The gemv grid-strides. Every buffer's guard is held
    // past the launch.
    unsafe { launch(dev, main_kernel(plan.path, wp.nf4), main, &args) }?;
    if let Some(split) = plan.split {
        // SAFETY: lora_split_reduce_bf16 takes the same QadaptLoraFwdArgs: it reads partial
        // [splits*m*n] (written by the launch above, same stream), u [m*na*r] (this call's, only
        // the row's own adapter's r columns), B [na*n*r], bias [n] when non-zero, adapter_idx [m]
        // (indices outside 0..na read as -1), and writes y [m*n], grid-stride over the m*n
        // elements (plan). All checked above; every guard is held past the launch.
        unsafe { launch(dev, kernels::LORA_SPLIT_REDUCE_BF16, split.reduce, &args) }?;
    }
    Ok(())
}

/// The y GEMM of an NF4 weight on the sm_90a kernel (`kernels/lora_sm90.cu`), `args` as for
/// `lora_gemm_nf4_bf16` (u already written when `rt > 0`): the tensor maps of x, of the codes
/// (as bytes, `n x k/2`) and of u, then one launch.
fn launch_sm90(
    dev: &CudaDevice,
    sp: plan::Sm90Plan,
    args: &ffi::QadaptLoraFwdArgs,
    rt: usize,
) -> Result<()> {
    let (m, n, k) = (u64::from(args.m), u64::from(args.n), u64::from(args.k));
    let (bm, bk) = (ffi::QADAPT_SM90_BM, ffi::QADAPT_SM90_BK);
    // W's codes in boxes of 128 rows x 32 bytes (64 columns of k).
    let [x_map, codes_map, u_map] = sm90_maps(
        &sp,
        (args.x, k),
        (args.w, n, k / 2, bm, bk / 2, Swizzle::None),
        (args.u, rt),
        m,
    )?;
    let sm90 = ffi::QadaptLoraSm90Args {
        x_map,
        codes_map,
        u_map,
        fwd: ffi::QadaptLoraFwdArgs {
            partial: 0,
            splits: 0,
            split_steps: 0,
            ..*args
        },
        reserved: [0; 104],
    };
    let kernel = if sp.bn == 256 {
        kernels::LORA_GEMM_NF4_SM90_BN256_BF16
    } else {
        kernels::LORA_GEMM_NF4_SM90_BN128_BF16
    };
    // SAFETY: QadaptLoraSm90Args is what lora_gemm_nf4_sm90_* take. Its `fwd` is the argument
    // struct lora_forward checked (x [m*k], y [m*n], u [m*R] written by the xa launch, B
    // [na*n*r], bias [n], adapter_idx [m], NF4 codes of n*k/2 bytes with their block scales). The
    // kernel reads x, the codes and u only through the three tensor maps, which describe exactly
    // those tensors (so TMA stays inside them, zero-filling outside), and the rest under the
    // preconditions plan::lora_sm90 checked (k % 64 == 0, a power-of-two block size >= 64, rank
    // and n multiples of 8) and the 16-byte alignment of x, y, u and B checked by the caller
    // (its 16-byte stores of y). The grid is one CTA per 128 x bn output tile with the dynamic
    // shared memory of sm90_shared_bytes(bn) (the kernel traps on less). The device is compute
    // capability 9.0 (hopper_kernels), whose driver loads the sm_90a-only module.
    unsafe { launch(dev, kernel, sp.launch, &sm90) }
}

/// The three tensor maps of an sm_90a GEMM over `m` tokens: the activation `act [m, reduction]`
/// and the LoRA operand `lora [m, rt]` (bf16, boxes of bn rows x 64 columns, 128-byte swizzle; no
/// map when rt == 0: the kernel then runs no LoRA step), and the NF4 codes as bytes
/// `[rows, cols]` in boxes of `box_rows x box_cols` with `swizzle`.
fn sm90_maps(
    sp: &plan::Sm90Plan,
    (act, reduction): (u64, u64),
    (codes, rows, cols, box_rows, box_cols, swizzle): (u64, u64, u64, u32, u32, Swizzle),
    (lora, rt): (u64, usize),
    m: u64,
) -> Result<[ffi::QadaptTensorMap; 3]> {
    use cudarc::driver::sys::CUtensorMapDataType as D;
    let bf = D::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    let bk = ffi::QADAPT_SM90_BK;
    let act_map = tensor_map_2d(act, bf, 2, (m, reduction), (sp.bn, bk), Swizzle::B128)?;
    let u8 = D::CU_TENSOR_MAP_DATA_TYPE_UINT8;
    let codes_map = tensor_map_2d(codes, u8, 1, (rows, cols), (box_rows, box_cols), swizzle)?;
    let lora_map = if rt > 0 {
        tensor_map_2d(lora, bf, 2, (m, rt as u64), (sp.bn, bk), Swizzle::B128)?
    } else {
        ffi::QadaptTensorMap { opaque: [0; 16] }
    };
    Ok([act_map, codes_map, lora_map])
}

/// The dx GEMM on the sm_80 kernels (`lora_gemm_bwd_dx_*_bf16`, then the split reduction when
/// `plan` splits n), `args` as `lora_backward` built and checked them (g already written).
fn launch_dx(
    dev: &CudaDevice,
    plan: &plan::LoraBackwardPlan,
    args: &ffi::QadaptLoraBwdArgs,
    nf4: bool,
) -> Result<()> {
    let dx_kernel = if nf4 {
        kernels::LORA_GEMM_BWD_DX_NF4_BF16
    } else {
        kernels::LORA_GEMM_BWD_DX_DENSE_BF16
    };
    let dx = plan::LaunchPlan {
        block: plan::lora_gemm_threads(nf4),
        ..plan.dx
    };
    // SAFETY: the dx kernels take QadaptLoraBwdArgs; they read dy [m*n], W (n*k bf16, or NF4
    // codes/scales validated by nf4_scratch with k % 32 == 0 and aligned codes for the NF4
    // kernel's 16-byte cp.async), g (scratch of at least m*na*r, written above) and A [na*r*k],
    // and write dx [m*k] only inside those bounds; cp.async of dy/W/A rows only under
    // QADAPT_LORA_VEC (k % 8, n % 8, aligned). The grid is exactly ceil(m/128)*ceil(k/128) CTAs
    // (times `splits` with a split n, whose ranges cover n, plan::gemm_split) of the kernel's
    // thread count (lora_gemm_threads); a split dx GEMM writes only partial [splits*m*k] (the
    // scratch holds at least that; the rank products above are done with it, same stream), not
    // dx. Every guard is held past the launch.
    unsafe { launch(dev, dx_kernel, dx, args) }?;
    if let Some(split) = plan.dx_split {
        // SAFETY: lora_split_reduce_dx_bf16 takes the same QadaptLoraBwdArgs: it reads partial
        // [splits*m*k] (written just above, same stream), g [m*na*r] (this call's, only the row's
        // own adapter's r columns), A [na*r*k] and adapter_idx [m] (outside 0..na: -1), and writes
        // dx [m*k], grid-stride over the m*k elements (plan). Every guard is held past it.
        unsafe { launch(dev, kernels::LORA_SPLIT_REDUCE_DX_BF16, split.reduce, args) }?;
    }
    Ok(())
}

/// The dx GEMM of an NF4 weight on the sm_90a kernel (`kernels/lora_sm90.cu`), `args` as for
/// `lora_gemm_bwd_dx_nf4_bf16` (g already written when `rt > 0`): the tensor maps of dy, of the
/// codes (as bytes, `n x k/2`, boxes of 64 W rows x 128 features) and of g, then one launch.
fn launch_sm90_dx(
    dev: &CudaDevice,
    sp: plan::Sm90Plan,
    args: &ffi::QadaptLoraBwdArgs,
    rt: usize,
) -> Result<()> {
    let (m, n, k) = (u64::from(args.m), u64::from(args.n), u64::from(args.k));
    let (bm, bk) = (ffi::QADAPT_SM90_BM, ffi::QADAPT_SM90_BK);
    // W's codes in boxes of 64 rows (steps of n) x 64 bytes (128 features of k), 64-byte
    // swizzled (the kernel's decode reads four rows at once).
    let [dy_map, codes_map, g_map] = sm90_maps(
        &sp,
        (args.dy, n),
        (args.w, n, k / 2, bk, bm / 2, Swizzle::B64),
        (args.g, rt),
        m,
    )?;
    let sm90 = ffi::QadaptLoraBwdSm90Args {
        dy_map,
        codes_map,
        g_map,
        bwd: ffi::QadaptLoraBwdArgs {
            partial: 0,
            splits: 0,
            split_steps: 0,
            ..*args
        },
        reserved: [0; 16],
    };
    let kernel = if sp.bn == 256 {
        kernels::LORA_GEMM_BWD_DX_NF4_SM90_BN256_BF16
    } else {
        kernels::LORA_GEMM_BWD_DX_NF4_SM90_BN128_BF16
    };
    // SAFETY: QadaptLoraBwdSm90Args is what lora_gemm_bwd_dx_nf4_sm90_* take. Its `bwd` is the
    // argument struct lora_backward checked (dy [m*n], g [m*R] written by the dyb product, A
    // [R*k], dx [m*k], NF4 codes of n*k/2 bytes with their block scales). The kernel reads dy, the
    // codes and g only through the three tensor maps, which describe exactly those tensors (TMA
    // stays inside them, zero-filling outside), A and the block scales under the preconditions
    // plan::lora_sm90_dx checked (n % 64 == 0, k % 64 == 0, a power-of-two block size >= 64, rank
    // % 8 == 0: no scale index past the last block), and writes dx with 16-byte stores (dx 16-byte
    // aligned, checked by the caller, k % 8 == 0). The grid is one CTA per 128 x bn tile of dx
    // with the dynamic shared memory of sm90_shared_bytes(bn) (the kernel traps on less), on a
    // compute capability 9.0 device (hopper_kernels).
    unsafe { launch(dev, kernel, sp.launch, &sm90) }
}

/// A caller's buffer for the LoRA intermediate `u [m, R]` (kept from the forward for the
/// backward): its length and device.
fn check_kept_u(
    op: &'static str,
    dev: &CudaDevice,
    u: &CudaSlice<bf16>,
    m: usize,
    rt: usize,
) -> Result<()> {
    if rt == 0 {
        return Err(invalid(op, "a kept u without a LoRA term (rank 0)"));
    }
    if u.len() != m * rt {
        return Err(shape_err(op, format!("u of {m}x{rt}"), u.len()));
    }
    on_device(op, dev, "u", u)
}

/// Which rank product of `kernels/lora_rank.cu` a launch forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RankOp {
    /// `u = mask(s x Acat^T)`: p = m, t = k.
    Xa,
    /// `g = mask(s dy Bcat)`: p = m, t = n.
    Dyb,
    /// `grad_a += g^T x`: p = k, t = m.
    Da,
    /// `grad_b += dy^T u`: p = n, t = m.
    Db,
}

/// The device addresses of one rank product (their guards held by the caller) and whether its
/// operands' rows allow 16-byte copies.
struct RankPtrs {
    lhs: u64,
    rhs: u64,
    scales: u64,
    adapter_idx: u64,
    partial: u64,
    out: u64,
    vec_lhs: bool,
    vec_rhs: bool,
}

/// Launches one rank product and its fixed-order reduction. The caller has checked every buffer
/// against the shape (`p x t` as `RankOp` says, `R = rank * n_adapters > 0`) and sized the
/// scratch: `partial` holds at least `plan.partial_len(p, R)` f32, u and g at least `m * R` bf16.
fn rank_product(
    dev: &CudaDevice,
    op: RankOp,
    plan: &LoraRankPlan,
    shape: &LoraShape,
    p: usize,
    t: usize,
    ptrs: &RankPtrs,
) -> Result<()> {
    let rt = shape.r_total();
    if rt == 0 || !matches!(plan.r_tile, 16 | 32 | 64) || plan.splits == 0 {
        return Err(invalid(
            "lora rank product (cuda)",
            "internal: a rank product needs R > 0 and a planned tile",
        ));
    }
    let (kernel, mode) = match op {
        RankOp::Xa => (kernels::LORA_RANK_XA_BF16, ffi::QADAPT_LORA_RANK_MASKED),
        RankOp::Dyb => (kernels::LORA_RANK_DYB_BF16, ffi::QADAPT_LORA_RANK_MASKED),
        RankOp::Da => (kernels::LORA_RANK_DA_BF16, ffi::QADAPT_LORA_RANK_GRAD_A),
        RankOp::Db => (kernels::LORA_RANK_DB_BF16, ffi::QADAPT_LORA_RANK_GRAD_B),
    };
    let mut flags = 0;
    if ptrs.vec_lhs {
        flags |= ffi::QADAPT_LORA_RANK_VEC_LHS;
    }
    if ptrs.vec_rhs {
        flags |= ffi::QADAPT_LORA_RANK_VEC_RHS;
    }
    let args = ffi::QadaptLoraRankArgs {
        lhs: ptrs.lhs,
        rhs: ptrs.rhs,
        scales: ptrs.scales,
        adapter_idx: ptrs.adapter_idx,
        partial: ptrs.partial,
        out: ptrs.out,
        p: p as u32,
        t: t as u32,
        rank: shape.rank as u32,
        n_adapters: shape.n_adapters as u32,
        r_tile: plan.r_tile,
        splits: plan.splits,
        steps: plan.steps,
        mode,
        flags,
        unused: 0,
    };
    // SAFETY: QadaptLoraRankArgs is what the lora_rank_* kernels take. The product kernel reads
    // lhs and rhs only inside their shapes (x [m*k] or dy [m*n]; the A stack [R*k], the B stack
    // [na*n*r], or g/u [m*R] in the scratch, all checked or sized by the caller) with zero fill
    // outside, 16-byte cp.async only under the VEC flags (row length % 8 == 0 and a 16-byte
    // aligned base; for the B stack rank % 8 == 0), and writes partial[splits*p*R] (the scratch
    // holds at least plan.partial_len). The grid is splits * ceil(p/64) * ceil(R/r_tile) CTAs of
    // 128 threads with r_tile in {16, 32, 64} (plan, checked above), as the kernel decodes it.
    unsafe { launch(dev, kernel, plan.main, &args) }?;
    // SAFETY: lora_rank_reduce_bf16 grid-strides over p*R elements: it reads partial[splits*p*R]
    // (just written, same stream), scales [na] and adapter_idx [p] (MASKED only, p = m: checked by
    // the caller; indices outside 0..na read as -1), and writes u or g [p*R] (scratch) or adds
    // into grad_a [R*k] (p = k) / grad_b [na*n*r] (p = n), lengths checked by the caller.
    unsafe { launch(dev, kernels::LORA_RANK_REDUCE_BF16, plan.reduce, &args) }?;
    Ok(())
}

/// The fused backward: overwrites `dx [m, k]` (adds into it with [`Accumulate::Add`]), ADDS into
/// `grad_a [na, r, k]` and
/// `grad_b [na, n, r]` (f32; `grads`, required when the shape has a LoRA term and ignored
/// without one). NF4 weights are dequantized inside the dx matmul (or into a scratch
/// copy first, under the same conditions as the forward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_backward(
    dev: &CudaDevice,
    shape: &LoraShape,
    x: &CudaSlice<bf16>,
    dy: &CudaSlice<bf16>,
    w: CudaWeightRef<'_>,
    lora: CudaLoraRef<'_>,
    adapter_idx: Option<&CudaSlice<i32>>,
    dx: &mut CudaSlice<bf16>,
    grads: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    acc: Accumulate,
    u_in: Option<&CudaSlice<bf16>>,
) -> Result<()> {
    const OP: &str = "lora backward (cuda)";
    let (m, n, k, r, na) = (shape.m, shape.n, shape.k, shape.rank, shape.n_adapters);
    let rt = shape.r_total();
    for (what, len, want) in [
        ("x", x.len(), m * k),
        ("dy", dy.len(), m * n),
        ("dx", dx.len(), m * k),
    ] {
        if len != want {
            return Err(shape_err(OP, format!("{what} of {want}"), len));
        }
    }
    if let Some(u) = u_in {
        check_kept_u(OP, dev, u, m, rt)?;
    }
    // Without a LoRA term no kernel touches the gradients: they are neither needed nor read.
    let grads = if rt > 0 { grads } else { None };
    match &grads {
        None if rt > 0 => {
            return Err(invalid(
                OP,
                "the adapter gradients are required with a LoRA term",
            ));
        }
        Some((grad_a, grad_b)) if grad_a.len() != na * r * k || grad_b.len() != na * n * r => {
            return Err(shape_err(
                OP,
                format!("grad_a of {} and grad_b of {}", na * r * k, na * n * r),
                format!("{} and {}", grad_a.len(), grad_b.len()),
            ));
        }
        _ => {}
    }
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "dy", dy)?;
    on_device(OP, dev, "dx", dx)?;
    if let Some((grad_a, grad_b)) = &grads {
        on_device(OP, dev, "grad_a", *grad_a)?;
        on_device(OP, dev, "grad_b", *grad_b)?;
    }
    check_lora(OP, dev, shape, lora, adapter_idx)?;
    let plan = plan::lora_backward(m as u64, n as u64, k as u64, rt as u64, &dev.props())?;
    let stream = dev.stream().clone();
    let (x_ptr, _gx) = x.device_ptr(&stream);
    let scratch = nf4_scratch(OP, dev, n, k, w, x_ptr)?;
    let w = scratch.as_ref().map_or(w, CudaWeightRef::Dense);
    let mut ws = dev.lora_scratch()?;
    let ws = &mut *ws;
    let (mu, nu, ku, ru) = (m as u64, n as u64, k as u64, rt as u64);
    let partial_len = [
        plan.xa.map(|p| p.partial_len(mu, ru)),
        plan.dyb.map(|p| p.partial_len(mu, ru)),
        plan.dx_split.map(|s| s.partial_len(mu, ku)),
        plan.da.map(|p| p.partial_len(ku, ru)),
        plan.db.map(|p| p.partial_len(nu, ru)),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0) as usize;
    // u as the forward kept it, or recomputed into the scratch.
    let (u_ptr, _gu) = match u_in {
        Some(u) => u.device_ptr(&stream),
        None => grown(dev, &mut ws.u, m * rt)?.device_ptr_mut(&stream),
    };
    let g = grown(dev, &mut ws.g, m * rt)?;
    let partial = grown(dev, &mut ws.partial, partial_len)?;
    let wp = weight_ptrs(&stream, w);
    let (dy_ptr, _gdy) = dy.device_ptr(&stream);
    let (a_ptr, _ga) = lora.a.device_ptr(&stream);
    let (b_ptr, _gb) = lora.b.device_ptr(&stream);
    let (s_ptr, _gs) = lora.scales.device_ptr(&stream);
    let (g_ptr, _gg) = g.device_ptr_mut(&stream);
    let (p_ptr, _gp) = partial.device_ptr_mut(&stream);
    let (dx_ptr, _gdx) = dx.device_ptr_mut(&stream);
    let (mut grad_a, mut grad_b) = match grads {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let ga_guard = grad_a.as_mut().map(|g| g.device_ptr_mut(&stream));
    let gb_guard = grad_b.as_mut().map(|g| g.device_ptr_mut(&stream));
    let da_ptr = ga_guard.as_ref().map_or(0, |p| p.0);
    let db_ptr = gb_guard.as_ref().map_or(0, |p| p.0);
    let idx_guard = adapter_idx.map(|i| i.device_ptr(&stream));
    let idx = idx_guard.as_ref().map_or(0, |p| p.0);
    let rank = if rt > 0 { r as u32 } else { 0 };
    let vec_x = k.is_multiple_of(8) && is16(x_ptr);
    let vec_dy = n.is_multiple_of(8) && is16(dy_ptr);
    let vec_ru = rt.is_multiple_of(8);
    let vec = vec_x && is16(a_ptr) && vec_dy && (wp.nf4 || is16(wp.w));
    let args = ffi::QadaptLoraBwdArgs {
        x: x_ptr,
        dy: dy_ptr,
        w: wp.w,
        absmax: wp.absmax,
        absmax_codes: wp.absmax_codes,
        nested_absmax: wp.nested_absmax,
        dynamic_map: wp.dynamic_map,
        lora_a: a_ptr,
        lora_b: b_ptr,
        scales: s_ptr,
        adapter_idx: idx,
        u: u_ptr,
        g: g_ptr,
        dx: dx_ptr,
        grad_a: da_ptr,
        grad_b: db_ptr,
        m: m as u32,
        n: n as u32,
        k: k as u32,
        rank,
        n_adapters: na as u32,
        blocksize: wp.blocksize,
        offset: wp.offset,
        flags: if vec { ffi::QADAPT_LORA_VEC } else { 0 }
            | if acc == Accumulate::Add {
                ffi::QADAPT_LORA_ACCUMULATE
            } else {
                0
            },
        partial: if plan.dx_split.is_some() { p_ptr } else { 0 },
        splits: plan.dx_split.map_or(0, |s| s.splits),
        split_steps: plan.dx_split.map_or(0, |s| s.steps),
    };
    if wp.nf4 && (!k.is_multiple_of(32) || !is16(wp.w)) {
        return Err(invalid(
            OP,
            "internal: the fused NF4 path needs k % 32 == 0 and aligned codes",
        ));
    }
    let ptrs = |lhs: u64, rhs: u64, out: u64, vec_lhs: bool, vec_rhs: bool| RankPtrs {
        lhs,
        rhs,
        scales: s_ptr,
        adapter_idx: idx,
        partial: p_ptr,
        out,
        vec_lhs,
        vec_rhs,
    };
    if let (Some(xa), Some(dyb)) = (plan.xa, plan.dyb) {
        // u = mask(s x Acat^T) (recomputed unless the forward kept it) and g = mask(s dy Bcat)
        // into the scratch (m*R each).
        let vec_a = k.is_multiple_of(8) && is16(a_ptr);
        if u_in.is_none() {
            rank_product(
                dev,
                RankOp::Xa,
                &xa,
                shape,
                m,
                k,
                &ptrs(x_ptr, a_ptr, u_ptr, vec_x, vec_a),
            )?;
        }
        let vec_b = r.is_multiple_of(8) && is16(b_ptr);
        rank_product(
            dev,
            RankOp::Dyb,
            &dyb,
            shape,
            m,
            n,
            &ptrs(dy_ptr, b_ptr, g_ptr, vec_dy, vec_b),
        )?;
    }
    let sm90 = if wp.nf4 && dev.hopper_kernels() {
        plan::lora_sm90_dx(mu, nu, ku, u64::from(rank), wp.blocksize, &dev.props())
            .filter(|_| is16(dy_ptr) && is16(dx_ptr) && (rt == 0 || is16(g_ptr)))
    } else {
        None
    };
    match sm90 {
        Some(sp) => launch_sm90_dx(dev, sp, &args, rt)?,
        None => launch_dx(dev, &plan, &args, wp.nf4)?,
    }
    if let (Some(da), Some(db)) = (plan.da, plan.db) {
        // grad_a [R, k] += g^T x (p = k, t = m) and grad_b [na, n, r] += dy^T u (p = n, t = m);
        // g and u are the scratch's (aligned allocations: only R % 8 decides their copies).
        let vec_g = vec_ru && is16(g_ptr);
        rank_product(
            dev,
            RankOp::Da,
            &da,
            shape,
            k,
            m,
            &ptrs(x_ptr, g_ptr, da_ptr, vec_x, vec_g),
        )?;
        let vec_u = vec_ru && is16(u_ptr);
        rank_product(
            dev,
            RankOp::Db,
            &db,
            shape,
            n,
            m,
            &ptrs(dy_ptr, u_ptr, db_ptr, vec_dy, vec_u),
        )?;
    }
    Ok(())
}
