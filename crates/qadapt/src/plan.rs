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

/// `ctas` CTAs of 256 threads (capped as [`capped_grid`] says, the kernel striding over the
/// rest), no dynamic shared memory.
fn ctas_of_256(ctas: u64, props: &DeviceProps) -> LaunchPlan {
    LaunchPlan {
        grid: capped_grid(ctas, props),
        block: 256,
        shared_bytes: 0,
    }
}

/// `nf4_quantize_*`: one warp per NF4 block, 8 warps per CTA.
pub fn nf4_quantize(n: u64, blocksize: u32, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 quantize plan", "empty tensor"));
    }
    let nblocks = n.div_ceil(u64::from(blocksize));
    Ok(ctas_of_256(nblocks.div_ceil(8), props))
}

/// `nf4_dequantize_*`: one thread per 32 elements (a 16-byte load of codes), 256 threads a CTA.
pub fn nf4_dequantize(n: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if n == 0 {
        return Err(invalid("nf4 dequantize plan", "empty tensor"));
    }
    let groups = n.div_ceil(32);
    Ok(ctas_of_256(groups.div_ceil(256), props))
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
    Ok(ctas_of_256(n.div_ceil(256), props))
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

// ---- Model ops (kernels/rmsnorm.cu ... attention.cu) --------------------------------------------

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

/// The launch of a model-op kernel over `items` work items of the kind `work` says.
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

/// Logits per chunk of the fused LM head and cross-entropy
/// ([`crate::cuda::ops::lm_head_cross_entropy`]): `2^26` (128 MiB of bf16, twice with the
/// gradient). At a 128k vocabulary that is 523 rows per chunk: the head GEMM of a chunk
/// (523 x 4096 x 128k) still does ~500 FLOP per byte of the head it re-reads, so chunking costs
/// no throughput, while 16k rows of whole logits would take 8 GiB.
pub const LOSS_CHUNK_LOGITS: usize = 1 << 26;

/// Token rows per chunk of the fused LM head and cross-entropy for `rows` rows and a `vocab`
/// vocabulary: as many as [`LOSS_CHUNK_LOGITS`] logits allow, at least one, at most `rows`.
pub fn loss_chunk_rows(rows: usize, vocab: usize) -> usize {
    (LOSS_CHUNK_LOGITS / vocab.max(1)).clamp(1, rows.max(1))
}

/// The tensor-core attention kernels (`kernels/flash_attention.cu`): `blocks` 64-row blocks
/// (`QADAPT_FLASH_BLOCK` queries or keys of one head), one CTA each up to the grid cap (the
/// kernels grid-stride over the rest), `QADAPT_FLASH_THREADS` threads, static shared memory only.
pub fn flash_attention(blocks: u64, props: &DeviceProps) -> Result<LaunchPlan> {
    if blocks == 0 {
        return Err(invalid("flash attention plan", "no row blocks"));
    }
    Ok(LaunchPlan {
        grid: capped_grid(blocks, props),
        block: ffi::QADAPT_FLASH_THREADS,
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
    fn flash_attention_plan_one_cta_per_block_capped() {
        let p = flash_attention(3 * 8 * 17, &DeviceProps::H200).unwrap();
        assert_eq!((p.grid, p.block, p.shared_bytes), (408, 128, 0));
        assert_eq!(
            flash_attention(1 << 40, &DeviceProps::H200).unwrap().grid,
            132 * 32
        );
        assert_eq!(flash_attention(1000, &SMALL).unwrap().grid, 10);
        assert!(flash_attention(0, &SMALL).is_err());
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

// ---- LoRA (kernels/lora_*.cu) -------------------------------------------------------------------

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

/// How a fused LoRA forward forms the LoRA intermediate `u = s * x A^T` (per row adapter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XaPlan {
    /// `lora_xa_bf16` (gemv path): one CTA per element of `u` (its warps split k), grid-stride.
    Gemv(LaunchPlan),
    /// `lora_rank_xa_bf16` + `lora_rank_reduce_bf16` (GEMM path): R-wide tiles split over k.
    Rank(LoraRankPlan),
}

/// The launches of one fused LoRA forward: the LoRA intermediate `u` (absent without a LoRA
/// term), then the gemv or GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraForwardPlan {
    /// The kernel family of the main launch.
    pub path: LoraPath,
    /// `u = s * x A^T` per row adapter; `None` when `rank * n_adapters == 0`.
    pub xa: Option<XaPlan>,
    /// The gemv or GEMM launch (on the GEMM path with a split k: `splits` CTAs per output tile).
    pub main: LaunchPlan,
    /// The GEMM path's split of k, when the output tiles alone would leave most SMs idle.
    pub split: Option<GemmSplit>,
}

/// A split k of the y GEMM (`QadaptLoraFwdArgs.splits`, `.split_steps`): f32 partial sums
/// `[splits, m, n]`, then `lora_split_reduce_bf16` adds them in order with the LoRA term and
/// the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmSplit {
    /// Ranges of k (at least 2; none empty).
    pub splits: u32,
    /// `QADAPT_LORA_GEMM_BK` slices per range (the last range may be shorter).
    pub steps: u32,
    /// `lora_split_reduce_bf16`: grid-stride over the `m * n` outputs.
    pub reduce: LaunchPlan,
}

impl GemmSplit {
    /// f32 elements of the partial sums for `m x n` outputs.
    pub fn partial_len(&self, m: u64, n: u64) -> u64 {
        u64::from(self.splits) * m * n
    }
}

/// The split of k for a y GEMM of `tiles` output tiles over `k` inputs, or `None`: only when the
/// tiles fill less than half the SMs (e.g. 17..256 rows at n = 4096 on 132 SMs), about two
/// CTAs per SM in all, each range at least `QADAPT_LORA_SPLIT_MIN_STEPS` slices of BK.
pub fn gemm_split(tiles: u64, m: u64, n: u64, k: u64, props: &DeviceProps) -> Option<GemmSplit> {
    let sms = u64::from(props.sm_count.max(1));
    if 2 * tiles >= sms {
        return None;
    }
    let total_steps = k.div_ceil(u64::from(ffi::QADAPT_LORA_GEMM_BK));
    let max_splits = total_steps / u64::from(ffi::QADAPT_LORA_SPLIT_MIN_STEPS);
    let want = (2 * sms).div_ceil(tiles).min(max_splits);
    if want < 2 {
        return None;
    }
    let steps = total_steps.div_ceil(want);
    let splits = total_steps.div_ceil(steps);
    (splits >= 2).then(|| GemmSplit {
        splits: splits as u32,
        steps: steps as u32,
        reduce: LaunchPlan {
            grid: capped_grid(
                (m * n).div_ceil(u64::from(ffi::QADAPT_LORA_SPLIT_REDUCE_THREADS)),
                props,
            ),
            block: ffi::QADAPT_LORA_SPLIT_REDUCE_THREADS,
            shared_bytes: 0,
        },
    })
}

/// One rank-R product of `kernels/lora_rank.cu`: `out[p, e] = sum_t L(p, t) Rr(t, e)` over
/// `R` columns `e`, its reduction of length `t` split into `splits` ranges of `steps` slices of
/// `QADAPT_LORA_RANK_BK`, then the fixed-order reduction of the splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraRankPlan {
    /// The product kernel: `splits * ceil(p / BM) * ceil(R / r_tile)` CTAs.
    pub main: LaunchPlan,
    /// `lora_rank_reduce_bf16`: grid-stride over the `p * R` outputs.
    pub reduce: LaunchPlan,
    /// Output tile width: 16, 32 or 64 columns of `R`.
    pub r_tile: u32,
    /// Ranges the reduction is cut into (none empty).
    pub splits: u32,
    /// `QADAPT_LORA_RANK_BK` slices per range (the last range may have fewer).
    pub steps: u32,
}

impl LoraRankPlan {
    /// f32 elements of the partial-sum scratch `[splits, p, R]`.
    pub fn partial_len(&self, p: u64, r_total: u64) -> u64 {
        u64::from(self.splits) * p * r_total
    }
}

/// Plans one rank-R product with `p` output rows, a reduction of length `t` and `r_total` columns.
/// The tile is `QADAPT_LORA_RANK_BM x r_tile` with the narrowest `r_tile` of 16, 32, 64 that holds
/// `r_total` (wider `R`: several column tiles of 64). The reduction is split so that the grid is
/// about two waves of the device's SMs (`floor(2 * sm_count / tiles)` splits, at least one),
/// while every split keeps at least `QADAPT_LORA_RANK_MIN_STEPS` slices; the steps are then spread
/// evenly and the split count recomputed so that no split is empty.
pub fn lora_rank(p: u64, t: u64, r_total: u64, props: &DeviceProps) -> Result<LoraRankPlan> {
    const OP: &str = "lora rank-product plan";
    if p == 0 || t == 0 || r_total == 0 {
        return Err(invalid(
            OP,
            format!("empty product p={p} t={t} R={r_total}"),
        ));
    }
    if p > u64::from(u32::MAX) || t > u64::from(u32::MAX) || r_total > u64::from(u32::MAX) {
        return Err(invalid(OP, "p, t and R must each fit in 32 bits"));
    }
    let r_tile: u64 = match r_total {
        0..=16 => 16,
        17..=32 => 32,
        _ => 64,
    };
    let tiles = p.div_ceil(u64::from(ffi::QADAPT_LORA_RANK_BM)) * r_total.div_ceil(r_tile);
    let total_steps = t.div_ceil(u64::from(ffi::QADAPT_LORA_RANK_BK));
    let max_splits = (total_steps / u64::from(ffi::QADAPT_LORA_RANK_MIN_STEPS)).max(1);
    let want = (2 * u64::from(props.sm_count.max(1)) / tiles).max(1);
    let steps = total_steps.div_ceil(want.min(max_splits));
    let splits = total_steps.div_ceil(steps);
    let ctas = tiles * splits;
    if ctas > u64::from(props.max_grid_x) {
        return Err(invalid(OP, format!("{ctas} CTAs exceed the grid limit")));
    }
    let reduce_threads = u64::from(ffi::QADAPT_LORA_RANK_REDUCE_THREADS);
    Ok(LoraRankPlan {
        main: LaunchPlan {
            grid: ctas as u32,
            block: ffi::QADAPT_LORA_RANK_THREADS,
            shared_bytes: 0,
        },
        reduce: LaunchPlan {
            grid: capped_grid((p * r_total).div_ceil(reduce_threads), props),
            block: ffi::QADAPT_LORA_RANK_REDUCE_THREADS,
            shared_bytes: 0,
        },
        r_tile: r_tile as u32,
        splits: splits as u32,
        steps: steps as u32,
    })
}

/// Plans `y = x W^T + s B (A x)` for `m` rows, `n` outputs, `k` inputs and `r_total` =
/// rank * adapters LoRA columns. Rows <= 16 take a gemv path (grid-stride, capped grid), more
/// take the GEMM path, which needs one CTA per 128 x 128 output tile (times the splits of k when
/// the tiles are few, [`gemm_split`]) and an sm_80+ device (mma.sync bf16).
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
        let xa = (r_total > 0).then(|| {
            XaPlan::Gemv(LaunchPlan {
                grid: capped_grid(m * r_total, props),
                block: 32 * ffi::QADAPT_LORA_GEMV_WARPS,
                shared_bytes: 0,
            })
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
            split: None,
        });
    }
    if props.compute_capability.0 < 8 {
        return Err(invalid(
            OP,
            "the GEMM path needs compute capability 8.0 or newer (mma.sync bf16)",
        ));
    }
    // The main GEMM: one CTA per 128 x 128 output tile; u: R-wide tiles split over k.
    let tiles = n.div_ceil(u64::from(ffi::QADAPT_LORA_GEMM_BN))
        * m.div_ceil(u64::from(ffi::QADAPT_LORA_GEMM_BM));
    let split = gemm_split(tiles, m, n, k, props);
    let ctas = tiles * split.map_or(1, |s| u64::from(s.splits));
    if ctas > u64::from(props.max_grid_x) {
        return Err(invalid(
            OP,
            format!("{ctas} output tiles exceed the grid limit"),
        ));
    }
    Ok(LoraForwardPlan {
        path: LoraPath::Gemm,
        xa: if r_total > 0 {
            Some(XaPlan::Rank(lora_rank(m, k, r_total, props)?))
        } else {
            None
        },
        main: LaunchPlan {
            grid: ctas as u32,
            block: ffi::QADAPT_LORA_GEMM_THREADS,
            shared_bytes: 0,
        },
        split,
    })
}

/// An sm_90a NF4 GEMM of `kernels/lora_sm90.cu` (`lora_gemm_nf4_sm90_bn{bn}_bf16`,
/// `lora_gemm_bwd_dx_nf4_sm90_bn{bn}_bf16`): TMA, mbarriers and wgmma with the weight decoded in
/// registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sm90Plan {
    /// Tokens per CTA tile: 128 or 256 (features: `QADAPT_SM90_BM`).
    pub bn: u32,
    /// One CTA per output tile, `QADAPT_SM90_THREADS` threads, the kernel's dynamic shared memory.
    pub launch: LaunchPlan,
}

/// The dynamic shared memory of the sm_90a GEMMs at `bn` tokens a tile: `QADAPT_SM90_STAGES`
/// stages of an activation tile (`bn` rows of 128 bytes) and a 4 KiB codes tile, eight warps'
/// epilogue staging (`bn` x 16 bf16 each), a table of 128 f32 block scales a stage and two
/// mbarriers a stage (`Sm90Layout` in the kernel, which traps when given less).
pub fn sm90_shared_bytes(bn: u32) -> u32 {
    let stages = ffi::QADAPT_SM90_STAGES;
    let codes = ffi::QADAPT_SM90_BM * ffi::QADAPT_SM90_BK / 2;
    stages * (bn * ffi::QADAPT_SM90_BK * 2 + codes)
        + 8 * bn * 16 * 2
        + stages * 128 * 4
        + 2 * stages * 8
}

/// Whether the y GEMM of an NF4 weight takes the sm_90a kernel instead of `lora_gemm_nf4_bf16`,
/// and with which tile. Only on compute capability 9.0, past the gemv rows, for the kernel's
/// preconditions (k % 64 == 0, a power-of-two block size of at least 64, rank and n multiples of
/// 8), and when its 128 x 128 tiles alone give every SM at least half a CTA (fewer would want the
/// split k of the sm_80 path). 256-token tiles when those still give every SM a CTA.
pub fn lora_sm90(
    m: u64,
    n: u64,
    k: u64,
    rank: u64,
    blocksize: u32,
    props: &DeviceProps,
) -> Option<Sm90Plan> {
    sm90_plan(m, n, k, rank, blocksize, props)
}

/// The same for the dx GEMM of an NF4 weight (`lora_gemm_bwd_dx_nf4_sm90_*` instead of
/// `lora_gemm_bwd_dx_nf4_bf16`): its output features are k and its reduction is n, so it needs
/// n % 64 == 0 and k % 64 == 0 (whole blocks along each W row), rank % 8 == 0, and k's tiles to
/// fill the GPU.
pub fn lora_sm90_dx(
    m: u64,
    n: u64,
    k: u64,
    rank: u64,
    blocksize: u32,
    props: &DeviceProps,
) -> Option<Sm90Plan> {
    if !k.is_multiple_of(u64::from(ffi::QADAPT_SM90_BK)) {
        return None;
    }
    sm90_plan(m, k, n, rank, blocksize, props)
}

/// An sm_90a GEMM of `m` tokens, `features` outputs and a `reduction` (see [`lora_sm90`]).
fn sm90_plan(
    m: u64,
    features: u64,
    reduction: u64,
    rank: u64,
    blocksize: u32,
    props: &DeviceProps,
) -> Option<Sm90Plan> {
    let fits = props.compute_capability == (9, 0)
        && m > u64::from(ffi::QADAPT_LORA_GEMV_MAX_ROWS)
        && reduction.is_multiple_of(u64::from(ffi::QADAPT_SM90_BK))
        && blocksize.is_power_of_two()
        && blocksize >= ffi::QADAPT_SM90_BK
        && rank.is_multiple_of(8)
        && features.is_multiple_of(8)
        && m <= u64::from(i32::MAX as u32)
        && features <= u64::from(i32::MAX as u32)
        && reduction <= u64::from(i32::MAX as u32);
    if !fits {
        return None;
    }
    let sms = u64::from(props.sm_count.max(1));
    let tiles_f = features.div_ceil(u64::from(ffi::QADAPT_SM90_BM));
    if 2 * tiles_f * m.div_ceil(128) < sms {
        return None;
    }
    let bn: u32 = if tiles_f * m.div_ceil(256) >= sms {
        256
    } else {
        128
    };
    let ctas = tiles_f * m.div_ceil(u64::from(bn));
    (ctas <= u64::from(props.max_grid_x)).then(|| Sm90Plan {
        bn,
        launch: LaunchPlan {
            grid: ctas as u32,
            block: ffi::QADAPT_SM90_THREADS,
            shared_bytes: sm90_shared_bytes(bn),
        },
    })
}

#[cfg(test)]
mod sm90_tests {
    use super::*;

    #[test]
    fn sm90_path_needs_hopper_and_the_kernel_preconditions() {
        let h = DeviceProps::H200;
        let p = lora_sm90(4096, 4096, 4096, 16, 64, &h).unwrap();
        // 32 x 16 tiles of 128 features x 256 tokens.
        assert_eq!(p.bn, 256);
        assert_eq!((p.launch.grid, p.launch.block), (512, 384));
        // 4 stages x (32 KiB + 4 KiB) + 8 x 8 KiB staging + 4 scale tables + 8 mbarriers.
        assert_eq!(
            p.launch.shared_bytes,
            4 * (32768 + 4096) + 8 * 8192 + 4 * 512 + 64
        );
        assert!(p.launch.shared_bytes <= 227 * 1024);
        // 512 tokens: 32 x 2 tiles of 256 would leave SMs idle, 32 x 4 of 128 do not.
        let p = lora_sm90(512, 4096, 4096, 16, 64, &h).unwrap();
        assert_eq!((p.bn, p.launch.grid), (128, 128));
        assert_eq!(
            p.launch.shared_bytes,
            4 * (16384 + 4096) + 8 * 4096 + 4 * 512 + 64
        );
        // Few tiles: the sm_80 path and its split k.
        assert_eq!(lora_sm90(128, 4096, 4096, 16, 64, &h), None);
        // Not Hopper, or the kernel's preconditions unmet.
        let a100 = DeviceProps {
            compute_capability: (8, 0),
            ..h
        };
        assert_eq!(lora_sm90(4096, 4096, 4096, 16, 64, &a100), None);
        assert_eq!(lora_sm90(4096, 4096, 4096 + 32, 16, 64, &h), None);
        assert_eq!(lora_sm90(4096, 4096, 4096, 16, 32, &h), None);
        assert_eq!(lora_sm90(4096, 4096, 4096, 12, 64, &h), None);
        assert_eq!(lora_sm90(4096, 4100, 4096, 16, 64, &h), None);
        assert_eq!(lora_sm90(16, 4096, 4096, 16, 64, &h), None);
        // No adapter at all is fine (rank 0).
        assert!(lora_sm90(4096, 4096, 4096, 0, 64, &h).is_some());
    }

    #[test]
    fn sm90_dx_path_tiles_k_and_steps_over_n() {
        let h = DeviceProps::H200;
        // dx of a 14336 x 4096 projection: 32 tiles of k x 16 of 256 tokens.
        let p = lora_sm90_dx(4096, 14336, 4096, 16, 64, &h).unwrap();
        assert_eq!((p.bn, p.launch.grid), (256, 512));
        // The down projection's dx: k = 14336 features (112 tiles), n = 4096 steps.
        let p = lora_sm90_dx(512, 4096, 14336, 16, 64, &h).unwrap();
        assert_eq!((p.bn, p.launch.grid), (256, 112 * 2));
        // n is the reduction: a multiple of 64; k too (whole blocks along W's rows).
        assert_eq!(lora_sm90_dx(4096, 4096 + 8, 4096, 16, 64, &h), None);
        assert_eq!(lora_sm90_dx(4096, 4096, 4096 + 8, 16, 64, &h), None);
        assert!(lora_sm90(4096, 4096 + 8, 4096, 16, 64, &h).is_some());
    }
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
            assert_eq!(
                p.xa,
                Some(XaPlan::Gemv(LaunchPlan {
                    grid: m as u32 * 16, // a CTA per u element
                    block: 256,
                    shared_bytes: 0
                }))
            );
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
        let rank = |p: &LoraForwardPlan| match p.xa {
            Some(XaPlan::Rank(r)) => r,
            other => panic!("expected a rank-product u, got {other:?}"),
        };
        let p = lora_forward(17, 4096, 4096, 64, &DeviceProps::H200).unwrap();
        assert_eq!(p.path, LoraPath::Gemm);
        // 32 output tiles on 132 SMs: k split into 9 ranges of 15 slices (the last 8), 288 CTAs.
        let split = p.split.unwrap();
        assert_eq!((split.splits, split.steps), (9, 15));
        assert_eq!((p.main.grid, p.main.block), (32 * 9, 256));
        assert_eq!(split.partial_len(17, 4096), 9 * 17 * 4096);
        // u is 17 x 64: one 64 x 64 tile, k split into 32 ranges of 4 slices.
        assert_eq!((rank(&p).main.grid, rank(&p).splits), (32, 32));
        let p = lora_forward(4097, 129, 33, 3, &DeviceProps::H200).unwrap();
        assert_eq!(p.main.grid, 33 * 2);
        assert_eq!((rank(&p).main.grid, rank(&p).r_tile), (65, 16)); // k = 33: one split
        let p = lora_forward(300, 64, 64, 8 * 64, &DeviceProps::H200).unwrap();
        assert_eq!((p.main.grid, rank(&p).main.grid), (3, 5 * 8));
    }

    #[test]
    fn lora_plan_splits_k_only_when_the_tiles_are_few() {
        let h = DeviceProps::H200;
        // 256 rows x 4096: 64 tiles, under half of 132 SMs: 5 ranges of 26 slices (the last 24).
        let s = lora_forward(256, 4096, 4096, 16, &h)
            .unwrap()
            .split
            .unwrap();
        assert_eq!((s.splits, s.steps), (5, 26));
        // 512 rows: 128 tiles, none.
        assert_eq!(lora_forward(512, 4096, 4096, 16, &h).unwrap().split, None);
        // 40 x 200 x 1056: 2 tiles, 33 slices, at most 8 ranges of >= 4: 7 of 5 (the last 3).
        let p = lora_forward(40, 200, 1056, 8, &h).unwrap();
        let s = p.split.unwrap();
        assert_eq!((s.splits, s.steps, p.main.grid), (7, 5, 14));
        assert_eq!(s.reduce.grid, (40 * 200u32).div_ceil(256));
        // k = 96 (3 slices): too short to split.
        assert_eq!(lora_forward(40, 200, 96, 8, &h).unwrap().split, None);
        // Every split covers all slices of k, none empty, each but the last `steps` long.
        for k in 1..3000u64 {
            if let Some(s) = gemm_split(2, 40, 200, k, &h) {
                let total = k.div_ceil(32);
                let (n, st) = (u64::from(s.splits), u64::from(s.steps));
                assert!(n >= 2 && st >= 4, "k = {k}: {s:?}");
                assert!((n - 1) * st < total && total <= n * st, "k = {k}: {s:?}");
            }
        }
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
        assert!(lora_forward(128, 384, 64, 8, &tiny).is_ok()); // 3 x 1 tiles, u: 2 x 1
        assert!(lora_forward(128, 384, 64, 200, &tiny).is_err()); // u: 2 x 4 tiles
    }
}

/// The launches of one fused LoRA backward: the rank-R products `u` (recomputed), `g`, and after
/// the dx GEMM the two adapter gradients (each a [`LoraRankPlan`], `None` without a LoRA term),
/// and the dx GEMM with one CTA per 128 x 128 tile of dx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraBackwardPlan {
    /// `u = bf16(s x A^T)`, recomputed for dB: `p = m`, reduction over `k`.
    pub xa: Option<LoraRankPlan>,
    /// `g = bf16(s dy B)`: `p = m`, reduction over `n`.
    pub dyb: Option<LoraRankPlan>,
    /// `dx = dy W + g Acat`: one CTA per 128 x 128 tile of dx (times the splits of n).
    pub dx: LaunchPlan,
    /// The dx GEMM's split of n when its tiles are few ([`gemm_split`]; then
    /// `lora_split_reduce_dx_bf16` adds the ranges and `g Acat`).
    pub dx_split: Option<GemmSplit>,
    /// `dA += g^T x`: `p = k`, reduction over `m`.
    pub da: Option<LoraRankPlan>,
    /// `dB += dy^T u`: `p = n`, reduction over `m`.
    pub db: Option<LoraRankPlan>,
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
    let tiles = m.div_ceil(t) * k.div_ceil(t);
    // dx is m x k reduced over n.
    let dx_split = gemm_split(tiles, m, k, n, props);
    let ctas = tiles * dx_split.map_or(1, |s| u64::from(s.splits));
    if ctas > u64::from(props.max_grid_x) {
        return Err(invalid(OP, format!("{ctas} tiles exceed the grid limit")));
    }
    let dx = LaunchPlan {
        grid: ctas as u32,
        block: ffi::QADAPT_LORA_GEMM_THREADS,
        shared_bytes: 0,
    };
    let rank = |p: u64, t: u64| -> Result<Option<LoraRankPlan>> {
        if r_total == 0 {
            Ok(None)
        } else {
            lora_rank(p, t, r_total, props).map(Some)
        }
    };
    Ok(LoraBackwardPlan {
        xa: rank(m, k)?,
        dyb: rank(m, n)?,
        dx,
        dx_split,
        da: rank(k, m)?,
        db: rank(n, m)?,
    })
}

#[cfg(test)]
mod lora_backward_tests {
    use super::*;

    #[test]
    fn lora_backward_plan_tiles_dx_and_splits_the_rank_products() {
        let p = lora_backward(4096, 4096, 11008, 64, &DeviceProps::H200).unwrap();
        assert_eq!((p.dx.grid, p.dx_split), (32 * 86, None));
        // u: 64 row tiles of a 64-wide R, 344 slices of k: 4 splits of 86 (256 CTAs).
        let xa = p.xa.unwrap();
        assert_eq!(
            (xa.r_tile, xa.splits, xa.steps, xa.main.grid),
            (64, 4, 86, 256)
        );
        // g: 128 slices of n, 4 splits of 32.
        let dyb = p.dyb.unwrap();
        assert_eq!((dyb.splits, dyb.steps, dyb.main.grid), (4, 32, 256));
        // dA: 172 tiles of k rows, already above 2 waves / 2: one split over all 128 slices of m.
        let da = p.da.unwrap();
        assert_eq!((da.splits, da.steps, da.main.grid), (1, 128, 172));
        let db = p.db.unwrap();
        assert_eq!((db.splits, db.steps, db.main.grid), (4, 32, 256));
        let p = lora_backward(1, 5, 3, 0, &DeviceProps::H200).unwrap();
        assert_eq!(
            (p.dx.grid, p.da, p.db, p.xa, p.dyb, p.dx_split),
            (1, None, None, None, None, None)
        );
        // 128 rows x k = 4096: 32 dx tiles, n = 4096 split into 9 ranges (288 CTAs).
        let p = lora_backward(128, 4096, 4096, 16, &DeviceProps::H200).unwrap();
        let s = p.dx_split.unwrap();
        assert_eq!((s.splits, s.steps, p.dx.grid), (9, 15, 288));
        assert_eq!(s.partial_len(128, 4096), 9 * 128 * 4096);
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
        assert!(lora_backward(4, 200, 4, 1, &tiny).is_err()); // dB: 4 row tiles of n
        assert!(lora_backward(4, 4, 4, 130, &tiny).is_err()); // 3 column tiles of R
        assert!(lora_backward(128, 128, 4, 64, &tiny).is_ok());
    }
}

#[cfg(test)]
mod lora_rank_tests {
    use super::*;

    #[test]
    fn rank_tile_is_the_narrowest_that_holds_r() {
        for (r, tile, tiles) in [
            (1, 16, 1),
            (16, 16, 1),
            (17, 32, 1),
            (32, 32, 1),
            (33, 64, 1),
            (64, 64, 1),
            (65, 64, 2),
            (200, 64, 4),
        ] {
            let p = lora_rank(64, 32, r, &DeviceProps::H200).unwrap();
            assert_eq!((p.r_tile, p.main.grid), (tile, tiles), "R = {r}");
        }
    }

    #[test]
    fn rank_splits_fill_about_two_waves_with_whole_ranges() {
        let h = DeviceProps::H200;
        // A 4096 x 4096 projection at 512 rows, r = 16: xa over k = 4096 (128 slices) on 8
        // row tiles: 33 splits wanted, 32 allowed by the 4-slice minimum: 4 slices each.
        let p = lora_rank(512, 4096, 16, &h).unwrap();
        assert_eq!((p.splits, p.steps, p.main.grid), (32, 4, 256));
        // dA / dB at 512 rows: 64 tiles of k (or n), 16 slices of m: 4 splits of 4.
        let p = lora_rank(4096, 512, 16, &h).unwrap();
        assert_eq!((p.splits, p.steps, p.main.grid), (4, 4, 256));
        // 4096 rows: 64 row tiles, 4 splits of 32 slices.
        let p = lora_rank(4096, 4096, 16, &h).unwrap();
        assert_eq!((p.splits, p.steps, p.main.grid), (4, 32, 256));
        // Splits that do not divide the slices: 10 slices, wanted 264 / 1, at most 2 by the
        // minimum: 5 + 5. 13 slices: at most 3 splits of ceil(13 / 3) = 5: 5 + 5 + 3.
        let p = lora_rank(10, 320, 16, &h).unwrap();
        assert_eq!((p.splits, p.steps), (2, 5));
        let p = lora_rank(10, 13 * 32 - 7, 16, &h).unwrap();
        assert_eq!((p.splits, p.steps), (3, 5));
        // A reduction shorter than one slice, and one shorter than the minimum: one split.
        let p = lora_rank(100, 5, 3, &h).unwrap();
        assert_eq!((p.splits, p.steps, p.main.grid), (1, 1, 2));
        let p = lora_rank(100, 100, 3, &h).unwrap();
        assert_eq!((p.splits, p.steps), (1, 4));
        // Never an empty split: 9 slices at most 2 splits -> 5 + 4.
        for t in 1..2000u64 {
            let p = lora_rank(7, t, 40, &h).unwrap();
            let slices = t.div_ceil(32);
            assert!(
                u64::from(p.splits - 1) * u64::from(p.steps) < slices,
                "t = {t}"
            );
            assert!(
                u64::from(p.splits) * u64::from(p.steps) >= slices,
                "t = {t}"
            );
            assert!(p.splits == 1 || u64::from(p.steps) >= 4, "t = {t}");
        }
        // The reduce kernel covers p * R elements.
        let p = lora_rank(1000, 64, 40, &h).unwrap();
        assert_eq!(p.reduce.grid, (1000u32 * 40).div_ceil(256));
        assert_eq!(p.partial_len(1000, 40), 1000 * 40);
    }

    #[test]
    fn rank_plan_refuses_what_it_cannot_launch() {
        assert!(lora_rank(0, 1, 1, &DeviceProps::H200).is_err());
        assert!(lora_rank(1, 0, 1, &DeviceProps::H200).is_err());
        assert!(lora_rank(1, 1, 0, &DeviceProps::H200).is_err());
        assert!(lora_rank(1 << 33, 1, 1, &DeviceProps::H200).is_err());
        let tiny = DeviceProps {
            max_grid_x: 3,
            ..DeviceProps::H200
        };
        assert!(lora_rank(64 * 4, 32, 16, &tiny).is_err());
        assert!(lora_rank(64 * 3, 32, 16, &tiny).is_ok());
    }
}
