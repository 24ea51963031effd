/*
 * model_emu.cpp — runs every model-op kernel (kernels/rmsnorm.cu, swiglu.cu, dropout.cu, rope.cu,
 * embedding.cu, cross_entropy.cu, attention.cu; forward and backward) on the CPU through
 * cuda_emu.h and compares it with a float64 reference written here, at the tolerances of a bf16 output
 * (atol + 2^-6 |ref| unless stated). Grids are small (2-3 CTAs) so every grid-stride loop runs
 * more than once. Exit status 0 when every element matches; crates/qadapt/tests/ops/kernel_emu.rs
 * builds and runs it. Build by hand:
 *   F="$(sed -n 's/^common: //p' kernels/emu/emu.flags) -Ikernels/emu -Ikernels/include"
 *   c++ $F -DQV_NO_KERNEL_ANCHORS -c kernels/emu/vgpu_runtime.cpp -o rt.o
 *   c++ $F $(sed -n 's/^memcheck: //p' kernels/emu/emu.flags) -c kernels/emu/model_emu.cpp -o model_emu.o
 *   c++ -pthread model_emu.o rt.o -o model_emu && ./model_emu
 */
#include <cstdio>
#include <random>

#include "cuda_emu_runtime.h"
#include "../attention.cu"
#include "../cross_entropy.cu"
#include "../dropout.cu"
#include "../embedding.cu"
#include "../rmsnorm.cu"
#include "../rope.cu"
#include "../swiglu.cu"

template <class A>
void run_(void (*k)(const A), const A& a, unsigned grid) {
    emu::launch(k, a, grid, 256);
}
typedef __nv_bfloat16 B;
static std::mt19937 rng(1);
std::vector<B> rnd(size_t n, float s) { std::uniform_real_distribution<float> d(-s, s); std::vector<B> v(n); for (auto& x : v) x = __float2bfloat16_rn(d(rng)); return v; }
float F(B b) { return __bfloat162float(b); }
uint64_t P(const void* p) { return (uint64_t)p; }
int fails = 0;
void check(const char* what, double got, double want, double atol, double rtol, size_t i) {
    if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) { if (fails++ < 10) printf("FAIL %s[%zu]: got %g want %g\n", what, i, got, want); }
}
void test_rmsnorm(size_t rows, uint32_t d, bool vec, bool add, uint32_t chunk_rows) {
    auto x = rnd(rows * d, 2), w = rnd(d, 1.5), dy = rnd(rows * d, 1), dx = rnd(rows * d, 0.5);
    auto dx0 = dx; std::vector<B> y(rows * d); std::vector<float> rstd(rows), dw(d, 0.25f);
    QadaptRmsNormArgs a{}; a.x = P(x.data()); a.w = P(w.data()); a.rstd = P(rstd.data()); a.y = P(y.data());
    a.dy = P(dy.data()); a.dx = P(dx.data()); a.dw = P(dw.data()); a.rows = rows; a.dim = d; a.eps = 1e-5f;
    a.accumulate = add; a.flags = vec ? QADAPT_MODEL_VEC : 0;
    a.chunk_rows = chunk_rows; a.chunks = (rows + chunk_rows - 1) / chunk_rows; std::vector<float> part(a.chunks * d, 12345.f); a.partial = P(part.data());
    run_(rmsnorm_fwd_bf16, a, 2); run_(rmsnorm_bwd_dx_bf16, a, 2); run_(rmsnorm_bwd_dw_bf16, a, 3); run_(rmsnorm_bwd_dw_reduce, a, 2);
    std::vector<double> dwr(d, 0.25);
    for (size_t n = 0; n < rows; ++n) {
        double ss = 0; for (uint32_t c = 0; c < d; ++c) ss += (double)F(x[n*d+c]) * F(x[n*d+c]);
        double r = 1 / std::sqrt(ss / d + 1e-5); check("rstd", rstd[n], r, 0, 1e-5, n);
        double dot = 0; for (uint32_t c = 0; c < d; ++c) dot += F(dy[n*d+c]) * F(w[c]) * F(x[n*d+c]) * r;
        for (uint32_t c = 0; c < d; ++c) {
            size_t i = n*d+c; check("y", F(y[i]), F(w[c]) * F(x[i]) * r, 1e-6, 1.0/64, i);
            double v = r * (F(dy[i]) * F(w[c]) - F(x[i]) * r * dot / d) + (add ? F(dx0[i]) : 0);
            check("dx", F(dx[i]), v, 1e-4 * r, 1.0/64, i);
            dwr[c] += F(dy[i]) * F(x[i]) * r;
        }
    }
    for (uint32_t c = 0; c < d; ++c) check("dw", dw[c], dwr[c], 1e-4, 1e-5, c);
}
double sig(double g) { return 1 / (1 + std::exp(-g)); }
void test_swiglu(size_t n, bool vec) {
    auto g = rnd(n, 6), u = rnd(n, 2), dh = rnd(n, 1); std::vector<B> h(n), dg(n), du(n);
    QadaptSwigluArgs a{}; a.gate = P(g.data()); a.up = P(u.data()); a.h = P(h.data()); a.dh = P(dh.data());
    a.dgate = P(dg.data()); a.dup = P(du.data()); a.n = n; a.flags = vec ? QADAPT_MODEL_VEC : 0;
    run_(swiglu_fwd_bf16, a, 2); run_(swiglu_bwd_bf16, a, 2);
    for (size_t i = 0; i < n; ++i) {
        double G = F(g[i]), U = F(u[i]), D = F(dh[i]), s = sig(G);
        check("h", F(h[i]), G * s * U, 1e-6, 1.0/64, i);
        check("du", F(du[i]), D * G * s, 1e-6, 1.0/64, i);
        check("dg", F(dg[i]), D * U * s * (1 + G * (1 - s)), 1e-6, 1.0/64, i);
    }
}
/* The dropout mask, written out again for the reference: splitmix64's output function of
 * base + j * golden, kept iff its top 53 bits are >= threshold = ceil(prob * 2^53). */
uint64_t ref_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
bool ref_kept(uint64_t base, uint64_t threshold, uint64_t j) { return (ref_mix(base + j * 0x9E3779B97F4A7C15ull) >> 11) >= threshold; }
/* With k = 1 / (1 - prob): without b, dropout (a = (k, 0)); with b, d0 + m (d1 - d0)
 * (a = (1 - k, 1), b = (k, 0)). Checked per element: the float64 value at bf16 tolerance, bit
 * equality with the f32 reference (two products and a sum, each rounded) rounded to bf16, and the
 * exact mask: a dropped element is exactly 0 (dropout) or exactly a (the blend). */
void test_mask_mix(size_t n, bool vec, bool with_b, double prob, uint64_t base) {
    auto x = rnd(n, 2), y = rnd(n, 2); std::vector<B> out(n, __float2bfloat16_rn(9.f));
    const uint64_t thr = (uint64_t)std::ceil(prob * 9007199254740992.0);
    const float k = (float)(1 / (1 - prob));
    const float ak = with_b ? 1 - k : k, ad = with_b ? 1.f : 0.f, bk = k, bd = 0.f;
    QadaptMaskMixArgs a{}; a.a = P(x.data()); a.b = with_b ? P(y.data()) : 0; a.out = P(out.data()); a.n = n;
    a.base = base; a.threshold = thr; a.a_keep = ak; a.a_drop = ad; a.b_keep = with_b ? bk : 77.f; a.b_drop = with_b ? bd : 77.f; a.flags = vec ? QADAPT_MODEL_VEC : 0;
    run_(mask_mix_bf16, a, 2);
    size_t dropped = 0;
    for (size_t i = 0; i < n; ++i) {
        const bool kept = ref_kept(base, thr, i); dropped += !kept;
        const float ca = kept ? ak : ad, cb = kept ? bk : bd;
        double want = (double)ca * F(x[i]) + (with_b ? (double)cb * F(y[i]) : 0);
        check("mask_mix", F(out[i]), want, 1e-6, 1.0/256, i);
        float f = ca * F(x[i]); if (with_b) f = f + cb * F(y[i]);
        if (__float2bfloat16_rn(f).bits != out[i].bits) { if (fails++ < 10) printf("FAIL mask_mix bits[%zu]: %04x vs f32 reference %04x\n", i, out[i].bits, __float2bfloat16_rn(f).bits); }
        if (!kept && F(out[i]) != (with_b ? F(x[i]) : 0.f)) { if (fails++ < 10) printf("FAIL mask_mix dropped[%zu]: %g\n", i, F(out[i])); }
    }
    // Binomial(n, prob): 5 sd, and none at all for prob 0.
    const double frac = (double)dropped / n;
    if (std::fabs(frac - prob) > 5 * std::sqrt(prob * (1 - prob) / n) + (prob > 0 ? 1.0 / n : 0)) { if (fails++ < 10) printf("FAIL mask_mix: dropped %g, prob %g\n", frac, prob); }
}
void test_rope(size_t batch, uint32_t seq, uint32_t heads, uint32_t D, bool back) {
    size_t rows = batch * seq; auto x = rnd(rows * heads * D, 1); auto x0 = x;
    std::vector<float> cs(seq * D / 2), sn(seq * D / 2);
    for (uint32_t p = 0; p < seq; ++p) for (uint32_t i = 0; i < D / 2; ++i) { float f = std::pow(10000.f, -(2.f*i)/D); cs[p*D/2+i] = std::cos(p*f); sn[p*D/2+i] = std::sin(p*f); }
    QadaptRopeArgs a{}; a.x = P(x.data()); a.cos = P(cs.data()); a.sin = P(sn.data()); a.rows = rows; a.seq = seq; a.heads = heads; a.head_dim = D; a.direction = back;
    run_(rope_bf16, a, 2);
    for (size_t n = 0; n < rows; ++n) for (uint32_t h = 0; h < heads; ++h) for (uint32_t i = 0; i < D/2; ++i) {
        size_t at = (n * heads + h) * D; uint32_t p = n % seq; double c = cs[p*D/2+i], s = (back ? -1 : 1) * sn[p*D/2+i];
        double x1 = F(x0[at+i]), x2 = F(x0[at+i+D/2]);
        check("rope lo", F(x[at+i]), x1*c - x2*s, 1e-6, 1.0/64, at+i); check("rope hi", F(x[at+i+D/2]), x2*c + x1*s, 1e-6, 1.0/64, at+i);
    }
}
void test_embedding(uint32_t vocab, uint32_t d, size_t tokens, bool vec) {
    auto t = rnd(vocab * d, 1), dout = rnd(tokens * d, 1); std::vector<uint32_t> ids(tokens);
    for (size_t i = 0; i < tokens; ++i) ids[i] = i % 3 == 0 ? std::min(2u, vocab - 1) : rng() % vocab;
    std::vector<B> out(tokens * d); std::vector<float> dt(vocab * d); for (size_t i = 0; i < dt.size(); ++i) dt[i] = std::cos(i * 0.37f);
    auto want = dt;
    for (size_t n = 0; n < tokens; ++n) for (uint32_t c = 0; c < d; ++c) want[ids[n]*d+c] += F(dout[n*d+c]);
    // group by id (as launch/model.rs group_by_id)
    std::vector<uint32_t> uniq, off{0}, order;
    for (uint32_t v = 0; v < vocab; ++v) { size_t c0 = order.size(); for (size_t n = 0; n < tokens; ++n) if (ids[n] == v) order.push_back(n); if (order.size() > c0) { uniq.push_back(v); off.push_back(order.size()); } }
    QadaptEmbeddingArgs a{}; a.ids = P(ids.data()); a.table = P(t.data()); a.out = P(out.data()); a.dout = P(dout.data()); a.dtable = P(dt.data());
    a.uniq = P(uniq.data()); a.offsets = P(off.data()); a.order = P(order.data()); a.tokens = tokens; a.vocab = vocab; a.dim = d; a.n_uniq = uniq.size(); a.flags = vec ? QADAPT_MODEL_VEC : 0;
    run_(embedding_fwd_bf16, a, 2); run_(embedding_bwd_bf16, a, 2);
    for (size_t n = 0; n < tokens; ++n) for (uint32_t c = 0; c < d; ++c) check("emb out", F(out[n*d+c]), F(t[ids[n]*d+c]), 0, 0, n*d+c);
    for (size_t i = 0; i < dt.size(); ++i) if (std::memcmp(&dt[i], &want[i], 4)) { if (fails++ < 10) printf("FAIL dtable[%zu] %g vs %g\n", i, dt[i], want[i]); }
}
void test_ce(size_t rows, uint32_t V, bool vec) {
    auto z = rnd(rows * V, 8); std::vector<int32_t> t(rows); for (size_t r = 0; r < rows; ++r) t[r] = r % 4 == 1 ? -1 : (int)(rng() % V);
    std::vector<float> loss(rows); std::vector<B> dz(rows * V, __float2bfloat16_rn(9.f)); float g = 0.3f;
    QadaptCrossEntropyArgs a{}; a.logits = P(z.data()); a.targets = P(t.data()); a.loss = P(loss.data()); a.dlogits = P(dz.data()); a.rows = rows; a.vocab = V; a.grad_scale = g; a.flags = vec ? QADAPT_MODEL_VEC : 0;
    run_(cross_entropy_bf16, a, 2);
    for (size_t r = 0; r < rows; ++r) {
        double m = -1e30; for (uint32_t c = 0; c < V; ++c) m = std::max(m, (double)F(z[r*V+c]));
        double s = 0; for (uint32_t c = 0; c < V; ++c) s += std::exp(F(z[r*V+c]) - m); double lse = m + std::log(s);
        check("loss", loss[r], t[r] >= 0 ? lse - F(z[r*V+t[r]]) : 0, 1e-5, 1e-5, r);
        for (uint32_t c = 0; c < V; ++c) { double want = t[r] < 0 ? 0 : std::exp(F(z[r*V+c]) - lse) * g - (c == (uint32_t)t[r] ? g : 0); check("dz", F(dz[r*V+c]), want, 1e-5 * g, 1.0/64, r*V+c); }
    }
}
void test_attention(uint32_t batch, uint32_t T, uint32_t H, uint32_t KV, uint32_t D) {
    size_t n = batch * T; auto q = rnd(n*H*D, 2), k = rnd(n*KV*D, 2), v = rnd(n*KV*D, 1), dout = rnd(n*H*D, 1);
    std::vector<B> out(n*H*D), dq(n*H*D), dk(n*KV*D), dv(n*KV*D); std::vector<float> lse(n*H), delta(n*H);
    QadaptAttentionArgs a{}; a.q = P(q.data()); a.k = P(k.data()); a.v = P(v.data()); a.out = P(out.data()); a.lse = P(lse.data());
    a.dout = P(dout.data()); a.dq = P(dq.data()); a.dk = P(dk.data()); a.dv = P(dv.data()); a.delta = P(delta.data());
    a.batch = batch; a.seq = T; a.heads = H; a.kv_heads = KV; a.head_dim = D; a.scale = 1 / std::sqrt((double)D);
    run_(attention_fwd_bf16, a, 2); run_(attention_bwd_dq_bf16, a, 2); run_(attention_bwd_dkv_bf16, a, 3);
    uint32_t rep = H / KV; double sc = 1 / std::sqrt((double)D);
    std::vector<double> O(n*H*D), DQ(n*H*D), DK(n*KV*D, 0), DV(n*KV*D, 0);
    auto Q = [&](size_t b, size_t i, size_t h, size_t e) { return (double)F(q[((b*T+i)*H+h)*D+e]); };
    auto K = [&](size_t b, size_t j, size_t g, size_t e) { return (double)F(k[((b*T+j)*KV+g)*D+e]); };
    auto Vv = [&](size_t b, size_t j, size_t g, size_t e) { return (double)F(v[((b*T+j)*KV+g)*D+e]); };
    auto DO = [&](size_t b, size_t i, size_t h, size_t e) { return (double)F(dout[((b*T+i)*H+h)*D+e]); };
    for (size_t b = 0; b < batch; ++b) for (size_t h = 0; h < H; ++h) { size_t g = h / rep;
        for (size_t i = 0; i < T; ++i) {
            std::vector<double> s(i+1), p(i+1), dp(i+1); double m = -1e30;
            for (size_t j = 0; j <= i; ++j) { double d = 0; for (size_t e = 0; e < D; ++e) d += Q(b,i,h,e)*K(b,j,g,e); s[j] = d*sc; m = std::max(m, s[j]); }
            double z = 0; for (size_t j = 0; j <= i; ++j) z += std::exp(s[j]-m);
            for (size_t j = 0; j <= i; ++j) p[j] = std::exp(s[j]-m)/z;
            check("lse", lse[(b*H+h)*T+i], m + std::log(z), 1e-5, 1e-5, i);
            double dsum = 0;
            for (size_t j = 0; j <= i; ++j) { double d = 0; for (size_t e = 0; e < D; ++e) d += DO(b,i,h,e)*Vv(b,j,g,e); dp[j] = d; dsum += p[j]*d; }
            for (size_t e = 0; e < D; ++e) { double o = 0, dqv = 0; for (size_t j = 0; j <= i; ++j) { o += p[j]*Vv(b,j,g,e); dqv += p[j]*(dp[j]-dsum)*sc*K(b,j,g,e); } O[((b*T+i)*H+h)*D+e] = o; DQ[((b*T+i)*H+h)*D+e] = dqv; }
            for (size_t j = 0; j <= i; ++j) for (size_t e = 0; e < D; ++e) { DV[((b*T+j)*KV+g)*D+e] += p[j]*DO(b,i,h,e); DK[((b*T+j)*KV+g)*D+e] += p[j]*(dp[j]-dsum)*sc*Q(b,i,h,e); }
        } }
    auto cmp = [&](const char* w, std::vector<B>& got, std::vector<double>& want) { double mx = 0; for (double x : want) mx = std::max(mx, std::fabs(x)); for (size_t i = 0; i < got.size(); ++i) check(w, F(got[i]), want[i], 1e-3*mx, 1.0/64, i); };
    cmp("out", out, O); cmp("dq", dq, DQ); cmp("dk", dk, DK); cmp("dv", dv, DV);
}
int main() {
    test_rmsnorm(19, 1000, true, false, 5); test_rmsnorm(11, 999, false, true, 11); test_rmsnorm(5, 520, true, true, 2); test_rmsnorm(2, 1, false, false, 1); test_rmsnorm(70, 40, true, false, 9); printf("rmsnorm done, fails %d\n", fails);
    test_swiglu(8*300+5, true); test_swiglu(777, false); test_swiglu(7, true); printf("swiglu done, fails %d\n", fails);
    if (ref_mix(0x9E3779B97F4A7C15ull) != 0xE220A8397B1DCDAFull || ref_mix(2 * 0x9E3779B97F4A7C15ull) != 0x6E789E6AA1B965F4ull) { fails++; printf("FAIL the reference mix is not splitmix64 (seed 0 outputs)\n"); }
    for (double prob : {0.0, 0.1, 0.5}) for (bool with_b : {false, true}) {
        test_mask_mix(1001, false, with_b, prob, 0xD1B54A32D192ED03ull); test_mask_mix(8*1100, true, with_b, prob, 17);
        test_mask_mix(8*300+5, true, with_b, prob, ~0ull); test_mask_mix(7, true, with_b, prob, 3);
    }
    printf("mask_mix done, fails %d\n", fails);
    test_rope(2, 17, 3, 6, false); test_rope(1, 9, 2, 130, true); printf("rope done, fails %d\n", fails);
    test_embedding(50, 100, 77, false); test_embedding(40, 64, 101, true); printf("embedding done, fails %d\n", fails);
    test_ce(9, 1000, true); test_ce(6, 2049, false); test_ce(2, 1, false); printf("ce done, fails %d\n", fails);
    test_attention(2, 37, 4, 2, 8); test_attention(1, 70, 3, 1, 6); test_attention(1, 9, 2, 2, 66); test_attention(1, 33, 2, 1, 256); test_attention(1,1,1,1,2);
    printf("attention done, fails %d\n", fails);
    return fails != 0;
}
