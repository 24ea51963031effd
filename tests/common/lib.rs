//! Shared helpers of the cross-crate tests and benches: fixtures, random inputs of awkward sizes.

use std::path::PathBuf;

use rand::{Rng, SeedableRng, rngs::SmallRng};

/// `tests/data/<name>` in this checkout.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// `n` normally distributed values (Box-Muller) times `scale`, from a fixed seed.
pub fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            scale * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// `QADAPT_BENCH_SMOKE=1`: the CUDA tables of the benches run once at tiny shapes, so every CUDA
/// branch executes on the virtual device (`just vgpu`) in CI. Times measured so mean nothing and
/// are printed under a SMOKE header, never to be reported.
pub fn bench_smoke() -> bool {
    std::env::var("QADAPT_BENCH_SMOKE").is_ok_and(|v| v == "1")
}
