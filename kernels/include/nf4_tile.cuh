/*
 * nf4_tile.cuh — an NF4 weight decoded once per CTA into the bf16 tiles of gemm_sm80.cuh, for the
 * NF4 GEMMs of lora_fwd.cu (y = x W^T) and lora_bwd.cu (dx = dy W). Codes and scales are read in
 * the bitsandbytes layout (the flattened row-major [N, K] tensor in blocks of `blocksize`, element
 * 2j in the high nibble of byte j); K % 32 == 0, so a run of 32 codes of one row is 16 aligned
 * bytes inside one NF4 block.
 */
#pragma once

#include "gemm_sm80.cuh"
#include "nf4_codec.cuh"

namespace {

using qadapt::nf4_block_scale;
using qadapt::nf4_level;
using qadapt::round_to;

/* ---- NF4 GEMMs: the weight decoded once per CTA ------------------------------------------------
 *
 * Both NF4 GEMMs (forward y = x W^T, backward dx = dy W) stream W as packed codes and decode each
 * stage ONCE, by all its threads, into a swizzled bf16 tile that the dense ldmatrix paths then
 * read exactly as they read a dense W tile (mma_tile_dense / mma_tile_nt). No warp decodes what
 * another warp of the CTA decodes.
 *
 * A stage of codes is 2 KiB: 128 "code runs" of 32 codes = 16 aligned bytes inside one NF4 block
 * (K % 32 == 0), each with one scale:
 *   forward  run i = row n0 + i of W, columns k0 .. k0+32           -> decoded tile [BN][BK] (swz)
 *   backward run i = row r0 + i/4 of W, columns c0 + 32 (i%4) ..    -> decoded tile [BK][BQ] (swz_t)
 * Thread i (of 128) copies run i with one cp.async and computes its scale. The decode reads the
 * stage as 512 words of 8 codes: thread t takes words t, t + 128, t + 256 and t + 384 (consecutive
 * lanes, consecutive words: one wavefront), the scale of run word/4 (8 addresses a warp: one wavefront), looks up
 * the 16 f32 levels in shared memory (16 words in 16 banks: never a conflict) and stores 8 bf16
 * values as one 16-byte chunk of the swizzled tile (the chunks of a quarter-warp are 128
 * contiguous bytes: conflict-free). Values are bf16(level * scale) with the f32 product rounded
 * once, as the NF4 dequantizer gives them.
 *
 * Pipeline (STAGES = 3 slots for x/dy tiles and for codes, 2 decoded tiles). The codes travel one
 * stage ahead of the x/dy tiles: cp.async group j holds the x/dy tile of step j and the codes of
 * step j + 1 (group 0 also those of step 0). Iteration kt: wait for group kt, one barrier, issue
 * group kt + 2, decode the codes of step kt + 1 into decoded tile (kt + 1) % 2, run the mma of
 * step kt on decoded tile kt % 2. One barrier per step orders all reuse: the slot a new group
 * overwrites and the decoded tile being written were last read in step kt - 1.
 * Scales are prefetched: the loads of the scales of step kt + 3 are issued with its codes and
 * their value is stored to shared memory only after step kt's mma, so their latency (two
 * dependent loads with double quantization) hides behind the tensor-core work. */

/* 8 codes (a little-endian word: element 2j in the high nibble of byte j) as 8 bf16 values. */
__device__ __forceinline__ uint4 nf4_decode8(uint32_t word, float scale, const float* lv) {
    uint32_t v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (word >> (8 * b)) & 0xffu;
        const __nv_bfloat162 p = __floats2bfloat162_rn(__fmul_rn(lv[byte >> 4], scale), __fmul_rn(lv[byte & 15u], scale));
        v[b] = *reinterpret_cast<const uint32_t*>(&p);
    }
    return make_uint4(v[0], v[1], v[2], v[3]);
}

/* The argument fields both directions share (QadaptLoraFwdArgs and QadaptLoraBwdArgs). */
struct Nf4W {
    const uint8_t* codes;
    const float* absmax;
    const uint8_t* absmax_codes;
    const float* nested;
    const float* map;
    float offset;
    uint32_t block_shift; /* log2(blocksize): block sizes are powers of two */
    uint32_t n, k;
    template <typename Args>
    __device__ __forceinline__ explicit Nf4W(const Args& a)
        : codes(reinterpret_cast<const uint8_t*>(a.w)),
          absmax(reinterpret_cast<const float*>(a.absmax)),
          absmax_codes(reinterpret_cast<const uint8_t*>(a.absmax_codes)),
          nested(reinterpret_cast<const float*>(a.nested_absmax)),
          map(reinterpret_cast<const float*>(a.dynamic_map)),
          offset(a.offset),
          block_shift(__ffs((int)a.blocksize) - 1),
          n(a.n),
          k(a.k) {}
};

/* The NF4 GEMMs' tiling: 128 threads = 4 warps as 2 x 2, warp tiles 64 x 64 (MI4 x NI8 mma
 * tiles) over the same 128 x 128 CTA tile. Wider warp tiles take 1 ldmatrix wavefront per mma
 * instead of 1.5, which pays for the decode's lookups and stores (section comment); each thread
 * decodes 4 words a step and copies one code run. */
constexpr int NF4_THREADS = QADAPT_LORA_GEMM_NF4_THREADS;
constexpr int NF4_WM = 64, NF4_WN = 64;
constexpr int MI4 = NF4_WM / 16, NI8 = NF4_WN / 8;
static_assert((BM / NF4_WM) * (BN / NF4_WN) * 32 == NF4_THREADS, "4 warps tile the CTA");
static_assert(NF4_THREADS == 128, "one code run (of 128 a stage) per thread");

/* Thread i's code run, one per step in step order: run i of every stage (forward: row tile0 + i
 * of W at columns step * BK; backward: row step * BK + i / 4 at columns tile0 + 32 (i % 4)),
 * its flat element index e advancing by a fixed stride (BK, or BK * K rows down) instead of being
 * recomputed in 64 bits each step. issue() starts the cp.async of its 16 bytes and returns its
 * scale (0, with the zero code 7 stored, for a run outside W). The returned value is the only use
 * of the scale loads, so a caller that stores it late does not wait for them here. */
template <bool BWD>
struct Nf4Runs {
    uint64_t e, stride;
    uint32_t row;  /* backward: this step's row of W (bound-checked each step) */
    bool fixed_ok; /* forward: the row is in W; backward: the columns are */
    /* The last block's scale and the last nested absmax: the forward walks along a row, so a
     * block of 64 codes serves two steps and a nested absmax (256 blocks) a whole row; each is
     * loaded once instead of once a step. */
    uint64_t last_block, last_group;
    float last_scale, last_nested;
    /* tile0: the first W row (forward) or column (backward) of the tile; red0: the first
     * reduction index, a multiple of BK (the column of k, or the row of n, of step 0). */
    __device__ __forceinline__ Nf4Runs(const Nf4W& w, uint32_t tile0, uint32_t red0)
        : last_block(~0ull), last_group(~0ull), last_scale(0.0f), last_nested(0.0f) {
        const uint32_t i = threadIdx.x;
        row = BWD ? red0 + i / 4 : tile0 + i;
        const uint32_t kc = BWD ? tile0 + (i % 4) * 32 : red0;
        fixed_ok = BWD ? kc < w.k : row < w.n;
        e = (uint64_t)row * w.k + kc;
        stride = BWD ? (uint64_t)BK * w.k : (uint64_t)BK;
    }
    /* nf4_block_scale with the two caches (same values, same two roundings). */
    __device__ __forceinline__ float scale_of(const Nf4W& w, uint64_t b) {
        if (b == last_block) return last_scale;
        last_block = b;
        if (w.absmax_codes == nullptr) {
            last_scale = __ldg(w.absmax + b);
        } else {
            if (b / 256 != last_group) {
                last_group = b / 256;
                last_nested = __ldg(w.nested + last_group);
            }
            last_scale = __fadd_rn(__fmul_rn(__ldg(w.map + __ldg(w.absmax_codes + b)), last_nested), w.offset);
        }
        return last_scale;
    }
    __device__ __forceinline__ float issue(uint8_t* tq, const Nf4W& w) {
        const bool ok = fixed_ok && (!BWD || row < w.n);
        uint8_t* dst = tq + threadIdx.x * 16;
        float scale = 0.0f;
        if (ok) {
            cp_async16(dst, w.codes + e / 2);
            scale = scale_of(w, e >> w.block_shift);
        } else {
            *reinterpret_cast<uint4*>(dst) = make_uint4(0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u);
        }
        e += stride;
        row += BWD ? BK : 0;
        return scale;
    }
};

/* Decodes one stage of codes into the bf16 tile the dense path reads (see the section comment). */
template <bool BWD>
__device__ __forceinline__ void nf4_decode_stage(bf16* tw, const uint8_t* tq, const float* ts, const float* lv) {
#pragma unroll
    for (int h = 0; h < 512 / NF4_THREADS; ++h) {
        const uint32_t j = threadIdx.x + h * NF4_THREADS;
        const uint4 v = nf4_decode8(reinterpret_cast<const uint32_t*>(tq)[j], ts[j / 4], lv);
        *reinterpret_cast<uint4*>(tw + (BWD ? swz_t(j / 16, j % 16) : swz(j / 4, j % 4))) = v;
    }
}

/* The shared memory of an NF4 GEMM: 24 KiB of x/dy tiles, 6 KiB of codes, 1.5 KiB of scales,
 * 16 KiB of decoded W, the levels: 48704 bytes, under the 48 KiB of static shared memory. */
struct Nf4Smem {
    bf16 a[STAGES][BM * BK];
    bf16 w[2][BN * BK];
    uint8_t q[STAGES][2048];
    float s[STAGES][128];
    float lv[16];
};
static_assert(BN * BK == BK * BQ && BN * BK == 4096, "both directions decode 4096 values a stage");
static_assert(sizeof(Nf4Smem) <= 48 * 1024, "static shared memory");

/* The K loop of an NF4 GEMM over KT steps: issue_a(slot, step) copies the A operand tile [BM][BK]
 * of a step (x in the forward, dy in the backward; called in step order), against the decoded W.
 * Forward (BWD = false): W rows tile0.., reduction over k from red0; backward: W columns tile0..,
 * reduction over n from red0. Buffer slots rotate instead of taking step % STAGES. */
template <bool BWD, class IssueA>
__device__ __forceinline__ void mainloop_nf4(float (&acc)[MI4][NI8][4], Nf4Smem& sm, const Nf4W& w, uint32_t KT,
                                             IssueA&& issue_a, uint32_t tile0, uint32_t red0, uint32_t wm0,
                                             uint32_t wn0) {
    if (threadIdx.x < 16) sm.lv[threadIdx.x] = nf4_level((int)threadIdx.x);
    Nf4Runs<BWD> runs(w, tile0, red0);
    /* Prologue: group 0 = {A 0, codes 0, codes 1}, group 1 = {A 1, codes 2}; their scales are
     * stored at once. */
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < KT) issue_a((uint32_t)s, (uint32_t)s);
        for (uint32_t step = s == 0 ? 0u : (uint32_t)s + 1; step <= (uint32_t)s + 1; ++step) {
            if (step < KT) sm.s[step][threadIdx.x] = runs.issue(sm.q[step], w);
        }
        cp_async_commit();
    }
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    nf4_decode_stage<BWD>(sm.w[0], sm.q[0], sm.s[0], sm.lv);
    /* Slots: x/dy of step kt in a[sa], codes of step kt + 1 in q[sq], the A slot and the codes
     * slot to be written this step (steps kt + 2 and kt + 3) in a[sa_w] and q[sa] (the codes of
     * step kt, decoded one step before, freed it). */
    uint32_t sa = 0, sq = 1, sa_w = STAGES - 1;
    for (uint32_t kt = 0; kt < KT; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + STAGES - 1 < KT) issue_a(sa_w, kt + STAGES - 1);
        const bool issued = kt + STAGES < KT;
        float scale = 0.0f;
        if (issued) scale = runs.issue(sm.q[sa], w);
        cp_async_commit();
        if (kt + 1 < KT) nf4_decode_stage<BWD>(sm.w[(kt + 1) & 1], sm.q[sq], sm.s[sq], sm.lv);
        if (BWD) mma_tile_nt(acc, sm.a[sa], sm.w[kt & 1], wm0, wn0);
        else mma_tile_dense(acc, sm.a[sa], sm.w[kt & 1], wm0, wn0);
        if (issued) sm.s[sa][threadIdx.x] = scale;
        sa = sa + 1 == STAGES ? 0 : sa + 1;
        sq = sq + 1 == STAGES ? 0 : sq + 1;
        sa_w = sa_w + 1 == STAGES ? 0 : sa_w + 1;
    }
    cp_async_wait<0>();
}

/* The A operand of an NF4 GEMM, [rows, cols] from `act` at rows m0.., through ColCopy under
 * `vec`, element loads otherwise. */
template <bool BWD>
__device__ __forceinline__ void mainloop_nf4_act(float (&acc)[MI4][NI8][4], Nf4Smem& sm, const Nf4W& w,
                                                 const bf16* __restrict__ act, uint32_t rows, uint32_t cols,
                                                 uint32_t m0, uint32_t tile0, uint32_t wm0, uint32_t wn0, bool vec,
                                                 uint32_t kb, uint32_t ke) {
    const uint32_t KT = (ke - kb + BK - 1) / BK;
    if (vec) {
        ColCopy<BM, NF4_THREADS> ca(act, m0, rows, ke, cols, kb);
        mainloop_nf4<BWD>(acc, sm, w, KT, [&](uint32_t s, uint32_t) { ca.issue(sm.a[s]); }, tile0, kb, wm0, wn0);
    } else {
        mainloop_nf4<BWD>(
            acc, sm, w, KT,
            [&](uint32_t s, uint32_t step) {
                load_tile<BM, NF4_THREADS>(sm.a[s], act, m0, rows, kb + step * BK, ke, cols);
            },
            tile0, kb, wm0, wn0);
    }
}

}  // namespace
