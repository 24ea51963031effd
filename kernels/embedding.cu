/*
 * embedding.cu — token embedding, forward (a row copy) and backward (a scatter-add).
 * CPU reference: crates/qadapt/src/ops/embedding.rs; the conventions of every model-op kernel:
 * include/model_common.cuh.
 *
 *   embedding_fwd_bf16                      one warp per token: a row copy, 16 bytes a lane.
 *   embedding_bwd_bf16                      one warp per distinct id; lanes own columns.
 */
#include "model_common.cuh"

QADAPT_KERNEL(embedding_fwd_bf16, QadaptEmbeddingArgs) {
    const uint32_t* __restrict__ ids = reinterpret_cast<const uint32_t*>(args.ids);
    const bf16* __restrict__ table = reinterpret_cast<const bf16*>(args.table);
    bf16* __restrict__ out = reinterpret_cast<bf16*>(args.out);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    const bool vec = (args.flags & QADAPT_MODEL_VEC) != 0;
    for (uint64_t n = global_warp(); n < args.tokens; n += warp_count()) {
        const uint32_t id = ids[n];
        if (id >= args.vocab) continue; /* the host refuses such ids; never read outside */
        const bf16* src = table + (uint64_t)id * d;
        bf16* dst = out + n * d;
        if (vec) {
            for (uint32_t c = lane * 8; c < d; c += 256) store8(dst + c, load8(src + c));
        } else {
            for (uint32_t c = lane; c < d; c += 32) dst[c] = src[c];
        }
    }
}

QADAPT_KERNEL(embedding_bwd_bf16, QadaptEmbeddingArgs) {
    const bf16* __restrict__ dout = reinterpret_cast<const bf16*>(args.dout);
    float* __restrict__ dtable = reinterpret_cast<float*>(args.dtable);
    const uint32_t* __restrict__ uniq = reinterpret_cast<const uint32_t*>(args.uniq);
    const uint32_t* __restrict__ offsets = reinterpret_cast<const uint32_t*>(args.offsets);
    const uint32_t* __restrict__ order = reinterpret_cast<const uint32_t*>(args.order);
    const uint32_t d = args.dim;
    const unsigned lane = threadIdx.x & 31u;
    for (uint64_t u = global_warp(); u < args.n_uniq; u += warp_count()) {
        const uint32_t id = uniq[u];
        if (id >= args.vocab) continue; /* the host builds uniq from checked ids */
        const uint32_t begin = offsets[u];
        const uint32_t end = offsets[u + 1];
        float* dst = dtable + (uint64_t)id * d;
        for (uint32_t c = lane; c < d; c += 32) {
            float acc = dst[c];
            for (uint32_t k = begin; k < end; ++k) {
                acc = __fadd_rn(acc, to_f(dout[(uint64_t)order[k] * d + c]));
            }
            dst[c] = acc;
        }
    }
}
