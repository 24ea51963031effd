//! Token embedding: a row gather from the table `E [vocab, dim]`.
//!
//! ```text
//! forward   out[n, :]  = E[ids[n], :]                     (overwritten)
//! backward  dE[v, :]  += sum_{n : ids[n] = v} dout[n, :]  (accumulated, a scatter-add)
//! ```
//! An id outside the vocabulary is a [`crate::Error::Invalid`], checked before anything is written.

use super::{Real, check_len};
use crate::error::{Result, invalid};

fn check_ids(op: &'static str, ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&t| t as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(invalid(
            op,
            format!(
                "token id {} at {i} is outside the vocabulary of {vocab}",
                ids[i]
            ),
        )),
    }
}

/// `out [ids.len(), dim] = table[ids]`; `table` is `[vocab, dim]`.
pub fn forward<T: Real>(
    ids: &[u32],
    table: &[T],
    vocab: usize,
    dim: usize,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "embedding forward";
    check_len(OP, "table", table, vocab * dim)?;
    check_len(OP, "out", out, ids.len() * dim)?;
    check_ids(OP, ids, vocab)?;
    for (row, &t) in out.chunks_exact_mut(dim).zip(ids) {
        let t = t as usize;
        row.copy_from_slice(&table[t * dim..(t + 1) * dim]);
    }
    Ok(())
}

/// `dtable[ids[n]] += dout[n]` for every n.
pub fn backward<T: Real>(
    ids: &[u32],
    dout: &[T],
    vocab: usize,
    dim: usize,
    dtable: &mut [T],
) -> Result<()> {
    const OP: &str = "embedding backward";
    check_len(OP, "dtable", dtable, vocab * dim)?;
    check_len(OP, "dout", dout, ids.len() * dim)?;
    check_ids(OP, ids, vocab)?;
    for (row, &t) in dout.chunks_exact(dim).zip(ids) {
        let t = t as usize;
        for (d, g) in dtable[t * dim..(t + 1) * dim].iter_mut().zip(row) {
            *d += *g;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn gathers_and_rejects_bad_ids() {
        let table = [0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0];
        let mut out = [0.0f32; 6];
        forward(&[2, 0, 2], &table, 3, 2, &mut out).unwrap();
        assert_eq!(out, [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
        let err = forward(&[2, 3, 0], &table, 3, 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("token id 3 at 1"), "{err}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (vocab, dim) = (5, 3);
        let ids = [4u32, 1, 4, 0];
        let table = rand_vec(1, vocab * dim);
        let r = rand_vec(2, ids.len() * dim);
        let mut dt = vec![0.0; table.len()];
        backward(&ids, &r, vocab, dim, &mut dt).unwrap();
        check_grad("embedding", &table, &dt, |t| {
            let mut out = vec![0.0; ids.len() * dim];
            forward(&ids, t, vocab, dim, &mut out).unwrap();
            out.iter().zip(&r).map(|(a, b)| a * b).sum()
        })
        .unwrap();
    }
}
