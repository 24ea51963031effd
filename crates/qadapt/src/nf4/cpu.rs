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

/// The 15 decision bounds of NF4, `(level[i] + level[i+1]) / 2` in f32 (one rounding of the sum,
/// the halving is exact): bitsandbytes 0.50's `_get_4bit_quantize_bounds`. Its CUDA kernel's
/// `dQuantizeNF4` tree compares with decimal literals that nvcc rounds to these same values except
/// at indices 0, 8, 12 and 14, where they are one ulp off (see `tests/data/README.md`).
pub const NF4_BOUNDS: [f32; 15] = {
    let mut b = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        b[i] = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0;
        i += 1;
    }
    b
};

/// NF4 code of a scaled value as bitsandbytes 0.50 decides it (`torch.bucketize(s, bounds)`):
/// the number of bounds below `s`, so a value exactly on a bound takes the lower code. NaN, which
/// compares false, counts past every bound and lands on 15, as bucketize puts it.
#[inline]
pub fn encode_scaled(s: f32) -> u8 {
    let mut c = 0u8;
    for b in NF4_BOUNDS {
        c += u8::from(s.is_nan() || s > b);
    }
    c
}

/// The smallest divisor bitsandbytes 0.50 scales a block by: `absmax.clamp(min=1e-38)` (an f32
/// subnormal). An all-zero block divides by it (every code 7), and a partial last block also
/// stores it as its absmax.
pub const MIN_ABSMAX: f32 = 1e-38;

/// `torch.max` of |x| over a block: NaN if any element is NaN (as the canonical NaN, so that the
/// kernel's reduction order cannot change its bits), else the largest |x|.
#[inline]
pub fn absmax_step(m: f32, v: f32) -> f32 {
    if m.is_nan() || v.is_nan() {
        f32::NAN
    } else {
        m.max(v.abs())
    }
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
    let m = block.iter().fold(0.0f32, |m, x| absmax_step(m, x.to_f32()));
    // NaN stays NaN (`clamp` keeps it).
    let d = if m < MIN_ABSMAX { MIN_ABSMAX } else { m };
    // bitsandbytes 0.50 (`quantize_4bit`, default backend): a full block stores its absmax and is
    // scaled by the f32 reciprocal of the clamped absmax, `x * (1 / d)`; a partial last block
    // stores the clamped absmax and is scaled by a division, `x / d`. Both in f32 for every T.
    let partial = block.len() < blocksize;
    *am = if partial { d } else { m };
    let inv = 1.0f32 / d;
    let code = |x: T| {
        let x = x.to_f32();
        encode_scaled(if partial { x / d } else { x * inv })
    };
    let mut pairs = block.chunks_exact(2);
    for (byte, pair) in bytes.iter_mut().zip(&mut pairs) {
        *byte = (code(pair[0]) << 4) | code(pair[1]);
    }
    if let [last] = pairs.remainder() {
        bytes[block.len() / 2] = (code(*last) << 4) | CODE_ZERO;
    }
}

/// The double-quant offset: the mean of `absmax` exactly as torch's f32 `Tensor.mean()` computes
/// it on one CPU thread (bitsandbytes takes `absmax.mean()`): torch's cascade sum over 8-lane
/// vectors, then one f32 division by n. Lane-wise f32 arithmetic, no FMA; see [`torch_sum`].
/// The `nf4_dq_offset` kernel runs the same algorithm, one warp lane per sum column.
pub fn dq_offset(absmax: &[f32]) -> f32 {
    torch_sum(absmax) / absmax.len() as f32
}

/// torch's single-threaded f32 sum of a contiguous vector (at::native cascade_sum with 8-lane
/// vectors, as it runs on AVX2 and AVX512 builds alike). For n >= 8 the data is viewed as
/// `V = n/8` vectors; groups of 4 vectors form a row of 32 columns, and each column is summed over
/// the `G = V/4` rows by `multi_row_sum`. The leftover vectors are added to column block 0, the
/// four column blocks folded into one vector, and the scalar tail plus the 8 lanes summed in order.
pub fn torch_sum(x: &[f32]) -> f32 {
    let n = x.len();
    if n < 8 {
        let g = n / 4;
        let mut p: [f32; 4] = multi_row_sum(g, |i| std::array::from_fn(|c| x[4 * i + c]));
        for &v in &x[4 * g..] {
            p[0] += v;
        }
        return p[0] + p[1] + p[2] + p[3];
    }
    let v = n / 8;
    let g = v / 4;
    let mut p: [f32; 32] = multi_row_sum(g, |i| std::array::from_fn(|c| x[32 * i + c]));
    for j in 4 * g..v {
        for l in 0..8 {
            p[l] += x[8 * j + l];
        }
    }
    for blk in 1..4 {
        for l in 0..8 {
            p[l] += p[8 * blk + l];
        }
    }
    let mut acc = 0.0f32;
    for &t in &x[8 * v..] {
        acc += t;
    }
    for &lane in &p[..8] {
        acc += lane;
    }
    acc
}

/// torch's `multi_row_sum`: column-wise sums of `g` rows through four levels of accumulators.
/// Level 0 takes `step = 2^lp` rows at a time; after each such run it is carried into level 1,
/// and level j into j+1 whenever the row count is a multiple of `step^j`, which keeps every partial
/// sum over a similar number of rows (a cascade, so the error grows like log n).
fn multi_row_sum<const W: usize>(g: usize, row: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    let ceil_log2 = if g <= 2 {
        1
    } else {
        usize::BITS - (g - 1).leading_zeros()
    };
    let lp = (ceil_log2 / 4).max(4);
    let step = 1usize << lp;
    let mut a = [[0.0f32; W]; 4];
    let mut i = 0usize;
    let add = |dst: &mut [f32; W], src: &[f32; W]| {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    };
    while i + step <= g {
        for _ in 0..step {
            add(&mut a[0], &row(i));
            i += 1;
        }
        for j in 1..4 {
            let lower = a[j - 1];
            add(&mut a[j], &lower);
            a[j - 1] = [0.0; W];
            if i & ((step - 1) << (j as u32 * lp)) != 0 {
                break;
            }
        }
    }
    while i < g {
        add(&mut a[0], &row(i));
        i += 1;
    }
    for j in 1..4 {
        let upper = a[j];
        add(&mut a[0], &upper);
    }
    a[0]
}

/// Number of LUT bins of bitsandbytes 0.50's 8-bit blockwise CPU quantizer (`kLUTSize`).
const DQ_LUT_BINS: f32 = 65535.0;

/// The 255 midpoints of a sorted 256-entry map, `0.5 * (map[j] + map[j+1])` in f32.
pub fn dq_midpoints(map: &[f32; 256]) -> [f32; 255] {
    std::array::from_fn(|j| 0.5 * (map[j] + map[j + 1]))
}

/// Code of a normalized value `q` as bitsandbytes 0.50's CPU `quantize_blockwise` picks it: `q`
/// is clamped to [-1, 1] and rounded to one of 65536 bins, `i = (u16)((q + 1) * 0.5 * 65535 +
/// 0.5)` (the last multiply-add fused, as the x86-64 build compiles it), and the code is the
/// number of map midpoints below the bin's value `2i / 65535 - 1` (its `build_quantize_lut`).
#[inline]
pub fn dq_encode(mid: &[f32; 255], q: f32) -> u8 {
    // f32::clamp keeps NaN, as std::clamp does.
    let h = (q.clamp(-1.0, 1.0) + 1.0) * 0.5;
    // A NaN converts to 0x8000_0000 on x86 (cvttss2si), which truncates to bin 0.
    let bin = if h.is_nan() {
        0
    } else {
        h.mul_add(DQ_LUT_BINS, 0.5) as u32 & 0xffff
    };
    let val = (2.0 * bin as f32) / DQ_LUT_BINS - 1.0;
    // Midpoints are sorted: count those below val.
    let mut lo = 0usize;
    let mut step = 128;
    while step > 0 {
        if lo + step <= 255 && mid[lo + step - 1] < val {
            lo += step;
        }
        step /= 2;
    }
    lo as u8
}

/// Double quantization of `absmax` by the sorted 256-entry `map` (the two `nf4_dq_*` kernels).
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
    let mid = dq_midpoints(map);
    absmax
        .par_chunks(DQ_BLOCK)
        .zip(codes.par_chunks_mut(DQ_BLOCK))
        .zip(nested_absmax.par_iter_mut())
        .for_each(|((a, c), nested)| {
            let m = a.iter().fold(0.0f32, |m, &x| m.max((x - offset).abs()));
            *nested = m;
            let inv = 1.0f32 / m;
            for (code, &x) in c.iter_mut().zip(a) {
                *code = if m == 0.0 {
                    DQ_CODE_ZERO
                } else {
                    dq_encode(&mid, (x - offset) * inv)
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
/// `T(level * scale)`: bitsandbytes 0.50 decodes in f32 and rounds once to T.
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
    let levels: [f32; 16] = NF4_LEVELS;
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
    fn encode_matches_argmin_off_the_bounds() {
        // Dense sweep of [-1.1, 1.1]: away from the 15 bounds, bucketize and the nearest level
        // by f32 distance (bitsandbytes 0.48's argmin) agree.
        for i in 0..200_001 {
            let x = -1.1 + 2.2 * i as f32 / 200_000.0;
            if NF4_BOUNDS.contains(&x) {
                continue;
            }
            let best = NF4_LEVELS
                .iter()
                .enumerate()
                .skip(1)
                .fold(0usize, |best, (i, l)| {
                    if (x - l).abs() < (x - NF4_LEVELS[best]).abs() {
                        i
                    } else {
                        best
                    }
                });
            assert_eq!(encode_scaled(x), best as u8, "x = {x:e}");
        }
    }

    #[test]
    fn bounds_are_bitsandbytes_and_take_the_lower_code() {
        // bitsandbytes 0.50.2's `_get_4bit_quantize_bounds("nf4")`, bit for bit.
        const BNB: [u32; 15] = [
            0xbf59_1cd8,
            0xbf1c_5270,
            0xbeeb_8480,
            0xbead_ea76,
            0xbe70_3cec,
            0xbe0d_38bc,
            0xbd3a_7871,
            0x3d22_faff,
            0x3df6_4862,
            0x3e50_67e0,
            0x3e95_82d4,
            0x3ec7_53f9,
            0x3f00_6d04,
            0x3f24_8daf,
            0x3f5c_89da,
        ];
        assert_eq!(NF4_BOUNDS.map(f32::to_bits), BNB);
        for (i, b) in NF4_BOUNDS.into_iter().enumerate() {
            assert_eq!(encode_scaled(b), i as u8);
            assert_eq!(encode_scaled(b.next_down()), i as u8);
            assert_eq!(encode_scaled(b.next_up()), i as u8 + 1);
        }
        // Six of them sit where the f32 distances say the upper level is nearer (0.48's choice).
        let upper = NF4_BOUNDS
            .iter()
            .enumerate()
            .filter(|&(i, &b)| (b - NF4_LEVELS[i + 1]).abs() < (b - NF4_LEVELS[i]).abs())
            .map(|(i, _)| i)
            .collect::<Vec<_>>();
        assert_eq!(upper, [0, 1, 3, 4, 12, 14]);
        assert_eq!(encode_scaled(f32::NAN), 15);
        assert_eq!(encode_scaled(-0.0), CODE_ZERO);
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
    fn torch_sum_is_close_to_the_exact_sum() {
        for n in [1, 3, 7, 8, 9, 100, 5000, 70_000] {
            let a: Vec<f32> = (0..n).map(|i| 0.1 + (i % 97) as f32 * 1e-3).collect();
            let exact: f64 = a.iter().map(|&x| f64::from(x)).sum();
            let s = torch_sum(&a);
            assert!(
                (f64::from(s) - exact).abs() <= 4.0 * f64::from(f32::EPSILON) * exact,
                "n = {n}"
            );
        }
        assert_eq!(torch_sum(&[]), 0.0);
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
