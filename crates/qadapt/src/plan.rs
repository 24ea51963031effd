//! Launch geometry as pure functions of the shape and the device: `plan(shape, props) ->
//! LaunchPlan`. Kept apart from the launch layer so every branch is unit-tested on the CPU.

use crate::error::{Result, invalid};
use qadapt_kernels::ffi;

/// The device facts a plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceProps {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Compute capability, e.g. (9, 0).
    pub compute_capability: (u32, u32),
    /// Largest grid x dimension.
    pub max_grid_x: u32,
}

impl DeviceProps {
    /// An H200-like device (132 SMs, sm_90), for tests and documentation.
    pub const H200: DeviceProps = DeviceProps {
        sm_count: 132,
        compute_capability: (9, 0),
        max_grid_x: i32::MAX as u32,
    };
}

/// Grid and block of one launch, and its dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Thread blocks along x.
    pub grid: u32,
    /// Threads per block.
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared_bytes: u32,
}

impl LaunchPlan {
    /// As cudarc's launch configuration.
    pub fn config(&self) -> cudarc::driver::LaunchConfig {
        cudarc::driver::LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        }
    }
}

/// Enough CTAs to fill every SM several times; the kernels grid-stride past this.
fn capped_grid(work_ctas: u64, props: &DeviceProps) -> u32 {
    let cap = u64::from(props.sm_count.max(1)) * 32;
    work_ctas.clamp(1, cap.min(u64::from(props.max_grid_x))) as u32
}

/// `nf4_quantize_*`: one warp per NF4 block, 8 warps per CTA.
pub fn nf4_quantize(n: u64, blocksize: u32, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 quantize plan", "empty tensor"));
    }
    let nblocks = n.div_ceil(u64::from(blocksize));
    Ok(LaunchPlan {
        grid: capped_grid(nblocks.div_ceil(8), props),
        block: 256,
        shared_bytes: 0,
    })
}

/// `nf4_dequantize_*`: one thread per 32 elements (a 16-byte load of codes), 256 threads a CTA.
pub fn nf4_dequantize(n: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 dequantize plan", "empty tensor"));
    }
    let groups = n.div_ceil(32);
    Ok(LaunchPlan {
        grid: capped_grid(groups.div_ceil(256), props),
        block: 256,
        shared_bytes: 0,
    })
}

/// The two double-quant launches: offset (one warp), encode (one CTA per 256 blocks).
pub fn nf4_double_quant(nblocks: u64, props: &DeviceProps) -> Result<[LaunchPlan; 2]> {
    if nblocks == 0 {
        return Err(invalid("nf4 double quant plan", "no blocks"));
    }
    let nested = nblocks.div_ceil(u64::from(ffi::QADAPT_DQ_BLOCK));
    Ok([
        LaunchPlan {
            grid: 1,
            block: ffi::QADAPT_DQ_SUM_COLUMNS,
            shared_bytes: 0,
        },
        LaunchPlan {
            grid: capped_grid(nested, props),
            block: ffi::QADAPT_DQ_BLOCK,
            shared_bytes: 0,
        },
    ])
}

/// Element-wise kernels (the AdamW step): one thread per element, 256 a CTA, grid-stride.
pub fn elementwise(n: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("elementwise plan", "no elements"));
    }
    Ok(LaunchPlan {
        grid: capped_grid(n.div_ceil(256), props),
        block: 256,
        shared_bytes: 0,
    })
}

/// Grid-stride reductions (`sum_squares_f32`): 256 threads a CTA, at most 4 CTAs per SM so the
/// host adds few partials.
pub fn reduction(n: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("reduction plan", "no elements"));
    }
    let cap = u64::from(props.sm_count.max(1)) * 4;
    Ok(LaunchPlan {
        grid: n
            .div_ceil(256)
            .clamp(1, cap.min(u64::from(props.max_grid_x))) as u32,
        block: 256,
        shared_bytes: 0,
    })
}

// ---- Model ops (kernels/model.cu) ----------------------------------------------------------------

/// How a model-op kernel spreads its work: every one runs `QADAPT_MODEL_THREADS` threads per CTA
/// and grid-strides, so the grid only has to fill the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelWork {
    /// One warp per item (a row of RMSNorm, a token of the embedding, a (row, head) of RoPE, a
    /// distinct id of the embedding backward): 8 items per CTA.
    WarpPerItem,
    /// One CTA per item (a row of the cross-entropy; 8 query or key rows of one head of the
    /// attention; 32 columns of one row chunk of the RMSNorm weight gradient).
    CtaPerItem,
    /// One thread per item (SwiGLU: an item is 8 elements on the 16-byte path, else 1; a column
    /// of the RMSNorm weight-gradient reduction).
    ThreadPerItem,
}

/// The launch of a `kernels/model.cu` kernel over `items` work items of the kind `work` says.
pub fn model_op(items: u64, work: ModelWork, props: &DeviceProps) -> Result<LaunchPlan> {
    if items == 0 {
        return Err(invalid("model op plan", "no work items"));
    }
    let threads = u64::from(ffi::QADAPT_MODEL_THREADS);
    let per_cta = match work {
        ModelWork::WarpPerItem => threads / 32,
        ModelWork::CtaPerItem => 1,
        ModelWork::ThreadPerItem => threads,
    };
    Ok(LaunchPlan {
        grid: capped_grid(items.div_ceil(per_cta), props),
        block: ffi::QADAPT_MODEL_THREADS,
        shared_bytes: 0,
    })
}

/// The two launches of the RMSNorm weight gradient: `rmsnorm_bwd_dw_bf16` sums `chunk_rows` rows
/// of 32 columns per CTA into `partial [chunks, dim]`, then `rmsnorm_bwd_dw_reduce` adds the
/// chunks in order into `dw`, one thread per column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmsNormDwPlan {
    /// Row chunks (the rows of the partial-sum scratch).
    pub chunks: u32,
    /// Rows per chunk (the last chunk may hold fewer).
    pub chunk_rows: u32,
    /// `rmsnorm_bwd_dw_bf16`: one CTA per (32 columns, chunk), grid-stride.
    pub partial: LaunchPlan,
    /// `rmsnorm_bwd_dw_reduce`: one thread per column.
    pub reduce: LaunchPlan,
}

/// Splits the rows into chunks so that about 4 CTAs per SM have work (each chunk at least 64
/// rows, 8 per row-slice), for `rows` rows of `dim` columns.
pub fn rmsnorm_dw(rows: u64, dim: u64, props: &DeviceProps) -> Result<RmsNormDwPlan> {
    const OP: &str = "rmsnorm dw plan";
    if rows == 0 || dim == 0 {
        return Err(invalid(OP, "no rows or no columns"));
    }
    let groups = dim.div_ceil(32);
    let target = u64::from(props.sm_count.max(1)) * 4;
    let chunks = target.div_ceil(groups).clamp(1, rows.div_ceil(64));
    let chunk_rows = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(chunk_rows);
    if chunk_rows > u64::from(u32::MAX) {
        return Err(invalid(
            OP,
            format!("{rows} rows do not fit the 32-bit chunking"),
        ));
    }
    Ok(RmsNormDwPlan {
        chunks: chunks as u32,
        chunk_rows: chunk_rows as u32,
        partial: model_op(groups * chunks, ModelWork::CtaPerItem, props)?,
        reduce: model_op(dim, ModelWork::ThreadPerItem, props)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: DeviceProps = DeviceProps {
        sm_count: 2,
        compute_capability: (8, 0),
        max_grid_x: 10,
    };

    #[test]
    fn quantize_plan_one_warp_per_block_and_capped() {
        let p = nf4_quantize(1000, 64, &DeviceProps::H200).unwrap();
        assert_eq!((p.grid, p.block), (2, 256)); // 16 blocks / 8 warps
        let p = nf4_quantize(1, 4096, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 1);
        let p = nf4_quantize(1 << 40, 64, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 132 * 32);
        assert_eq!(nf4_quantize(1 << 20, 32, &SMALL).unwrap().grid, 10);
        assert!(nf4_quantize(0, 64, &SMALL).is_err());
    }

    #[test]
    fn elementwise_and_reduction_plans() {
        assert_eq!(elementwise(1000, &DeviceProps::H200).unwrap().grid, 4);
        assert_eq!(
            elementwise(1 << 40, &DeviceProps::H200).unwrap().grid,
            132 * 32
        );
        assert_eq!(reduction(1000, &DeviceProps::H200).unwrap().grid, 4);
        assert_eq!(
            reduction(1 << 30, &DeviceProps::H200).unwrap().grid,
            132 * 4
        );
        assert_eq!(reduction(1 << 30, &SMALL).unwrap().grid, 8);
        assert!(elementwise(0, &SMALL).is_err() && reduction(0, &SMALL).is_err());
    }

    #[test]
    fn dequantize_plan_covers_every_group_of_32() {
        let p = nf4_dequantize(32 * 256 * 3 + 1, &DeviceProps::H200).unwrap();
        assert_eq!(p.grid, 4);
        assert_eq!(nf4_dequantize(1, &DeviceProps::H200).unwrap().grid, 1);
        assert!(nf4_dequantize(0, &SMALL).is_err());
    }

    #[test]
    fn double_quant_plans_match_the_abi_constants() {
        let [off, enc] = nf4_double_quant(5000, &DeviceProps::H200).unwrap();
        assert_eq!((off.grid, off.block), (1, 32));
        assert_eq!((enc.grid, enc.block), (20, 256));
        assert!(nf4_double_quant(0, &SMALL).is_err());
    }

    #[test]
    fn model_op_plans_cover_the_items_and_cap_the_grid() {
        let h = DeviceProps::H200;
        assert_eq!(
            model_op(4096, ModelWork::WarpPerItem, &h).unwrap().grid,
            512
        );
        assert_eq!(model_op(9, ModelWork::WarpPerItem, &h).unwrap().grid, 2);
        assert_eq!(model_op(7, ModelWork::CtaPerItem, &h).unwrap().grid, 7);
        assert_eq!(
            model_op(1 << 20, ModelWork::CtaPerItem, &h).unwrap().grid,
            132 * 32
        );
        assert_eq!(model_op(257, ModelWork::ThreadPerItem, &h).unwrap().grid, 2);
        assert_eq!(
            model_op(1 << 30, ModelWork::ThreadPerItem, &SMALL)
                .unwrap()
                .grid,
            10
        );
        for w in [
            ModelWork::WarpPerItem,
            ModelWork::CtaPerItem,
            ModelWork::ThreadPerItem,
        ] {
            assert_eq!(
                model_op(1, w, &h).unwrap(),
                LaunchPlan {
                    grid: 1,
                    block: 256,
                    shared_bytes: 0
                }
            );
            assert!(model_op(0, w, &h).is_err());
        }
    }

    #[test]
    fn rmsnorm_dw_plan_chunks_rows_to_fill_the_device() {
        let h = DeviceProps::H200;
        // 4096 columns = 128 groups: 528 CTAs wanted, so 5 chunks of 820 rows.
        let p = rmsnorm_dw(4096, 4096, &h).unwrap();
        assert_eq!((p.chunks, p.chunk_rows), (5, 820));
        assert_eq!(p.partial.grid, 128 * 5);
        assert_eq!((p.reduce.grid, p.reduce.block), (16, 256));
        // Few rows: one chunk (every chunk keeps at least 64 rows).
        let p = rmsnorm_dw(37, 1000, &h).unwrap();
        assert_eq!((p.chunks, p.chunk_rows, p.partial.grid), (1, 37, 32));
        let p = rmsnorm_dw(1000, 8, &h).unwrap();
        assert_eq!((p.chunks, p.chunk_rows), (16, 63));
        // Every row is in exactly one chunk.
        for (rows, dim) in [(1u64, 1u64), (65, 33), (100_003, 4096), (7, 1 << 20)] {
            let p = rmsnorm_dw(rows, dim, &SMALL).unwrap();
            let (c, r) = (u64::from(p.chunks), u64::from(p.chunk_rows));
            assert!(
                c * r >= rows && (c - 1) * r < rows,
                "rows {rows} dim {dim}: {p:?}"
            );
        }
        assert!(rmsnorm_dw(0, 4, &h).is_err() && rmsnorm_dw(4, 0, &h).is_err());
    }
}

// ---- LoRA (kernels/lora.cu) ---------------------------------------------------------------------

/// Which kernel family a fused LoRA forward takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    /// `lora_gemv_*`: at most [`ffi::QADAPT_LORA_GEMV_NARROW_ROWS`] rows, one warp per output
    /// feature, the weight streamed once (few registers: many warps per SM).
    Gemv,
    /// `lora_gemv_wide_*`: up to [`ffi::QADAPT_LORA_GEMV_MAX_ROWS`] rows, same scheme with more
    /// accumulators per lane.
    GemvWide,
    /// `lora_gemm_*`: tensor-core tiles of `QADAPT_LORA_GEMM_BM x QADAPT_LORA_GEMM_BN`.
    Gemm,
}

/// Threads a CTA of the y and dx GEMMs over a dense (`QADAPT_LORA_GEMM_THREADS`: 8 warps of
/// 64 x 32) or an NF4 weight (`QADAPT_LORA_GEMM_NF4_THREADS`: 4 warps of 64 x 64, the wider warp
/// tiles paying for the in-CTA decode). The grid is the same 128 x 128 tiling.
pub fn lora_gemm_threads(nf4: bool) -> u32 {
    if nf4 {
        ffi::QADAPT_LORA_GEMM_NF4_THREADS
    } else {
        ffi::QADAPT_LORA_GEMM_THREADS
    }
}

/// The launches of one fused LoRA forward: the LoRA intermediate `u` (`lora_xa_bf16` on the gemv
/// path, `lora_gemm_xa_bf16` on the GEMM path; absent without a LoRA term), then the gemv or GEMM
/// kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraForwardPlan {
    /// The kernel family of the main launch.
    pub path: LoraPath,
    /// `u = s * x A^T` per row adapter; `None` when `rank * n_adapters == 0`.
    pub xa: Option<LaunchPlan>,
    /// The gemv or GEMM launch.
    pub main: LaunchPlan,
}

/// Plans `y = x W^T + s B (A x)` for `m` rows, `n` outputs, `k` inputs and `r_total` =
/// rank * adapters LoRA columns. Rows <= 16 take a gemv path (grid-stride, capped grid), more
/// take the GEMM path, which needs one CTA per 128 x 128 output tile and an sm_80+ device
/// (mma.sync bf16).
pub fn lora_forward(
    m: u64,
    n: u64,
    k: u64,
    r_total: u64,
    props: &DeviceProps,
) -> Result<LoraForwardPlan> {
    const OP: &str = "lora forward plan";
    if m == 0 || n == 0 || k == 0 {
        return Err(invalid(OP, format!("empty shape m={m} n={n} k={k}")));
    }
    if m > u64::from(u32::MAX) || n > u64::from(u32::MAX) || k > u64::from(u32::MAX) {
        return Err(invalid(OP, "m, n and k must each fit in 32 bits"));
    }
    let warps = u64::from(ffi::QADAPT_LORA_GEMV_WARPS);
    if m <= u64::from(ffi::QADAPT_LORA_GEMV_MAX_ROWS) {
        // lora_xa_bf16: one CTA per u element (its warps split k), grid-stride.
        let xa = (r_total > 0).then(|| LaunchPlan {
            grid: capped_grid(m * r_total, props),
            block: 32 * ffi::QADAPT_LORA_GEMV_WARPS,
            shared_bytes: 0,
        });
        return Ok(LoraForwardPlan {
            path: if m <= u64::from(ffi::QADAPT_LORA_GEMV_NARROW_ROWS) {
                LoraPath::Gemv
            } else {
                LoraPath::GemvWide
            },
            xa,
            main: LaunchPlan {
                grid: capped_grid(n.div_ceil(warps), props),
                block: 32 * ffi::QADAPT_LORA_GEMV_WARPS,
                shared_bytes: 0,
            },
        });
    }
    if props.compute_capability.0 < 8 {
        return Err(invalid(
            OP,
            "the GEMM path needs compute capability 8.0 or newer (mma.sync bf16)",
        ));
    }
    // lora_gemm_xa_bf16 and the main GEMM: one CTA per 128 x 128 output tile.
    let tiled = |cols: u64| -> Result<LaunchPlan> {
        let tiles = cols.div_ceil(u64::from(ffi::QADAPT_LORA_GEMM_BN))
            * m.div_ceil(u64::from(ffi::QADAPT_LORA_GEMM_BM));
        if tiles > u64::from(props.max_grid_x) {
            return Err(invalid(
                OP,
                format!("{tiles} output tiles exceed the grid limit"),
            ));
        }
        Ok(LaunchPlan {
            grid: tiles as u32,
            block: ffi::QADAPT_LORA_GEMM_THREADS,
            shared_bytes: 0,
        })
    };
    Ok(LoraForwardPlan {
        path: LoraPath::Gemm,
        xa: if r_total > 0 {
            Some(tiled(r_total)?)
        } else {
            None
        },
        main: tiled(n)?,
    })
}

#[cfg(test)]
mod lora_tests {
    use super::*;

    const SM75: DeviceProps = DeviceProps {
        sm_count: 40,
        compute_capability: (7, 5),
        max_grid_x: i32::MAX as u32,
    };

    #[test]
    fn lora_plan_picks_gemv_up_to_16_rows() {
        for (m, path) in [
            (1, LoraPath::Gemv),
            (4, LoraPath::Gemv),
            (5, LoraPath::GemvWide),
            (16, LoraPath::GemvWide),
        ] {
            let p = lora_forward(m, 4096, 4096, 16, &DeviceProps::H200).unwrap();
            assert_eq!(p.path, path);
            assert_eq!((p.main.grid, p.main.block), (512, 256)); // 4096 features / 8 warps
            assert_eq!(p.xa.unwrap().grid, m as u32 * 16); // a CTA per u element
        }
        // The gemv grid-strides: capped at 32 CTAs per SM.
        let p = lora_forward(1, 1 << 30, 64, 0, &DeviceProps::H200).unwrap();
        assert_eq!(p.main.grid, 132 * 32);
        assert_eq!(p.xa, None);
        // Even a pre-Ampere device runs the gemv path.
        assert_eq!(
            lora_forward(3, 10, 10, 1, &SM75).unwrap().path,
            LoraPath::Gemv
        );
    }

    #[test]
    fn lora_plan_gemm_has_one_cta_per_output_tile() {
        let p = lora_forward(17, 4096, 4096, 64, &DeviceProps::H200).unwrap();
        assert_eq!(p.path, LoraPath::Gemm);
        assert_eq!((p.main.grid, p.main.block), (32, 256));
        assert_eq!(p.xa.unwrap().grid, 1); // u is 17 x 64: one tile
        let p = lora_forward(4097, 129, 33, 3, &DeviceProps::H200).unwrap();
        assert_eq!(p.main.grid, 33 * 2);
        assert_eq!(p.xa.unwrap().grid, 33);
        let p = lora_forward(300, 64, 64, 8 * 64, &DeviceProps::H200).unwrap();
        assert_eq!((p.main.grid, p.xa.unwrap().grid), (3, 3 * 4));
    }

    #[test]
    fn lora_plan_refuses_what_it_cannot_launch() {
        assert!(lora_forward(0, 1, 1, 0, &DeviceProps::H200).is_err());
        assert!(lora_forward(1, 0, 1, 0, &DeviceProps::H200).is_err());
        assert!(lora_forward(1, 1, 1 << 33, 0, &DeviceProps::H200).is_err());
        assert!(lora_forward(64, 64, 64, 8, &SM75).is_err());
        let tiny = DeviceProps {
            max_grid_x: 3,
            ..DeviceProps::H200
        };
        assert!(lora_forward(300, 300, 64, 8, &tiny).is_err());
        assert!(lora_forward(300, 256, 64, 8, &tiny).is_err()); // 3 x 2 tiles
        assert!(lora_forward(128, 384, 64, 8, &tiny).is_ok()); // 3 x 1 tiles
    }
}

/// The launches of one fused LoRA backward: `lora_gemm_xa_bf16` (u), `lora_gemm_bwd_dyb_bf16` (g),
/// the dx GEMM, and the two adapter-gradient GEMMs; the LoRA launches are `None` without a LoRA
/// term. Every launch has one CTA per 128 x 128 output tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraBackwardPlan {
    /// `u = bf16(s x A^T)`, recomputed for dB.
    pub xa: Option<LaunchPlan>,
    /// `g = bf16(s dy B)`.
    pub dyb: Option<LaunchPlan>,
    /// `dx = dy W + g Acat`: one CTA per 128 x 128 tile of dx.
    pub dx: LaunchPlan,
    /// `dA += g^T x`: one CTA per 128 x 128 tile of the `[R, k]` stack.
    pub da: Option<LaunchPlan>,
    /// `dB += dy^T u`: one CTA per 128 x 128 tile of `[n, R]`.
    pub db: Option<LaunchPlan>,
}

/// Plans the fused backward for `m` rows, `n` outputs, `k` inputs, `r_total` LoRA columns. Every
/// matmul takes the tensor-core path (sm_80+).
pub fn lora_backward(
    m: u64,
    n: u64,
    k: u64,
    r_total: u64,
    props: &DeviceProps,
) -> Result<LoraBackwardPlan> {
    const OP: &str = "lora backward plan";
    if m == 0 || n == 0 || k == 0 {
        return Err(invalid(OP, format!("empty shape m={m} n={n} k={k}")));
    }
    if m > u64::from(u32::MAX) || n > u64::from(u32::MAX) || k > u64::from(u32::MAX) {
        return Err(invalid(OP, "m, n and k must each fit in 32 bits"));
    }
    if props.compute_capability.0 < 8 {
        return Err(invalid(
            OP,
            "the backward needs compute capability 8.0 or newer (mma.sync bf16)",
        ));
    }
    let t = u64::from(ffi::QADAPT_LORA_GEMM_BN);
    let tiled = |rows: u64, cols: u64| -> Result<LaunchPlan> {
        let tiles = rows.div_ceil(t) * cols.div_ceil(t);
        if tiles > u64::from(props.max_grid_x) {
            return Err(invalid(OP, format!("{tiles} tiles exceed the grid limit")));
        }
        Ok(LaunchPlan {
            grid: tiles as u32,
            block: ffi::QADAPT_LORA_GEMM_THREADS,
            shared_bytes: 0,
        })
    };
    let lora = r_total > 0;
    let mr = if lora { Some(tiled(m, r_total)?) } else { None };
    Ok(LoraBackwardPlan {
        xa: mr,
        dyb: mr,
        dx: tiled(m, k)?,
        da: if lora { Some(tiled(r_total, k)?) } else { None },
        db: if lora { Some(tiled(n, r_total)?) } else { None },
    })
}

#[cfg(test)]
mod lora_backward_tests {
    use super::*;

    #[test]
    fn lora_backward_plan_tiles_each_output() {
        let p = lora_backward(4096, 4096, 11008, 64, &DeviceProps::H200).unwrap();
        assert_eq!(p.dx.grid, 32 * 86);
        assert_eq!(p.da.unwrap().grid, 86);
        assert_eq!(p.db.unwrap().grid, 32);
        assert_eq!(p.xa.unwrap().grid, 32); // u and g: 4096 x 64
        assert_eq!(p.dyb, p.xa);
        let p = lora_backward(1, 5, 3, 0, &DeviceProps::H200).unwrap();
        assert_eq!((p.dx.grid, p.da, p.db, p.xa), (1, None, None, None));
    }

    #[test]
    fn lora_backward_plan_refuses_what_it_cannot_launch() {
        let old = DeviceProps {
            compute_capability: (7, 5),
            ..DeviceProps::H200
        };
        assert!(lora_backward(4, 4, 4, 1, &old).is_err());
        assert!(lora_backward(0, 4, 4, 1, &DeviceProps::H200).is_err());
        let tiny = DeviceProps {
            max_grid_x: 2,
            ..DeviceProps::H200
        };
        assert!(lora_backward(300, 4, 4, 1, &tiny).is_err()); // dx: 3 tiles
        assert!(lora_backward(4, 300, 4, 1, &tiny).is_err()); // dB: 3 tiles
        assert!(lora_backward(4, 4, 4, 300, &tiny).is_err()); // dA: 3 tiles
        assert!(lora_backward(256, 256, 4, 128, &tiny).is_ok());
        assert!(lora_backward(256, 4, 4, 129, &tiny).is_err()); // u, g: 2 x 2 tiles
    }
}
