//! Fused LoRA launches (`kernels/lora.cu`): `lora_xa_bf16`, then the gemv or GEMM kernel for a
//! dense or NF4 base weight, as [`plan::lora_forward`] decides.
//!
//! The fused NF4 kernels read 32 codes of one row as 16 aligned bytes, so they need
//! `k % 32 == 0`, 16-byte aligned packed codes and a 16-byte aligned x; otherwise the weight is
//! dequantized to a bf16 scratch buffer first (`nf4_dequantize_bf16`) and the dense kernels run.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use qadapt_kernels::{KernelName, ffi, kernels};

use super::{CudaScalesRef, launch, nf4_dequantize, on_device};
use crate::cuda::CudaDevice;
use crate::error::{Result, invalid, shape_err};
use crate::lora::LoraShape;
use crate::nf4::{check_blocksize, num_blocks, packed_len};
use crate::plan::{self, LoraPath};

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
    addr % 16 == 0
}

fn main_kernel(path: LoraPath, nf4: bool) -> KernelName {
    match (path, nf4) {
        (LoraPath::Gemv, false) => kernels::LORA_GEMV_DENSE_BF16,
        (LoraPath::Gemv, true) => kernels::LORA_GEMV_NF4_BF16,
        (LoraPath::Gemm, false) => kernels::LORA_GEMM_DENSE_BF16,
        (LoraPath::Gemm, true) => kernels::LORA_GEMM_NF4_BF16,
    }
}

/// The fused forward: overwrites `u [m, n_adapters*rank]` (at least that long; unused without a
/// LoRA term) and `y [m, n]`. Adapter indices are not read back to the host: the kernels treat
/// any index outside `0..n_adapters` as -1 (base only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_forward(
    dev: &CudaDevice,
    shape: &LoraShape,
    x: &CudaSlice<bf16>,
    w: CudaWeightRef<'_>,
    lora: CudaLoraRef<'_>,
    adapter_idx: Option<&CudaSlice<i32>>,
    bias: Option<&CudaSlice<bf16>>,
    u: &mut CudaSlice<bf16>,
    y: &mut CudaSlice<bf16>,
) -> Result<()> {
    const OP: &str = "lora forward (cuda)";
    let (m, n, k, r, na) = (shape.m, shape.n, shape.k, shape.rank, shape.n_adapters);
    let rt = shape.r_total();
    if x.len() != m * k {
        return Err(shape_err(OP, format!("x of {m}x{k}"), x.len()));
    }
    if y.len() != m * n {
        return Err(shape_err(OP, format!("y of {m}x{n}"), y.len()));
    }
    if u.len() < (m * rt).max(1) {
        return Err(shape_err(OP, format!("u of at least {}", m * rt), u.len()));
    }
    if lora.a.len() < (na * r * k).max(1) && rt > 0
        || lora.b.len() < na * n * r
        || lora.scales.len() < na
    {
        return Err(shape_err(
            OP,
            format!("A of {na}x{r}x{k}, B of {na}x{n}x{r}, {na} scales"),
            format!("{}, {}, {}", lora.a.len(), lora.b.len(), lora.scales.len()),
        ));
    }
    if let Some(i) = adapter_idx
        && i.len() != m
    {
        return Err(shape_err(OP, format!("{m} adapter indices"), i.len()));
    }
    if let Some(b) = bias
        && b.len() != n
    {
        return Err(shape_err(OP, format!("bias of {n}"), b.len()));
    }
    on_device(OP, dev, "x", x)?;
    on_device(OP, dev, "u", u)?;
    on_device(OP, dev, "y", y)?;
    on_device(OP, dev, "A", lora.a)?;
    on_device(OP, dev, "B", lora.b)?;
    on_device(OP, dev, "scales", lora.scales)?;
    if let Some(i) = adapter_idx {
        on_device(OP, dev, "adapter_idx", i)?;
    }
    if let Some(b) = bias {
        on_device(OP, dev, "bias", b)?;
    }
    let plan = plan::lora_forward(m as u64, n as u64, k as u64, rt as u64, &dev.props())?;

    // NF4 weights the fused kernels cannot stream become a dense bf16 scratch copy.
    let stream = dev.stream().clone();
    let mut scratch: Option<CudaSlice<bf16>> = None;
    if let CudaWeightRef::Nf4 {
        packed,
        scales,
        blocksize,
    } = w
    {
        check_blocksize(OP, blocksize)?;
        if packed.len() != packed_len(n * k) {
            return Err(shape_err(
                OP,
                format!("{} packed bytes", packed_len(n * k)),
                packed.len(),
            ));
        }
        let nb = num_blocks(n * k, blocksize);
        let got = match scales {
            CudaScalesRef::Absmax(a) => a.len(),
            CudaScalesRef::Double { codes, .. } => codes.len(),
        };
        if got != nb {
            return Err(shape_err(OP, format!("{nb} block scales"), got));
        }
        on_device(OP, dev, "NF4 codes", packed)?;
        let (pp, _g1) = packed.device_ptr(&stream);
        let (xp, _g2) = x.device_ptr(&stream);
        if k % 32 != 0 || !is16(pp) || !is16(xp) {
            let mut d = dev.zeros::<bf16>(n * k)?;
            nf4_dequantize(dev, packed, scales, blocksize, &mut d)?;
            scratch = Some(d);
        }
    }
    let w = match &scratch {
        Some(d) => CudaWeightRef::Dense(d),
        None => w,
    };
    if let CudaWeightRef::Dense(d) = w {
        if d.len() != n * k {
            return Err(shape_err(OP, format!("W of {n}x{k}"), d.len()));
        }
        on_device(OP, dev, "W", d)?;
    }

    let (x_ptr, _gx) = x.device_ptr(&stream);
    let (a_ptr, _ga) = lora.a.device_ptr(&stream);
    let (b_ptr, _gb) = lora.b.device_ptr(&stream);
    let (s_ptr, _gs) = lora.scales.device_ptr(&stream);
    let (u_ptr, _gu) = u.device_ptr_mut(&stream);
    let (y_ptr, _gy) = y.device_ptr_mut(&stream);
    let idx = adapter_idx.map(|i| i.device_ptr(&stream));
    let bias_p = bias.map(|b| b.device_ptr(&stream));
    let mut args = ffi::QadaptLoraFwdArgs {
        x: x_ptr,
        lora_a: a_ptr,
        lora_b: b_ptr,
        scales: s_ptr,
        adapter_idx: idx.as_ref().map_or(0, |p| p.0),
        bias: bias_p.as_ref().map_or(0, |p| p.0),
        u: u_ptr,
        y: y_ptr,
        m: m as u32,
        n: n as u32,
        k: k as u32,
        rank: if rt > 0 { r as u32 } else { 0 },
        n_adapters: na as u32,
        ..Default::default()
    };
    let mut vec = k % 8 == 0 && is16(x_ptr) && (rt == 0 || is16(a_ptr));
    let mut guards = Vec::new();
    let nf4 = match w {
        CudaWeightRef::Dense(d) => {
            let (p, g) = d.device_ptr(&stream);
            vec &= is16(p);
            args.w = p;
            guards.push(g);
            false
        }
        CudaWeightRef::Nf4 {
            packed,
            scales,
            blocksize,
        } => {
            let (p, g) = packed.device_ptr(&stream);
            args.w = p;
            args.blocksize = blocksize as u32;
            guards.push(g);
            match scales {
                CudaScalesRef::Absmax(a) => {
                    on_device(OP, dev, "absmax", a)?;
                    let (p, g) = a.device_ptr(&stream);
                    args.absmax = p;
                    guards.push(g);
                }
                CudaScalesRef::Double {
                    codes,
                    nested_absmax,
                    map,
                    offset,
                } => {
                    let nb = num_blocks(n * k, blocksize);
                    let nn = nb.div_ceil(ffi::QADAPT_DQ_BLOCK as usize);
                    if nested_absmax.len() != nn || map.len() != 256 {
                        return Err(shape_err(
                            OP,
                            format!("{nn} nested absmax and a 256-entry map"),
                            format!("{} and {}", nested_absmax.len(), map.len()),
                        ));
                    }
                    on_device(OP, dev, "absmax codes", codes)?;
                    on_device(OP, dev, "nested absmax", nested_absmax)?;
                    on_device(OP, dev, "map", map)?;
                    let (c, g1) = codes.device_ptr(&stream);
                    let (na_, g2) = nested_absmax.device_ptr(&stream);
                    let (mp, g3) = map.device_ptr(&stream);
                    args.absmax_codes = c;
                    args.nested_absmax = na_;
                    args.dynamic_map = mp;
                    args.offset = offset;
                    guards.extend([g1, g2, g3]);
                }
            }
            true
        }
    };
    if vec {
        args.flags |= ffi::QADAPT_LORA_VEC;
    }
    if nf4 && (k % 32 != 0 || !is16(args.w) || !is16(x_ptr)) {
        return Err(invalid(OP, "internal: the fused NF4 path needs k % 32 == 0 and aligned rows"));
    }
    if let Some(xa) = plan.xa {
        // SAFETY: QadaptLoraFwdArgs is what lora_xa_bf16 takes. It reads x [m*k], A [na*r*k]
        // and scales [na] (lengths checked above), adapter_idx [m] when non-zero (checked), and
        // writes u[0..m*na*r] (u.len() >= m*na*r checked); 16-byte loads only with
        // QADAPT_LORA_VEC, set only when k % 8 == 0 and x and A are 16-byte aligned. Indices
        // outside 0..na are treated as -1 by the kernel. All buffers are on this device.
        unsafe { launch(dev, kernels::LORA_XA_BF16, xa, &args) }?;
    }
    // SAFETY: QadaptLoraFwdArgs is what every lora_gemv_*/lora_gemm_* kernel takes. Checked
    // above: x [m*k], y [m*n], u [>= m*na*r], A [na*r*k], B [na*n*r], scales [na], bias [n],
    // adapter_idx [m]; a dense W of n*k bf16, or NF4 codes of ceil(n*k/2) bytes with
    // ceil(n*k/bs) block scales (and ceil(nb/256) nested absmax and a 256-entry map for double
    // quant), bs a power of two >= 32. The NF4 kernels are only chosen when k % 32 == 0 and the
    // codes and x are 16-byte aligned (their unconditional 16-byte loads), the dense kernels use
    // 16-byte loads and cp.async only under QADAPT_LORA_VEC (k % 8 == 0, x/W/A aligned). The
    // GEMM grid is exactly ceil(n/128)*ceil(m/128) CTAs of 256 threads, the gemv grid-strides.
    // The stream-ordering guards of every buffer are held until after the launch.
    unsafe { launch(dev, main_kernel(plan.path, nf4), plan.main, &args) }?;
    drop(guards);
    Ok(())
}
