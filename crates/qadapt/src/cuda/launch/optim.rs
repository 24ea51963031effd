//! Optimizer launches: the AdamW step and the sum of squares (`kernels/optim.cu`).

use cudarc::driver::sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, UnifiedSlice};
use half::bf16;
use qadapt_kernels::{ffi, kernels};

use super::{launch, on_device};
use crate::cuda::CudaDevice;
use crate::error::{Result, invalid, shape_err};
use crate::optim::AdamWStep;
use crate::plan;

/// Where the AdamW moments live: device memory, or managed memory the driver pages between host
/// and device (the paged optimizer of QLoRA), prefetched to the device before each step.
pub(crate) enum Moments<'a> {
    Device(&'a mut CudaSlice<f32>, &'a mut CudaSlice<f32>),
    Managed(&'a mut UnifiedSlice<f32>, &'a mut UnifiedSlice<f32>),
}

/// `adamw_f32`: updates param, m, v in place, overwrites param_bf16 when given.
pub(crate) fn adamw(
    dev: &CudaDevice,
    param: &mut CudaSlice<f32>,
    param_bf16: Option<&mut CudaSlice<bf16>>,
    grad: &CudaSlice<f32>,
    moments: Moments<'_>,
    s: &AdamWStep,
) -> Result<()> {
    const OP: &str = "adamw (cuda)";
    let n = param.len();
    if n == 0 {
        return Err(invalid(OP, "no parameters"));
    }
    let p16_len = param_bf16.as_ref().map_or(n, |p| p.len());
    let (m_len, v_len) = match &moments {
        Moments::Device(m, v) => (m.len(), v.len()),
        Moments::Managed(m, v) => (m.len(), v.len()),
    };
    for (what, len) in [
        ("grad", grad.len()),
        ("m", m_len),
        ("v", v_len),
        ("param_bf16", p16_len),
    ] {
        if len != n {
            return Err(shape_err(OP, format!("{what} of {n} elements"), len));
        }
    }
    on_device(OP, dev, "param", param)?;
    on_device(OP, dev, "grad", grad)?;
    let plan = plan::elementwise(n as u64, &dev.props())?;
    let stream = dev.stream().clone();
    let (param_ptr, _w1) = param.device_ptr_mut(&stream);
    let (grad_ptr, _r) = grad.device_ptr(&stream);
    let (m_ptr, v_ptr, _moment_guards) = match moments {
        Moments::Device(m, v) => {
            on_device(OP, dev, "m", m)?;
            on_device(OP, dev, "v", v)?;
            let (mp, g1) = m.device_ptr_mut(&stream);
            let (vp, g2) = v.device_ptr_mut(&stream);
            (mp, vp, [g1, g2])
        }
        Moments::Managed(m, v) => {
            // Managed memory is valid on every device of the system; queue the migration to this
            // device on the step's stream so the kernel does not fault page by page.
            for state in [&mut *m, &mut *v] {
                state.attach(&stream, CU_MEM_ATTACH_GLOBAL)?;
                state.prefetch()?;
            }
            let (mp, g1) = m.device_ptr_mut(&stream);
            let (vp, g2) = v.device_ptr_mut(&stream);
            (mp, vp, [g1, g2])
        }
    };
    let mut p16_ptr = 0;
    let _w4 = match param_bf16 {
        Some(p16) => {
            on_device(OP, dev, "param_bf16", p16)?;
            let (p, g) = p16.device_ptr_mut(&stream);
            p16_ptr = p;
            Some(g)
        }
        None => None,
    };
    let args = ffi::QadaptAdamwArgs {
        param: param_ptr,
        param_bf16: p16_ptr,
        grad: grad_ptr,
        m: m_ptr,
        v: v_ptr,
        n: n as u64,
        lr: s.lr,
        weight_decay: s.weight_decay,
        beta1: s.beta1,
        beta2: s.beta2,
        eps: s.eps,
        step_size: s.step_size,
        bc2_sqrt: s.bc2_sqrt,
        grad_scale: s.grad_scale,
    };
    // SAFETY: QadaptAdamwArgs is what adamw_f32 takes; param, grad, m, v (and param_bf16 when
    // non-zero) hold n elements each (checked above); param, grad and param_bf16 are device
    // memory of this context, m and v device memory of it or managed memory attached to this
    // stream (valid on the device); the kernel touches index i only for i < n.
    unsafe { launch(dev, kernels::ADAMW_F32, plan, &args) }
}

/// `n` zeroed f32 of managed memory (cuMemAllocManaged, attached globally), for paged state.
pub(crate) fn alloc_managed_f32(dev: &CudaDevice, n: usize) -> Result<UnifiedSlice<f32>> {
    if n == 0 {
        return Err(invalid("managed allocation", "zero elements"));
    }
    let (free, _) = dev.inner.ctx.mem_get_info()?;
    if n * 4 > free / 2 {
        // Asking for more managed memory than the card has free can hang the device.
        return Err(invalid(
            "managed allocation",
            format!(
                "{} MiB asked, {} MiB free on the device: refused",
                (n * 4) >> 20,
                free >> 20
            ),
        ));
    }
    // SAFETY: f32 is valid for any bit pattern, and the buffer is zeroed below before any read.
    let mut s = unsafe { dev.inner.ctx.alloc_unified::<f32>(n, true) }?;
    dev.stream().memset_zeros(&mut s)?;
    Ok(s)
}

/// `sum_squares_f32` on each of `xs`, every tensor's per-CTA partials in its own range of one
/// buffer, then one download (one synchronization) and an f64 sum of all partials on the host:
/// the squared global norm of several tensors.
pub(crate) fn sum_squares(dev: &CudaDevice, xs: &[&CudaSlice<f32>]) -> Result<f64> {
    const OP: &str = "sum of squares (cuda)";
    let mut plans = Vec::with_capacity(xs.len());
    for x in xs.iter().filter(|x| !x.is_empty()) {
        on_device(OP, dev, "x", x)?;
        plans.push((x, plan::reduction(x.len() as u64, &dev.props())?));
    }
    let total: usize = plans.iter().map(|(_, p)| p.grid as usize).sum();
    if total == 0 {
        return Ok(0.0);
    }
    let mut partial = dev.zeros::<f32>(total)?;
    let stream = dev.stream().clone();
    let mut at = 0;
    for (x, plan) in plans {
        let grid = plan.grid as usize;
        let mut range = partial.slice_mut(at..at + grid);
        at += grid;
        let (x_ptr, _r) = x.device_ptr(&stream);
        let (partial_ptr, _w) = range.device_ptr_mut(&stream);
        let args = ffi::QadaptSumSquaresArgs {
            x: x_ptr,
            partial: partial_ptr,
            n: x.len() as u64,
        };
        // SAFETY: QadaptSumSquaresArgs is what sum_squares_f32 takes; x holds n floats, the
        // partial range one float per CTA of this plan (a view of the buffer allocated above,
        // disjoint from every other tensor's range), both on this device; the plan has the 256
        // threads per CTA the kernel's shared array assumes.
        unsafe { launch(dev, kernels::SUM_SQUARES_F32, plan, &args) }?;
    }
    Ok(dev.download(&partial)?.iter().map(|&p| f64::from(p)).sum())
}
