//! Counter-based dropout masks and the masked blend that applies them (LoRA dropout on the
//! adapter's input, and its backward).
//!
//! A mask is not stored: element `j` of a masked tensor is kept iff
//!
//! ```text
//! (mix(base + j * G) >> 11) >= threshold,   threshold = ceil(prob * 2^53),   G = 0x9E3779B97F4A7C15
//! ```
//!
//! with `mix` splitmix64's output function. `u_j = (mix(..) >> 11) / 2^53` is uniform in [0, 1)
//! and the test is exactly `u_j >= prob` (for an integer n and a real x, n < x iff n < ceil(x)),
//! so an element is dropped with probability `prob`. `base` names the mask (the caller hashes
//! its seed, step, micro-batch, layer and projection into it); any element can be computed alone,
//! so a backward regenerates its forward's mask, and a CUDA kernel draws the very same mask.
//!
//! [`mask_mix`] blends one or two tensors with per-element coefficients chosen by the mask:
//!
//! ```text
//! out[j] = ca(j) a[j] + cb(j) b[j],   c(j) = c.keep if element j is kept, c.drop if dropped
//! ```
//!
//! which covers, with `k = 1 / (1 - prob)`:
//! - dropout itself, `x~ = m x`: a = x, ca = (k, 0);
//! - its complement, `x - x~`: a = x, ca = (1 - k, 1);
//! - the input gradient of `W x + L(x~)` from those of `W x~ + L(x~)` (`d1`) and of `W x` (`d0`):
//!   `d0 + m (d1 - d0)`: a = d0, ca = (1 - k, 1), b = d1, cb = (k, 0).
//!
//! **Why a hand-written hash and not `rand`.** The mask is splitmix64 used as a counter-based
//! hash: `mix` is splitmix64's output function (two xor-shift-multiply rounds and a final
//! xor-shift, products mod 2^64) applied to the counter `base + j * G`, and the mask bit is the
//! comparison of its top 53 bits with `threshold`. The CUDA kernel `mask_mix_bf16` in
//! `kernels/dropout.cu` (`splitmix64_mix`, `mask_kept`) computes the same function on the device,
//! and the emulator's reference in `kernels/emu/model_emu.cpp` (`ref_mix`, `ref_kept`) a third
//! time; a run that trains on the GPU and a resumed or CPU run must drop the very same elements,
//! so the three must agree bit for bit. A stream generator (`rand`'s ChaCha, used for every other
//! random draw in the workspace) cannot serve: its values depend on the order of the draws, and
//! the kernel needs element `j`'s bit alone. Change `mix`, `GOLDEN` or the comparison only
//! together with both C++ copies.
//!
//! The arithmetic is `ca * a + cb * b` in `T` (f32 for the model, f64 for gradient checks); the
//! bf16 kernel computes the same in f32 and rounds once.

use rayon::prelude::*;

use super::{Real, check_len};
use crate::error::{Result, invalid};

/// splitmix64's increment (the golden ratio in 64 bits).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function: a bijective 64-bit mix.
#[inline]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One dropout mask (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutMask {
    /// The mask's name: element `j` hashes `base + j * GOLDEN`.
    pub base: u64,
    /// `ceil(prob * 2^53)`: an element is kept iff its 53-bit draw is at least this.
    pub threshold: u64,
}

impl DropoutMask {
    /// The mask `base` dropping with probability `prob` in [0, 1).
    pub fn new(base: u64, prob: f64) -> Result<DropoutMask> {
        if !(0.0..1.0).contains(&prob) {
            return Err(invalid(
                "dropout mask",
                format!("the dropout probability {prob} must be in [0, 1)"),
            ));
        }
        // prob * 2^53 is exact (a power-of-two scaling) and below 2^53.
        let threshold = (prob * (1u64 << 53) as f64).ceil() as u64;
        Ok(DropoutMask { base, threshold })
    }

    /// Whether element `j` is kept.
    #[inline]
    pub fn kept(&self, j: u64) -> bool {
        mix(self.base.wrapping_add(j.wrapping_mul(GOLDEN))) >> 11 >= self.threshold
    }
}

/// A coefficient per mask state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskCoef {
    /// Where the element is kept.
    pub keep: f32,
    /// Where it is dropped.
    pub drop: f32,
}

impl MaskCoef {
    /// `(keep, drop)`.
    pub fn new(keep: f32, drop: f32) -> MaskCoef {
        MaskCoef { keep, drop }
    }

    #[inline]
    fn at(self, kept: bool) -> f32 {
        if kept { self.keep } else { self.drop }
    }
}

/// `out[j] = ca(j) a[j] + cb(j) b[j]` (overwritten; the `b` term absent when `b` is `None`), with
/// each coefficient chosen by whether `mask` keeps element `j`. All lengths equal.
pub fn mask_mix<T: Real>(
    mask: DropoutMask,
    a: &[T],
    ca: MaskCoef,
    b: Option<(&[T], MaskCoef)>,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "mask mix";
    check_len(OP, "out", out, a.len())?;
    if let Some((b, _)) = b {
        check_len(OP, "b", b, a.len())?;
    }
    let c = |v: f32| T::from_f64(f64::from(v));
    out.par_iter_mut()
        .enumerate()
        .with_min_len(4096)
        .for_each(|(j, o)| {
            let kept = mask.kept(j as u64);
            let mut v = c(ca.at(kept)) * a[j];
            if let Some((b, cb)) = b {
                v += c(cb.at(kept)) * b[j];
            }
            *o = v;
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_the_exact_probability_test() {
        let m = DropoutMask::new(17, 0.25).unwrap();
        assert_eq!(m.threshold, 1 << 51);
        assert_eq!(DropoutMask::new(17, 0.0).unwrap().threshold, 0);
        for j in 0..2000u64 {
            let u = (mix(17u64.wrapping_add(j.wrapping_mul(GOLDEN))) >> 11) as f64
                / (1u64 << 53) as f64;
            assert_eq!(m.kept(j), u >= 0.25, "{j}");
        }
        assert!(DropoutMask::new(1, 1.0).is_err());
        assert!(DropoutMask::new(1, -0.1).is_err());
    }

    #[test]
    fn about_prob_of_the_elements_are_dropped_and_zero_keeps_all() {
        let m = DropoutMask::new(99, 0.1).unwrap();
        let n = 100_000u64;
        let dropped = (0..n).filter(|&j| !m.kept(j)).count() as f64 / n as f64;
        // Binomial: sd sqrt(0.1 * 0.9 / 1e5) = 9.5e-4, so 5 sd is 4.7e-3.
        assert!((dropped - 0.1).abs() < 5e-3, "{dropped}");
        let none = DropoutMask::new(99, 0.0).unwrap();
        assert!((0..n).all(|j| none.kept(j)));
    }

    #[test]
    fn dropout_and_its_complement_add_up_and_the_blend_picks_per_element() {
        let prob = 0.3;
        let k = (1.0 / (1.0 - prob)) as f32;
        let m = DropoutMask::new(5, prob).unwrap();
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut kept = vec![0f32; x.len()];
        let mut rest = vec![0f32; x.len()];
        mask_mix(m, &x, MaskCoef::new(k, 0.0), None, &mut kept).unwrap();
        mask_mix(m, &x, MaskCoef::new(1.0 - k, 1.0), None, &mut rest).unwrap();
        for j in 0..x.len() {
            if m.kept(j as u64) {
                assert_eq!(kept[j], k * x[j]);
            } else {
                assert_eq!((kept[j], rest[j]), (0.0, x[j]));
            }
            assert!((kept[j] + rest[j] - x[j]).abs() <= 1e-6, "{j}");
        }
        // d0 + m (d1 - d0).
        let d0: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut dx = vec![0f32; x.len()];
        let (ca, cb) = (MaskCoef::new(1.0 - k, 1.0), MaskCoef::new(k, 0.0));
        mask_mix(m, &d0, ca, Some((&x, cb)), &mut dx).unwrap();
        for j in 0..x.len() {
            let want = if m.kept(j as u64) {
                d0[j] + k * (x[j] - d0[j])
            } else {
                d0[j]
            };
            assert!((dx[j] - want).abs() <= 1e-5, "{j}");
        }
        assert!(mask_mix(m, &x, ca, Some((&x[1..], cb)), &mut dx).is_err());
        assert!(mask_mix(m, &x, ca, None, &mut dx[1..]).is_err());
    }
}
