//! The driver and cuBLAS of the virtual device, through cudarc as qadapt uses them. Ignored by
//! `cargo test` (they need a CUDA driver); `just test-vgpu` runs them on the virtual device, the
//! GPU bundle on a GPU.

mod common;

use common::{Arg, ctx, is_virtual, kernel, sm90_registers};
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::sys::cublasStatus_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::sys::{CUdevice_attribute as A, CUresult};
use cudarc::driver::{DevicePtr, DevicePtrMut, DriverError, LaunchConfig, PushKernelArg, result};
use half::bf16;
use qadapt_kernels::ffi;
use rand::{Rng, SeedableRng};

#[test]
#[ignore = "needs a CUDA device"]
fn device_reports_an_h200_when_virtual() {
    let ctx = ctx();
    let (major, _) = ctx.compute_capability().unwrap();
    assert!(major >= 8, "qadapt needs sm_80 or newer");
    assert_eq!(ctx.attribute(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE).unwrap(), 32);
    if !is_virtual(&ctx) {
        return;
    }
    assert_eq!(ctx.compute_capability().unwrap(), (9, 0));
    let attr = |a| ctx.attribute(a).unwrap();
    assert_eq!(attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), 132);
    assert_eq!(
        attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK),
        49_152
    );
    assert_eq!(
        attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        232_448
    );
    assert_eq!(
        attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
        233_472
    );
    assert_eq!(attr(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK), 65_536);
    assert_eq!(attr(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X), i32::MAX);
    assert_eq!(attr(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z), 64);
    let mut v = 0;
    // SAFETY: a writable int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .unwrap();
    assert_eq!(v, 13000);
    assert!(ctx.total_mem().unwrap() > 140_000_000_000);
}

#[test]
#[ignore = "needs a CUDA device"]
fn alloc_copy_round_trip() {
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    let host: Vec<f32> = (0..1001).map(|i| i as f32 * 0.5 - 3.0).collect();
    let dev = stream.clone_htod(&host).unwrap();
    assert_eq!(stream.clone_dtoh(&dev).unwrap(), host);
    // Device to device into the middle of a larger buffer, then memset of a sub-range.
    let mut big = stream.alloc_zeros::<f32>(2000).unwrap();
    stream
        .memcpy_dtod(&dev, &mut big.slice_mut(500..1501))
        .unwrap();
    stream.memset_zeros(&mut big.slice_mut(600..610)).unwrap();
    let back = stream.clone_dtoh(&big).unwrap();
    for (i, &v) in back.iter().enumerate() {
        let want = if (500..1501).contains(&i) && !(600..610).contains(&i) {
            host[i - 500]
        } else {
            0.0
        };
        assert_eq!(v, want, "[{i}]");
    }
    // The default stream and a second stream see the same memory.
    let other = ctx.new_stream().unwrap();
    assert_eq!(other.clone_dtoh(&dev).unwrap(), host);
    let (free, total) = ctx.mem_get_info().unwrap();
    assert!(free > 0 && free <= total);
}

#[test]
#[ignore = "needs a CUDA device"]
fn fresh_allocations_are_nan_not_zero() {
    let ctx = ctx();
    if !is_virtual(&ctx) {
        eprintln!("not the virtual device: what fresh memory holds is unspecified, skipped");
        return;
    }
    let stream = ctx.default_stream();
    // SAFETY: f32 is valid for any bits; read back only to look at them.
    let dev = unsafe { stream.alloc::<f32>(37) }.unwrap();
    let v = stream.clone_dtoh(&dev).unwrap();
    assert!(v.iter().all(|x| x.to_bits() == 0xFFFF_FFFF), "{v:?}");
    // SAFETY: as above, bf16.
    let dev16 = unsafe { stream.alloc::<bf16>(9) }.unwrap();
    assert!(
        stream
            .clone_dtoh(&dev16)
            .unwrap()
            .iter()
            .all(|x| x.is_nan())
    );
    // alloc_zeros really zeroes.
    let z = stream.alloc_zeros::<f32>(37).unwrap();
    assert!(stream.clone_dtoh(&z).unwrap().iter().all(|&x| x == 0.0));
}

#[test]
#[ignore = "needs a CUDA device"]
fn out_of_range_copies_are_refused() {
    let ctx = ctx();
    if !is_virtual(&ctx) {
        eprintln!(
            "not the virtual device: a GPU may accept a copy into the allocation's padding, skipped"
        );
        return;
    }
    let stream = ctx.default_stream();
    let n = 100usize;
    let mut buf = stream.alloc_zeros::<f32>(n).unwrap();
    let (ptr, _g) = buf.device_ptr_mut(&stream);
    let invalid = Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    let last = ptr + 4 * (n as u64 - 1);
    let mut out = [0f32; 2];
    // Two floats starting at the last element: 4 bytes too many; a memset one byte too long; a
    // copy starting before the buffer.
    // SAFETY: the driver checks the device ranges; the host slices are valid.
    let htod = unsafe { result::memcpy_htod_sync(last, &[1.0f32, 2.0]) };
    // SAFETY: as above.
    let dtoh = unsafe { result::memcpy_dtoh_sync(&mut out, last) };
    // SAFETY: as above.
    let memset = unsafe { result::memset_d8_sync(ptr + 1, 0, 4 * n) };
    // SAFETY: as above.
    let before = unsafe { result::memcpy_htod_sync(ptr - 4, &[1.0f32]) };
    for r in [htod, dtoh, memset, before] {
        assert_eq!(r, invalid);
    }
    drop(_g);
    // Refused copies leave the context usable, and the buffer untouched.
    assert!(stream.clone_dtoh(&buf).unwrap().iter().all(|&x| x == 0.0));
}

fn sum_squares_args(x: u64, partial: u64, n: usize) -> Arg<ffi::QadaptSumSquaresArgs> {
    Arg(ffi::QadaptSumSquaresArgs {
        x,
        partial,
        n: n as u64,
    })
}

#[test]
#[ignore = "needs a CUDA device"]
fn dynamic_shared_memory_above_48k_needs_the_opt_in() {
    let ctx = ctx();
    let stream = ctx.default_stream();
    let f = kernel(&ctx, "sum_squares_f32");
    let n = 3000usize;
    let host: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let x = stream.clone_htod(&host).unwrap();
    let mut partial = stream.alloc_zeros::<f32>(2).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 60_000,
    };
    let launch = |partial: &mut cudarc::driver::CudaSlice<f32>| {
        let (xp, _r) = x.device_ptr(&stream);
        let (pp, _w) = partial.device_ptr_mut(&stream);
        let args = sum_squares_args(xp, pp, n);
        let mut b = stream.launch_builder(&f);
        b.arg(&args);
        // SAFETY: the argument struct of sum_squares_f32 with x of n floats and 2 partials for
        // 2 CTAs of the 256 threads the kernel assumes.
        unsafe { b.launch(cfg) }.map(drop)
    };
    assert_eq!(
        launch(&mut partial),
        Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE))
    );
    // Beyond 227 KiB the attribute itself is refused.
    assert_eq!(
        f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 232_449),
        Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE))
    );
    f.set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 60_000)
        .unwrap();
    launch(&mut partial).unwrap();
    let got: f64 = stream
        .clone_dtoh(&partial)
        .unwrap()
        .iter()
        .map(|&p| f64::from(p))
        .sum();
    let want: f64 = host.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn launch_dimensions_and_registers_are_checked() {
    let ctx = ctx();
    let stream = ctx.default_stream();
    let f = kernel(&ctx, "sum_squares_f32");
    let x = stream.alloc_zeros::<f32>(16).unwrap();
    let mut partial = stream.alloc_zeros::<f32>(1).unwrap();
    let (xp, _r) = x.device_ptr(&stream);
    let (pp, _w) = partial.device_ptr_mut(&stream);
    let args = sum_squares_args(xp, pp, 16);
    let try_launch =
        |f: &cudarc::driver::CudaFunction, grid: (u32, u32, u32), block: (u32, u32, u32)| {
            let mut b = stream.launch_builder(f);
            b.arg(&args);
            // SAFETY: every launch here is refused before it runs (its shape is invalid).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: grid,
                    block_dim: block,
                    shared_mem_bytes: 0,
                })
            }
            .map(drop)
        };
    let invalid = Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
    assert_eq!(try_launch(&f, (1, 1, 1), (1025, 1, 1)), invalid);
    assert_eq!(try_launch(&f, (1, 1, 1), (32, 32, 2)), invalid);
    assert_eq!(try_launch(&f, (1, 1, 1), (1, 1, 65)), invalid);
    assert_eq!(try_launch(&f, (0, 1, 1), (256, 1, 1)), invalid);
    assert_eq!(try_launch(&f, (1, 65536, 1), (256, 1, 1)), invalid);
    // The kernel of the build with the most registers cannot run 1024 threads per CTA.
    let (name, regs) = qadapt_kernels::KERNELS
        .iter()
        .filter_map(|k| sm90_registers(k.name).map(|r| (k.name, r)))
        .max_by_key(|&(_, r)| r)
        .expect("ptxas report");
    assert!(
        regs.div_ceil(8) * 8 * 1024 > 65536,
        "{name} uses {regs} registers"
    );
    let heavy = kernel(&ctx, name);
    assert_eq!(
        try_launch(&heavy, (1, 1, 1), (1024, 1, 1)),
        Err(DriverError(CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)),
        "{name}: {regs} registers x 1024 threads"
    );
    drop((_r, _w));
    // Nothing above poisoned the context.
    stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn events_time_the_stream() {
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    let start = stream
        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let big = stream.alloc_zeros::<f32>(1 << 22).unwrap();
    let _copy = stream.clone_dtoh(&big).unwrap();
    let end = stream
        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    end.synchronize().unwrap();
    let ms = start.elapsed_ms(&end).unwrap();
    assert!(ms >= 0.0, "{ms}");
    // Events created without timing cannot be timed.
    let a = stream.record_event(None).unwrap();
    let b = stream.record_event(None).unwrap();
    assert_eq!(
        a.elapsed_ms(&b),
        Err(DriverError(CUresult::CUDA_ERROR_INVALID_HANDLE))
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn managed_memory_is_shared_with_the_host() {
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    // SAFETY: f32 is valid for any bits; zeroed before it is read.
    let mut m = unsafe { ctx.alloc_unified::<f32>(1000, true) }.unwrap();
    stream.memset_zeros(&mut m).unwrap();
    stream.synchronize().unwrap();
    m.as_mut_slice().unwrap()[3] = 7.5;
    m.attach(
        &stream,
        cudarc::driver::sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL,
    )
    .unwrap();
    m.prefetch().unwrap();
    let back = stream.clone_dtoh(&m).unwrap();
    assert_eq!(back[3], 7.5);
    assert_eq!(back.iter().filter(|&&v| v != 0.0).count(), 1);
}

/// `n` values uniform in [-0.5, 0.5) from the ChaCha8 stream of `seed`.
fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-0.5..0.5)).collect()
}

/// Column-major `alpha * op(A) op(B) + beta * C` in f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    b: &[f64],
    ldb: usize,
    beta: f64,
    c: &[f64],
    ldc: usize,
) -> Vec<f64> {
    let mut out = c.to_vec();
    for j in 0..n {
        for i in 0..m {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                s += av * bv;
            }
            out[i + j * ldc] = alpha * s + beta * c[i + j * ldc];
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA device"]
fn cublas_gemm_matches_a_scalar_reference() {
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    let blas = CudaBlas::new(stream.clone()).unwrap();
    for (m, n, k) in [(1, 1, 1), (7, 5, 33), (65, 31, 130)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Leading dimensions larger than needed, as cuBLAS allows.
            let lda = if ta { k } else { m } + 3;
            let ldb = if tb { n } else { k } + 1;
            let ldc = m + 2;
            let a = vals(lda * if ta { m } else { k }, 1);
            let b = vals(ldb * if tb { k } else { n }, 2);
            let c = vals(ldc * n, 3);
            fn cfg<T>(
                t: (bool, bool),
                mnk: (usize, usize, usize),
                ld: (usize, usize, usize),
                alpha: T,
                beta: T,
            ) -> GemmConfig<T> {
                GemmConfig {
                    transa: if t.0 { CUBLAS_OP_T } else { CUBLAS_OP_N },
                    transb: if t.1 { CUBLAS_OP_T } else { CUBLAS_OP_N },
                    m: mnk.0 as i32,
                    n: mnk.1 as i32,
                    k: mnk.2 as i32,
                    alpha,
                    lda: ld.0 as i32,
                    ldb: ld.1 as i32,
                    beta,
                    ldc: ld.2 as i32,
                }
            }
            let shape = ((ta, tb), (m, n, k), (lda, ldb, ldc));
            // f32 (cublasSgemm).
            let (da, db) = (
                stream.clone_htod(&a).unwrap(),
                stream.clone_htod(&b).unwrap(),
            );
            let mut dc = stream.clone_htod(&c).unwrap();
            // SAFETY: A, B, C hold exactly the spans the leading dimensions give.
            unsafe {
                blas.gemm(
                    cfg(shape.0, shape.1, shape.2, 0.75f32, -0.5f32),
                    &da,
                    &db,
                    &mut dc,
                )
            }
            .unwrap();
            let got = stream.clone_dtoh(&dc).unwrap();
            let f = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            let want = reference(
                ta,
                tb,
                m,
                n,
                k,
                0.75,
                &f(&a),
                lda,
                &f(&b),
                ldb,
                -0.5,
                &f(&c),
                ldc,
            );
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(g) - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(),
                    "f32 {m}x{n}x{k} {ta} {tb} [{i}]: {g} vs {w}"
                );
            }
            // bf16 in and out, f32 compute (cublasGemmEx): one bf16 rounding of the result.
            let h = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (a16, b16, c16) = (h(&a), h(&b), h(&c));
            let (da, db) = (
                stream.clone_htod(&a16).unwrap(),
                stream.clone_htod(&b16).unwrap(),
            );
            let mut dc = stream.clone_htod(&c16).unwrap();
            // SAFETY: as above.
            unsafe {
                blas.gemm(
                    cfg(shape.0, shape.1, shape.2, bf16::from_f32(2.0), bf16::ZERO),
                    &da,
                    &db,
                    &mut dc,
                )
            }
            .unwrap();
            let got = stream.clone_dtoh(&dc).unwrap();
            let g16 = |v: &[bf16]| v.iter().map(|x| f64::from(x.to_f32())).collect::<Vec<_>>();
            let want = reference(
                ta,
                tb,
                m,
                n,
                k,
                2.0,
                &g16(&a16),
                lda,
                &g16(&b16),
                ldb,
                0.0,
                &g16(&c16),
                ldc,
            );
            for j in 0..n {
                for i in 0..m {
                    let (g, w) = (f64::from(got[i + j * ldc].to_f32()), want[i + j * ldc]);
                    assert!(
                        (g - w).abs() <= 2f64.powi(-8) * w.abs() + 1e-5 * (k as f64).sqrt(),
                        "bf16 {m}x{n}x{k} {ta} {tb} [{i},{j}]: {g} vs {w}"
                    );
                }
                // Rows between m and ldc are not part of C and stay as they were.
                for i in m..ldc {
                    assert_eq!(got[i + j * ldc], c16[i + j * ldc]);
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cublas_refuses_a_leading_dimension_below_the_rows() {
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    let blas = CudaBlas::new(stream.clone()).unwrap();
    let (m, n, k) = (8, 4, 6);
    let a = stream.alloc_zeros::<bf16>(m * k).unwrap();
    let b = stream.alloc_zeros::<bf16>(k * n).unwrap();
    let mut c = stream.alloc_zeros::<bf16>(m * n).unwrap();
    for (lda, ldb, ldc) in [(m - 1, k, m), (m, k - 1, m), (m, k, m - 1)] {
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: lda as i32,
            ldb: ldb as i32,
            beta: bf16::ZERO,
            ldc: ldc as i32,
        };
        // SAFETY: refused before any access (invalid leading dimension).
        let r = unsafe { blas.gemm(cfg, &a, &b, &mut c) };
        assert_eq!(
            r.map_err(|e| e.0),
            Err(cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE),
            "lda {lda} ldb {ldb} ldc {ldc}"
        );
    }
    stream.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA device"]
fn cublas_handle_modes_read_back_what_was_set() {
    use cudarc::cublas::sys::{
        self, cublasAtomicsMode_t as Atomics, cublasMath_t as Math, cublasPointerMode_t as Ptr,
    };
    let ctx = ctx();
    let blas = CudaBlas::new(ctx.new_stream().unwrap()).unwrap();
    let h = *blas.handle();
    let ok = cublasStatus_t::CUBLAS_STATUS_SUCCESS;
    // Sets each of two values of a mode and reads it back (starting from the other one).
    macro_rules! round_trip {
        ($set:ident, $get:ident, $a:expr, $b:expr) => {
            for (mode, other) in [($a, $b), ($b, $a)] {
                // SAFETY: h is a live handle (blas outlives the test); mode is a value of the
                // mode's enum.
                assert_eq!(unsafe { sys::$set(h, mode) }, ok);
                let mut got = other;
                // SAFETY: h is live; got is a local of the mode's type for the call to write.
                assert_eq!(unsafe { sys::$get(h, &mut got) }, ok);
                assert_eq!(got, mode);
            }
        };
    }
    round_trip!(
        cublasSetPointerMode_v2,
        cublasGetPointerMode_v2,
        Ptr::CUBLAS_POINTER_MODE_DEVICE,
        Ptr::CUBLAS_POINTER_MODE_HOST
    );
    round_trip!(
        cublasSetMathMode,
        cublasGetMathMode,
        Math::CUBLAS_TF32_TENSOR_OP_MATH,
        Math::CUBLAS_DEFAULT_MATH
    );
    round_trip!(
        cublasSetAtomicsMode,
        cublasGetAtomicsMode,
        Atomics::CUBLAS_ATOMICS_ALLOWED,
        Atomics::CUBLAS_ATOMICS_NOT_ALLOWED
    );
}
