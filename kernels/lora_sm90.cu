/*
 * lora_sm90.cu — the Hopper (sm_90a) path of the fused NF4 LoRA forward:
 *
 *     y = x W^T + bias + u Bcat^T        (u = s x A^T from lora_rank_xa_bf16, Bcat = [B_0 | B_1 ...])
 *
 * computed as its transpose, y^T = [W | Bcat] [x | u]^T, so that W — the operand that must be
 * decoded from NF4 — is wgmma's A operand, the one it takes from registers: no decoded copy of W
 * ever goes through shared memory. x (then u) is the B operand, loaded by TMA into 128-byte-swizzled
 * tiles that wgmma reads through a matrix descriptor.
 *
 * CTA: 384 threads = 3 warpgroups, one CTA per SM (dynamic shared memory), tile BM = 128 output
 * features x BN = 128 or 256 tokens, BK = 64 of k a step, STAGES = 4 stages.
 *   - warpgroup 0, the producer: gives its registers back (setmaxnreg.dec) and one thread runs the
 *     TMA loop: for each k step, wait until the consumers released the stage (`empty`), announce its
 *     bytes on `full` (arrive.expect_tx) and issue the loads: the x box [BN rows x 64 k] and the W
 *     codes box [128 rows x 32 bytes] for a step of W, the u box [BN x 64] for a step of Bcat.
 *   - warpgroups 1 and 2, the consumers (setmaxnreg.inc): consumer c owns features
 *     n0 + 64c .. n0 + 64c + 63. Per step: wait on `full`, build the A fragments of the four
 *     16-wide k slices (W: 4 code bytes a slice from the shared codes tile, each nibble ->
 *     bf16(level * block scale), exactly lora_gemm_nf4_bf16's rounding; Bcat: bf16 pairs from
 *     global), issue four m64nBNk16 wgmma into the f32 accumulators (BN/2 registers a thread),
 *     wait for them, release the stage (one arrive per warp on `empty`). The other consumer's
 *     decode runs under this one's MMA: the two warpgroups share each SM sub-partition.
 *   - epilogue, per warp (no CTA barrier: the producer has exited): v = acc + bias (+ y when
 *     QADAPT_LORA_ACCUMULATE, read in fragment order), rounded once to bf16 into the warp's own
 *     [BN tokens][16 features] staging tile, then 16-byte stores of y rows.
 *
 * Shared memory (dynamic, 1024-byte aligned): STAGES x (x/u tile BN x 128 B, codes tile 128 x 32 B),
 * the 8 consumer warps' staging tiles (BN x 32 B each), 2 x STAGES mbarriers.
 *
 * Preconditions (the host plan checks them; qadapt.h, QadaptLoraSm90Args): k % 64 == 0, blocksize a
 * power of two >= 64 (one block scale per row and step), rank % 8 == 0, n % 8 == 0, x, u, y,
 * lora_b 16-byte aligned. No split k: the host takes this path only when the output tiles fill the
 * GPU.
 */
#include "qadapt.h"
#include "gemm_sm80.cuh"
#include "nf4_codec.cuh"
#include <qadapt_sm90.cuh>

namespace {

using bf16 = __nv_bfloat16;

/* (gemm_sm80.cuh's BM, BK, STAGES are the sm_80 tiles; these are the sm_90a ones.) */
constexpr uint32_t H_BM = QADAPT_SM90_BM;
constexpr uint32_t H_BK = QADAPT_SM90_BK;
constexpr uint32_t H_STAGES = QADAPT_SM90_STAGES;
constexpr uint32_t CODES_BYTES = H_BM * H_BK / 2; /* one step of W's codes: 128 rows x 32 bytes */

template <uint32_t BN>
struct Sm90Layout {
    static constexpr uint32_t TILE_BYTES = BN * H_BK * 2; /* x or u: BN rows of 128 bytes */
    static constexpr uint32_t STAGE_BYTES = TILE_BYTES + CODES_BYTES;
    static constexpr uint32_t STAGING_BYTES = BN * 16 * 2; /* a warp's [BN][16] bf16 */
    static constexpr uint32_t STAGING_OFF = H_STAGES * STAGE_BYTES;
    static constexpr uint32_t BAR_OFF = STAGING_OFF + 8 * STAGING_BYTES;
    static constexpr uint32_t BYTES = BAR_OFF + 2 * H_STAGES * 8;
    static_assert(TILE_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzled tiles stay 1024-byte aligned");
    static_assert(BYTES <= 227 * 1024, "over the 227 KiB of shared memory a CTA can have on sm_90");
};

#if QADAPT_SM90A

/* The block scale of feature row `row` at k step `step` (0 outside W: a row past n contributes 0). */
__device__ __forceinline__ float step_scale(const QadaptLoraFwdArgs& a, uint32_t row, uint32_t step, uint32_t bs_shift) {
    if (row >= a.n) return 0.0f;
    const uint64_t b = ((uint64_t)row * a.k + (uint64_t)step * H_BK) >> bs_shift;
    return qadapt::nf4_block_scale(reinterpret_cast<const float*>(a.absmax),
                                   reinterpret_cast<const uint8_t*>(a.absmax_codes),
                                   reinterpret_cast<const float*>(a.nested_absmax),
                                   reinterpret_cast<const float*>(a.dynamic_map), a.offset, b);
}

/* Two codes of one byte (the even element in the high nibble, as bitsandbytes packs them) as the
 * bf16 pair of an A-fragment register, the lower column in the low half. */
__device__ __forceinline__ uint32_t decode_pair(const float* lv, uint32_t byte, float scale) {
    const __nv_bfloat162 p =
        __floats2bfloat162_rn(__fmul_rn(lv[byte >> 4], scale), __fmul_rn(lv[byte & 15u], scale));
    return *reinterpret_cast<const uint32_t*>(&p);
}

/* Two consecutive Bcat elements (n, e), (n, e + 1) as one register (0 outside). e is even and rank
 * is a multiple of 8, so the pair lies in one adapter's row and is 4-byte aligned. */
__device__ __forceinline__ uint32_t bcat_pair(const QadaptLoraFwdArgs& a, uint32_t n, uint32_t e) {
    if (n >= a.n || e >= a.rank * a.n_adapters) return 0u;
    const bf16* B = reinterpret_cast<const bf16*>(a.lora_b);
    return __ldg(reinterpret_cast<const uint32_t*>(B + ((uint64_t)(e / a.rank) * a.n + n) * a.rank + e % a.rank));
}

/* One step of a consumer warpgroup, its stage full: acc += frag (the 64 x 64 A slab, four 16-wide
 * slices) times the stage's B tile (BN rows of 64 k, 128-byte swizzled; slice q starts 32 q bytes
 * in), then, once the MMA retired, this warp's release of the stage. */
template <uint32_t BN>
__device__ __forceinline__ void mma_stage(float (&acc)[BN / 2], const uint32_t (&frag)[4][4], const uint8_t* tile,
                                          uint64_t* empty, uint32_t lane) {
    qadapt::sm90::wgmma_fence();
#pragma unroll
    for (uint32_t q = 0; q < 4; ++q)
        qadapt::sm90::wgmma_bf16_rs<BN>(acc, frag[q], qadapt::sm90::wgmma_desc_sw128(tile + 32 * q), true);
    qadapt::sm90::wgmma_commit();
    qadapt::sm90::wgmma_wait<0>();
    qadapt::sm90::fence_regs(acc);
    /* Every lane of the warp is past its wait (and its codes loads) before the warp releases. */
    __syncwarp();
    if (lane == 0) qadapt::sm90::mbar_arrive(empty);
}

template <uint32_t BN>
__device__ __forceinline__ void gemm_nf4_sm90(const QadaptLoraSm90Args& args) {
    using L = Sm90Layout<BN>;
    const QadaptLoraFwdArgs& a = args.fwd;
    if (qadapt::dynamic_smem_size() < L::BYTES) __trap();
    uint8_t* smem = qadapt::dynamic_smem<uint8_t>();
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::BAR_OFF);
    uint64_t* empty = full + H_STAGES;
    __shared__ float lv[16];

    const uint32_t tiles_m = (a.m + BN - 1) / BN, tiles_n = (a.n + H_BM - 1) / H_BM;
    const uint2 tile = grouped_tile(tiles_m, tiles_n);
    const uint32_t m0 = tile.x * BN, n0 = tile.y * H_BM;
    const uint32_t w_steps = a.k / H_BK;
    const uint32_t lora_cols = a.rank * a.n_adapters;
    const uint32_t steps = w_steps + (lora_cols + H_BK - 1) / H_BK;

    if (threadIdx.x == 0) {
        for (uint32_t s = 0; s < H_STAGES; ++s) {
            qadapt::sm90::mbar_init(&full[s], 1);
            qadapt::sm90::mbar_init(&empty[s], 8);
        }
        qadapt::sm90::fence_mbar_init();
    }
    if (threadIdx.x < 16) lv[threadIdx.x] = qadapt::nf4_level((int)threadIdx.x);
    __syncthreads();

    const uint32_t wg = threadIdx.x / 128;
    if (wg == 0) {
        /* Producer. */
        qadapt::sm90::reg_dealloc<40>();
        if (threadIdx.x != 0) return;
        for (uint32_t i = 0; i < steps; ++i) {
            const uint32_t s = i % H_STAGES;
            if (i >= H_STAGES) qadapt::sm90::mbar_wait(&empty[s], ((i / H_STAGES) - 1) & 1u);
            uint8_t* stage = smem + s * L::STAGE_BYTES;
            if (i < w_steps) {
                qadapt::sm90::mbar_arrive_expect_tx(&full[s], L::TILE_BYTES + CODES_BYTES);
                qadapt::sm90::tma_load_2d(stage, &args.x_map, &full[s], (int32_t)(i * H_BK), (int32_t)m0);
                qadapt::sm90::tma_load_2d(stage + L::TILE_BYTES, &args.codes_map, &full[s], (int32_t)(i * H_BK / 2),
                                          (int32_t)n0);
            } else {
                qadapt::sm90::mbar_arrive_expect_tx(&full[s], L::TILE_BYTES);
                qadapt::sm90::tma_load_2d(stage, &args.u_map, &full[s], (int32_t)((i - w_steps) * H_BK), (int32_t)m0);
            }
        }
        return;
    }

    /* Consumers. */
    qadapt::sm90::reg_alloc<232>();
    const uint32_t warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const uint32_t g = lane / 4, t = lane % 4;
    const uint32_t r_lo = (wg - 1) * 64 + warp * 16 + g; /* tile-local feature rows r_lo, r_lo + 8 */
    const uint32_t bs_shift = 31 - __clz(a.blocksize);

    float acc[BN / 2];
#pragma unroll
    for (uint32_t j = 0; j < BN / 2; ++j) acc[j] = 0.0f;

    /* The W steps: block scales from global memory first (they load while the stage is in
     * flight), then the codes from the stage. Row r of the codes tile is 32 bytes: byte 8q + t
     * holds columns 16q + 2t, +1 and byte 8q + t + 4 columns 16q + 2t + 8, +9 of slice q. */
    for (uint32_t i = 0; i < w_steps; ++i) {
        const uint32_t s = i % H_STAGES;
        const uint8_t* stage = smem + s * L::STAGE_BYTES;
        const float sc_lo = step_scale(a, n0 + r_lo, i, bs_shift);
        const float sc_hi = step_scale(a, n0 + r_lo + 8, i, bs_shift);
        qadapt::sm90::mbar_wait(&full[s], (i / H_STAGES) & 1u);
        const uint4* row_lo = reinterpret_cast<const uint4*>(stage + L::TILE_BYTES + r_lo * 32);
        const uint4* row_hi = reinterpret_cast<const uint4*>(stage + L::TILE_BYTES + (r_lo + 8) * 32);
        const uint4 lo0 = row_lo[0], lo1 = row_lo[1], hi0 = row_hi[0], hi1 = row_hi[1];
        const uint32_t wl[8] = {lo0.x, lo0.y, lo0.z, lo0.w, lo1.x, lo1.y, lo1.z, lo1.w};
        const uint32_t wh[8] = {hi0.x, hi0.y, hi0.z, hi0.w, hi1.x, hi1.y, hi1.z, hi1.w};
        const uint32_t sh = 8 * t;
        uint32_t frag[4][4];
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            frag[q][0] = decode_pair(lv, (wl[2 * q] >> sh) & 0xffu, sc_lo);
            frag[q][1] = decode_pair(lv, (wh[2 * q] >> sh) & 0xffu, sc_hi);
            frag[q][2] = decode_pair(lv, (wl[2 * q + 1] >> sh) & 0xffu, sc_lo);
            frag[q][3] = decode_pair(lv, (wh[2 * q + 1] >> sh) & 0xffu, sc_hi);
        }
        mma_stage<BN>(acc, frag, stage, &empty[s], lane);
    }
    /* The LoRA steps: Bcat pairs from global memory, u from the stage. */
    for (uint32_t i = w_steps; i < steps; ++i) {
        const uint32_t s = i % H_STAGES;
        const uint32_t e0 = (i - w_steps) * H_BK;
        uint32_t frag[4][4];
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            const uint32_t e = e0 + 16 * q + 2 * t;
            frag[q][0] = bcat_pair(a, n0 + r_lo, e);
            frag[q][1] = bcat_pair(a, n0 + r_lo + 8, e);
            frag[q][2] = bcat_pair(a, n0 + r_lo, e + 8);
            frag[q][3] = bcat_pair(a, n0 + r_lo + 8, e + 8);
        }
        qadapt::sm90::mbar_wait(&full[s], (i / H_STAGES) & 1u);
        mma_stage<BN>(acc, frag, smem + s * L::STAGE_BYTES, &empty[s], lane);
    }

    /* Epilogue. acc[4j + 0, 1] = y^T[r_lo][8j + 2t, +1], acc[4j + 2, 3] = y^T[r_lo + 8][8j + 2t, +1]. */
    const bf16* __restrict__ bias = reinterpret_cast<const bf16*>(a.bias);
    bf16* __restrict__ y = reinterpret_cast<bf16*>(a.y);
    const bool add = (a.flags & QADAPT_LORA_ACCUMULATE) != 0;
    const uint32_t f_lo = n0 + r_lo, f_hi = f_lo + 8;
    const float b_lo = (bias && f_lo < a.n) ? bf_at(bias, f_lo) : 0.0f;
    const float b_hi = (bias && f_hi < a.n) ? bf_at(bias, f_hi) : 0.0f;
    bf16* staging = reinterpret_cast<bf16*>(smem + L::STAGING_OFF + ((wg - 1) * 4 + warp) * L::STAGING_BYTES);
#pragma unroll
    for (uint32_t j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t tok = 8 * j + 2 * t + h, row = m0 + tok;
            float lo = acc[4 * j + h] + b_lo, hi = acc[4 * j + 2 + h] + b_hi;
            if (add && row < a.m) {
                if (f_lo < a.n) lo += bf_at(y, (uint64_t)row * a.n + f_lo);
                if (f_hi < a.n) hi += bf_at(y, (uint64_t)row * a.n + f_hi);
            }
            staging[tok * 16 + g] = __float2bfloat16_rn(lo);
            staging[tok * 16 + g + 8] = __float2bfloat16_rn(hi);
        }
    }
    __syncwarp();
    /* Lane pairs store one token's 16 features (32 bytes) as two 16-byte chunks. */
    const uint32_t f0 = n0 + (wg - 1) * 64 + warp * 16 + 8 * (lane & 1u);
    for (uint32_t tok = lane / 2; tok < BN; tok += 16) {
        const uint32_t row = m0 + tok;
        if (row >= a.m || f0 >= a.n) continue;
        *reinterpret_cast<uint4*>(y + (uint64_t)row * a.n + f0) =
            *reinterpret_cast<const uint4*>(staging + tok * 16 + 8 * (lane & 1u));
    }
}

#endif  // QADAPT_SM90A

}  // namespace

/* Compiled for sm_90a only (build.rs); QADAPT_SM90A is 0 in no pass of that build but nvcc's host
 * pass, which never runs kernel bodies. */
QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn128_bf16, QadaptLoraSm90Args) {
#if QADAPT_SM90A
    gemm_nf4_sm90<128>(args);
#else
    __trap();
#endif
}
QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn256_bf16, QadaptLoraSm90Args) {
#if QADAPT_SM90A
    gemm_nf4_sm90<256>(args);
#else
    __trap();
#endif
}
