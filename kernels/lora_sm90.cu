/*
 * lora_sm90.cu — the Hopper (sm_90a) path of the fused NF4 LoRA matmuls, forward y and backward dx:
 *
 *     y  = x W^T + bias + u Bcat^T       computed as  y^T  = [W   | Bcat  ] [x  | u]^T
 *     dx = dy W + g Acat                 computed as  dx^T = [W^T | Acat^T] [dy | g]^T
 *
 * (u = s x A^T and g = s dy B from kernels/lora_rank.cu; Bcat [n, R] = the B stack side by side,
 * Acat [R, k] = the A stack.) Transposed, the NF4 weight is wgmma's A operand, the one it takes
 * from registers: every consumer thread decodes exactly its own fragment from the codes tile and no
 * decoded copy of W goes through shared memory. The activations (x or dy, then u or g) are the B
 * operand, loaded by TMA into 128-byte-swizzled tiles that wgmma reads through a descriptor. The
 * LoRA term is more k steps of the same product.
 *
 * CTA: 384 threads = 3 warpgroups, one CTA per SM, tile BM = 128 output features (y: features of
 * n; dx: features of k) x BN = 128 or 256 tokens, BK = 64 of the reduction a step, 4 stages.
 *   - warpgroup 0, the producer, gives its registers back (setmaxnreg.dec). Its first warp runs the
 *     ring: per step all 32 lanes wait until the consumers released the stage (`empty`), compute
 *     the step's 128 block scales into the stage's scale table (4 each; W steps only), and arrive
 *     on `full`, lane 0 with the step's TMA bytes (arrive.expect_tx) and the loads: the activation
 *     box [BN tokens x 64] and the codes box [4 KiB], or the u/g box for a LoRA step.
 *   - warpgroups 1 and 2, the consumers (setmaxnreg.inc): consumer c owns features 64c..64c+63 of
 *     the tile. Per step: wait on `full`, build the A fragments of four 16-wide slices (W: codes
 *     and scales from the stage, each nibble -> bf16(level * scale) as lora_gemm_nf4_bf16 rounds
 *     it; LoRA: bf16 from global), four m64nBNk16 wgmma into f32 accumulators (BN/2 registers a
 *     thread), wait, release the stage (one arrive per warp on `empty`).
 *   - epilogue, per warp: v = acc (+ bias) (+ the old output with QADAPT_LORA_ACCUMULATE, read in
 *     fragment order), rounded once to bf16 into the warp's [BN tokens][16 features] staging tile,
 *     then 16-byte stores of output rows.
 *
 * Codes tiles (4 KiB a stage, TMA, no swizzle):
 *   y:  W rows n0..n0+127, columns k0..k0+63 = 32 bytes a row; row r holds, for slice q, columns
 *       16q + 2t, +1 in byte 8q + t and 16q + 2t + 8, +9 in byte 8q + t + 4 (t = lane % 4).
 *   dx: W rows nn0..nn0+63 (the reduction), columns (features) f0..f0+127 = 64 bytes a row,
 *       64-byte swizzled (chunk j of row nn at j ^ ((nn / 2) % 4): the decode reads four rows at
 *       once, which would otherwise share banks).
 * Scale tables (128 floats a stage): y: row r's block scale at this step (one block: block size
 * >= 64 and k % 64 == 0); dx: [nn][c], the block of W row nn0 + nn over features f0 + 64c ..+63.
 *
 * Shared memory (dynamic, 1024-byte aligned): STAGES x (activation tile BN x 128 B, codes 4 KiB; both
 * start 1024-byte aligned, as the swizzles need),
 * 8 consumer warps' staging tiles (BN x 32 B), STAGES scale tables, 2 x STAGES mbarriers.
 *
 * Preconditions (plan::lora_sm90 / lora_sm90_dx check them): the reduction a multiple of 64 (y: k,
 * dx: n), k % 64 == 0, blocksize a power of two >= 64, rank % 8 == 0, the output's row a multiple
 * of 8 (y: n, dx: k), x/dy, u/g, y/dx 16-byte aligned. No split: the host takes this path only
 * when the output tiles fill the GPU.
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
constexpr uint32_t CODES_BYTES = 4096; /* y: 128 rows x 32 bytes; dx: 64 rows x 64 bytes */
constexpr uint32_t SCALES = 128;       /* block scales a stage */

template <uint32_t BN>
struct Sm90Layout {
    static constexpr uint32_t TILE_BYTES = BN * H_BK * 2; /* BN rows of 128 bytes */
    static constexpr uint32_t STAGE_BYTES = TILE_BYTES + CODES_BYTES;
    static constexpr uint32_t STAGING_BYTES = BN * 16 * 2; /* a warp's [BN][16] bf16 */
    static constexpr uint32_t STAGING_OFF = H_STAGES * STAGE_BYTES;
    static constexpr uint32_t SCALES_OFF = STAGING_OFF + 8 * STAGING_BYTES;
    static constexpr uint32_t BAR_OFF = SCALES_OFF + H_STAGES * SCALES * 4;
    static constexpr uint32_t BYTES = BAR_OFF + 2 * H_STAGES * 8;
    static_assert(TILE_BYTES % 1024 == 0 && STAGE_BYTES % 1024 == 0, "swizzled tiles stay 1024-byte aligned");
    static_assert(BYTES <= 227 * 1024, "over the 227 KiB of shared memory a CTA can have on sm_90");
};

#if QADAPT_SM90A

/* What differs between the two products; the pipeline below is shared. */
struct NF4W {
    const uint8_t* absmax_codes;
    const float* absmax;
    const float* nested;
    const float* map;
    float offset;
    uint32_t bs_shift;
    __device__ __forceinline__ float scale(uint64_t element) const {
        return qadapt::nf4_block_scale(absmax, absmax_codes, nested, map, offset, element >> bs_shift);
    }
};

template <typename Args>
__device__ __forceinline__ NF4W nf4_w(const Args& a) {
    return NF4W{reinterpret_cast<const uint8_t*>(a.absmax_codes), reinterpret_cast<const float*>(a.absmax),
                reinterpret_cast<const float*>(a.nested_absmax), reinterpret_cast<const float*>(a.dynamic_map),
                a.offset, (uint32_t)(31 - __clz((int)a.blocksize))};
}

/* The forward y^T = [W | Bcat] [x | u]^T. */
struct Fwd {
    const QadaptLoraFwdArgs& a;
    const QadaptLoraSm90Args& maps;
    __device__ __forceinline__ uint32_t features() const { return a.n; }
    __device__ __forceinline__ uint32_t reduction() const { return a.k; }
    __device__ __forceinline__ const QadaptTensorMap* act_map() const { return &maps.x_map; }
    __device__ __forceinline__ const QadaptTensorMap* lora_map() const { return &maps.u_map; }
    __device__ __forceinline__ const QadaptTensorMap* codes_map() const { return &maps.codes_map; }
    /* The codes box of W step `step` for features f0..: columns step*64 .. +63 (bytes /2), rows f0. */
    __device__ __forceinline__ int2 codes_at(uint32_t f0, uint32_t step) const {
        return make_int2((int)(step * H_BK / 2), (int)f0);
    }
    /* Scale j of the step's table: W row f0 + j at columns step*64.. (one block). */
    __device__ __forceinline__ float table_scale(const NF4W& w, uint32_t f0, uint32_t step, uint32_t j) const {
        const uint32_t row = f0 + j;
        if (row >= a.n) return 0.0f;
        return w.scale((uint64_t)row * a.k + (uint64_t)step * H_BK);
    }
    /* A fragments of W^... (here W itself: rows = features r_lo, r_lo + 8, columns = k). */
    __device__ __forceinline__ void decode(uint32_t (&frag)[4][4], const uint8_t* codes, const float* scales,
                                           const float* lv, uint32_t r_lo, uint32_t t, uint32_t /*g*/,
                                           uint32_t /*c*/) const {
        const float sc_lo = scales[r_lo], sc_hi = scales[r_lo + 8];
        const uint4* row_lo = reinterpret_cast<const uint4*>(codes + r_lo * 32);
        const uint4* row_hi = reinterpret_cast<const uint4*>(codes + (r_lo + 8) * 32);
        const uint4 lo0 = row_lo[0], lo1 = row_lo[1], hi0 = row_hi[0], hi1 = row_hi[1];
        const uint32_t wl[8] = {lo0.x, lo0.y, lo0.z, lo0.w, lo1.x, lo1.y, lo1.z, lo1.w};
        const uint32_t wh[8] = {hi0.x, hi0.y, hi0.z, hi0.w, hi1.x, hi1.y, hi1.z, hi1.w};
        const uint32_t sh = 8 * t;
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            frag[q][0] = pair(lv, (wl[2 * q] >> sh) & 0xffu, sc_lo);
            frag[q][1] = pair(lv, (wh[2 * q] >> sh) & 0xffu, sc_hi);
            frag[q][2] = pair(lv, (wl[2 * q + 1] >> sh) & 0xffu, sc_lo);
            frag[q][3] = pair(lv, (wh[2 * q + 1] >> sh) & 0xffu, sc_hi);
        }
    }
    /* Two codes of one byte (the even element in the high nibble, as bitsandbytes packs them) as
     * one A register, the lower column in the low half. */
    static __device__ __forceinline__ uint32_t pair(const float* lv, uint32_t byte, float scale) {
        const __nv_bfloat162 p =
            __floats2bfloat162_rn(__fmul_rn(lv[byte >> 4], scale), __fmul_rn(lv[byte & 15u], scale));
        return *reinterpret_cast<const uint32_t*>(&p);
    }
    /* Bcat[f][e], Bcat[f][e + 1] (0 outside): e even and rank % 8 == 0, so one adapter's row,
     * 4-byte aligned. */
    __device__ __forceinline__ uint32_t lora_pair(uint32_t f, uint32_t e) const {
        if (f >= a.n || e >= a.rank * a.n_adapters) return 0u;
        const bf16* B = reinterpret_cast<const bf16*>(a.lora_b);
        return __ldg(reinterpret_cast<const uint32_t*>(B + ((uint64_t)(e / a.rank) * a.n + f) * a.rank + e % a.rank));
    }
    __device__ __forceinline__ bf16* out() const { return reinterpret_cast<bf16*>(a.y); }
    __device__ __forceinline__ const bf16* bias() const { return reinterpret_cast<const bf16*>(a.bias); }
};

/* The dx product dx^T = [W^T | Acat^T] [dy | g]^T. */
struct Dx {
    const QadaptLoraBwdArgs& a;
    const QadaptLoraBwdSm90Args& maps;
    __device__ __forceinline__ uint32_t features() const { return a.k; }
    __device__ __forceinline__ uint32_t reduction() const { return a.n; }
    __device__ __forceinline__ const QadaptTensorMap* act_map() const { return &maps.dy_map; }
    __device__ __forceinline__ const QadaptTensorMap* lora_map() const { return &maps.g_map; }
    __device__ __forceinline__ const QadaptTensorMap* codes_map() const { return &maps.codes_map; }
    /* W rows step*64 .. +63, feature columns f0 .. f0 + 127 (bytes f0/2 ..). */
    __device__ __forceinline__ int2 codes_at(uint32_t f0, uint32_t step) const {
        return make_int2((int)(f0 / 2), (int)(step * H_BK));
    }
    /* Scale j = 2 nn + c: W row step*64 + nn over features f0 + 64c .. +63 (one block; 0 past k). */
    __device__ __forceinline__ float table_scale(const NF4W& w, uint32_t f0, uint32_t step, uint32_t j) const {
        const uint32_t nn = step * H_BK + j / 2, f = f0 + 64 * (j % 2);
        if (f >= a.k) return 0.0f;
        return w.scale((uint64_t)nn * a.k + f);
    }
    /* A = W^T: rows = features r_lo, r_lo + 8 (one byte column, r_lo's parity picks the nibble),
     * columns = W rows 16q + 2t, +1, +8, +9 of the step. An 8-byte load of W row nn at byte
     * 32c + 8w holds the codes of features r_lo (byte g/2) and r_lo + 8 (byte g/2 + 4). The box
     * lands with the 64-byte swizzle (16-byte chunk j of row nn at j ^ ((nn / 2) % 4)): the four
     * rows 2t + .. that a warp's lanes read at once fall in four different chunks, not one bank. */
    __device__ __forceinline__ void decode(uint32_t (&frag)[4][4], const uint8_t* codes, const float* scales,
                                           const float* lv, uint32_t r_lo, uint32_t t, uint32_t g,
                                           uint32_t c) const {
        const uint32_t col = r_lo / 2 - g / 2; /* 32c + 8w: 8-byte aligned */
        const uint32_t chunk = col / 16, half = col % 16;
        const uint32_t sh = 8 * (g / 2) + ((g & 1u) ? 0u : 4u);
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            float lo[4], hi[4];
#pragma unroll
            for (uint32_t j = 0; j < 4; ++j) {
                const uint32_t nn = 16 * q + 2 * t + (j & 1u) + 8 * (j >> 1);
                const uint32_t at = nn * 64 + 16 * (chunk ^ ((nn / 2) % 4)) + half;
                const uint2 v = *reinterpret_cast<const uint2*>(codes + at);
                const float sc = scales[2 * nn + c];
                lo[j] = __fmul_rn(lv[(v.x >> sh) & 15u], sc);
                hi[j] = __fmul_rn(lv[(v.y >> sh) & 15u], sc);
            }
            frag[q][0] = pack(lo[0], lo[1]);
            frag[q][1] = pack(hi[0], hi[1]);
            frag[q][2] = pack(lo[2], lo[3]);
            frag[q][3] = pack(hi[2], hi[3]);
        }
    }
    static __device__ __forceinline__ uint32_t pack(float x, float y) {
        const __nv_bfloat162 p = __floats2bfloat162_rn(x, y);
        return *reinterpret_cast<const uint32_t*>(&p);
    }
    /* Acat^T[f][e], [f][e + 1] = A stack[e][f], [e + 1][f] (0 outside). */
    __device__ __forceinline__ uint32_t lora_pair(uint32_t f, uint32_t e) const {
        const uint32_t R = a.rank * a.n_adapters;
        if (f >= a.k || e >= R) return 0u;
        const bf16* A = reinterpret_cast<const bf16*>(a.lora_a);
        const bf16 v0 = A[(uint64_t)e * a.k + f];
        const bf16 v1 = e + 1 < R ? A[(uint64_t)(e + 1) * a.k + f] : __float2bfloat16_rn(0.0f);
        return pack(__bfloat162float(v0), __bfloat162float(v1));
    }
    __device__ __forceinline__ bf16* out() const { return reinterpret_cast<bf16*>(a.dx); }
    __device__ __forceinline__ const bf16* bias() const { return nullptr; }
};

/* One step of a consumer warpgroup, its stage full: acc += frag (the 64 x 64 A slab, four 16-wide
 * slices) times the stage's B tile (BN rows of 64, 128-byte swizzled; slice q starts 32 q bytes
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

template <uint32_t BN, typename P>
__device__ __forceinline__ void gemm_sm90(const P& p, uint32_t m, uint32_t rank_cols, uint32_t flags) {
    using L = Sm90Layout<BN>;
    if (qadapt::dynamic_smem_size() < L::BYTES) __trap();
    uint8_t* smem = qadapt::dynamic_smem<uint8_t>();
    float* tables = reinterpret_cast<float*>(smem + L::SCALES_OFF);
    uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::BAR_OFF);
    uint64_t* empty = full + H_STAGES;
    __shared__ float lv[16];

    const uint32_t F = p.features();
    const uint32_t tiles_m = (m + BN - 1) / BN, tiles_f = (F + H_BM - 1) / H_BM;
    const uint2 tile = grouped_tile(tiles_m, tiles_f);
    const uint32_t m0 = tile.x * BN, f0 = tile.y * H_BM;
    const uint32_t w_steps = p.reduction() / H_BK;
    const uint32_t steps = w_steps + (rank_cols + H_BK - 1) / H_BK;

    if (threadIdx.x == 0) {
        for (uint32_t s = 0; s < H_STAGES; ++s) {
            qadapt::sm90::mbar_init(&full[s], 32);
            qadapt::sm90::mbar_init(&empty[s], 8);
        }
        qadapt::sm90::fence_mbar_init();
    }
    if (threadIdx.x < 16) lv[threadIdx.x] = qadapt::nf4_level((int)threadIdx.x);
    __syncthreads();

    const uint32_t wg = threadIdx.x / 128, lane = threadIdx.x % 32;
    if (wg == 0) {
        qadapt::sm90::reg_dealloc<40>();
        if (threadIdx.x >= 32) return;
        /* The producer warp. */
        const NF4W w = nf4_w(p.a);
        for (uint32_t i = 0; i < steps; ++i) {
            const uint32_t s = i % H_STAGES;
            if (i >= H_STAGES) qadapt::sm90::mbar_wait(&empty[s], ((i / H_STAGES) - 1) & 1u);
            uint8_t* stage = smem + s * L::STAGE_BYTES;
            if (i < w_steps) {
#pragma unroll
                for (uint32_t j = 0; j < SCALES / 32; ++j)
                    tables[s * SCALES + lane * (SCALES / 32) + j] = p.table_scale(w, f0, i, lane * (SCALES / 32) + j);
            }
            if (lane != 0) {
                qadapt::sm90::mbar_arrive(&full[s]);
                continue;
            }
            if (i < w_steps) {
                qadapt::sm90::mbar_arrive_expect_tx(&full[s], L::TILE_BYTES + CODES_BYTES);
                qadapt::sm90::tma_load_2d(stage, p.act_map(), &full[s], (int32_t)(i * H_BK), (int32_t)m0);
                const int2 at = p.codes_at(f0, i);
                qadapt::sm90::tma_load_2d(stage + L::TILE_BYTES, p.codes_map(), &full[s], at.x, at.y);
            } else {
                qadapt::sm90::mbar_arrive_expect_tx(&full[s], L::TILE_BYTES);
                qadapt::sm90::tma_load_2d(stage, p.lora_map(), &full[s], (int32_t)((i - w_steps) * H_BK), (int32_t)m0);
            }
        }
        return;
    }

    /* Consumers. */
    qadapt::sm90::reg_alloc<232>();
    const uint32_t c = wg - 1, warp = (threadIdx.x / 32) % 4;
    const uint32_t g = lane / 4, t = lane % 4;
    const uint32_t r_lo = c * 64 + warp * 16 + g; /* tile-local features r_lo, r_lo + 8 */

    float acc[BN / 2];
#pragma unroll
    for (uint32_t j = 0; j < BN / 2; ++j) acc[j] = 0.0f;

    for (uint32_t i = 0; i < w_steps; ++i) {
        const uint32_t s = i % H_STAGES;
        const uint8_t* stage = smem + s * L::STAGE_BYTES;
        qadapt::sm90::mbar_wait(&full[s], (i / H_STAGES) & 1u);
        uint32_t frag[4][4];
        p.decode(frag, stage + L::TILE_BYTES, tables + s * SCALES, lv, r_lo, t, g, c);
        mma_stage<BN>(acc, frag, stage, &empty[s], lane);
    }
    /* The LoRA steps: A from global memory (loaded before the wait), u or g from the stage. */
    for (uint32_t i = w_steps; i < steps; ++i) {
        const uint32_t s = i % H_STAGES;
        const uint32_t e0 = (i - w_steps) * H_BK;
        uint32_t frag[4][4];
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) {
            const uint32_t e = e0 + 16 * q + 2 * t;
            frag[q][0] = p.lora_pair(f0 + r_lo, e);
            frag[q][1] = p.lora_pair(f0 + r_lo + 8, e);
            frag[q][2] = p.lora_pair(f0 + r_lo, e + 8);
            frag[q][3] = p.lora_pair(f0 + r_lo + 8, e + 8);
        }
        qadapt::sm90::mbar_wait(&full[s], (i / H_STAGES) & 1u);
        mma_stage<BN>(acc, frag, smem + s * L::STAGE_BYTES, &empty[s], lane);
    }

    /* Epilogue. acc[4j + 0, 1] = out^T[r_lo][8j + 2t, +1], acc[4j + 2, 3] = out^T[r_lo + 8][..]. */
    const bf16* __restrict__ bias = p.bias();
    bf16* __restrict__ out = p.out();
    const bool add = (flags & QADAPT_LORA_ACCUMULATE) != 0;
    const uint32_t f_lo = f0 + r_lo, f_hi = f_lo + 8;
    const float b_lo = (bias && f_lo < F) ? bf_at(bias, f_lo) : 0.0f;
    const float b_hi = (bias && f_hi < F) ? bf_at(bias, f_hi) : 0.0f;
    bf16* staging = reinterpret_cast<bf16*>(smem + L::STAGING_OFF + (c * 4 + warp) * L::STAGING_BYTES);
#pragma unroll
    for (uint32_t j = 0; j < BN / 8; ++j) {
#pragma unroll
        for (uint32_t h = 0; h < 2; ++h) {
            const uint32_t tok = 8 * j + 2 * t + h, row = m0 + tok;
            float lo = acc[4 * j + h] + b_lo, hi = acc[4 * j + 2 + h] + b_hi;
            if (add && row < m) {
                if (f_lo < F) lo += bf_at(out, (uint64_t)row * F + f_lo);
                if (f_hi < F) hi += bf_at(out, (uint64_t)row * F + f_hi);
            }
            staging[tok * 16 + g] = __float2bfloat16_rn(lo);
            staging[tok * 16 + g + 8] = __float2bfloat16_rn(hi);
        }
    }
    __syncwarp();
    /* Lane pairs store one token's 16 features (32 bytes) as two 16-byte chunks. */
    const uint32_t fs = f0 + c * 64 + warp * 16 + 8 * (lane & 1u);
    for (uint32_t tok = lane / 2; tok < BN; tok += 16) {
        const uint32_t row = m0 + tok;
        if (row >= m || fs >= F) continue;
        *reinterpret_cast<uint4*>(out + (uint64_t)row * F + fs) =
            *reinterpret_cast<const uint4*>(staging + tok * 16 + 8 * (lane & 1u));
    }
}

template <uint32_t BN>
__device__ __forceinline__ void fwd_sm90(const QadaptLoraSm90Args& args) {
    const Fwd p{args.fwd, args};
    gemm_sm90<BN>(p, args.fwd.m, args.fwd.rank * args.fwd.n_adapters, args.fwd.flags);
}

template <uint32_t BN>
__device__ __forceinline__ void dx_sm90(const QadaptLoraBwdSm90Args& args) {
    const Dx p{args.bwd, args};
    gemm_sm90<BN>(p, args.bwd.m, args.bwd.rank * args.bwd.n_adapters, args.bwd.flags);
}

#endif  // QADAPT_SM90A

}  // namespace

/* Compiled for sm_90a only (build.rs); QADAPT_SM90A is 0 only in nvcc's host pass, which never
 * runs kernel bodies. */
#if QADAPT_SM90A
#define QADAPT_SM90_BODY(call) call
#else
#define QADAPT_SM90_BODY(call) __trap()
#endif

QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn128_bf16, QadaptLoraSm90Args) { QADAPT_SM90_BODY(fwd_sm90<128>(args)); }
QADAPT_KERNEL_SM90A(lora_gemm_nf4_sm90_bn256_bf16, QadaptLoraSm90Args) { QADAPT_SM90_BODY(fwd_sm90<256>(args)); }
QADAPT_KERNEL_SM90A(lora_gemm_bwd_dx_nf4_sm90_bn128_bf16, QadaptLoraBwdSm90Args) {
    QADAPT_SM90_BODY(dx_sm90<128>(args));
}
QADAPT_KERNEL_SM90A(lora_gemm_bwd_dx_nf4_sm90_bn256_bf16, QadaptLoraBwdSm90Args) {
    QADAPT_SM90_BODY(dx_sm90<256>(args));
}
