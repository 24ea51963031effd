//! Memory errors the virtual device must catch: a kernel reading past the end of a buffer, a
//! kernel writing into the padding after a buffer, a cuBLAS operand leaving its buffer. Each
//! leaves the context in a sticky error, as on a GPU, so they run one after another in one test
//! (its own process), each with a fresh context. Only on the virtual device: on a GPU these would
//! corrupt memory or fault without saying where.

mod common;

use common::{Arg, ctx, is_virtual, kernel};
use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{DevicePtr, DevicePtrMut, DriverError, LaunchConfig, PushKernelArg};
use qadapt_kernels::ffi;

const ILLEGAL: Result<(), DriverError> = Err(DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS));

#[test]
#[ignore = "needs a CUDA device"]
fn memory_errors_are_caught_and_sticky() {
    {
        let ctx = ctx();
        if !is_virtual(&ctx) {
            eprintln!("not the virtual device: skipped (these corrupt memory on a GPU)");
            return;
        }
    }

    // 1. A kernel reads one element past the end: 64 floats (a multiple of 16 bytes, so the
    //    next byte is the guard page) summed as 65.
    {
        let ctx = ctx();
        let stream = ctx.default_stream();
        let f = kernel(&ctx, "sum_squares_f32");
        let x = stream.alloc_zeros::<f32>(64).unwrap();
        let mut partial = stream.alloc_zeros::<f32>(1).unwrap();
        let r = {
            let (xp, _r) = x.device_ptr(&stream);
            let (pp, _w) = partial.device_ptr_mut(&stream);
            let args = Arg(ffi::QadaptSumSquaresArgs {
                x: xp,
                partial: pp,
                n: 65,
            });
            let mut b = stream.launch_builder(&f);
            b.arg(&args);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: deliberately wrong (n exceeds x by one): the virtual device must catch it.
            unsafe { b.launch(cfg) }.map(drop)
        };
        assert_eq!(r, ILLEGAL);
        // Sticky: the next call in this context fails the same way.
        assert_eq!(stream.synchronize(), ILLEGAL);
        assert!(stream.clone_dtoh(&partial).is_err());
    }

    // 2. A kernel writes into the slack after a buffer: adamw over 7 elements with param of 6
    //    floats (24 bytes, rounded to 32: element 6 lands in the canary).
    {
        let ctx = ctx();
        let stream = ctx.default_stream();
        stream
            .synchronize()
            .expect("a fresh context after the last one was released");
        let f = kernel(&ctx, "adamw_f32");
        let mut param = stream.clone_htod(&[1.0f32; 6]).unwrap();
        let grad = stream.clone_htod(&[0.5f32; 7]).unwrap();
        let mut m = stream.alloc_zeros::<f32>(7).unwrap();
        let mut v = stream.alloc_zeros::<f32>(7).unwrap();
        let r = {
            let (p, _a) = param.device_ptr_mut(&stream);
            let (g, _b) = grad.device_ptr(&stream);
            let (mp, _c) = m.device_ptr_mut(&stream);
            let (vp, _d) = v.device_ptr_mut(&stream);
            let args = Arg(ffi::QadaptAdamwArgs {
                param: p,
                param_bf16: 0,
                grad: g,
                m: mp,
                v: vp,
                n: 7,
                lr: 1e-3,
                weight_decay: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step_size: 1e-3,
                bc2_sqrt: 1.0,
                grad_scale: 1.0,
            });
            let mut b = stream.launch_builder(&f);
            b.arg(&args);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: deliberately wrong (param holds 6 of the 7 elements).
            unsafe { b.launch(cfg) }.map(drop)
        };
        assert_eq!(r, ILLEGAL);
        assert_eq!(stream.synchronize(), ILLEGAL);
    }

    // 3. cuBLAS: leading dimensions that pass cuBLAS' checks but make B leave its buffer.
    {
        let ctx = ctx();
        let stream = ctx.new_stream().unwrap();
        stream.synchronize().expect("a fresh context");
        let blas = CudaBlas::new(stream.clone()).unwrap();
        let (m, n, k) = (4usize, 3usize, 5usize);
        let a = stream.alloc_zeros::<f32>(m * k).unwrap();
        let b = stream.alloc_zeros::<f32>(k * n).unwrap();
        let mut c = stream.alloc_zeros::<f32>(m * n).unwrap();
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: m as i32,
            ldb: (k + 1) as i32, // B would need (n-1)*(k+1)+k = 17 floats; it has 15
            beta: 0.0,
            ldc: m as i32,
        };
        // SAFETY: deliberately wrong (ldb too large for b).
        let r = unsafe { blas.gemm(cfg, &a, &b, &mut c) };
        assert_eq!(
            r.map_err(|e| e.0),
            Err(cublasStatus_t::CUBLAS_STATUS_EXECUTION_FAILED)
        );
        assert_eq!(stream.synchronize(), ILLEGAL);
    }

    // After all of this, a fresh context works again.
    let ctx = ctx();
    let stream = ctx.default_stream();
    let x = stream.clone_htod(&[3.0f32, 4.0]).unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), [3.0, 4.0]);
}
