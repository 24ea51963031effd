//! cuBLAS GEMM wrapper against a naive f64 product, every operand layout, awkward shapes; the
//! device's errors keep their kind (out of memory apart from the rest).
//! Needs a CUDA device (and libcublas): ignored by `cargo test`, run by the GPU bundle and the
//! virtual device.

use half::bf16;
use qadapt::cuda::Op;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-0.5, 0.5) from the ChaCha8 stream of `seed`, rounded to bf16.
fn vals(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-0.5..0.5)))
        .collect()
}

/// element (i, j) of op(x) where op(x) is rows x cols and x is stored as `op` says.
fn at(x: &[bf16], op: Op, rows: usize, cols: usize, i: usize, j: usize) -> f64 {
    f64::from(match op {
        Op::N => x[i * cols + j].to_f32(),
        Op::T => x[j * rows + i].to_f32(),
    })
}

#[test]
#[ignore = "needs a CUDA device"]
fn cublas_gemm_matches_f64_reference_for_every_layout() {
    let dev = crate::common::cuda_device();
    for (m, n, k) in [(1, 33, 17), (5, 7, 129), (67, 130, 61)] {
        for a_op in [Op::N, Op::T] {
            for b_op in [Op::N, Op::T] {
                let a = vals(m * k, 1);
                let b = vals(k * n, 2);
                let c0 = vals(m * n, 3);
                let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
                let mut dc = dev.upload(&c0).unwrap();
                dev.gemm_bf16(&da, a_op, &db, b_op, &mut dc, (m, n, k), 0.5, 2.0)
                    .unwrap();
                let c = dev.download(&dc).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|p| at(&a, a_op, m, k, i, p) * at(&b, b_op, k, n, p, j))
                            .sum();
                        let want = 0.5 * dot + 2.0 * f64::from(c0[i * n + j].to_f32());
                        let got = f64::from(c[i * n + j].to_f32());
                        // bf16 output: one rounding (2^-8 relative) plus f32 accumulation error.
                        let tol = 1e-2 * want.abs() + 1e-3 * (k as f64).sqrt();
                        assert!(
                            (got - want).abs() <= tol,
                            "{a_op:?}{b_op:?} ({m},{n},{k}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn running_out_of_device_memory_is_its_own_error_and_the_device_goes_on() {
    let dev = crate::common::cuda_device();
    // 1 PiB: more than any GPU (and the virtual device's limit) has.
    match dev.zeros::<u8>(1 << 50) {
        Err(qadapt::Error::OutOfMemory(msg)) => assert!(msg.contains("OUT_OF_MEMORY"), "{msg}"),
        Err(e) => panic!("another error than out of memory: {e:?}"),
        Ok(_) => panic!("a 1 PiB allocation succeeded"),
    }
    let small = dev.upload(&[1.5f32, -2.0]).unwrap();
    assert_eq!(dev.download(&small).unwrap(), [1.5, -2.0]);
}
