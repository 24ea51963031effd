/*
 * nf4_optim_emu.cpp — runs the kernels of kernels/nf4.cu and kernels/optim.cu on the CPU through
 * cuda_emu.h, for crates/qadapt/tests/ops/kernel_emu.rs, which compares what they write with the Rust
 * CPU reference bit for bit. Build (the test does it):
 *   F="$(sed -n 's/^common: //p' kernels/emu/emu.flags) -Ikernels/emu -Ikernels/include"
 *   c++ $F -DQV_NO_KERNEL_ANCHORS -c kernels/emu/vgpu_runtime.cpp -o rt.o
 *   c++ $F $(sed -n 's/^memcheck: //p' kernels/emu/emu.flags) -c kernels/emu/nf4_optim_emu.cpp -o nf4_optim_emu.o
 *   c++ -pthread nf4_optim_emu.o rt.o -o nf4_optim_emu
 * Protocol: `nf4_optim_emu nf4 IN OUT` or `nf4_optim_emu adamw IN OUT`, little-endian binary files
 * whose layouts are written next to each mode below. Grids are deliberately small (2 or 3 CTAs) so
 * every grid-stride loop runs more than once.
 */
#include <cstdio>
#include <fstream>
#include <string>

#include "cuda_emu_runtime.h"
#include "../nf4.cu"
#include "../optim.cu"

namespace {

std::vector<char> slurp(const char* path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

struct Reader {
    const char* p;
    template <class T> T get() {
        T v;
        memcpy(&v, p, sizeof(T));
        p += sizeof(T);
        return v;
    }
    template <class T> std::vector<T> vec(size_t n) {
        std::vector<T> v(n);
        memcpy(v.data(), p, n * sizeof(T));
        p += n * sizeof(T);
        return v;
    }
};

struct Writer {
    std::ofstream f;
    template <class T> void put(const std::vector<T>& v) { f.write((const char*)v.data(), v.size() * sizeof(T)); }
    template <class T> void one(T v) { f.write((const char*)&v, sizeof(T)); }
};

uint64_t P(const void* p) { return (uint64_t)(uintptr_t)p; }

/* IN:  u32 dtype (0 f32, 1 bf16, 2 f16), u32 blocksize, u32 double_quant, u64 n, n elements,
 *      f32[256] map.
 * OUT: u8 packed[ceil(n/2)], f32 absmax[nb], f32 offset, u8 codes[nb], f32 nested[ceil(nb/256)]
 *      (offset/codes/nested zero-length... always written, zeros without double quant), then the
 *      dequantization to f32[n], bf16[n], f16[n] from the statistics the run produced. */
int run_nf4(Reader r, Writer& w) {
    const uint32_t dtype = r.get<uint32_t>(), bs = r.get<uint32_t>(), dq = r.get<uint32_t>();
    const uint64_t n = r.get<uint64_t>();
    const size_t es = dtype == 0 ? 4 : 2;
    std::vector<char> input = r.vec<char>(n * es);
    std::vector<float> map = r.vec<float>(256);
    const uint64_t nb = (n + bs - 1) / bs, nn = (nb + 255) / 256;
    std::vector<uint8_t> packed((n + 1) / 2 + 16), codes(nb);
    std::vector<float> absmax(nb), nested(nn), offset(1);
    QadaptNf4QuantizeArgs q{P(input.data()), P(packed.data()), P(absmax.data()), n, bs, 0};
    if (dtype == 0) emu::launch(nf4_quantize_f32, q, 3, 256);
    if (dtype == 1) emu::launch(nf4_quantize_bf16, q, 3, 256);
    if (dtype == 2) emu::launch(nf4_quantize_f16, q, 3, 256);
    if (dq) {
        QadaptNf4DoubleQuantArgs d{P(absmax.data()), P(offset.data()), P(map.data()), P(codes.data()), P(nested.data()), nb};
        emu::launch(nf4_dq_offset, d, 1, 32);
        emu::launch(nf4_dq_encode, d, 2, 256);
    }
    packed.resize((n + 1) / 2);
    w.put(packed);
    w.put(absmax);
    w.one(offset[0]);
    w.put(codes);
    w.put(nested);
    std::vector<float> of(n);
    std::vector<__nv_bfloat16> ob(n);
    std::vector<__half> oh(n);
    /* The dequantize kernel reads 16 bytes of codes per 32 elements: pad like a device allocation. */
    packed.resize((n + 1) / 2 + 16);
    QadaptNf4DequantizeArgs a{};
    a.packed = P(packed.data());
    a.absmax = P(absmax.data());
    if (dq) {
        a.absmax_codes = P(codes.data());
        a.nested_absmax = P(nested.data());
        a.dynamic_map = P(map.data());
        a.offset = offset[0];
    }
    a.n = n;
    a.blocksize = bs;
    a.out = P(of.data());
    emu::launch(nf4_dequantize_f32, a, 2, 256);
    a.out = P(ob.data());
    emu::launch(nf4_dequantize_bf16, a, 2, 256);
    a.out = P(oh.data());
    emu::launch(nf4_dequantize_f16, a, 2, 256);
    w.put(of);
    w.put(ob);
    w.put(oh);
    return 0;
}

/* IN:  u64 n, u32 steps, f32 lr, weight_decay, beta1, beta2, eps, then per step f32 step_size,
 *      bc2_sqrt, grad_scale and f32 grad[n]; then f32 param[n].
 * OUT: f32 param[n], m[n], v[n], bf16 param_bf16[n] after the steps, then f32 partial sums of
 *      squares of param (3 CTAs). */
int run_adamw(Reader r, Writer& w) {
    const uint64_t n = r.get<uint64_t>();
    const uint32_t steps = r.get<uint32_t>();
    QadaptAdamwArgs a{};
    a.lr = r.get<float>();
    a.weight_decay = r.get<float>();
    a.beta1 = r.get<float>();
    a.beta2 = r.get<float>();
    a.eps = r.get<float>();
    std::vector<std::vector<float>> grads;
    std::vector<std::array<float, 3>> scalars;
    for (uint32_t s = 0; s < steps; ++s) {
        scalars.push_back({r.get<float>(), r.get<float>(), r.get<float>()});
        grads.push_back(r.vec<float>(n));
    }
    std::vector<float> p = r.vec<float>(n), m(n, 0.0f), v(n, 0.0f);
    std::vector<__nv_bfloat16> p16(n);
    a.param = P(p.data());
    a.param_bf16 = P(p16.data());
    a.m = P(m.data());
    a.v = P(v.data());
    a.n = n;
    for (uint32_t s = 0; s < steps; ++s) {
        a.step_size = scalars[s][0];
        a.bc2_sqrt = scalars[s][1];
        a.grad_scale = scalars[s][2];
        a.grad = P(grads[s].data());
        emu::launch(adamw_f32, a, 2, 256);
    }
    w.put(p);
    w.put(m);
    w.put(v);
    w.put(p16);
    std::vector<float> partial(3);
    QadaptSumSquaresArgs q{P(p.data()), P(partial.data()), n};
    emu::launch(sum_squares_f32, q, 3, 256);
    w.put(partial);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s nf4|adamw IN OUT\n", argv[0]);
        return 2;
    }
    std::vector<char> in = slurp(argv[2]);
    Writer w{std::ofstream(argv[3], std::ios::binary)};
    const std::string mode = argv[1];
    if (mode == "nf4") return run_nf4(Reader{in.data()}, w);
    if (mode == "adamw") return run_adamw(Reader{in.data()}, w);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
}
