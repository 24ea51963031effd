//! Linear layer without bias, in PyTorch's weight layout: `W` is `[out, in]` row-major.
//!
//! ```text
//! forward   y[n, o]  (=|+=) sum_i x[n, i] W[o, i]          y = x W^T
//! backward  dx[n, i] (=|+=) sum_o dy[n, o] W[o, i]         dx = dy W
//!           dW[o, i] +=     sum_n dy[n, o] x[n, i]         dW = dy^T x   (always accumulated)
//! ```
//! All three are one GEMM each on views of the slices (no copies, no transposes materialized),
//! through [`gemm`]: faer's single-threaded kernel on blocks of the output, the blocks run on
//! rayon's pool.
//!
//! Why faer and not matrixmultiply (ndarray's): on the step's shapes faer's kernels are about
//! 15 % faster, more on the thin rank-8 products (BENCHMARKS.md, "CPU LoRA training step").
//! Why not a library's own threading: a second thread pool beside rayon's, on a machine with few
//! cores, spins (`sched_yield`) while the other pool works; in a training step that took about a
//! sixth of the CPU time. One pool that runs the GEMM blocks and the elementwise ops alike has no
//! such contention.

use faer::{Accum, MatMut, MatRef};
use ndarray::{ArrayBase, ArrayView2, ArrayViewMut2, Data, DataMut, Ix2};
use rayon::prelude::*;

use super::{Accumulate, Real, check_len};
use crate::error::Result;

/// Below this many multiply-adds (`m * n * k`) a product runs as one block: splitting it costs
/// more in dispatch and in packing the shared operand twice than the second core gives back.
const SPLIT_MIN_WORK: usize = 1 << 18;

/// Block sizes are multiples of this (the kernels' f32 and f64 micro-tiles divide it), so only
/// the last block has a ragged edge.
const BLOCK_ALIGN: usize = 16;

/// `c = alpha a b + beta c` (any strides), split over rayon's pool: `c` is cut into one block per
/// thread, along its rows (with the matching rows of `a`) when it has at least as many rows as
/// columns, else along its columns (with the matching columns of `b`). Each block is one
/// single-threaded faer product over the whole inner dimension. The result does not depend on
/// scheduling: the same thread count gives the same blocks, and each block is a sequential
/// kernel, so runs are bit-identical.
pub(crate) fn gemm<T, S1, S2, S3>(
    alpha: T,
    a: &ArrayBase<S1, Ix2>,
    b: &ArrayBase<S2, Ix2>,
    beta: T,
    c: &mut ArrayBase<S3, Ix2>,
) where
    T: Real,
    S1: Data<Elem = T>,
    S2: Data<Elem = T>,
    S3: DataMut<Elem = T>,
{
    let (m, k) = a.dim();
    let n = b.ncols();
    let blocks = if m * n * k < SPLIT_MIN_WORK {
        1
    } else {
        rayon::current_num_threads()
    };
    gemm_blocks(blocks, alpha, &a.view(), &b.view(), beta, &mut c.view_mut());
}

/// faer's view of an ndarray view that is row-major or column-major contiguous; `None` for any
/// other strides.
fn faer_ref<'a, T>(v: &ArrayView2<'a, T>) -> Option<MatRef<'a, T>> {
    let (rows, cols) = v.dim();
    if let Some(s) = v.to_slice() {
        return Some(MatRef::from_row_major_slice(s, rows, cols));
    }
    let s = (*v).reversed_axes().to_slice()?;
    Some(MatRef::from_column_major_slice(s, rows, cols))
}

/// [`gemm`] in at most `blocks` blocks.
fn gemm_blocks<T: Real>(
    blocks: usize,
    alpha: T,
    a: &ArrayView2<'_, T>,
    b: &ArrayView2<'_, T>,
    beta: T,
    c: &mut ArrayViewMut2<'_, T>,
) {
    // Operands with other strides (none of this crate's callers) are copied to row-major first.
    let (a_own, b_own);
    let a = match faer_ref(a) {
        Some(v) => v,
        None => {
            a_own = a.as_standard_layout().into_owned();
            faer_ref(&a_own.view()).expect("standard layout")
        }
    };
    let b = match faer_ref(b) {
        Some(v) => v,
        None => {
            b_own = b.as_standard_layout().into_owned();
            faer_ref(&b_own.view()).expect("standard layout")
        }
    };
    if beta != T::ZERO && beta != T::ONE {
        c.mapv_inplace(|v| v * beta);
    }
    let acc = if beta == T::ZERO {
        Accum::Replace
    } else {
        Accum::Add
    };
    let (m, n) = c.dim();
    if c.is_standard_layout() {
        let s = c.as_slice_mut().expect("standard layout");
        gemm_faer(
            blocks,
            alpha,
            a,
            b,
            acc,
            MatMut::from_row_major_slice_mut(s, m, n),
        );
    } else if let Some(s) = c.view_mut().reversed_axes().into_slice() {
        gemm_faer(
            blocks,
            alpha,
            a,
            b,
            acc,
            MatMut::from_column_major_slice_mut(s, m, n),
        );
    } else {
        let mut tmp = c.as_standard_layout().into_owned();
        let s = tmp.as_slice_mut().expect("standard layout");
        gemm_faer(
            blocks,
            alpha,
            a,
            b,
            acc,
            MatMut::from_row_major_slice_mut(s, m, n),
        );
        c.assign(&tmp);
    }
}

/// `c (=|+=) alpha a b` on faer views, cut as [`gemm`] says.
fn gemm_faer<T: Real>(
    blocks: usize,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    acc: Accum,
    c: MatMut<'_, T>,
) {
    let (m, n) = (c.nrows(), c.ncols());
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let size = len.div_ceil(blocks.max(1)).next_multiple_of(BLOCK_ALIGN);
    if blocks <= 1 || size >= len {
        T::matmul(c, acc, a, b, alpha);
        return;
    }
    let mut jobs = Vec::with_capacity(blocks);
    let (mut rest, mut start) = (c, 0);
    while start < len {
        let w = size.min(len - start);
        let block;
        if by_rows {
            (block, rest) = rest.split_at_row_mut(w);
            jobs.push((a.subrows(start, w), b, block));
        } else {
            (block, rest) = rest.split_at_col_mut(w);
            jobs.push((a, b.subcols(start, w), block));
        }
        start += w;
    }
    jobs.into_par_iter()
        .for_each(|(a, b, c)| T::matmul(c, acc, a, b, alpha));
}

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
    gemm(
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
        gemm(
            T::ONE,
            &dyv,
            &view(s.out, s.inp, w),
            acc.beta(),
            &mut view_mut(s.rows, s.inp, dx),
        );
    }
    if let Some(dw) = dw {
        check_len(OP, "dw", dw, s.out * s.inp)?;
        gemm(
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
    fn split_gemm_equals_one_block_bit_for_bit() {
        // Tall (split by rows), wide (split by columns), transposed operands, ragged last blocks.
        for (m, k, n, at) in [
            (300, 70, 40, false),
            (9, 500, 203, true),
            (150, 33, 150, true),
        ] {
            let a = rand_vec(5, m * k);
            let b = rand_vec(6, k * n);
            let c0 = rand_vec(7, m * n);
            let av = if at {
                view(k, m, &a).reversed_axes()
            } else {
                view(m, k, &a)
            };
            let bv = view(k, n, &b);
            let mut want = c0.clone();
            gemm_blocks(1, 0.5, &av, &bv, 1.0, &mut view_mut(m, n, &mut want));
            for blocks in [2, 3, 5] {
                let mut got = c0.clone();
                gemm_blocks(blocks, 0.5, &av, &bv, 1.0, &mut view_mut(m, n, &mut got));
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{m}x{k}x{n} in {blocks} blocks"
                );
            }
        }
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
