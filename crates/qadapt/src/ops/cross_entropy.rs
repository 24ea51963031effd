//! Mean cross-entropy over the rows that have a target (PyTorch's `cross_entropy` with
//! `ignore_index`, reduction "mean"):
//!
//! ```text
//! loss = (1/N) sum_{n : t[n] is Some} (logsumexp(z[n, :]) - z[n, t[n]]),   N = #rows with a target
//! dz[n, v] = dloss / N * (softmax(z[n, :])[v] - [v = t[n]])                 (0 for ignored rows)
//! ```
//! The log-sum-exp subtracts the row maximum first. A causal LM's loss is this over the shifted
//! targets `t[b, i] = ids[b, i + 1]`, with the last position of each sequence ignored.
//!
//! [`lm_head`] fuses the loss with the LM head `z = xn H^T` (`H [vocab, hidden]`, frozen): it
//! takes `chunk_rows` rows at a time through the head, the loss and, for training, the gradient
//! `dxn = dz H`, so only `chunk_rows x vocab` logits and their gradient exist at once instead of
//! `rows x vocab` (at a 128k vocabulary, 16k rows of logits are 4 GiB in bf16, twice). Every row's
//! values are those of the unchunked computation: a row's logits, loss and gradient depend on
//! that row alone.

use rayon::prelude::*;

use super::linear::{self, LinearShape};
use super::{Accumulate, Real, check_len};
use crate::error::{Result, invalid, shape_err};

fn check(
    op: &'static str,
    logits: &[impl Sized],
    targets: &[Option<u32>],
    vocab: usize,
) -> Result<usize> {
    check_len(op, "logits", logits, targets.len() * vocab)?;
    count_targets(op, targets, vocab)
}

fn logsumexp<T: Real>(row: &[T]) -> T {
    let m = row.iter().fold(T::NEG_INFINITY, |a, &x| a.max(x));
    let mut s = T::ZERO;
    for &x in row {
        s += (x - m).exp();
    }
    m + s.ln()
}

/// Each row's `logsumexp(z[n]) - z[n, t[n]]` (0 for an ignored row) into `loss [targets.len()]`.
fn row_losses<T: Real>(logits: &[T], targets: &[Option<u32>], vocab: usize, loss: &mut [T]) {
    logits
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .zip(loss.par_iter_mut())
        .for_each(|((row, t), l)| {
            *l = match *t {
                Some(t) => logsumexp(row) - row[t as usize],
                None => T::ZERO,
            }
        });
}

/// The per-row losses summed in row order, over the `n` rows with a target: the result does not
/// depend on the thread count.
fn mean_of<T: Real>(loss: &[T], n: usize) -> T {
    let mut total = T::ZERO;
    for &v in loss {
        total += v;
    }
    total / T::from_f64(n as f64)
}

/// The mean loss over the rows of `logits [targets.len(), vocab]` that have a target.
pub fn forward<T: Real>(logits: &[T], targets: &[Option<u32>], vocab: usize) -> Result<T> {
    let n = check("cross_entropy forward", logits, targets, vocab)?;
    let mut loss = vec![T::ZERO; targets.len()];
    row_losses(logits, targets, vocab, &mut loss);
    Ok(mean_of(&loss, n))
}

/// The shape of [`lm_head`]: `rows` tokens, `hidden` features, `vocab` logits per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmHeadShape {
    /// Token rows of `xn` (and targets).
    pub rows: usize,
    /// Features of `xn`, columns of the head.
    pub hidden: usize,
    /// Rows of the head: logits per token.
    pub vocab: usize,
}

/// The mean cross-entropy of `z = xn H^T` (`xn [rows, hidden]`, the head `H [vocab, hidden]`)
/// against `targets [rows]`, computed `chunk_rows` rows at a time (see the module doc); when
/// `dxn` is given it is overwritten with the gradient of `dloss * loss` with respect to `xn`
/// (the head is frozen: no gradient for it).
#[allow(clippy::too_many_arguments)]
pub fn lm_head<T: Real>(
    xn: &[T],
    head: &[T],
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
    dloss: T,
    dxn: Option<&mut [T]>,
) -> Result<T> {
    lm_head_stored(xn, head, shape, targets, chunk_rows, dloss, dxn, |_| {})
}

/// [`lm_head`] with the logits and their gradient passed through `store` after they are computed:
/// a mixed-precision caller rounds them to the precision its device keeps them in (bf16), so
/// the reference follows a device's arithmetic step for step.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_stored<T: Real>(
    xn: &[T],
    head: &[T],
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
    dloss: T,
    dxn: Option<&mut [T]>,
    store: impl Fn(&mut [T]),
) -> Result<T> {
    const OP: &str = "lm_head cross_entropy";
    let mut loss = vec![T::ZERO; shape.rows];
    let n = lm_head_rows(
        OP, xn, head, shape, targets, chunk_rows, dloss, dxn, &mut loss, None, store,
    )?;
    Ok(mean_of(&loss, n))
}

/// One token row's score under the LM head ([`lm_head_scores`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore<T> {
    /// `logsumexp(z) - z[t]`; 0 for a row without a target.
    pub loss: T,
    /// Whether the row has a target and it is the first argmax of the row's logits (no logit
    /// greater, none equal at a lower index): the token greedy decoding would pick.
    pub top: bool,
}

/// Each row's loss and argmax test under `z = xn H^T` (`xn [rows, hidden]`, the head
/// `H [vocab, hidden]`), `chunk_rows` rows at a time: what an evaluation needs (mean loss,
/// exact-match accuracy) without the logits. No gradient.
pub fn lm_head_scores<T: Real>(
    xn: &[T],
    head: &[T],
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
) -> Result<Vec<RowScore<T>>> {
    lm_head_scores_stored(xn, head, shape, targets, chunk_rows, |_| {})
}

/// [`lm_head_scores`] with the logits passed through `store` (see [`lm_head_stored`]).
pub fn lm_head_scores_stored<T: Real>(
    xn: &[T],
    head: &[T],
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
    store: impl Fn(&mut [T]),
) -> Result<Vec<RowScore<T>>> {
    const OP: &str = "lm_head scores";
    let mut loss = vec![T::ZERO; shape.rows];
    let mut top = vec![false; shape.rows];
    lm_head_rows(
        OP,
        xn,
        head,
        shape,
        targets,
        chunk_rows,
        T::ZERO,
        None,
        &mut loss,
        Some(&mut top),
        store,
    )?;
    Ok(loss
        .into_iter()
        .zip(top)
        .map(|(loss, top)| RowScore { loss, top })
        .collect())
}

/// Whether `t` is the first argmax of `row`.
fn is_top<T: Real>(row: &[T], t: usize) -> bool {
    let zt = row[t];
    row.iter()
        .enumerate()
        .all(|(c, &x)| !(x > zt || (x == zt && c < t)))
}

/// The chunked head of [`lm_head_stored`] and [`lm_head_scores_stored`]: each row's loss into
/// `loss [rows]`, its argmax test into `top` when given, `dxn` when given; returns the number of
/// rows with a target.
#[allow(clippy::too_many_arguments)]
fn lm_head_rows<T: Real>(
    op: &'static str,
    xn: &[T],
    head: &[T],
    shape: LmHeadShape,
    targets: &[Option<u32>],
    chunk_rows: usize,
    dloss: T,
    mut dxn: Option<&mut [T]>,
    loss: &mut [T],
    mut top: Option<&mut [bool]>,
    store: impl Fn(&mut [T]),
) -> Result<usize> {
    let LmHeadShape {
        rows,
        hidden,
        vocab,
    } = shape;
    if rows == 0 || hidden == 0 || vocab == 0 || chunk_rows == 0 {
        return Err(invalid(
            op,
            format!("an empty shape ({rows} x {hidden} -> {vocab}) or chunk ({chunk_rows} rows)"),
        ));
    }
    check_len(op, "targets", targets, rows)?;
    check_len(op, "xn", xn, rows * hidden)?;
    check_len(op, "head", head, vocab * hidden)?;
    if let Some(d) = dxn.as_deref() {
        check_len(op, "dxn", d, rows * hidden)?;
    }
    check_len(op, "loss", loss, rows)?;
    if let Some(d) = top.as_deref() {
        check_len(op, "top", d, rows)?;
    }
    let chunk = chunk_rows.min(rows);
    let mut z = vec![T::ZERO; chunk * vocab];
    let n = count_targets(op, targets, vocab)?;
    let mut dz = dxn.as_ref().map(|_| vec![T::ZERO; chunk * vocab]);
    let g = dloss / T::from_f64(n as f64);
    for r0 in (0..rows).step_by(chunk) {
        let m = chunk.min(rows - r0);
        let s = LinearShape {
            rows: m,
            inp: hidden,
            out: vocab,
        };
        let (x, t) = (&xn[r0 * hidden..][..m * hidden], &targets[r0..r0 + m]);
        let z = &mut z[..m * vocab];
        linear::forward(s, x, head, z, Accumulate::Overwrite)?;
        store(z);
        row_losses(z, t, vocab, &mut loss[r0..r0 + m]);
        if let Some(top) = top.as_deref_mut() {
            for ((row, t), hit) in z.chunks_exact(vocab).zip(t).zip(&mut top[r0..r0 + m]) {
                *hit = t.is_some_and(|t| is_top(row, t as usize));
            }
        }
        if let (Some(dz), Some(dxn)) = (dz.as_mut(), dxn.as_deref_mut()) {
            let dz = &mut dz[..m * vocab];
            softmax_grad(z, t, vocab, g, dz);
            store(dz);
            let dx = &mut dxn[r0 * hidden..][..m * hidden];
            linear::backward(s, x, head, dz, Some((dx, Accumulate::Overwrite)), None)?;
        }
    }
    Ok(n)
}

/// The number of rows with a target, after checking every target against the vocabulary.
fn count_targets(op: &'static str, targets: &[Option<u32>], vocab: usize) -> Result<usize> {
    if let Some(i) = targets
        .iter()
        .position(|t| t.is_some_and(|t| t as usize >= vocab))
    {
        return Err(invalid(
            op,
            format!(
                "target {:?} at {i} is outside the vocabulary of {vocab}",
                targets[i]
            ),
        ));
    }
    let n = targets.iter().filter(|t| t.is_some()).count();
    if n == 0 {
        return Err(shape_err(op, "at least one row with a target", "none"));
    }
    Ok(n)
}

/// `dlogits` (overwritten) of `dloss * loss` (see the module doc).
pub fn backward<T: Real>(
    logits: &[T],
    targets: &[Option<u32>],
    vocab: usize,
    dloss: T,
    dlogits: &mut [T],
) -> Result<()> {
    const OP: &str = "cross_entropy backward";
    let n = check(OP, logits, targets, vocab)?;
    check_len(OP, "dlogits", dlogits, logits.len())?;
    softmax_grad(
        logits,
        targets,
        vocab,
        dloss / T::from_f64(n as f64),
        dlogits,
    );
    Ok(())
}

/// `dz[n] = g * (softmax(z[n]) - onehot(t[n]))` per row of `z [targets.len(), vocab]` (0 for an
/// ignored row), `g = dloss / N`.
fn softmax_grad<T: Real>(logits: &[T], targets: &[Option<u32>], vocab: usize, g: T, dz: &mut [T]) {
    logits
        .par_chunks_exact(vocab)
        .zip(dz.par_chunks_exact_mut(vocab))
        .zip(targets.par_iter())
        .for_each(|((row, drow), t)| match *t {
            None => drow.iter_mut().for_each(|d| *d = T::ZERO),
            Some(t) => {
                // softmax(z) = e^(z - m) / sum e^(z - m): one exp per logit, kept in drow.
                let m = row.iter().fold(T::NEG_INFINITY, |a, &x| a.max(x));
                let mut s = T::ZERO;
                for (d, &z) in drow.iter_mut().zip(row) {
                    *d = (z - m).exp();
                    s += *d;
                }
                let scale = g / s;
                drow.iter_mut().for_each(|d| *d *= scale);
                drow[t as usize] -= g;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn forward_value_and_errors() {
        let z = [0.0f64, 0.0, 0.0, 1.0, 2.0, 3.0];
        let l = forward(&z, &[Some(1), None], 3).unwrap();
        assert!((l - 3f64.ln()).abs() < 1e-15);
        let l2 = forward(&z, &[Some(1), Some(2)], 3).unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((l2 - (3f64.ln() + lse - 3.0) / 2.0).abs() < 1e-14);
        assert!(forward(&z, &[None, None], 3).is_err());
        assert!(forward(&z, &[Some(3), None], 3).is_err());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let vocab = 7;
        let targets = [Some(3), None, Some(0), Some(6)];
        let z: Vec<f64> = rand_vec(1, 4 * vocab).iter().map(|x| 3.0 * x).collect();
        let mut dz = vec![5.0; z.len()];
        backward(&z, &targets, vocab, 0.7, &mut dz).unwrap();
        check_grad("cross_entropy", &z, &dz, |v| {
            0.7 * forward(v, &targets, vocab).unwrap()
        })
        .unwrap();
    }

    /// The chunked head equals logits, loss and gradient computed whole, for chunks that do and
    /// do not divide the rows, and its `dxn` matches finite differences.
    #[test]
    fn lm_head_in_chunks_equals_the_whole_computation() {
        let (rows, hidden, vocab) = (7, 5, 11);
        let shape = LmHeadShape {
            rows,
            hidden,
            vocab,
        };
        let xn = rand_vec(2, rows * hidden);
        let head = rand_vec(3, vocab * hidden);
        let targets = [Some(3), None, Some(0), Some(10), Some(4), None, Some(7)];
        let s = LinearShape {
            rows,
            inp: hidden,
            out: vocab,
        };
        let mut z = vec![0.0; rows * vocab];
        linear::forward(s, &xn, &head, &mut z, Accumulate::Overwrite).unwrap();
        let want = forward(&z, &targets, vocab).unwrap();
        let mut dz = vec![0.0; rows * vocab];
        backward(&z, &targets, vocab, 0.3, &mut dz).unwrap();
        let mut want_dx = vec![0.0; rows * hidden];
        linear::backward(
            s,
            &xn,
            &head,
            &dz,
            Some((&mut want_dx, Accumulate::Overwrite)),
            None,
        )
        .unwrap();
        for chunk in [1, 3, 7, 100] {
            let mut dx = vec![9.0; rows * hidden];
            let l = lm_head(&xn, &head, shape, &targets, chunk, 0.3, Some(&mut dx)).unwrap();
            assert!((l - want).abs() < 1e-14, "chunk {chunk}: {l} vs {want}");
            for (a, b) in dx.iter().zip(&want_dx) {
                assert!((a - b).abs() < 1e-14, "chunk {chunk}: {a} vs {b}");
            }
            assert_eq!(
                lm_head(&xn, &head, shape, &targets, chunk, 0.3, None).unwrap(),
                l
            );
        }
        let mut dx = vec![0.0; rows * hidden];
        lm_head(&xn, &head, shape, &targets, 3, 0.3, Some(&mut dx)).unwrap();
        check_grad("lm_head cross_entropy", &xn, &dx, |x| {
            0.3 * lm_head(x, &head, shape, &targets, 3, 0.0, None).unwrap()
        })
        .unwrap();
        // Refusals: no chunk, a short head, a target outside the vocabulary, no target at all.
        assert!(lm_head(&xn, &head, shape, &targets, 0, 1.0, None).is_err());
        assert!(lm_head(&xn, &head[1..], shape, &targets, 2, 1.0, None).is_err());
        let mut bad = targets;
        bad[2] = Some(11);
        assert!(lm_head(&xn, &head, shape, &bad, 2, 1.0, None).is_err());
        assert!(lm_head(&xn, &head, shape, &[None; 7], 2, 1.0, None).is_err());
    }

    /// Scores: each row's loss is the whole computation's, and `top` is the first-argmax rule,
    /// ties included (two equal head rows give equal logits: the lower index wins).
    #[test]
    fn lm_head_scores_give_row_losses_and_the_first_argmax() {
        let (rows, hidden, vocab) = (6, 4, 9);
        let shape = LmHeadShape {
            rows,
            hidden,
            vocab,
        };
        let xn = rand_vec(4, rows * hidden);
        let mut head = rand_vec(5, vocab * hidden);
        // Head rows 2 and 7 equal and long: they are every row's maximum, tied.
        for k in 0..hidden {
            let v = 10.0 * xn[k].signum();
            head[2 * hidden + k] = v;
            head[7 * hidden + k] = v;
        }
        // Every row with the signs of row 0: aligned with the long rows.
        let xn: Vec<f64> = (0..rows * hidden)
            .map(|i| xn[i % hidden].signum() * (0.5 + xn[i].abs()))
            .collect();
        let targets = [Some(2), Some(7), None, Some(0), Some(2), Some(8)];
        let s = LinearShape {
            rows,
            inp: hidden,
            out: vocab,
        };
        let mut z = vec![0.0; rows * vocab];
        linear::forward(s, &xn, &head, &mut z, Accumulate::Overwrite).unwrap();
        let mut want_loss = vec![0.0; rows];
        row_losses(&z, &targets, vocab, &mut want_loss);
        for chunk in [1, 4, 6] {
            let got = lm_head_scores(&xn, &head, shape, &targets, chunk).unwrap();
            let top: Vec<bool> = got.iter().map(|r| r.top).collect();
            // Row 0 predicts 2 (the first of the tied maxima), row 1 predicts 7 (tied with 2,
            // which comes first), row 2 has no target, rows 3 and 5 predict small logits.
            assert_eq!(
                top,
                [true, false, false, false, true, false],
                "chunk {chunk}"
            );
            for (r, (g, w)) in got.iter().zip(&want_loss).enumerate() {
                assert!((g.loss - w).abs() < 1e-14, "chunk {chunk} row {r}");
            }
        }
        assert!(lm_head_scores(&xn, &head, shape, &[None; 6], 2).is_err());
        assert!(lm_head_scores(&xn, &head[1..], shape, &targets, 2).is_err());
    }
}
