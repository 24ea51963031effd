//! CPU references of the model ops a Llama-family transformer is built from, forward and backward:
//! [`linear`] (GEMMs), [`embedding`], [`rmsnorm`], [`rope`], [`attention`] (grouped-query, causal),
//! [`swiglu`] and [`cross_entropy`]; [`dropout`] draws counter-based masks and applies them.
//!
//! Every op is generic over [`Real`] (f32 and f64): the model runs in f32, and the
//! finite-difference gradient checks run the very same code in f64. Activations are row-major
//! `[rows, cols]` slices where `rows = batch * seq` (token-major), so a `[B, T, H, D]` tensor is a
//! `[B*T, H*D]` matrix and no op needs a transpose copy. Matrix products are faer's kernel on
//! views of those slices, split over rayon's pool by `linear::gemm` (attention's small per-head
//! products are matrixmultiply's, one per rayon task).
//!
//! Contracts shared by every backward: inputs are the forward's inputs (and whatever the forward
//! saved, named in each op), gradients of *parameters* are always accumulated into (so several
//! micro-batches can add up), and gradients of *activations* are overwritten or accumulated as the
//! caller asks with [`Accumulate`] (accumulating is how a residual branch adds its gradient to the
//! trunk's). Shapes are checked first; a mismatch is [`crate::Error::Shape`], never a panic.

pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod linear;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

pub mod gradcheck;

use std::fmt::{Debug, Display};
use std::ops::{AddAssign, DivAssign, MulAssign, Neg, SubAssign};

use ndarray::LinalgScalar;

use crate::error::{Result, shape_err};

/// Whether an op writes its output or adds to what is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulate {
    /// `out = value`.
    Overwrite,
    /// `out += value`.
    Add,
}

impl Accumulate {
    /// The `beta` of `out = alpha * value + beta * out`.
    pub(crate) fn beta<T: Real>(self) -> T {
        match self {
            Accumulate::Overwrite => T::ZERO,
            Accumulate::Add => T::ONE,
        }
    }

    /// `*out = v` or `*out += v`: one element of an op's output.
    #[inline]
    pub fn store<T: Real>(self, out: &mut T, v: T) {
        match self {
            Accumulate::Overwrite => *out = v,
            Accumulate::Add => *out += v,
        }
    }
}

/// The floating types the references run in: f32 (the model) and f64 (gradient checks).
pub trait Real:
    LinalgScalar
    + Send
    + Sync
    + PartialOrd
    + Debug
    + Display
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Neg<Output = Self>
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// -inf (the masked attention score).
    const NEG_INFINITY: Self;
    /// The nearest value of this type.
    fn from_f64(v: f64) -> Self;
    /// Widened to f64.
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Cosine.
    fn cos(self) -> Self;
    /// Sine.
    fn sin(self) -> Self;
    /// The larger of two values (NaN-ignoring like `f32::max`).
    fn max(self, other: Self) -> Self;
    /// `c (=|+=) alpha a b`, faer's single-threaded kernel (the block of [`linear`]'s GEMMs).
    #[doc(hidden)]
    fn matmul(
        c: faer::MatMut<'_, Self>,
        acc: faer::Accum,
        a: faer::MatRef<'_, Self>,
        b: faer::MatRef<'_, Self>,
        alpha: Self,
    );
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn matmul(
                c: faer::MatMut<'_, Self>,
                acc: faer::Accum,
                a: faer::MatRef<'_, Self>,
                b: faer::MatRef<'_, Self>,
                alpha: Self,
            ) {
                faer::linalg::matmul::matmul(c, acc, a, b, alpha, faer::Par::Seq);
            }
        }
    };
}

impl_real!(f32);
impl_real!(f64);

/// Checks that `v` holds exactly `len` elements; `what` names the argument in the error.
pub(crate) fn check_len<T>(op: &'static str, what: &str, v: &[T], len: usize) -> Result<()> {
    if v.len() == len {
        Ok(())
    } else {
        Err(shape_err(op, format!("{what} of {len} elements"), v.len()))
    }
}

/// Lanes of [`dot`]: one AVX register of f32, two SSE registers.
const LANES: usize = 8;

/// `sum_i a[i] * b[i]` over `min(a.len(), b.len())` elements, in [`LANES`] partial sums (lane `j`
/// takes the indices `i ≡ j mod LANES`) added pairwise at the end, then the tail. The partial sums
/// do not depend on each other, so the loop vectorizes; a sequential sum waits for the previous
/// add at every element. The result differs from the sequential order by rounding only.
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let body = n - n % LANES;
    let mut acc = [T::ZERO; LANES];
    for (x, y) in a[..body]
        .chunks_exact(LANES)
        .zip(b[..body].chunks_exact(LANES))
    {
        for j in 0..LANES {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = T::ZERO;
    for (&x, &y) in a[body..].iter().zip(&b[body..]) {
        tail += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            let hi = acc[j + width];
            acc[j] += hi;
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_the_sequential_sum() {
        for n in [0usize, 1, 7, 8, 9, 31, 192, 515] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-12, "n = {n}");
        }
        assert_eq!(dot(&[1.0f32, 2.0, 3.0], &[4.0f32, 5.0]), 14.0);
    }
}
