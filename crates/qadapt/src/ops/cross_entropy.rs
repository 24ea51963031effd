//! Mean cross-entropy over the rows that have a target (PyTorch's `cross_entropy` with
//! `ignore_index`, reduction "mean"):
//!
//! ```text
//! loss = (1/N) sum_{n : t[n] is Some} (logsumexp(z[n, :]) - z[n, t[n]]),   N = #rows with a target
//! dz[n, v] = dloss / N * (softmax(z[n, :])[v] - [v = t[n]])                 (0 for ignored rows)
//! ```
//! The log-sum-exp subtracts the row maximum first. A causal LM's loss is this over the shifted
//! targets `t[b, i] = ids[b, i + 1]`, with the last position of each sequence ignored.

use rayon::prelude::*;

use super::{Real, check_len};
use crate::error::{Result, invalid, shape_err};

fn check(
    op: &'static str,
    logits: &[impl Sized],
    targets: &[Option<u32>],
    vocab: usize,
) -> Result<usize> {
    check_len(op, "logits", logits, targets.len() * vocab)?;
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

fn logsumexp<T: Real>(row: &[T]) -> T {
    let m = row.iter().fold(T::NEG_INFINITY, |a, &x| a.max(x));
    let mut s = T::ZERO;
    for &x in row {
        s += (x - m).exp();
    }
    m + s.ln()
}

/// The mean loss over the rows of `logits [targets.len(), vocab]` that have a target.
pub fn forward<T: Real>(logits: &[T], targets: &[Option<u32>], vocab: usize) -> Result<T> {
    let n = check("cross_entropy forward", logits, targets, vocab)?;
    // Rows in parallel, then a sequential sum: the result does not depend on the thread count.
    let per_row: Vec<T> = logits
        .par_chunks_exact(vocab)
        .zip(targets.par_iter())
        .map(|(row, t)| match *t {
            Some(t) => logsumexp(row) - row[t as usize],
            None => T::ZERO,
        })
        .collect();
    let mut total = T::ZERO;
    for v in per_row {
        total += v;
    }
    Ok(total / T::from_f64(n as f64))
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
    let g = dloss / T::from_f64(n as f64);
    logits
        .par_chunks_exact(vocab)
        .zip(dlogits.par_chunks_exact_mut(vocab))
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
    Ok(())
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
}
