//! Fused LoRA linear forward/backward.
//!
//! CPU (criterion): the fused reference (`x W^T + s (x A^T) B^T` summed before one bf16 store)
//! against the unfused sequence (base matmul, rounded; `x A^T`, rounded; `(s t) B^T`; add), for a
//! dense and an NF4 2048 x 2048 weight at 1, 16 and 256 rows, plus the backward at 256 rows.
//! CUDA (when a device is present): a table of the fused kernels on a resident layer
//! (`kernel | shape | ms | weight GB/s | TFLOP/s`); without a device it prints why it is skipped.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group};
use half::bf16;
use qadapt::lora::{
    AdapterStack, BaseWeight, CudaLoraLinear, LoraGrads, LoraLinear, LoraRef, WeightRef, cpu,
};
use qadapt::nf4::{Nf4Tensor, Statistics};
use qadapt::{Device, FloatVec};
use qadapt_suite::randn;

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

fn layer(n: usize, k: usize, r: usize, nf4: bool) -> LoraLinear {
    let w = randn(n * k, 0.02, 1);
    let weight = if nf4 {
        BaseWeight::Nf4(
            Nf4Tensor::quantize(
                &Device::Cpu,
                &FloatVec::F32(w),
                &[n, k],
                64,
                Statistics::DoubleQuant,
            )
            .unwrap(),
        )
    } else {
        BaseWeight::Dense(bf(&w))
    };
    let adapters = AdapterStack::new(
        r,
        bf(&randn(r * k, 0.02, 2)),
        bf(&randn(n * r, 0.02, 3)),
        vec![2.0],
    )
    .unwrap();
    LoraLinear::new(n, k, weight, None, adapters).unwrap()
}

fn cpu_benches(c: &mut Criterion) {
    let (n, k, r) = (2048usize, 2048usize, 16usize);
    let mut g = c.benchmark_group("lora_cpu");
    g.sample_size(10);
    for nf4 in [false, true] {
        let l = layer(n, k, r, nf4);
        let kind = if nf4 { "nf4" } else { "dense" };
        for m in [1usize, 16, 256] {
            let x = bf(&randn(m * k, 1.0, 4));
            g.bench_with_input(BenchmarkId::new(format!("fused_{kind}"), m), &m, |b, &m| {
                b.iter(|| l.forward(&Device::Cpu, black_box(&x), m, None).unwrap())
            });
            g.bench_with_input(
                BenchmarkId::new(format!("unfused_{kind}"), m),
                &m,
                |b, &m| {
                    let shape = l.shape(m);
                    let w = match &l.weight {
                        BaseWeight::Dense(w) => WeightRef::Dense(w),
                        BaseWeight::Nf4(t) => WeightRef::Nf4 {
                            packed: &t.packed,
                            scales: t.scales.as_ref(),
                            blocksize: t.blocksize,
                        },
                    };
                    let lora = LoraRef {
                        a: &l.adapters.a,
                        b: &l.adapters.b,
                        scales: &l.adapters.scales,
                    };
                    let mut y = vec![bf16::ZERO; m * n];
                    b.iter(|| cpu::forward_unfused(&shape, black_box(&x), w, lora, &mut y).unwrap())
                },
            );
        }
        let m = 256;
        let x = bf(&randn(m * k, 1.0, 5));
        let dy = bf(&randn(m * n, 1.0, 6));
        let mut grads = LoraGrads::zeros(&l);
        g.bench_function(BenchmarkId::new(format!("backward_{kind}"), m), |b| {
            b.iter(|| {
                l.backward(&Device::Cpu, black_box(&x), &dy, m, None, &mut grads)
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// The CUDA table; prints why it is skipped without a device.
fn cuda_table() {
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => unreachable!(),
        Err(e) => {
            println!("lora CUDA benches skipped: {e}");
            return;
        }
    };
    println!("| kernel | shape (m, n, k, r) | ms | weight GB/s | TFLOP/s |");
    println!("|---|---|---|---|---|");
    let (n, k, r) = (4096usize, 4096usize, 16usize);
    for nf4 in [true, false] {
        let l = layer(n, k, r, nf4);
        let d = CudaLoraLinear::upload(&dev, &l).unwrap();
        let weight_bytes = if nf4 { n * k / 2 } else { n * k * 2 } as f64;
        for m in [1usize, 16, 4096] {
            let x = dev.upload(&bf(&randn(m * k, 1.0, 7))).unwrap();
            let mut y = dev.zeros::<bf16>(m * n).unwrap();
            d.forward(&x, m, None, &mut y).unwrap();
            dev.synchronize().unwrap();
            let iters = if m > 16 { 20 } else { 200 };
            let t0 = Instant::now();
            for _ in 0..iters {
                d.forward(&x, m, None, &mut y).unwrap();
            }
            dev.synchronize().unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
            let flops = 2.0 * (m * n * k + m * r * (n + k)) as f64;
            println!(
                "| lora forward {} | ({m}, {n}, {k}, {r}) | {ms:.4} | {:.0} | {:.1} |",
                if nf4 { "nf4" } else { "dense" },
                weight_bytes / (ms * 1e-3) / 1e9,
                flops / (ms * 1e-3) / 1e12
            );
        }
        let m = 4096;
        let x = dev.upload(&bf(&randn(m * k, 1.0, 8))).unwrap();
        let dy = dev.upload(&bf(&randn(m * n, 1.0, 9))).unwrap();
        let mut dx = dev.zeros::<bf16>(m * k).unwrap();
        let mut ga = dev.zeros::<f32>(r * k).unwrap();
        let mut gb = dev.zeros::<f32>(n * r).unwrap();
        d.backward(&x, &dy, m, None, &mut dx, &mut ga, &mut gb)
            .unwrap();
        dev.synchronize().unwrap();
        let iters = 10;
        let t0 = Instant::now();
        for _ in 0..iters {
            d.backward(&x, &dy, m, None, &mut dx, &mut ga, &mut gb)
                .unwrap();
        }
        dev.synchronize().unwrap();
        let ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let flops = 2.0 * (m * n * k + 4 * m * r * (n + k)) as f64;
        println!(
            "| lora backward {} | ({m}, {n}, {k}, {r}) | {ms:.4} | - | {:.1} |",
            if nf4 { "nf4" } else { "dense" },
            flops / (ms * 1e-3) / 1e12
        );
    }
}

criterion_group!(benches, cpu_benches);

fn main() {
    cuda_table();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
