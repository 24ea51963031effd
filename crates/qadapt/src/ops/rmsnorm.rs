//! RMSNorm over the last dimension, as transformers' `LlamaRMSNorm` computes it in f32:
//!
//! ```text
//! r[n]     = 1 / sqrt(mean_d x[n, d]^2 + eps)          saved for the backward ("rstd")
//! xh[n, d] = x[n, d] * r[n]
//! y[n, d]  = w[d] * xh[n, d]                           (overwritten)
//! ```
//! Backward, with `g = dy * w` (the gradient reaching xh):
//! ```text
//! dx[n, d] (=|+=) r[n] * (g[n, d] - xh[n, d] * mean_d(g[n, :] * xh[n, :]))
//! dw[d]    +=     sum_n dy[n, d] * xh[n, d]
//! ```
//! (the second term is the derivative of r through the mean of squares).

use rayon::prelude::*;

use super::{Accumulate, Real, check_len, dot};
use crate::error::{Result, shape_err};

fn check_rows(op: &'static str, x: &[impl Sized], w_len: usize) -> Result<usize> {
    if w_len == 0 || !x.len().is_multiple_of(w_len) {
        return Err(shape_err(
            op,
            format!("x of rows * {w_len} elements"),
            x.len(),
        ));
    }
    Ok(x.len() / w_len)
}

/// `y = w * x / sqrt(mean(x^2) + eps)` row by row; `x`, `y` are `[rows, w.len()]`, `rstd` is
/// `[rows]` (overwritten with `1/sqrt(mean(x^2) + eps)`).
pub fn forward<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T], rstd: &mut [T]) -> Result<()> {
    const OP: &str = "rmsnorm forward";
    let rows = check_rows(OP, x, w.len())?;
    check_len(OP, "y", y, x.len())?;
    check_len(OP, "rstd", rstd, rows)?;
    let d = w.len();
    let inv_d = T::from_f64(1.0 / d as f64);
    let eps = T::from_f64(eps);
    x.par_chunks_exact(d)
        .zip(y.par_chunks_exact_mut(d))
        .zip(rstd.par_iter_mut())
        .with_min_len(16)
        .for_each(|((xr, yr), r)| {
            *r = T::ONE / (dot(xr, xr) * inv_d + eps).sqrt();
            for ((o, &v), &wd) in yr.iter_mut().zip(xr).zip(w) {
                *o = wd * (v * *r);
            }
        });
    Ok(())
}

/// Backward of [`forward`] (see the module doc); `rstd` is what the forward saved.
pub fn backward<T: Real>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    dx: &mut [T],
    acc: Accumulate,
    dw: &mut [T],
) -> Result<()> {
    const OP: &str = "rmsnorm backward";
    let rows = check_rows(OP, x, w.len())?;
    check_len(OP, "rstd", rstd, rows)?;
    check_len(OP, "dy", dy, x.len())?;
    check_len(OP, "dx", dx, x.len())?;
    check_len(OP, "dw", dw, w.len())?;
    let d = w.len();
    let inv_d = T::from_f64(1.0 / d as f64);
    // dx row by row in parallel (each task keeps a row of g = dy * w); dw (a sum over rows)
    // sequentially, in row order.
    x.par_chunks_exact(d)
        .zip(dy.par_chunks_exact(d))
        .zip(dx.par_chunks_exact_mut(d))
        .zip(rstd.par_iter())
        .with_min_len(16)
        .for_each_init(
            || vec![T::ZERO; d],
            |g, (((xr, dyr), dxr), &r)| {
                for ((gd, &dyd), &wd) in g.iter_mut().zip(dyr).zip(w) {
                    *gd = dyd * wd;
                }
                // mean_d(g * xh) with xh = x * r.
                let mean = dot(g, xr) * r * inv_d;
                for ((o, &v), &gd) in dxr.iter_mut().zip(xr).zip(g.iter()) {
                    acc.store(o, r * (gd - v * r * mean));
                }
            },
        );
    for ((xr, dyr), &r) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(rstd) {
        for ((&v, &g), dwd) in xr.iter().zip(dyr).zip(dw.iter_mut()) {
            *dwd += g * (v * r);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn forward_matches_definition() {
        let x = [3.0f32, 4.0];
        let w = [1.0f32, 2.0];
        let (mut y, mut r) = ([0.0f32; 2], [0.0f32; 1]);
        forward(&x, &w, 0.0, &mut y, &mut r).unwrap();
        // mean(x^2) = 12.5
        let inv = 1.0 / 12.5f32.sqrt();
        assert!((r[0] - inv).abs() < 1e-7);
        assert!((y[0] - 3.0 * inv).abs() < 1e-6 && (y[1] - 8.0 * inv).abs() < 1e-6);
        assert!(forward(&x[..1], &w, 0.0, &mut y, &mut r).is_err());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (rows, d, eps) = (3, 6, 1e-5);
        let x = rand_vec(1, rows * d);
        let w: Vec<f64> = rand_vec(2, d).iter().map(|v| 1.0 + 0.5 * v).collect();
        let r = rand_vec(3, rows * d);
        let loss = |x: &[f64], w: &[f64]| {
            let (mut y, mut s) = (vec![0.0; rows * d], vec![0.0; rows]);
            forward(x, w, eps, &mut y, &mut s).unwrap();
            y.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        let (mut y, mut s) = (vec![0.0; rows * d], vec![0.0; rows]);
        forward(&x, &w, eps, &mut y, &mut s).unwrap();
        // Accumulate::Add onto a non-zero dx must add exactly the gradient.
        let mut dx = vec![1.0; x.len()];
        let mut dw = vec![0.0; d];
        backward(&x, &w, &s, &r, &mut dx, Accumulate::Add, &mut dw).unwrap();
        dx.iter_mut().for_each(|v| *v -= 1.0);
        check_grad("rmsnorm dx", &x, &dx, |v| loss(v, &w)).unwrap();
        check_grad("rmsnorm dw", &w, &dw, |v| loss(&x, v)).unwrap();
    }
}
