//! CPU reference of `kernels/lora_*.cu`, with the arguments of the kernels (shape, x, W, the adapter
//! stack, the per-row adapter index, bias) and the same math: f32 products through a threaded GEMM
//! (matrixmultiply, through ndarray's safe views), bf16 inputs and outputs.
//!
//! Forward (overwrites `u` and `y`):
//! ```text
//! u[m, a*r + j] = bf16(s_a * sum_k x[m,k] A_a[j,k])   if a == idx(m), else 0
//! y[m, n]       = bf16(sum_k x[m,k] W[n,k] + sum_e u[m,e] Bcat[n,e] + bias[n])
//! Bcat[n, a*r + j] = B_a[n, j]
//! ```
//! Backward of `y = x W^T + s (x A^T) B^T` for the rows of each adapter (f32 throughout, no
//! intermediate rounding; W is the bf16 weight the forward used, NF4 dequantized):
//! ```text
//! g[m, j] = s_a * sum_n dy[m,n] B_a[n,j]                (the gradient reaching A x)
//! dx      = dy W + g A_a                                 overwritten (bf16)
//! dA_a   += g^T x                                        accumulated (f32)
//! dB_a   += s_a * dy^T (x A_a^T)                         accumulated (f32)
//! ```
//! Rows with adapter -1 only get `dx = dy W`. The CUDA backward rounds g and u = bf16(s x A^T) to
//! bf16 before its products (2^-9 relative each); its tests compare against this reference with a
//! tolerance that covers that.

use half::bf16;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, s};
use rayon::prelude::*;

use super::{LoraRef, LoraShape, WeightRef};
use crate::error::{Result, shape_err};
use crate::ops::Accumulate;
use crate::ops::linear::gemm;

fn widen(v: &[bf16]) -> Vec<f32> {
    v.par_iter()
        .with_min_len(4096)
        .map(|x| x.to_f32())
        .collect()
}

fn narrow(v: &[f32], out: &mut [bf16]) {
    out.par_iter_mut()
        .zip(v.par_iter())
        .with_min_len(4096)
        .for_each(|(o, x)| *o = bf16::from_f32(*x));
}

fn view(rows: usize, cols: usize, v: &[f32]) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), v).expect("length checked by LoraShape")
}

fn view_mut(rows: usize, cols: usize, v: &mut [f32]) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), v).expect("length checked by LoraShape")
}

/// W as f32 `[n, k]`: the bf16 values the kernels multiply with. NF4 is dequantized to bf16 first,
/// `bf16(level * scale)` with the f32 level and one rounding of the f32 product, as `lora_fwd.cu`
/// decodes (`decode_pair`, `nf4_b_frags_t`, `nf4_levels_to_shared`) and bitsandbytes 0.50 does.
pub fn weight_f32(shape: &LoraShape, w: WeightRef<'_>) -> Result<Vec<f32>> {
    match w {
        WeightRef::Dense(d) => Ok(widen(d)),
        WeightRef::Nf4 {
            packed,
            scales,
            blocksize,
        } => {
            let mut tmp = vec![bf16::ZERO; shape.n * shape.k];
            crate::nf4::cpu::dequantize(packed, scales, blocksize, &mut tmp)?;
            Ok(widen(&tmp))
        }
    }
}

/// Rows of each adapter: `groups[a]` lists the rows m with idx(m) == a.
fn adapter_rows(shape: &LoraShape, idx: Option<&[i32]>) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); shape.n_adapters];
    match idx {
        None => {
            if shape.n_adapters > 0 {
                groups[0] = (0..shape.m).collect();
            }
        }
        Some(idx) => {
            for (m, &a) in idx.iter().enumerate() {
                if a >= 0 {
                    groups[a as usize].push(m);
                }
            }
        }
    }
    groups
}

/// The listed rows of a row-major `[rows, cols]` matrix, as a new matrix.
fn gather(v: &ArrayView2<'_, f32>, rows: &[usize]) -> Array2<f32> {
    let cols = v.ncols();
    let mut out = Array2::zeros((rows.len(), cols));
    for (i, &r) in rows.iter().enumerate() {
        out.row_mut(i).assign(&v.row(r));
    }
    out
}

/// The fused forward (see the module doc). `u` is `[m, n_adapters * rank]` (overwritten), `y` is
/// `[m, n]`: overwritten, or with [`Accumulate::Add`] added into (`y = bf16(y + ...)`, the old
/// value added in f32 before the one rounding: a residual add fused into the product).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    shape: &LoraShape,
    x: &[bf16],
    w: WeightRef<'_>,
    lora: LoraRef<'_>,
    adapter_idx: Option<&[i32]>,
    bias: Option<&[bf16]>,
    u: &mut [bf16],
    y: &mut [bf16],
    acc: Accumulate,
) -> Result<()> {
    const OP: &str = "lora forward (cpu)";
    shape.check(OP, x, w, lora, adapter_idx, bias)?;
    if u.len() != shape.m * shape.r_total() {
        return Err(shape_err(
            OP,
            format!("u of {}", shape.m * shape.r_total()),
            u.len(),
        ));
    }
    if y.len() != shape.m * shape.n {
        return Err(shape_err(
            OP,
            format!("y of {}", shape.m * shape.n),
            y.len(),
        ));
    }
    let (m, n, k, r, rt) = (shape.m, shape.n, shape.k, shape.rank, shape.r_total());
    let xf = widen(x);
    let wf = weight_f32(shape, w)?;
    let mut yf = vec![0f32; m * n];
    if let Some(b) = bias {
        let bf = widen(b);
        yf.par_chunks_mut(n)
            .for_each(|row| row.copy_from_slice(&bf));
    }
    let xv = view(m, k, &xf);
    gemm(
        1.0,
        &xv,
        &view(n, k, &wf).t(),
        1.0,
        &mut view_mut(m, n, &mut yf),
    );
    if rt > 0 {
        // t = x A_all^T for every adapter at once, then keep the row's own adapter, scaled.
        let af = widen(lora.a);
        let mut t = vec![0f32; m * rt];
        gemm(
            1.0,
            &xv,
            &view(rt, k, &af).t(),
            0.0,
            &mut view_mut(m, rt, &mut t),
        );
        u.par_chunks_mut(rt)
            .zip(t.par_chunks(rt))
            .enumerate()
            .for_each(|(row, (ur, tr))| {
                let own = adapter_idx.map_or(0, |i| i[row]);
                for (e, (o, tv)) in ur.iter_mut().zip(tr).enumerate() {
                    let a = (e / r) as i32;
                    *o = if a == own {
                        bf16::from_f32(lora.scales[a as usize] * tv)
                    } else {
                        bf16::ZERO
                    };
                }
            });
        let uf = widen(u);
        let bcat = bcat_f32(shape, lora.b);
        gemm(
            1.0,
            &view(m, rt, &uf),
            &view(n, rt, &bcat).t(),
            1.0,
            &mut view_mut(m, n, &mut yf),
        );
    }
    if acc == Accumulate::Add {
        // The old y added in f32 before the one rounding, as the kernels' epilogue does.
        yf.par_iter_mut()
            .zip(y.par_iter())
            .for_each(|(f, old)| *f += old.to_f32());
    }
    narrow(&yf, y);
    Ok(())
}

/// `Bcat[n, a*r + j] = B_a[n, j]` as f32 `[n, n_adapters * rank]`.
fn bcat_f32(shape: &LoraShape, b: &[bf16]) -> Vec<f32> {
    let (n, r, rt) = (shape.n, shape.rank, shape.r_total());
    let mut out = vec![0f32; n * rt];
    out.par_chunks_mut(rt).enumerate().for_each(|(row, o)| {
        for a in 0..shape.n_adapters {
            let src = &b[(a * n + row) * r..(a * n + row + 1) * r];
            for (d, v) in o[a * r..(a + 1) * r].iter_mut().zip(src) {
                *d = v.to_f32();
            }
        }
    });
    out
}

/// The backward (see the module doc): `dx [m, k]` is overwritten (or added into with
/// [`Accumulate::Add`], one rounding of the sum), `grad_a [n_adapters, rank, k]`
/// and `grad_b [n_adapters, n, rank]` are accumulated into (so gradient accumulation over several
/// micro-batches is a sum of calls).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    shape: &LoraShape,
    x: &[bf16],
    w: WeightRef<'_>,
    lora: LoraRef<'_>,
    adapter_idx: Option<&[i32]>,
    dy: &[bf16],
    dx: &mut [bf16],
    grad_a: &mut [f32],
    grad_b: &mut [f32],
    acc: Accumulate,
) -> Result<()> {
    const OP: &str = "lora backward (cpu)";
    shape.check(OP, x, w, lora, adapter_idx, None)?;
    let (m, n, k, r) = (shape.m, shape.n, shape.k, shape.rank);
    if dy.len() != m * n {
        return Err(shape_err(OP, format!("dy of {}", m * n), dy.len()));
    }
    if dx.len() != m * k {
        return Err(shape_err(OP, format!("dx of {}", m * k), dx.len()));
    }
    let na = shape.n_adapters;
    if grad_a.len() != na * r * k {
        return Err(shape_err(
            OP,
            format!("grad_a of {}", na * r * k),
            grad_a.len(),
        ));
    }
    if grad_b.len() != na * n * r {
        return Err(shape_err(
            OP,
            format!("grad_b of {}", na * n * r),
            grad_b.len(),
        ));
    }
    let xf = widen(x);
    let dyf = widen(dy);
    let wf = weight_f32(shape, w)?;
    let mut dxf = vec![0f32; m * k];
    let dyv = view(m, n, &dyf);
    let xv = view(m, k, &xf);
    gemm(
        1.0,
        &dyv,
        &view(n, k, &wf),
        0.0,
        &mut view_mut(m, k, &mut dxf),
    );
    if r > 0 {
        let af = widen(lora.a);
        let bf = widen(lora.b);
        for (a, rows) in adapter_rows(shape, adapter_idx).iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            let s = lora.scales[a];
            let a_mat = view(r, k, &af[a * r * k..(a + 1) * r * k]);
            let b_mat = view(n, r, &bf[a * n * r..(a + 1) * n * r]);
            let all = rows.len() == m;
            let dy_a = if all {
                dyv.to_owned()
            } else {
                gather(&dyv, rows)
            };
            let x_a = if all {
                xv.to_owned()
            } else {
                gather(&xv, rows)
            };
            // g = s dy B  [rows, r]
            let mut g = Array2::<f32>::zeros((rows.len(), r));
            gemm(s, &dy_a, &b_mat, 0.0, &mut g);
            // dx rows += g A
            let mut dx_a = Array2::<f32>::zeros((rows.len(), k));
            gemm(1.0, &g, &a_mat, 0.0, &mut dx_a);
            let mut dxv = view_mut(m, k, &mut dxf);
            for (i, &row) in rows.iter().enumerate() {
                let mut dst = dxv.slice_mut(s![row, ..]);
                dst += &dx_a.row(i);
            }
            // dA += g^T x, dB += s dy^T (x A^T): each product whole, then one add per element,
            // so that accumulating over calls is a sum of the calls' gradients (the GEMM kernel
            // would fold the old value into its multiply-add chain instead).
            let mut da = Array2::<f32>::zeros((r, k));
            gemm(1.0, &g.t(), &x_a, 0.0, &mut da);
            let mut ga = view_mut(r, k, &mut grad_a[a * r * k..(a + 1) * r * k]);
            ga += &da;
            let mut t = Array2::<f32>::zeros((rows.len(), r));
            gemm(1.0, &x_a, &a_mat.t(), 0.0, &mut t);
            let mut db = Array2::<f32>::zeros((n, r));
            gemm(s, &dy_a.t(), &t, 0.0, &mut db);
            let mut gb = view_mut(n, r, &mut grad_b[a * n * r..(a + 1) * n * r]);
            gb += &db;
        }
    }
    if acc == Accumulate::Add {
        // The old dx added in f32 before the one rounding, as the kernels' epilogue does.
        dxf.par_iter_mut()
            .zip(dx.par_iter())
            .for_each(|(f, old)| *f += old.to_f32());
    }
    narrow(&dxf, dx);
    Ok(())
}

/// The unfused forward the fused one replaces (for benchmarks): `x W^T`, then `x A^T`, then
/// `(s * t) B^T`, each a separate pass over its output, added at the end. Single adapter.
pub fn forward_unfused(
    shape: &LoraShape,
    x: &[bf16],
    w: WeightRef<'_>,
    lora: LoraRef<'_>,
    y: &mut [bf16],
) -> Result<()> {
    const OP: &str = "lora forward unfused (cpu)";
    shape.check(OP, x, w, lora, None, None)?;
    let (m, n, k, r) = (shape.m, shape.n, shape.k, shape.rank);
    if r == 0 || shape.n_adapters == 0 {
        return Err(crate::error::invalid(
            OP,
            "needs one adapter of positive rank",
        ));
    }
    if y.len() != m * n {
        return Err(shape_err(OP, format!("y of {}", m * n), y.len()));
    }
    let xf = widen(x);
    let wf = weight_f32(shape, w)?;
    let mut base = vec![0f32; m * n];
    gemm(
        1.0,
        &view(m, k, &xf),
        &view(n, k, &wf).t(),
        0.0,
        &mut view_mut(m, n, &mut base),
    );
    let base_bf: Vec<bf16> = base.iter().map(|v| bf16::from_f32(*v)).collect();
    let af = widen(&lora.a[..r * k]);
    let mut t = vec![0f32; m * r];
    gemm(
        1.0,
        &view(m, k, &xf),
        &view(r, k, &af).t(),
        0.0,
        &mut view_mut(m, r, &mut t),
    );
    let tf: Vec<f32> = t.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    let bfv = widen(&lora.b[..n * r]);
    let mut l = vec![0f32; m * n];
    gemm(
        lora.scales[0],
        &view(m, r, &tf),
        &view(n, r, &bfv).t(),
        0.0,
        &mut view_mut(m, n, &mut l),
    );
    for ((o, b), l) in y.iter_mut().zip(&base_bf).zip(&l) {
        *o = bf16::from_f32(b.to_f32() + bf16::from_f32(*l).to_f32());
    }
    Ok(())
}

/// `w += sign * s_a * B_a A_a` over the f32 weight `[n, k]` (merge with `sign = 1`, unmerge with
/// `sign = -1`).
pub fn add_delta(
    shape: &LoraShape,
    lora: LoraRef<'_>,
    adapter: usize,
    sign: f32,
    w: &mut [f32],
) -> Result<()> {
    const OP: &str = "lora merge (cpu)";
    let (n, k, r) = (shape.n, shape.k, shape.rank);
    if adapter >= shape.n_adapters || lora.scales.len() != shape.n_adapters {
        return Err(crate::error::invalid(
            OP,
            format!("adapter {adapter} of {}", shape.n_adapters),
        ));
    }
    if w.len() != n * k
        || lora.a.len() != shape.n_adapters * r * k
        || lora.b.len() != shape.n_adapters * n * r
    {
        return Err(shape_err(
            OP,
            format!("W {n}x{k}, A/B of rank {r}"),
            w.len(),
        ));
    }
    let af = widen(&lora.a[adapter * r * k..(adapter + 1) * r * k]);
    let bf = widen(&lora.b[adapter * n * r..(adapter + 1) * n * r]);
    gemm(
        sign * lora.scales[adapter],
        &view(n, r, &bf),
        &view(r, k, &af),
        1.0,
        &mut view_mut(n, k, w),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::cpu::ScalesRef;
    use crate::nf4::{NF4_LEVELS, packed_len};

    #[test]
    fn nf4_weight_is_the_f32_level_times_the_scale_rounded_once() {
        // Every code against scales whose products with the f32 levels round differently to
        // bf16 than the products with bf16-rounded levels would (the rule before bitsandbytes
        // 0.50): the reference must follow the kernels' f32 levels.
        let shape = LoraShape {
            m: 1,
            n: 4,
            k: 64,
            rank: 0,
            n_adapters: 0,
        };
        let codes: Vec<u8> = (0..shape.n * shape.k).map(|i| (i * 7 % 16) as u8).collect();
        let packed: Vec<u8> = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        assert_eq!(packed.len(), packed_len(codes.len()));
        let absmax = [0.0123f32, 1.7, 3.3e-3, 0.771];
        let w = weight_f32(
            &shape,
            WeightRef::Nf4 {
                packed: &packed,
                scales: ScalesRef::Absmax(&absmax),
                blocksize: 64,
            },
        )
        .unwrap();
        let mut differs = 0;
        for (i, (&c, &v)) in codes.iter().zip(&w).enumerate() {
            let (l, s) = (NF4_LEVELS[usize::from(c)], absmax[i / 64]);
            assert_eq!(v, bf16::from_f32(l * s).to_f32(), "element {i}");
            differs += usize::from(v != bf16::from_f32(bf16::from_f32(l).to_f32() * s).to_f32());
        }
        assert!(differs > 0, "the case does not tell the two rules apart");
    }
}
