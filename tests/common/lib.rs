//! Shared helpers of the cross-crate tests and benches: fixtures, random inputs of awkward sizes.

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// `tests/data/<name>` in this checkout.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `n` values from N(0, scale²), from the ChaCha8 stream of `seed`.
pub fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, scale).expect("a finite, non-negative scale");
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

/// `QADAPT_BENCH_SMOKE=1`: the CUDA tables of the benches run once at tiny shapes, so every CUDA
/// branch executes on the virtual device (`just vgpu`) in CI. Times measured so mean nothing and
/// are printed under a SMOKE header, never to be reported.
pub fn bench_smoke() -> bool {
    std::env::var("QADAPT_BENCH_SMOKE").is_ok_and(|v| v == "1")
}
