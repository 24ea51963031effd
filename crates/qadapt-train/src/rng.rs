//! The crate's seeded random streams: ChaCha8 (`rand_chacha`) seeded by `seed_from_u64`, which
//! is portable, so a seed gives the same initialization, shuffle or sample on every platform.
//! None of these streams has to match another implementation (PEFT's and transformers' inits
//! draw from torch's generator, which no test reproduces); the one generator that must is the
//! counter-based dropout hash of `qadapt::ops::dropout`, which the CUDA kernel mirrors.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The stream of `seed`.
pub(crate) fn stream(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in [-1, 1).
pub(crate) fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    rng.random_range(-1.0..1.0)
}
