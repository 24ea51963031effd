//! Rotary position embedding in transformers' Llama convention ("rotate_half": the two halves of
//! a head are the real and imaginary parts, not interleaved pairs).
//!
//! For a head vector `x` of even size `D`, position `p` and `i < D/2`, with `a = p * inv_freq[i]`:
//! ```text
//! out[i]       = x[i] cos a - x[i + D/2] sin a
//! out[i + D/2] = x[i + D/2] cos a + x[i] sin a
//! ```
//! `inv_freq[i] = 1 / theta^(2i / D)`, optionally rescaled by the "llama3" rule (transformers'
//! `_compute_llama3_parameters`): with wavelength `l = 2 pi / inv_freq`, the low/high wavelength
//! bounds `L = old_ctx / low_freq_factor`, `H = old_ctx / high_freq_factor`:
//! `l > L` -> `inv_freq / factor`; `l < H` -> unchanged; otherwise the blend
//! `(1 - s) inv_freq / factor + s inv_freq` with `s = (old_ctx / l - low) / (high - low)`.
//! The attention scaling of these two rope types is 1.
//!
//! The rotation is orthogonal, so the backward is the same rotation by `-a` (the transpose). Both
//! work in place on `[batch * seq, heads * D]` token-major activations; position `p` is the
//! token's index in its sequence.

use rayon::prelude::*;

use super::{Real, check_len};
use crate::error::{Result, invalid, shape_err};

/// The frequency rescaling of a RoPE variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: "default"`).
    None,
    /// Position interpolation (`rope_type: "linear"`, long-context Llama 2 variants): every
    /// frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.x (`rope_type: "llama3"`).
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `old_ctx / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `old_ctx / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length (`original_max_position_embeddings`).
        original_max_position_embeddings: f64,
    },
}

/// Which way to rotate: the forward, or its transpose (the backward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeDirection {
    /// Rotate by `+a`.
    Forward,
    /// Rotate by `-a` (the gradient of [`RopeDirection::Forward`]).
    Backward,
}

/// `inv_freq[i]` for `i < head_dim / 2`, computed in f32 as transformers does (its buffer is f32).
pub fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Result<Vec<f32>> {
    const OP: &str = "rope inv_freq";
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(
            OP,
            format!("head_dim {head_dim} must be even and positive"),
        ));
    }
    // Written so that NaN is refused too.
    if theta.is_nan() || theta <= 0.0 {
        return Err(invalid(OP, format!("rope_theta {theta} must be positive")));
    }
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => Ok(base),
        RopeScaling::Linear { factor } => {
            if factor.is_nan() || factor <= 0.0 {
                return Err(invalid(
                    OP,
                    format!("linear scaling needs factor > 0, got {factor}"),
                ));
            }
            // transformers divides its f32 inv_freq by the factor.
            Ok(base.into_iter().map(|f| f / factor as f32).collect())
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let positive = |v: f64| v > 0.0;
            if !positive(factor) || !positive(high_freq_factor - low_freq_factor) || !positive(old)
            {
                return Err(invalid(
                    OP,
                    format!(
                        "llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor and \
                         original_max_position_embeddings > 0, got {factor}, {high_freq_factor}, \
                         {low_freq_factor}, {old}"
                    ),
                ));
            }
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            Ok(base
                .into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let s = (old / wavelen - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect())
        }
    }
}

/// cos and sin of `p * inv_freq[i]` for positions `0..seq`, each `[seq, head_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeTable<T> {
    /// Positions covered.
    pub seq: usize,
    /// Head size D (the table has D/2 columns).
    pub head_dim: usize,
    /// `cos(p * inv_freq[i])`.
    pub cos: Vec<T>,
    /// `sin(p * inv_freq[i])`.
    pub sin: Vec<T>,
}

impl<T: Real> RopeTable<T> {
    /// The table for positions `0..seq`. The angle is the f32 product `p * inv_freq` (as
    /// transformers computes it); cos and sin are then taken in `T`.
    pub fn new(seq: usize, head_dim: usize, inv_freq: &[f32]) -> Result<Self> {
        let positions: Vec<u32> = (0..seq as u32).collect();
        Self::at_positions(&positions, head_dim, inv_freq)
    }

    /// The table whose row n is position `positions[n]`: with one row per token of a batch
    /// (`seq = positions.len()`, so token n reads row n), tokens of packed sequences get their
    /// distance from their own sequence's start. Angles as [`Self::new`].
    pub fn at_positions(positions: &[u32], head_dim: usize, inv_freq: &[f32]) -> Result<Self> {
        if inv_freq.len() * 2 != head_dim {
            return Err(shape_err(
                "rope table",
                format!("inv_freq of {} (head_dim / 2)", head_dim / 2),
                inv_freq.len(),
            ));
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let a = T::from_f64((p as f32 * f) as f64);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(RopeTable {
            seq: positions.len(),
            head_dim,
            cos,
            sin,
        })
    }

    /// Rotates every head of `x [batch * seq, heads * head_dim]` in place.
    pub fn apply(&self, x: &mut [T], heads: usize, dir: RopeDirection) -> Result<()> {
        const OP: &str = "rope apply";
        let row = heads * self.head_dim;
        if row == 0 || self.seq == 0 || !x.len().is_multiple_of(row * self.seq) {
            return Err(shape_err(
                OP,
                format!("x of batch * {} * {row} elements", self.seq),
                x.len(),
            ));
        }
        check_len(OP, "cos", &self.cos, self.seq * self.head_dim / 2)?;
        self.rotate(x, row, dir, |n| n % self.seq);
        Ok(())
    }

    /// [`Self::apply`] to a ragged set of tokens, token n (row n of `x [tokens, heads *
    /// head_dim]`) at table row `positions[n]`: the new tokens of cached decoding, each at its
    /// own position in its sequence.
    pub fn apply_at(
        &self,
        x: &mut [T],
        heads: usize,
        dir: RopeDirection,
        positions: &[usize],
    ) -> Result<()> {
        const OP: &str = "rope apply at positions";
        let row = heads * self.head_dim;
        check_len(OP, "x", x, positions.len() * row)?;
        check_len(OP, "cos", &self.cos, self.seq * self.head_dim / 2)?;
        if let Some(&p) = positions.iter().find(|&&p| p >= self.seq) {
            return Err(shape_err(
                OP,
                format!("positions below the table's {}", self.seq),
                p,
            ));
        }
        self.rotate(x, row, dir, |n| positions[n]);
        Ok(())
    }

    /// Rotates each `row`-wide token n of `x` by table row `pos(n)` (checked by the callers).
    fn rotate(
        &self,
        x: &mut [T],
        row: usize,
        dir: RopeDirection,
        pos: impl Fn(usize) -> usize + Sync,
    ) {
        let half = self.head_dim / 2;
        let sign = match dir {
            RopeDirection::Forward => T::ONE,
            RopeDirection::Backward => -T::ONE,
        };
        x.par_chunks_exact_mut(row)
            .enumerate()
            .with_min_len(16)
            .for_each(|(n, xr)| {
                let p = pos(n);
                let cos = &self.cos[p * half..(p + 1) * half];
                let sin = &self.sin[p * half..(p + 1) * half];
                for head in xr.chunks_exact_mut(self.head_dim) {
                    let (lo, hi) = head.split_at_mut(half);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                        let s = sign * s;
                        let (x1, x2) = (*a, *b);
                        *a = x1 * c - x2 * s;
                        *b = x2 * c + x1 * s;
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, rand_vec};

    #[test]
    fn llama3_scaling_takes_each_branch() {
        let plain = inv_freq(8, 10000.0, RopeScaling::None).unwrap();
        assert_eq!(plain[0], 1.0);
        assert!((plain[1] - 0.1).abs() < 1e-7 && (plain[3] - 0.001).abs() < 1e-9);
        let scaled = inv_freq(
            8,
            10000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        )
        .unwrap();
        // wavelengths 6.3 (< 16: kept), 62.8 (blended), 628 and 6283 (> 64: divided by 8).
        assert_eq!(scaled[0], plain[0]);
        let l = 2.0 * std::f32::consts::PI / plain[1];
        let s = 64.0 / l - 1.0;
        let s = s / 3.0;
        assert!((scaled[1] - ((1.0 - s) * plain[1] / 8.0 + s * plain[1])).abs() < 1e-8);
        assert_eq!(scaled[2], plain[2] / 8.0);
        assert_eq!(scaled[3], plain[3] / 8.0);
        assert!(inv_freq(7, 10000.0, RopeScaling::None).is_err());
    }

    #[test]
    fn rotates_halves_and_inverts() {
        let f = inv_freq(4, 100.0, RopeScaling::None).unwrap();
        let t = RopeTable::<f64>::new(3, 4, &f).unwrap();
        // one head, batch 1, position 2: angles 2 * 1 and 2 * 0.1
        let mut x = vec![0.0; 12];
        x[8..12].copy_from_slice(&[1.0, 0.0, 0.0, 1.0]);
        t.apply(&mut x, 1, RopeDirection::Forward).unwrap();
        let a0 = 2.0f64;
        let a1 = (2.0f32 * f[1]) as f64;
        assert!((x[8] - a0.cos()).abs() < 1e-12 && (x[10] - a0.sin()).abs() < 1e-12);
        assert!((x[9] + a1.sin()).abs() < 1e-12 && (x[11] - a1.cos()).abs() < 1e-12);
        t.apply(&mut x, 1, RopeDirection::Backward).unwrap();
        assert!((x[8] - 1.0).abs() < 1e-12 && x[9].abs() < 1e-12 && (x[11] - 1.0).abs() < 1e-12);
        assert!(t.apply(&mut x[..10], 1, RopeDirection::Forward).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (batch, seq, heads, d) = (2, 5, 3, 6);
        let f = inv_freq(d, 10000.0, RopeScaling::None).unwrap();
        let t = RopeTable::<f64>::new(seq, d, &f).unwrap();
        let x = rand_vec(1, batch * seq * heads * d);
        let r = rand_vec(2, x.len());
        let mut dx = r.clone();
        t.apply(&mut dx, heads, RopeDirection::Backward).unwrap();
        check_grad("rope", &x, &dx, |v| {
            let mut y = v.to_vec();
            t.apply(&mut y, heads, RopeDirection::Forward).unwrap();
            y.iter().zip(&r).map(|(a, b)| a * b).sum()
        })
        .unwrap();
    }

    #[test]
    fn a_token_at_its_own_position_rotates_as_in_a_full_batch() {
        let (seq, heads, d) = (6, 2, 4);
        let f = inv_freq(d, 100.0, RopeScaling::None).unwrap();
        let t = RopeTable::<f64>::new(seq, d, &f).unwrap();
        let full = rand_vec(3, seq * heads * d);
        let mut rotated = full.clone();
        t.apply(&mut rotated, heads, RopeDirection::Forward)
            .unwrap();
        // Positions 4, 0 and 5 of the sequence, as three new tokens of a cache.
        let positions = [4usize, 0, 5];
        let row = heads * d;
        let mut tokens: Vec<f64> = positions
            .iter()
            .flat_map(|&p| full[p * row..(p + 1) * row].to_vec())
            .collect();
        t.apply_at(&mut tokens, heads, RopeDirection::Forward, &positions)
            .unwrap();
        for (n, &p) in positions.iter().enumerate() {
            assert_eq!(
                tokens[n * row..(n + 1) * row],
                rotated[p * row..(p + 1) * row]
            );
        }
        let fwd = RopeDirection::Forward;
        assert!(t.apply_at(&mut tokens, heads, fwd, &[4, 0, 6]).is_err());
        assert!(
            t.apply_at(&mut tokens[..row], heads, fwd, &positions)
                .is_err()
        );
    }
}
