//! CPU reference of `kernels/nf4.cu`, with the same arguments as each kernel and the same results
//! bit for bit (the order of every floating-point operation is the kernel's).
//!
//! Work is split over all cores by NF4 block (rayon); nothing allocates per element.

use rayon::prelude::*;

use super::{NF4_LEVELS, check_blocksize, num_blocks, packed_len};
use crate::dtype::Float;
use crate::error::{Result, shape_err};
use qadapt_kernels::ffi;

const CODE_ZERO: u8 = ffi::QADAPT_NF4_CODE_ZERO as u8;
const DQ_BLOCK: usize = ffi::QADAPT_DQ_BLOCK as usize;
const DQ_CODE_ZERO: u8 = ffi::QADAPT_DQ_CODE_ZERO as u8;
const SUM_CHUNK: usize = ffi::QADAPT_DQ_SUM_CHUNK as usize;
const SUM_THREADS: usize = ffi::QADAPT_DQ_SUM_THREADS as usize;

/// Nearest NF4 code of a scaled value: |s - level| in f32, ties to the lower code. The nearest
/// level brackets `s`, so count the levels <= s and compare the two distances; NaN lands on 0.
#[inline]
pub fn encode_scaled(s: f32) -> u8 {
    let mut lo = 0usize;
    for l in &NF4_LEVELS[1..15] {
        lo += usize::from(s >= *l);
    }
    let d_lo = (s - NF4_LEVELS[lo]).abs();
    let d_hi = (s - NF4_LEVELS[lo + 1]).abs();
    (lo + usize::from(d_hi < d_lo)) as u8
}

/// Blockwise NF4 quantization of `input` (see `nf4_quantize_*` in `kernels/nf4.cu`).
/// Overwrites `packed[ceil(n/2)]` and `absmax[ceil(n/blocksize)]`.
pub fn quantize<T: Float>(
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    const OP: &str = "nf4 quantize (cpu)";
    check_blocksize(OP, blocksize)?;
    let n = input.len();
    if packed.len() != packed_len(n) {
        return Err(shape_err(
            OP,
            format!("packed of {} bytes", packed_len(n)),
            packed.len(),
        ));
    }
    if absmax.len() != num_blocks(n, blocksize) {
        return Err(shape_err(
            OP,
            format!("absmax of {} blocks", num_blocks(n, blocksize)),
            absmax.len(),
        ));
    }
    input
        .par_chunks(blocksize)
        .zip(packed.par_chunks_mut(blocksize / 2))
        .zip(absmax.par_iter_mut())
        .with_min_len(16)
        .for_each(|((block, bytes), am)| quantize_block(block, blocksize, bytes, am));
    Ok(())
}

fn quantize_block<T: Float>(block: &[T], blocksize: usize, bytes: &mut [u8], am: &mut f32) {
    let m = block.iter().fold(0.0f32, |m, x| m.max(x.to_f32().abs()));
    *am = m;
    if m == 0.0 {
        bytes.fill((CODE_ZERO << 4) | CODE_ZERO);
        return;
    }
    let inv = 1.0f32 / m;
    // A partial last block of a 16-bit tensor rounds its scaled values to T first, as
    // bitsandbytes' CPU path does (`A_rem * (1 / absmax[-1])` keeps T).
    let partial = block.len() < blocksize;
    let code = |x: T| {
        let s = x.to_f32() * inv;
        encode_scaled(if partial { T::round(s) } else { s })
    };
    let mut pairs = block.chunks_exact(2);
    for (byte, pair) in bytes.iter_mut().zip(&mut pairs) {
        *byte = (code(pair[0]) << 4) | code(pair[1]);
    }
    if let [last] = pairs.remainder() {
        bytes[block.len() / 2] = (code(*last) << 4) | CODE_ZERO;
    }
}

/// The double-quant offset: the mean of `absmax`, summed in f64 in the fixed order of
/// `QADAPT_DQ_SUM_CHUNK` (see `qadapt.h`), then divided in f32 (`nf4_dq_partial_sums` +
/// `nf4_dq_offset`).
pub fn dq_offset(absmax: &[f32]) -> f32 {
    let partials: Vec<f64> = absmax
        .par_chunks(SUM_CHUNK)
        .map(|chunk| {
            let mut part = [0.0f64; SUM_THREADS];
            for (t, p) in part.iter_mut().enumerate() {
                *p = chunk
                    .iter()
                    .skip(t)
                    .step_by(SUM_THREADS)
                    .fold(0.0f64, |a, &x| a + f64::from(x));
            }
            let mut s = SUM_THREADS / 2;
            while s > 0 {
                for t in 0..s {
                    part[t] += part[t + s];
                }
                s /= 2;
            }
            part[0]
        })
        .collect();
    let sum = partials.iter().fold(0.0f64, |a, &p| a + p);
    (sum as f32) / (absmax.len() as f32)
}

/// Nearest entry of a sorted 256-entry map, ties to the lower index (`nearest_in_map`).
#[inline]
fn nearest_in_map(map: &[f32; 256], q: f32) -> u8 {
    let mut lo = 0usize;
    let mut step = 128;
    while step > 0 {
        if map[lo + step] <= q {
            lo += step;
        }
        step /= 2;
    }
    if lo < 255 {
        let dl = (q - map[lo]).abs();
        let dr = (q - map[lo + 1]).abs();
        if dr < dl {
            lo += 1;
        }
    }
    lo as u8
}

/// Double quantization of `absmax` by the sorted 256-entry `map` (the three `nf4_dq_*` kernels).
/// Overwrites `codes[absmax.len()]` and `nested_absmax[ceil(len/256)]`; returns the offset.
pub fn double_quant(
    absmax: &[f32],
    map: &[f32; 256],
    codes: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<f32> {
    const OP: &str = "nf4 double quant (cpu)";
    if codes.len() != absmax.len() {
        return Err(shape_err(
            OP,
            format!("{} codes", absmax.len()),
            codes.len(),
        ));
    }
    let nn = absmax.len().div_ceil(DQ_BLOCK);
    if nested_absmax.len() != nn {
        return Err(shape_err(
            OP,
            format!("{nn} nested absmax"),
            nested_absmax.len(),
        ));
    }
    if absmax.is_empty() {
        return Ok(0.0);
    }
    let offset = dq_offset(absmax);
    absmax
        .par_chunks(DQ_BLOCK)
        .zip(codes.par_chunks_mut(DQ_BLOCK))
        .zip(nested_absmax.par_iter_mut())
        .for_each(|((a, c), nested)| {
            let m = a.iter().fold(0.0f32, |m, &x| m.max((x - offset).abs()));
            *nested = m;
            for (code, &x) in c.iter_mut().zip(a) {
                *code = if m == 0.0 {
                    DQ_CODE_ZERO
                } else {
                    nearest_in_map(map, (x - offset) / m)
                };
            }
        });
    Ok(offset)
}

/// The per-block scales of an NF4 tensor, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum ScalesRef<'a> {
    /// One f32 absmax per block.
    Absmax(&'a [f32]),
    /// Double quantization: `map[codes[b]] * nested_absmax[b / 256] + offset`.
    Double {
        /// One u8 code per block.
        codes: &'a [u8],
        /// One f32 per 256 blocks.
        nested_absmax: &'a [f32],
        /// The signed dynamic map the codes index.
        map: &'a [f32; 256],
        /// Mean of the original absmax.
        offset: f32,
    },
}

impl ScalesRef<'_> {
    /// Number of NF4 blocks these scales cover.
    pub fn len(&self) -> usize {
        match self {
            ScalesRef::Absmax(a) => a.len(),
            ScalesRef::Double { codes, .. } => codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 scale of block `b` (two roundings for double quant, as bitsandbytes decodes).
    #[inline]
    pub fn scale(&self, b: usize) -> f32 {
        match self {
            ScalesRef::Absmax(a) => a[b],
            ScalesRef::Double {
                codes,
                nested_absmax,
                map,
                offset,
            } => map[codes[b] as usize] * nested_absmax[b / DQ_BLOCK] + offset,
        }
    }

    fn check(&self, op: &'static str, nblocks: usize) -> Result<()> {
        if self.len() != nblocks {
            return Err(shape_err(op, format!("{nblocks} block scales"), self.len()));
        }
        if let ScalesRef::Double { nested_absmax, .. } = self {
            let nn = nblocks.div_ceil(DQ_BLOCK);
            if nested_absmax.len() != nn {
                return Err(shape_err(
                    op,
                    format!("{nn} nested absmax"),
                    nested_absmax.len(),
                ));
            }
        }
        Ok(())
    }
}

/// Blockwise NF4 dequantization into `out[n]` (the `nf4_dequantize_*` kernels): each value is
/// `T(T(level) * scale)`, the level rounded to T first as bitsandbytes decodes.
pub fn dequantize<T: Float>(
    packed: &[u8],
    scales: ScalesRef<'_>,
    blocksize: usize,
    out: &mut [T],
) -> Result<()> {
    const OP: &str = "nf4 dequantize (cpu)";
    check_blocksize(OP, blocksize)?;
    let n = out.len();
    if packed.len() != packed_len(n) {
        return Err(shape_err(
            OP,
            format!("packed of {} bytes for {n} values", packed_len(n)),
            packed.len(),
        ));
    }
    scales.check(OP, num_blocks(n, blocksize))?;
    let levels: [f32; 16] = NF4_LEVELS.map(T::round);
    out.par_chunks_mut(blocksize)
        .zip(packed.par_chunks(blocksize / 2))
        .enumerate()
        .with_min_len(16)
        .for_each(|(b, (o, bytes))| {
            let scale = scales.scale(b);
            let mut pairs = o.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                pair[0] = T::from_f32(levels[usize::from(byte >> 4)] * scale);
                pair[1] = T::from_f32(levels[usize::from(byte & 15)] * scale);
            }
            if let [last] = pairs.into_remainder() {
                *last = T::from_f32(levels[usize::from(bytes[bytes.len() - 1] >> 4)] * scale);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_matches_argmin_over_all_levels() {
        // Dense sweep of [-1.1, 1.1] plus every midpoint and its f32 neighbours.
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -1.1 + 2.2 * i as f32 / 200_000.0)
            .collect();
        for w in NF4_LEVELS.windows(2) {
            let mid = (w[0] + w[1]) / 2.0;
            xs.extend([
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits() - 1),
            ]);
        }
        for x in xs {
            let mut best = 0;
            for i in 1..16 {
                if (x - NF4_LEVELS[i]).abs() < (x - NF4_LEVELS[best]).abs() {
                    best = i;
                }
            }
            assert_eq!(encode_scaled(x), best as u8, "x = {x:e}");
        }
        assert_eq!(encode_scaled(f32::NAN), 0);
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        // 0.5 is exactly between 0.0 and 1.0 only for a 2-level table; use a real NF4 tie:
        // the f32 midpoint of levels 7 (0.0) and 8 whose distances compare equal.
        let mid = NF4_LEVELS[8] / 2.0;
        assert_eq!((mid - NF4_LEVELS[7]).abs(), (mid - NF4_LEVELS[8]).abs());
        assert_eq!(encode_scaled(mid), 7);
    }

    #[test]
    fn zero_block_and_odd_tail() {
        let x = [0.0f32; 64]
            .iter()
            .copied()
            .chain([1.0, -1.0, 0.5])
            .collect::<Vec<_>>();
        let mut packed = vec![0u8; packed_len(x.len())];
        let mut absmax = vec![0f32; 2];
        quantize(&x, 64, &mut packed, &mut absmax).unwrap();
        assert_eq!(absmax, [0.0, 1.0]);
        assert!(packed[..32].iter().all(|&b| b == 0x77));
        assert_eq!(packed[32], 0xF0);
        assert_eq!(packed[33] >> 4, encode_scaled(0.5));
        assert_eq!(packed[33] & 15, 7);
        let mut out = vec![1.0f32; x.len()];
        dequantize(&packed, ScalesRef::Absmax(&absmax), 64, &mut out).unwrap();
        assert!(out[..64].iter().all(|v| v.to_bits() == 0));
        assert_eq!(&out[64..66], &[1.0, -1.0]);
    }

    #[test]
    fn offset_uses_the_documented_order() {
        let a: Vec<f32> = (0..5000).map(|i| 0.1 + (i % 97) as f32 * 1e-3).collect();
        let exact: f64 = a.iter().map(|&x| f64::from(x)).sum();
        let off = dq_offset(&a);
        assert!(((exact as f32) / 5000.0 - off).abs() <= f32::EPSILON * off);
    }

    #[test]
    fn shapes_are_checked() {
        let x = [1.0f32; 100];
        let mut packed = vec![0u8; 49];
        let mut absmax = vec![0f32; 2];
        assert!(quantize(&x, 64, &mut packed, &mut absmax).is_err());
        let mut packed = vec![0u8; 50];
        assert!(quantize(&x, 48, &mut packed, &mut absmax).is_err());
        assert!(quantize(&x, 64, &mut packed, &mut absmax[..1]).is_err());
    }
}
