//! Helpers of the virtual device's tests: they load the driver exactly as qadapt does (cudarc,
//! dynamic loading, `libcuda.so` from the library path), so they run wherever a CUDA driver is
//! found: on the virtual device under `just test-vgpu`, or on a real GPU in the GPU bundle. What
//! only the virtual device promises (NaN-filled allocations, refused out-of-range copies) is
//! checked only when the device says it is the virtual one.
#![allow(dead_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr};

/// The device, or a panic that says how to get one.
pub(crate) fn ctx() -> Arc<CudaContext> {
    // SAFETY: only probes for the driver library with dlopen.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    assert!(
        present,
        "no libcuda.so on the library path: run this with `just test-vgpu` (or on a GPU)"
    );
    CudaContext::new(0).expect("device 0")
}

/// Whether `ctx` is the qadapt virtual device (not a GPU).
pub(crate) fn is_virtual(ctx: &CudaContext) -> bool {
    ctx.name()
        .is_ok_and(|n| n.contains("qadapt virtual device"))
}

/// A kernel of the real build, loaded from its embedded fatbin as qadapt loads it.
pub(crate) fn kernel(ctx: &Arc<CudaContext>, name: &str) -> CudaFunction {
    let k = qadapt_kernels::KERNELS
        .iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("no kernel {name} in qadapt.h"));
    let m = qadapt_kernels::Module::containing(*k).expect("kernels compiled (nvcc)");
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(m.fatbin.to_vec()))
        .expect("load the fatbin");
    module.load_function(name).expect("kernel in its module")
}

/// A kernel's argument struct, passed by value (one kernel parameter).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Arg<T: Copy>(pub(crate) T);
// SAFETY: only used with the bindgen-generated #[repr(C)] argument structs of qadapt.h, plain
// integers and floats.
unsafe impl<T: Copy> DeviceRepr for Arg<T> {}

/// ptxas' sm_90 register count for `kernel`, from the real build's report.
pub(crate) fn sm90_registers(kernel: &str) -> Option<u32> {
    for m in qadapt_kernels::MODULES {
        let mut current = false;
        for line in m.ptxas_report.lines() {
            if line.contains("Compiling entry function") {
                current = line.contains(&format!("'{kernel}'")) && line.contains("'sm_90'");
            } else if current && line.contains("Used ") && line.contains(" registers") {
                let before = line.split(" registers").next()?;
                return before.split_whitespace().last()?.parse().ok();
            }
        }
    }
    None
}
