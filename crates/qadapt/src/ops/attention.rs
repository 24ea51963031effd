//! Causal grouped-query attention (scaled dot product), the eager path of transformers' Llama.
//!
//! Layout: `q [batch * seq, heads * D]`, `k` and `v [batch * seq, kv_heads * D]` (token-major, the
//! projections' outputs after RoPE), `out [batch * seq, heads * D]`, and the saved probabilities
//! `p [batch, heads, seq, seq]`. Query head `h` reads kv head `h / (heads / kv_heads)` (transformers'
//! `repeat_kv` repeats each kv head for consecutive query heads). For one (batch, head):
//! ```text
//! S = Q K^T / sqrt(D),  S[i, j] = -inf for j > i (causal) or j < s_i (packed rows)
//! P = softmax_rows(S)                              (saved; masked entries are exactly 0)
//! O = P V                                          (overwritten)
//! ```
//! Backward (dq, dk, dv overwritten; a kv head sums the gradients of all its query heads):
//! ```text
//! dV  += P^T dO
//! dP   = dO V^T
//! dS   = P * (dP - rowsum(P * dP)) / sqrt(D)       (softmax backward; 0 where masked)
//! dQ   = dS K
//! dK  += dS^T Q
//! ```
//! Packed rows hold several sequences one after another: `segments[b * seq + i] = s_i` is the
//! position in row b where token i's sequence starts, and query i attends to the keys
//! `s_i <= j <= i` only, so each sequence sees nothing of the others (without segments, s_i = 0).
//! The backward needs no segments: P is exactly 0 wherever S was masked.
//!
//! Each product is one GEMM reading strided views of the token-major inputs (`[seq, D]` with row
//! stride `heads * D`), so no input head is copied; outputs are written head-major (one contiguous
//! block per parallel task) and then copied to the token-major layout once. The softmax works row
//! by row on one `[seq, seq]` block.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView4, s};
use rayon::prelude::*;

use super::linear::view_mut;
use super::{Real, check_len};
use crate::error::{Result, invalid};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Size D of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    fn check<T>(&self, op: &'static str, q: &[T], k: &[T], v: &[T], p: &[T]) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) || self.head_dim == 0 {
            return Err(invalid(
                op,
                format!(
                    "heads {} must be a multiple of kv_heads {}, head_dim {} positive",
                    self.heads, self.kv_heads, self.head_dim
                ),
            ));
        }
        let n = self.batch * self.seq;
        check_len(op, "q", q, n * self.heads * self.head_dim)?;
        check_len(op, "k", k, n * self.kv_heads * self.head_dim)?;
        check_len(op, "v", v, n * self.kv_heads * self.head_dim)?;
        check_len(op, "p", p, self.batch * self.heads * self.seq * self.seq)
    }

    fn dims(&self, heads: usize) -> (usize, usize, usize, usize) {
        (self.batch, self.seq, heads, self.head_dim)
    }

    fn scale<T: Real>(&self) -> T {
        T::from_f64(1.0 / (self.head_dim as f64).sqrt())
    }
}

fn view4<T>(d: (usize, usize, usize, usize), v: &[T]) -> ArrayView4<'_, T> {
    ArrayView4::from_shape(d, v).expect("length checked before the view")
}

/// Copies a head-major `[batch, heads, seq, D]` buffer into the token-major
/// `[batch * seq, heads * D]` layout.
fn heads_to_tokens<T: Real>(src: &[T], dst: &mut [T], seq: usize, heads: usize, d: usize) {
    dst.par_chunks_exact_mut(heads * d)
        .enumerate()
        .with_min_len(16)
        .for_each(|(n, row)| {
            let (b, i) = (n / seq, n % seq);
            for (h, out) in row.chunks_exact_mut(d).enumerate() {
                let at = ((b * heads + h) * seq + i) * d;
                out.copy_from_slice(&src[at..at + d]);
            }
        });
}

/// Checks packed rows' segment starts (see the module doc) for `batch` rows of `seq` tokens: one
/// per token, each row's first 0 and every next one either the same start or its own position
/// (a new sequence), so the starts never decrease along a row.
pub fn check_segments(op: &'static str, batch: usize, seq: usize, segments: &[u32]) -> Result<()> {
    check_len(op, "segments", segments, batch * seq)?;
    for (n, &s) in segments.iter().enumerate() {
        let i = n % seq;
        let prev = if i == 0 { 0 } else { segments[n - 1] };
        if s != prev && s as usize != i {
            return Err(invalid(
                op,
                format!(
                    "token {i} of row {} starts its sequence at {s}: a start is the previous \
                     token's ({prev}) or the token's own position",
                    n / seq
                ),
            ));
        }
    }
    Ok(())
}

/// Forward (see the module doc): overwrites `p` and `out`. The (batch, head) pairs run in
/// parallel, each on its own `[seq, seq]` block of `p` and a head-major copy of its output.
/// `segments` (packed rows) restricts each query to its own sequence's keys.
pub fn forward<T: Real>(
    sh: AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    segments: Option<&[u32]>,
    p: &mut [T],
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "attention forward";
    sh.check(OP, q, k, v, p)?;
    check_len(OP, "out", out, q.len())?;
    if let Some(s) = segments {
        check_segments(OP, sh.batch, sh.seq, s)?;
    }
    let (qv, kv, vv) = (
        view4(sh.dims(sh.heads), q),
        view4(sh.dims(sh.kv_heads), k),
        view4(sh.dims(sh.kv_heads), v),
    );
    let (t, d, rep) = (sh.seq, sh.head_dim, sh.heads / sh.kv_heads);
    let scale: T = sh.scale();
    let mut o_heads = vec![T::ZERO; out.len()];
    p.par_chunks_exact_mut(t * t)
        .zip(o_heads.par_chunks_exact_mut(t * d))
        .enumerate()
        .for_each(|(bh, (pbh, obh))| {
            let (b, h) = (bh / sh.heads, bh % sh.heads);
            let mut pbh = view_mut(t, t, pbh);
            general_mat_mul(
                scale,
                &qv.slice(s![b, .., h, ..]),
                &kv.slice(s![b, .., h / rep, ..]).t(),
                T::ZERO,
                &mut pbh,
            );
            for (i, mut row) in pbh.rows_mut().into_iter().enumerate() {
                let row = row.as_slice_mut().expect("p rows are contiguous");
                let s0 = segments.map_or(0, |s| s[b * t + i] as usize);
                let (before, row) = row.split_at_mut(s0);
                before.iter_mut().for_each(|x| *x = T::ZERO);
                let (live, masked) = row.split_at_mut(i + 1 - s0);
                let m = live.iter().fold(T::NEG_INFINITY, |a, &x| a.max(x));
                let mut sum = T::ZERO;
                for x in live.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                let inv = T::ONE / sum;
                live.iter_mut().for_each(|x| *x *= inv);
                masked.iter_mut().for_each(|x| *x = T::ZERO);
            }
            general_mat_mul(
                T::ONE,
                &pbh,
                &vv.slice(s![b, .., h / rep, ..]),
                T::ZERO,
                &mut view_mut(t, d, obh),
            );
        });
    heads_to_tokens(&o_heads, out, t, sh.heads, d);
    Ok(())
}

/// Backward (see the module doc): overwrites `dq`, `dk`, `dv`; `p` is what the forward saved.
/// The (batch, kv head) groups run in parallel; within a group the query heads are summed into
/// dK and dV in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    sh: AttentionShape,
    q: &[T],
    k: &[T],
    v: &[T],
    p: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    const OP: &str = "attention backward";
    sh.check(OP, q, k, v, p)?;
    check_len(OP, "dout", dout, q.len())?;
    check_len(OP, "dq", dq, q.len())?;
    check_len(OP, "dk", dk, k.len())?;
    check_len(OP, "dv", dv, v.len())?;
    let (qv, kv, vv, dov) = (
        view4(sh.dims(sh.heads), q),
        view4(sh.dims(sh.kv_heads), k),
        view4(sh.dims(sh.kv_heads), v),
        view4(sh.dims(sh.heads), dout),
    );
    let pv = view4((sh.batch, sh.heads, sh.seq, sh.seq), p);
    let (t, d, rep) = (sh.seq, sh.head_dim, sh.heads / sh.kv_heads);
    let scale: T = sh.scale();
    // Head-major gradients: [batch, heads, seq, D] and [batch, kv_heads, seq, D].
    let mut dq_h = vec![T::ZERO; dq.len()];
    let mut dk_h = vec![T::ZERO; dk.len()];
    let mut dv_h = vec![T::ZERO; dv.len()];
    dq_h.par_chunks_exact_mut(rep * t * d)
        .zip(dk_h.par_chunks_exact_mut(t * d))
        .zip(dv_h.par_chunks_exact_mut(t * d))
        .enumerate()
        .for_each_init(
            || Array2::<T>::zeros((t, t)),
            |ds, (bg, ((dqg, dkg), dvg))| {
                let (b, g) = (bg / sh.kv_heads, bg % sh.kv_heads);
                let mut dkv = view_mut(t, d, dkg);
                let mut dvv = view_mut(t, d, dvg);
                let (kg, vg) = (kv.slice(s![b, .., g, ..]), vv.slice(s![b, .., g, ..]));
                for (j, dqh) in dqg.chunks_exact_mut(t * d).enumerate() {
                    let h = g * rep + j;
                    let pbh = pv.slice(s![b, h, .., ..]);
                    let dobh = dov.slice(s![b, .., h, ..]);
                    general_mat_mul(T::ONE, &pbh.t(), &dobh, T::ONE, &mut dvv);
                    // ds = dO V^T, then the softmax backward in place, row by row.
                    general_mat_mul(T::ONE, &dobh, &vg.t(), T::ZERO, ds);
                    for (mut dsr, pr) in ds.rows_mut().into_iter().zip(pbh.rows()) {
                        let mut dot = T::ZERO;
                        for (&dd, &pp) in dsr.iter().zip(pr.iter()) {
                            dot += dd * pp;
                        }
                        for (dd, &pp) in dsr.iter_mut().zip(pr.iter()) {
                            *dd = pp * (*dd - dot) * scale;
                        }
                    }
                    general_mat_mul(T::ONE, &*ds, &kg, T::ZERO, &mut view_mut(t, d, dqh));
                    general_mat_mul(
                        T::ONE,
                        &ds.t(),
                        &qv.slice(s![b, .., h, ..]),
                        T::ONE,
                        &mut dkv,
                    );
                }
            },
        );
    heads_to_tokens(&dq_h, dq, t, sh.heads, d);
    heads_to_tokens(&dk_h, dk, t, sh.kv_heads, d);
    heads_to_tokens(&dv_h, dv, t, sh.kv_heads, d);
    Ok(())
}

/// A KV cache for incremental decoding: `kc` and `vc [batch, cap, kv_heads * head_dim]` hold the
/// (RoPE'd) keys and the values of every position each row has seen. A call carries `tokens`
/// new tokens of any rows, token-major: token t is row `row[t]` at absolute position `pos[t]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Rows of the cache.
    pub batch: usize,
    /// Positions per row.
    pub cap: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Size D of one head.
    pub head_dim: usize,
}

impl CacheShape {
    /// Checks the shape and one call's `row` and `pos` (equal lengths, each row `< batch`, each
    /// position `< cap`); returns the number of tokens.
    pub fn check_tokens(&self, op: &'static str, row: &[u32], pos: &[u32]) -> Result<usize> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) || self.head_dim == 0 {
            return Err(invalid(
                op,
                format!(
                    "heads {} must be a multiple of kv_heads {}, head_dim {} positive",
                    self.heads, self.kv_heads, self.head_dim
                ),
            ));
        }
        check_len(op, "pos", pos, row.len())?;
        if let Some(t) = row.iter().position(|&r| r as usize >= self.batch) {
            return Err(invalid(
                op,
                format!("token {t} is in row {}, of {}", row[t], self.batch),
            ));
        }
        if let Some(t) = pos.iter().position(|&p| p as usize >= self.cap) {
            return Err(invalid(
                op,
                format!("token {t} is at position {}, of {}", pos[t], self.cap),
            ));
        }
        Ok(row.len())
    }

    /// Elements of `kc` (and `vc`).
    pub fn cache_len(&self) -> usize {
        self.batch * self.cap * self.kv_heads * self.head_dim
    }
}

/// Writes each new token's key and value into its row's slot: `kc[row[t], pos[t]] = k[t]`,
/// `vc[row[t], pos[t]] = v[t]` (`k`, `v [tokens, kv_heads * D]`).
#[allow(clippy::too_many_arguments)]
pub fn kv_cache_write<T: Real>(
    sh: CacheShape,
    k: &[T],
    v: &[T],
    row: &[u32],
    pos: &[u32],
    kc: &mut [T],
    vc: &mut [T],
) -> Result<()> {
    const OP: &str = "kv cache write";
    let n = sh.check_tokens(OP, row, pos)?;
    let kd = sh.kv_heads * sh.head_dim;
    check_len(OP, "k", k, n * kd)?;
    check_len(OP, "v", v, n * kd)?;
    check_len(OP, "kc", kc, sh.cache_len())?;
    check_len(OP, "vc", vc, sh.cache_len())?;
    for t in 0..n {
        let at = (row[t] as usize * sh.cap + pos[t] as usize) * kd;
        kc[at..at + kd].copy_from_slice(&k[t * kd..(t + 1) * kd]);
        vc[at..at + kd].copy_from_slice(&v[t * kd..(t + 1) * kd]);
    }
    Ok(())
}

/// Each new token's attention over its row's cache: query t (`q [tokens, heads * D]`) attends
/// to the keys `0..=pos[t]` of row `row[t]` (causal: the cache up to the token itself, written
/// by [`kv_cache_write`] first; grouped-query, `1/sqrt(D)` scaling); `out [tokens, heads * D]`
/// overwritten. Tokens run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached<T: Real>(
    sh: CacheShape,
    q: &[T],
    kc: &[T],
    vc: &[T],
    row: &[u32],
    pos: &[u32],
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "cached attention";
    let n = sh.check_tokens(OP, row, pos)?;
    let (d, kd) = (sh.head_dim, sh.kv_heads * sh.head_dim);
    let qd = sh.heads * d;
    check_len(OP, "q", q, n * qd)?;
    check_len(OP, "out", out, n * qd)?;
    check_len(OP, "kc", kc, sh.cache_len())?;
    check_len(OP, "vc", vc, sh.cache_len())?;
    let rep = sh.heads / sh.kv_heads;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    out.par_chunks_exact_mut(qd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<T>, (t, ot)| {
            let live = pos[t] as usize + 1;
            let base = row[t] as usize * sh.cap * kd;
            let (keys, vals) = (&kc[base..base + live * kd], &vc[base..base + live * kd]);
            for (h, o) in ot.chunks_exact_mut(d).enumerate() {
                let g = h / rep;
                let qh = &q[t * qd + h * d..][..d];
                scores.clear();
                let mut m = T::NEG_INFINITY;
                for j in 0..live {
                    let kj = &keys[j * kd + g * d..][..d];
                    let mut sj = T::ZERO;
                    for (a, b) in qh.iter().zip(kj) {
                        sj += *a * *b;
                    }
                    sj *= scale;
                    m = m.max(sj);
                    scores.push(sj);
                }
                let mut sum = T::ZERO;
                for sj in scores.iter_mut() {
                    *sj = (*sj - m).exp();
                    sum += *sj;
                }
                let inv = T::ONE / sum;
                o.iter_mut().for_each(|x| *x = T::ZERO);
                for (j, &pj) in scores.iter().enumerate() {
                    let vj = &vals[j * kd + g * d..][..d];
                    let pj = pj * inv;
                    for (x, y) in o.iter_mut().zip(vj) {
                        *x += pj * *y;
                    }
                }
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    const SH: AttentionShape = AttentionShape {
        batch: 2,
        seq: 5,
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };

    fn run(q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut p = vec![0.0; SH.batch * SH.heads * SH.seq * SH.seq];
        let mut o = vec![0.0; q.len()];
        forward(SH, q, k, v, None, &mut p, &mut o).unwrap();
        (p, o)
    }

    fn inputs() -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let n = SH.batch * SH.seq;
        let scale = |v: Vec<f64>| v.into_iter().map(|x| 2.0 * x).collect::<Vec<_>>();
        (
            scale(rand_vec(1, n * SH.heads * SH.head_dim)),
            scale(rand_vec(2, n * SH.kv_heads * SH.head_dim)),
            rand_vec(3, n * SH.kv_heads * SH.head_dim),
        )
    }

    #[test]
    fn forward_matches_naive_loops() {
        let (q, k, v) = inputs();
        let (p, o) = run(&q, &k, &v);
        let (t, d, hd) = (SH.seq, SH.head_dim, SH.heads * SH.head_dim);
        let kd = SH.kv_heads * d;
        for b in 0..SH.batch {
            for h in 0..SH.heads {
                let g = h / 2;
                for i in 0..t {
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    q[(b * t + i) * hd + h * d + e]
                                        * k[(b * t + j) * kd + g * d + e]
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for j in 0..t {
                        let want = if j <= i { (sc[j] - m).exp() / z } else { 0.0 };
                        let got = p[((b * SH.heads + h) * t + i) * t + j];
                        assert!((got - want).abs() < 1e-12, "p[{b},{h},{i},{j}]");
                    }
                    for e in 0..d {
                        let want: f64 = (0..=i)
                            .map(|j| (sc[j] - m).exp() / z * v[(b * t + j) * kd + g * d + e])
                            .sum();
                        assert!((o[(b * t + i) * hd + h * d + e] - want).abs() < 1e-12);
                    }
                }
            }
        }
        let bad = AttentionShape { kv_heads: 3, ..SH };
        let mut pp = p.clone();
        let mut oo = o.clone();
        assert!(forward(bad, &q, &k, &v, None, &mut pp, &mut oo).is_err());
    }

    /// The cache: rows fed in two calls (a prefill of different lengths, then one token each)
    /// give each token the output of the causal forward over its row, and bad tokens are refused.
    #[test]
    fn cached_attention_equals_the_causal_forward() {
        let (q, k, v) = inputs();
        let cs = CacheShape {
            batch: SH.batch,
            cap: SH.seq + 2,
            heads: SH.heads,
            kv_heads: SH.kv_heads,
            head_dim: SH.head_dim,
        };
        let (_, want) = run(&q, &k, &v);
        let (qd, kd) = (SH.heads * SH.head_dim, SH.kv_heads * SH.head_dim);
        let mut kc = vec![0.0; cs.cache_len()];
        let mut vc = vec![0.0; cs.cache_len()];
        // Call 1: row 0's first 3 tokens and row 1's first 4; call 2: the rest (2 and 1).
        for rows in [
            [(0usize, 0usize, 3usize), (1, 0, 4)],
            [(0, 3, 2), (1, 4, 1)],
        ] {
            let (mut row, mut pos) = (Vec::new(), Vec::new());
            for &(b, p0, len) in &rows {
                for p in p0..p0 + len {
                    row.push(b as u32);
                    pos.push(p as u32);
                }
            }
            let pick = |x: &[f64], w: usize| -> Vec<f64> {
                row.iter()
                    .zip(&pos)
                    .flat_map(|(&b, &p)| x[(b as usize * SH.seq + p as usize) * w..][..w].to_vec())
                    .collect()
            };
            let (qt, kt, vt) = (pick(&q, qd), pick(&k, kd), pick(&v, kd));
            kv_cache_write(cs, &kt, &vt, &row, &pos, &mut kc, &mut vc).unwrap();
            let mut out = vec![0.0; qt.len()];
            attention_cached(cs, &qt, &kc, &vc, &row, &pos, &mut out).unwrap();
            for (x, y) in out.iter().zip(pick(&want, qd)) {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        }
        let mut out = vec![0.0; qd];
        assert!(attention_cached(cs, &q[..qd], &kc, &vc, &[2], &[0], &mut out).is_err());
        assert!(attention_cached(cs, &q[..qd], &kc, &vc, &[0], &[7], &mut out).is_err());
    }

    /// Packed rows: each sequence's outputs and gradients are those of the sequence run alone
    /// (rows of 5 holding sequences of 2 + 3 and 1 + 4), and a start after its token is refused.
    #[test]
    fn packed_rows_attend_within_their_sequences() {
        let (q, k, v) = inputs();
        let segments = [0u32, 0, 2, 2, 2, 0, 1, 1, 1, 1];
        let mut p = vec![0.0; SH.batch * SH.heads * SH.seq * SH.seq];
        let mut o = vec![0.0; q.len()];
        forward(SH, &q, &k, &v, Some(&segments), &mut p, &mut o).unwrap();
        let r = rand_vec(5, q.len());
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        backward(SH, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv).unwrap();
        let (hd, kd) = (SH.heads * SH.head_dim, SH.kv_heads * SH.head_dim);
        // (row, start, length) of each packed sequence.
        for (b, s0, len) in [(0, 0, 2), (0, 2, 3), (1, 0, 1), (1, 1, 4)] {
            let one = AttentionShape {
                batch: 1,
                seq: len,
                ..SH
            };
            let rows = |x: &[f64], w: usize| x[(b * SH.seq + s0) * w..][..len * w].to_vec();
            let (qs, ks, vs, rs) = (rows(&q, hd), rows(&k, kd), rows(&v, kd), rows(&r, hd));
            let mut ps = vec![0.0; SH.heads * len * len];
            let mut os = vec![0.0; qs.len()];
            forward(one, &qs, &ks, &vs, None, &mut ps, &mut os).unwrap();
            let (mut dqs, mut dks, mut dvs) = (
                vec![0.0; qs.len()],
                vec![0.0; ks.len()],
                vec![0.0; vs.len()],
            );
            backward(one, &qs, &ks, &vs, &ps, &rs, &mut dqs, &mut dks, &mut dvs).unwrap();
            for (what, got, want) in [
                ("out", rows(&o, hd), os),
                ("dq", rows(&dq, hd), dqs),
                ("dk", rows(&dk, kd), dks),
                ("dv", rows(&dv, kd), dvs),
            ] {
                for (x, y) in got.iter().zip(&want) {
                    assert!(
                        (x - y).abs() < 1e-12,
                        "{what} of ({b}, {s0}, {len}): {x} vs {y}"
                    );
                }
            }
        }
        let mut bad = segments;
        bad[6] = 2;
        assert!(forward(SH, &q, &k, &v, Some(&bad), &mut p, &mut o).is_err());
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (q, k, v) = inputs();
        let r = rand_vec(4, q.len());
        let (p, _) = run(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![9.0; k.len()], vec![9.0; v.len()]);
        backward(SH, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv).unwrap();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| {
            let (_, o) = run(q, k, v);
            o.iter().zip(&r).map(|(a, b)| a * b).sum::<f64>()
        };
        check_grad("attention dq", &q, &dq, |x| loss(x, &k, &v)).unwrap();
        check_grad("attention dk", &k, &dk, |x| loss(&q, x, &v)).unwrap();
        check_grad("attention dv", &v, &dv, |x| loss(&q, &k, x)).unwrap();
    }
}
