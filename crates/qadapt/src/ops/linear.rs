//! Linear layer without bias, in PyTorch's weight layout: `W` is `[out, in]` row-major.
//!
//! ```text
//! forward   y[n, o]  (=|+=) sum_i x[n, i] W[o, i]          y = x W^T
//! backward  dx[n, i] (=|+=) sum_o dy[n, o] W[o, i]         dx = dy W
//!           dW[o, i] +=     sum_n dy[n, o] x[n, i]         dW = dy^T x   (always accumulated)
//! ```
//! All three are one GEMM each on views of the slices (no copies, no transposes materialized).

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

use super::{Accumulate, Real, check_len};
use crate::error::Result;

/// Sizes of a linear layer applied to `rows` row vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Rows of x and y (tokens).
    pub rows: usize,
    /// Input features (columns of x and W).
    pub inp: usize,
    /// Output features (rows of W, columns of y).
    pub out: usize,
}

pub(crate) fn view<T>(rows: usize, cols: usize, v: &[T]) -> ArrayView2<'_, T> {
    ArrayView2::from_shape((rows, cols), v).expect("length checked before the view")
}

pub(crate) fn view_mut<T>(rows: usize, cols: usize, v: &mut [T]) -> ArrayViewMut2<'_, T> {
    ArrayViewMut2::from_shape((rows, cols), v).expect("length checked before the view")
}

/// `y = x W^T` (or `y += x W^T`): x `[rows, inp]`, w `[out, inp]`, y `[rows, out]`.
pub fn forward<T: Real>(
    s: LinearShape,
    x: &[T],
    w: &[T],
    y: &mut [T],
    acc: Accumulate,
) -> Result<()> {
    const OP: &str = "linear forward";
    check_len(OP, "x", x, s.rows * s.inp)?;
    check_len(OP, "w", w, s.out * s.inp)?;
    check_len(OP, "y", y, s.rows * s.out)?;
    general_mat_mul(
        T::ONE,
        &view(s.rows, s.inp, x),
        &view(s.out, s.inp, w).t(),
        acc.beta(),
        &mut view_mut(s.rows, s.out, y),
    );
    Ok(())
}

/// Backward of [`forward`]: `dx (=|+=) dy W` when `dx` is given, and `dw += dy^T x`.
pub fn backward<T: Real>(
    s: LinearShape,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<(&mut [T], Accumulate)>,
    dw: Option<&mut [T]>,
) -> Result<()> {
    const OP: &str = "linear backward";
    check_len(OP, "x", x, s.rows * s.inp)?;
    check_len(OP, "w", w, s.out * s.inp)?;
    check_len(OP, "dy", dy, s.rows * s.out)?;
    let dyv = view(s.rows, s.out, dy);
    if let Some((dx, acc)) = dx {
        check_len(OP, "dx", dx, s.rows * s.inp)?;
        general_mat_mul(
            T::ONE,
            &dyv,
            &view(s.out, s.inp, w),
            acc.beta(),
            &mut view_mut(s.rows, s.inp, dx),
        );
    }
    if let Some(dw) = dw {
        check_len(OP, "dw", dw, s.out * s.inp)?;
        general_mat_mul(
            T::ONE,
            &dyv.t(),
            &view(s.rows, s.inp, x),
            T::ONE,
            &mut view_mut(s.out, s.inp, dw),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn forward_matches_definition() {
        let s = LinearShape {
            rows: 2,
            inp: 3,
            out: 2,
        };
        let x = [1.0f32, 2.0, 3.0, -1.0, 0.5, 0.0];
        let w = [1.0f32, 0.0, -1.0, 2.0, 1.0, 1.0];
        let mut y = [10.0f32; 4];
        forward(s, &x, &w, &mut y, Accumulate::Overwrite).unwrap();
        assert_eq!(y, [-2.0, 7.0, -1.0, -1.5]);
        forward(s, &x, &w, &mut y, Accumulate::Add).unwrap();
        assert_eq!(y, [-4.0, 14.0, -2.0, -3.0]);
        let err = forward(s, &x[..5], &w, &mut y, Accumulate::Add).unwrap_err();
        assert!(err.to_string().contains("x of 6"), "{err}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let s = LinearShape {
            rows: 5,
            inp: 7,
            out: 3,
        };
        let x = rand_vec(1, s.rows * s.inp);
        let w = rand_vec(2, s.out * s.inp);
        let r = rand_vec(3, s.rows * s.out);
        // L = sum(r * y)  =>  dy = r.
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; s.rows * s.out];
            forward(s, x, w, &mut y, Accumulate::Overwrite).unwrap();
            y.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        backward(
            s,
            &x,
            &w,
            &r,
            Some((&mut dx, Accumulate::Overwrite)),
            Some(&mut dw),
        )
        .unwrap();
        check_grad("linear dx", &x, &dx, |v| loss(v, &w)).unwrap();
        check_grad("linear dw", &w, &dw, |v| loss(&x, v)).unwrap();
    }
}
