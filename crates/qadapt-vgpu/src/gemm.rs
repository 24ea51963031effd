//! The arithmetic of cuBLAS' GEMMs: column-major `C = alpha * op(A) op(B) + beta * C`.
//!
//! Inputs are widened to f32 (after rounding to bf16, f16 or tf32 for the CUBLAS_COMPUTE_32F_FAST_*
//! compute types, as tensor cores would), each dot product is summed in f32 in order of k, the
//! epilogue is `alpha * acc + beta * c` in f32 (C not read when beta is 0, A and B not read when
//! alpha is 0 or k is 0: cuBLAS' documented quick paths), and the result is rounded to the
//! output type to nearest even. A GPU sums in another order (and fuses multiply-adds), so results
//! agree to f32 rounding, not bit for bit. Columns of C are split over host threads.

use half::{bf16, f16};

/// An element type of A, B or C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dt {
    F32,
    F16,
    Bf16,
}

impl Dt {
    pub(crate) fn size(self) -> usize {
        match self {
            Dt::F32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
        }
    }

    /// Element `i` of the array at `base`.
    ///
    /// # Safety
    /// `base + i * size` must be readable.
    unsafe fn load(self, base: usize, i: usize) -> f32 {
        let p = base + i * self.size();
        match self {
            // SAFETY: readable per this function's contract; an unaligned read.
            Dt::F32 => unsafe { (p as *const f32).read_unaligned() },
            // SAFETY: as above.
            Dt::F16 => f16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32(),
            // SAFETY: as above.
            Dt::Bf16 => bf16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32(),
        }
    }

    /// Stores `v` rounded to this type as element `i` of the array at `base`.
    ///
    /// # Safety
    /// `base + i * size` must be writable.
    unsafe fn store(self, base: usize, i: usize, v: f32) {
        let p = base + i * self.size();
        match self {
            // SAFETY: writable per this function's contract; an unaligned write.
            Dt::F32 => unsafe { (p as *mut f32).write_unaligned(v) },
            // SAFETY: as above.
            Dt::F16 => unsafe { (p as *mut u16).write_unaligned(f16::from_f32(v).to_bits()) },
            // SAFETY: as above.
            Dt::Bf16 => unsafe { (p as *mut u16).write_unaligned(bf16::from_f32(v).to_bits()) },
        }
    }
}

/// How inputs are rounded before the f32 multiply-add (CUBLAS_COMPUTE_32F_FAST_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputRounding {
    None,
    Bf16,
    F16,
    Tf32,
}

impl InputRounding {
    fn apply(self, x: f32) -> f32 {
        match self {
            InputRounding::None => x,
            InputRounding::Bf16 => bf16::from_f32(x).to_f32(),
            InputRounding::F16 => f16::from_f32(x).to_f32(),
            InputRounding::Tf32 => {
                // Round to nearest even at 10 mantissa bits.
                if !x.is_finite() {
                    return x;
                }
                let b = x.to_bits();
                let lsb = (b >> 13) & 1;
                f32::from_bits((b + 0xfff + lsb) & !0x1fff)
            }
        }
    }
}

/// One GEMM on raw addresses, all ranges already checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gemm {
    pub(crate) trans_a: bool,
    pub(crate) trans_b: bool,
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
    pub(crate) a: usize,
    pub(crate) a_type: Dt,
    pub(crate) lda: usize,
    pub(crate) b: usize,
    pub(crate) b_type: Dt,
    pub(crate) ldb: usize,
    pub(crate) c: usize,
    pub(crate) c_type: Dt,
    pub(crate) ldc: usize,
    pub(crate) rounding: InputRounding,
}

impl Gemm {
    /// Runs it.
    ///
    /// # Safety
    /// A, B and C must hold the elements the shape and leading dimensions touch (readable; C
    /// writable), and no one else may write them meanwhile.
    pub(crate) unsafe fn run(&self) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        let use_ab = self.alpha != 0.0 && k > 0;
        // op(A) by rows (m x k), op(B) by columns (n x k), widened once.
        let mut a_rows = Vec::new();
        let mut b_cols = Vec::new();
        if use_ab {
            a_rows = vec![0f32; m * k];
            for i in 0..m {
                for p in 0..k {
                    let idx = if self.trans_a {
                        p + i * self.lda
                    } else {
                        i + p * self.lda
                    };
                    // SAFETY: idx is inside A's checked span.
                    let v = unsafe { self.a_type.load(self.a, idx) };
                    a_rows[i * k + p] = self.rounding.apply(v);
                }
            }
            b_cols = vec![0f32; n * k];
            for j in 0..n {
                for p in 0..k {
                    let idx = if self.trans_b {
                        j + p * self.ldb
                    } else {
                        p + j * self.ldb
                    };
                    // SAFETY: idx is inside B's checked span.
                    let v = unsafe { self.b_type.load(self.b, idx) };
                    b_cols[j * k + p] = self.rounding.apply(v);
                }
            }
        }
        let work = m.saturating_mul(n).saturating_mul(k.max(1));
        let threads = if work < 1 << 18 {
            1
        } else {
            std::thread::available_parallelism()
                .map_or(1, |t| t.get())
                .min(n)
        };
        let cols_per = n.div_ceil(threads);
        let column = |j: usize| {
            for i in 0..m {
                let acc = if use_ab {
                    let (ar, bc) = (&a_rows[i * k..(i + 1) * k], &b_cols[j * k..(j + 1) * k]);
                    let mut s = 0f32;
                    for p in 0..k {
                        s += ar[p] * bc[p];
                    }
                    s
                } else {
                    0.0
                };
                let ci = i + j * self.ldc;
                let out = if self.beta == 0.0 {
                    self.alpha * acc
                } else {
                    // SAFETY: ci is inside C's checked span.
                    let old = unsafe { self.c_type.load(self.c, ci) };
                    self.alpha * acc + self.beta * old
                };
                // SAFETY: as above; columns are disjoint between threads.
                unsafe { self.c_type.store(self.c, ci, out) };
            }
        };
        if threads == 1 {
            (0..n).for_each(column);
        } else {
            std::thread::scope(|s| {
                for t in 0..threads {
                    let column = &column;
                    s.spawn(move || {
                        for j in t * cols_per..((t + 1) * cols_per).min(n) {
                            column(j);
                        }
                    });
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_major_with_transposes_matches_a_naive_product() {
        // A stored 3x2 (lda 4), B stored 2x2 transposed, C 3x2 (ldc 3).
        let a: Vec<f32> = vec![1., 2., 3., 99., 4., 5., 6., 99.];
        let b: Vec<f32> = vec![1., 2., 3., 4.]; // stored as n x k = 2x2, op = T
        let mut c: Vec<f32> = vec![1.0; 6];
        let g = Gemm {
            trans_a: false,
            trans_b: true,
            m: 3,
            n: 2,
            k: 2,
            alpha: 2.0,
            beta: 0.5,
            a: a.as_ptr() as usize,
            a_type: Dt::F32,
            lda: 4,
            b: b.as_ptr() as usize,
            b_type: Dt::F32,
            ldb: 2,
            c: c.as_mut_ptr() as usize,
            c_type: Dt::F32,
            ldc: 3,
            rounding: InputRounding::None,
        };
        // SAFETY: the spans fit the vectors above.
        unsafe { g.run() };
        // op(B)[p][j] = B[j + p*2]: [[1,2],[3,4]]; C[i][j] = 2 * sum_p A[i][p] op(B)[p][j] + 0.5.
        let a2 = [[1., 4.], [2., 5.], [3., 6.]];
        let b2 = [[1., 2.], [3., 4.]];
        for i in 0..3 {
            for j in 0..2 {
                let want = 2.0 * (a2[i][0] * b2[0][j] + a2[i][1] * b2[1][j]) + 0.5;
                assert_eq!(c[i + 3 * j], want, "[{i},{j}]");
            }
        }
    }

    #[test]
    fn tf32_rounds_to_ten_mantissa_bits() {
        let x = 1.0f32 + f32::EPSILON * 3.0;
        assert_eq!(InputRounding::Tf32.apply(x), 1.0);
        assert_eq!(
            InputRounding::Tf32.apply(1.0 + 1.0 / 1024.0),
            1.0 + 1.0 / 1024.0
        );
    }
}
