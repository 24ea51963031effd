//! Causal grouped-query attention with per-layer prefix keys and values (prefix tuning), the CPU
//! op the model uses when a [`crate::PrefixTuning`] adapter is attached.
//!
//! Layout as in [`qadapt::ops::attention`]: `q [batch * seq, heads * D]`, `k`, `v`
//! `[batch * seq, kv_heads * D]` (token-major, RoPE already applied to q and k), plus the prefix
//! `pk`, `pv [prefix, kv_heads * D]`, shared by every sequence of the batch and used as given (no
//! RoPE: they enter the cache as past keys). For one (batch, query head h, query i), with
//! `g = h / (heads / kv_heads)` and the `prefix + seq` columns `j` being the prefix rows followed
//! by the sequence's own keys:
//! ```text
//! S[i, j] = q_i . key_j / sqrt(D),  -inf for real keys after i (causal; the prefix is always seen)
//! P = softmax_rows(S)                         (saved, [batch, heads, seq, prefix + seq])
//! O[i] = sum_j P[i, j] val_j                  (overwritten)
//! ```
//! Backward: `dP = dO V^T`, `dS = P (dP - rowsum(P dP)) / sqrt(D)`, `dQ = dS K`, `dK += dS^T Q`,
//! `dV += P^T dO`; `dq`, `dk`, `dv` are overwritten, `dpk`, `dpv` accumulated (summed over the
//! batch, since every sequence reads the same prefix). Plain loops: the op serves the reference
//! model and prefix lengths are small.

use qadapt::Result;
use qadapt::ops::Real;

use crate::shape_err;

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixShape {
    /// Sequences.
    pub batch: usize,
    /// Real tokens per sequence.
    pub seq: usize,
    /// Prefix (virtual) tokens.
    pub prefix: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head size D.
    pub head_dim: usize,
}

impl PrefixShape {
    /// Columns of one score row.
    pub fn cols(&self) -> usize {
        self.prefix + self.seq
    }

    fn check<T>(&self, op: &'static str, bufs: &[(&str, &[T], usize)]) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(shape_err(
                op,
                "heads a multiple of kv_heads",
                format!("{} and {}", self.heads, self.kv_heads),
            ));
        }
        for (what, v, n) in bufs {
            if v.len() != *n {
                return Err(shape_err(op, format!("{what} of {n} elements"), v.len()));
            }
        }
        Ok(())
    }

    fn lens(&self) -> (usize, usize, usize, usize) {
        let n = self.batch * self.seq;
        (
            n * self.heads * self.head_dim,
            n * self.kv_heads * self.head_dim,
            self.prefix * self.kv_heads * self.head_dim,
            self.batch * self.heads * self.seq * self.cols(),
        )
    }
}

/// Where key/value column `j` of sequence `b` lives: `(from the prefix?, row)`.
#[inline]
fn col(sh: &PrefixShape, b: usize, j: usize) -> (bool, usize) {
    if j < sh.prefix {
        (true, j)
    } else {
        (false, b * sh.seq + j - sh.prefix)
    }
}

/// Forward (see the module doc): overwrites `p` and `out`.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    sh: PrefixShape,
    q: &[T],
    k: &[T],
    v: &[T],
    pk: &[T],
    pv: &[T],
    p: &mut [T],
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "prefix attention forward";
    let (lq, lk, lp, lprob) = sh.lens();
    sh.check(
        OP,
        &[
            ("q", q, lq),
            ("k", k, lk),
            ("v", v, lk),
            ("pk", pk, lp),
            ("pv", pv, lp),
            ("p", p, lprob),
            ("out", out, lq),
        ],
    )?;
    let (d, rep, cols) = (sh.head_dim, sh.heads / sh.kv_heads, sh.cols());
    let (qw, kw) = (sh.heads * d, sh.kv_heads * d);
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let g = h / rep;
            for i in 0..sh.seq {
                let qi = &q[(b * sh.seq + i) * qw + h * d..][..d];
                let row = &mut p[((b * sh.heads + h) * sh.seq + i) * cols..][..cols];
                let live = sh.prefix + i + 1;
                let mut m = T::NEG_INFINITY;
                for (j, s) in row.iter_mut().enumerate().take(live) {
                    let (pre, r) = col(&sh, b, j);
                    let kj = &(if pre { pk } else { k })[r * kw + g * d..][..d];
                    let mut acc = T::ZERO;
                    for (a, c) in qi.iter().zip(kj) {
                        acc += *a * *c;
                    }
                    *s = acc * scale;
                    m = m.max(*s);
                }
                let mut sum = T::ZERO;
                for s in row.iter_mut().take(live) {
                    *s = (*s - m).exp();
                    sum += *s;
                }
                let inv = T::ONE / sum;
                row[..live].iter_mut().for_each(|s| *s *= inv);
                row[live..].iter_mut().for_each(|s| *s = T::ZERO);
                let o = &mut out[(b * sh.seq + i) * qw + h * d..][..d];
                o.iter_mut().for_each(|x| *x = T::ZERO);
                for (j, &pj) in row.iter().enumerate().take(live) {
                    let (pre, r) = col(&sh, b, j);
                    let vj = &(if pre { pv } else { v })[r * kw + g * d..][..d];
                    for (x, y) in o.iter_mut().zip(vj) {
                        *x += pj * *y;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Backward (see the module doc): overwrites `dq`, `dk`, `dv`, accumulates into `dpk`, `dpv`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    sh: PrefixShape,
    q: &[T],
    k: &[T],
    v: &[T],
    pk: &[T],
    pv: &[T],
    p: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dpk: &mut [T],
    dpv: &mut [T],
) -> Result<()> {
    const OP: &str = "prefix attention backward";
    let (lq, lk, lp, lprob) = sh.lens();
    sh.check(
        OP,
        &[
            ("q", q, lq),
            ("k", k, lk),
            ("v", v, lk),
            ("pk", pk, lp),
            ("pv", pv, lp),
            ("p", p, lprob),
            ("dout", dout, lq),
            ("dq", dq, lq),
            ("dk", dk, lk),
            ("dv", dv, lk),
            ("dpk", dpk, lp),
            ("dpv", dpv, lp),
        ],
    )?;
    let (d, rep, cols) = (sh.head_dim, sh.heads / sh.kv_heads, sh.cols());
    let (qw, kw) = (sh.heads * d, sh.kv_heads * d);
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    dq.iter_mut().for_each(|x| *x = T::ZERO);
    dk.iter_mut().for_each(|x| *x = T::ZERO);
    dv.iter_mut().for_each(|x| *x = T::ZERO);
    let mut dp = vec![T::ZERO; cols];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let g = h / rep;
            for i in 0..sh.seq {
                let at = (b * sh.seq + i) * qw + h * d;
                let (qi, doi) = (&q[at..at + d], &dout[at..at + d]);
                let row = &p[((b * sh.heads + h) * sh.seq + i) * cols..][..cols];
                let live = sh.prefix + i + 1;
                let mut dot = T::ZERO;
                for j in 0..live {
                    let (pre, r) = col(&sh, b, j);
                    let vj = &(if pre { pv } else { v })[r * kw + g * d..][..d];
                    let mut acc = T::ZERO;
                    for (a, c) in doi.iter().zip(vj) {
                        acc += *a * *c;
                    }
                    dp[j] = acc;
                    dot += row[j] * acc;
                    let dvj = &mut (if pre { &mut *dpv } else { &mut *dv })[r * kw + g * d..][..d];
                    for (x, y) in dvj.iter_mut().zip(doi) {
                        *x += row[j] * *y;
                    }
                }
                for j in 0..live {
                    let ds = row[j] * (dp[j] - dot) * scale;
                    let (pre, r) = col(&sh, b, j);
                    let kj = &(if pre { pk } else { k })[r * kw + g * d..][..d];
                    for (x, y) in dq[at..at + d].iter_mut().zip(kj) {
                        *x += ds * *y;
                    }
                    let dkj = &mut (if pre { &mut *dpk } else { &mut *dk })[r * kw + g * d..][..d];
                    for (x, y) in dkj.iter_mut().zip(qi) {
                        *x += ds * *y;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qadapt::ops::attention::{self, AttentionShape};

    fn rand(seed: u64, n: usize) -> Vec<f64> {
        let mut s = crate::rng::stream(seed);
        (0..n).map(|_| crate::rng::uniform(&mut s)).collect()
    }

    #[test]
    fn without_a_prefix_it_is_qadapts_attention() {
        let sh = PrefixShape {
            batch: 2,
            seq: 5,
            prefix: 0,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
        };
        let ash = AttentionShape {
            batch: 2,
            seq: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
        };
        let (q, k, v, dout) = (rand(1, 120), rand(2, 60), rand(3, 60), rand(4, 120));
        let (mut p1, mut o1) = (vec![0.0; 200], vec![0.0; 120]);
        let (mut p2, mut o2) = (vec![0.0; 200], vec![0.0; 120]);
        forward(sh, &q, &k, &v, &[], &[], &mut p1, &mut o1).unwrap();
        attention::forward(ash, &q, &k, &v, None, &mut p2, &mut o2).unwrap();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&p1, &p2) && close(&o1, &o2));
        let (mut dq1, mut dk1, mut dv1) = (vec![0.0; 120], vec![0.0; 60], vec![0.0; 60]);
        let (mut dq2, mut dk2, mut dv2) = (vec![0.0; 120], vec![0.0; 60], vec![0.0; 60]);
        backward(
            sh,
            &q,
            &k,
            &v,
            &[],
            &[],
            &p1,
            &dout,
            &mut dq1,
            &mut dk1,
            &mut dv1,
            &mut [],
            &mut [],
        )
        .unwrap();
        attention::backward(ash, &q, &k, &v, &p2, &dout, &mut dq2, &mut dk2, &mut dv2).unwrap();
        assert!(close(&dq1, &dq2) && close(&dk1, &dk2) && close(&dv1, &dv2));
        // Shapes are checked.
        let e = forward(sh, &q, &k, &v, &[0.0], &[], &mut p1, &mut o1).unwrap_err();
        assert!(e.to_string().contains("pk of 0"), "{e}");
    }
}
